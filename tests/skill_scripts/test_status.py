"""status.py: the human report, --json, and failures."""

from __future__ import annotations

import json

import pytest
import status

from .conftest import closed_port, run_script, script_env
from .fakes import FakeHTTPServer, send_json

HEALTH = {"status": "healthy", "uptime_seconds": 7380, "node_count": 3}
MODELS = {"models": ["llama3.2:3b", "qwen3:0.6b"],
          "capabilities": {"llama3.2:3b": {"thinking": False, "tool_calls": True},
                           "qwen3:0.6b": {"thinking": True, "tool_calls": True}}}


def router(health=HEALTH, models=MODELS):
    def handle(h):
        if h.path == "/health":
            send_json(h, 200, health)
        elif h.path == "/api/models":
            send_json(h, 200, models)
        else:
            send_json(h, 404, {"detail": "not found"})
    return FakeHTTPServer(handle)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (45, "45s"), (185, "3m 5s"), (7380, "2h 3m"), (90_000, "1d 1h"),
    (None, "unknown"), (-1, "unknown"),
])
def test_uptime_is_human_readable(seconds, text):
    assert status.format_uptime(seconds) == text


def test_report_shows_status_uptime_nodes_and_models():
    with router() as server:
        result = run_script("status.py", env=script_env(IDLECLAW_SERVER=server.url))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "status:  healthy" in out
    assert "uptime:  2h 3m" in out
    assert "nodes:   3" in out
    assert "models:  2" in out
    assert "qwen3:0.6b   thinking, tools" in out


def test_per_model_extension_fields_are_shown():
    models = {"models": [{"name": "llama3.2:3b", "nodes": 2, "free_slots": 3}],
              "capabilities": {}}
    assert status.model_rows(models) == [("llama3.2:3b", "2 nodes, 3 free slots")]
    by_key = {"models": ["a:1b"], "details": {"a:1b": {"nodes": 1, "free_slots": 0}}}
    assert status.model_rows(by_key) == [("a:1b", "1 node, 0 free slots")]


def test_json_prints_the_combined_raw_answers():
    with router() as server:
        result = run_script("status.py", "--json", env=script_env(IDLECLAW_SERVER=server.url))
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"server": server.url, "health": HEALTH,
                                         "models": MODELS}


def test_unreachable_router_exits_1():
    url = f"http://127.0.0.1:{closed_port()}"
    result = run_script("status.py", env=script_env(IDLECLAW_SERVER=url))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: cannot reach the IdleClaw router at {url} (connection refused)")


def test_non_200_or_non_json_exits_1():
    with FakeHTTPServer(lambda h: send_json(h, 502, {"detail": "bad gateway"})) as server:
        bad_status = run_script("status.py", env=script_env(IDLECLAW_SERVER=server.url))

    def not_json(h):
        h.send_response(200)
        h.send_header("Content-Length", "4")
        h.end_headers()
        h.wfile.write(b"<ok>")

    with FakeHTTPServer(not_json) as server:
        bad_body = run_script("status.py", env=script_env(IDLECLAW_SERVER=server.url))
    assert bad_status.returncode == bad_body.returncode == 1
    assert "answered HTTP 502" in bad_status.stderr
    assert "did not answer JSON" in bad_body.stderr


def test_bad_server_exits_2():
    result = run_script("status.py", env=script_env(IDLECLAW_SERVER="ftp://x"))
    assert result.returncode == 2
