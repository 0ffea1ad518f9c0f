"""status.py: the human report, --json, and failures."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time

import pytest
import status

from .conftest import SCRIPTS, closed_port, run_script, script_env
from .fakes import FakeHTTPServer, send_json, start_chunked, write_chunk

HEALTH = {"status": "healthy", "uptime_seconds": 7380, "node_count": 3}
MODELS = {
    "models": ["llama3.2:3b", "qwen3:0.6b"],
    "capabilities": {
        "llama3.2:3b": {"thinking": False, "tool_calls": True},
        "qwen3:0.6b": {"thinking": True, "tool_calls": True},
    },
}


def router(health=HEALTH, models=MODELS, network=None):
    """A router with the base protocol's /health and /api/models, and /network.json only when
    ``network`` is given."""

    def handle(h):
        if h.path == "/health":
            send_json(h, 200, health)
        elif h.path == "/api/models":
            send_json(h, 200, models)
        elif h.path == "/network.json" and network is not None:
            send_json(h, 200, network)
        else:
            send_json(h, 404, {"detail": "not found"})

    return FakeHTTPServer(handle)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (45, "45s"),
        (185, "3m 5s"),
        (7380, "2h 3m"),
        (90_000, "1d 1h"),
        (None, "unknown"),
        (-1, "unknown"),
        (float("nan"), "unknown"),
        (float("inf"), "unknown"),
        (1e308, ">999999d"),
        pytest.param(10**100, ">999999d", id="googol"),
    ],
)
def test_uptime_is_human_readable(seconds, text):
    assert status.format_uptime(seconds) == text


def test_a_base_protocol_router_gets_the_table_with_what_it_says():
    with router() as server:
        result = run_script("status.py", env=script_env(IDLECLAW_SERVER=server.url))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"IdleClaw router {server.url}",
        "status:    healthy",
        "uptime:    2h 3m",
        "nodes:     3 online",
        "models:    2",
        "  MODEL        NODES  FREE  QUEUED  TOKENS/S  CAPABILITIES",
        "  llama3.2:3b      -     -       -         -  tools",
        "  qwen3:0.6b       -     -       -         -  thinking, tools",
    ]


def test_extension_fields_fill_nodes_slots_queue_and_speed():
    health = {**HEALTH, "active_requests": 2, "queued_requests": 1}
    models = {
        **MODELS,
        "details": {
            "llama3.2:3b": {"nodes": 2, "free_slots": 3, "queued": 1},
            "qwen3:0.6b": {"nodes": 1, "free_slots": 0, "queued": 0},
        },
    }
    network = {
        "slots": 6,
        "free_slots": 3,
        "models": [
            {"name": "llama3.2:3b", "tokens_per_s": 41.25},
            {"name": "qwen3:0.6b", "tokens_per_s": None},
        ],
    }
    with router(health, models, network) as server:
        result = run_script("status.py", env=script_env(IDLECLAW_SERVER=server.url))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[3:] == [
        "nodes:     3 online, 3 of 6 slots free",
        "requests:  2 in flight, 1 waiting",
        "models:    2",
        "  MODEL        NODES  FREE  QUEUED  TOKENS/S  CAPABILITIES",
        "  llama3.2:3b      2     3       1      41.2  tools",
        "  qwen3:0.6b       1     0       0         -  thinking, tools",
    ]


def test_json_prints_the_combined_raw_answers():
    with router() as server:
        result = run_script("status.py", "--json", env=script_env(IDLECLAW_SERVER=server.url))
    assert result.returncode == 0
    assert json.loads(result.stdout) == {
        "server": server.url,
        "health": HEALTH,
        "models": MODELS,
        "network": None,
    }


def test_unreachable_router_in_json_says_offline_and_exits_1():
    url = f"http://127.0.0.1:{closed_port()}"
    result = run_script("status.py", "--json", env=script_env(IDLECLAW_SERVER=url))
    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        "server": url,
        "offline": True,
        "error": f"cannot reach the IdleClaw router at {url} (connection refused)",
    }


def test_watch_clears_the_screen_on_a_terminal_and_appends_reports_to_a_pipe():
    with router() as server:
        env = script_env(IDLECLAW_SERVER=server.url)
        piped = run_script("status.py", "--watch", "1", "--count", "2", env=env)
        # On a terminal each report is drawn over the last: it starts by clearing the screen.
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "status.py"), "--watch", "--count", "1"],
            env=env,
            stdout=follower,
            stderr=subprocess.PIPE,
        )
        os.close(follower)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
        on_terminal = os.read(leader, 65536).decode()
        os.close(leader)
    assert piped.returncode == 0, piped.stderr
    assert "\x1b" not in piped.stdout
    reports = piped.stdout.split("\n\n")
    assert [r.splitlines()[0] for r in reports if r] == [f"IdleClaw router {server.url}"] * 2
    assert "every 1 s; Ctrl+C stops" in reports[1]
    assert on_terminal.startswith(status.CLEAR_SCREEN + f"IdleClaw router {server.url}")
    assert "every 5 s; Ctrl+C stops" in on_terminal


def test_draining_router_is_shown_as_draining():
    def handle(h):  # a router shutting down answers /health with a 503 and its status
        if h.path == "/health":
            send_json(h, 503, {**HEALTH, "status": "draining"})
        else:
            send_json(h, 200, MODELS)

    with FakeHTTPServer(handle) as server:
        result = run_script("status.py", env=script_env(IDLECLAW_SERVER=server.url))
    assert result.returncode == 0, result.stderr
    assert "status:    draining" in result.stdout


def test_non_200_or_non_json_exits_1():
    with FakeHTTPServer(lambda h: send_json(h, 502, {"detail": "bad gateway"})) as server:
        bad_status = run_script("status.py", env=script_env(IDLECLAW_SERVER=server.url))

    def not_json(h):
        h.send_response(200)
        h.send_header("Content-Length", "4")
        h.end_headers()
        h.wfile.write(b"<ok>")

    def endless(h):  # a JSON string that never ends: status.py stops reading at 5 MB
        start_chunked(h, "application/json")
        write_chunk(h, b'"')
        try:
            for _ in range(1000):
                write_chunk(h, b"x" * 65536)
        except OSError:
            pass

    with FakeHTTPServer(not_json) as server:
        bad_body = run_script("status.py", env=script_env(IDLECLAW_SERVER=server.url))
    with FakeHTTPServer(endless) as server:
        huge_body = run_script("status.py", env=script_env(IDLECLAW_SERVER=server.url))
    assert bad_status.returncode == bad_body.returncode == huge_body.returncode == 1
    assert "OFFLINE: " in bad_status.stdout and "answered HTTP 502" in bad_status.stdout
    assert "OFFLINE: " in bad_body.stdout and "did not answer JSON" in bad_body.stdout
    assert huge_body.stdout.endswith("/health answered over 5 MB\n")


def test_bad_server_exits_2():
    result = run_script("status.py", env=script_env(IDLECLAW_SERVER="ftp://x"))
    assert result.returncode == 2


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_a_hostile_routers_nan_infinity_and_huge_figures_are_shown_bounded_and_json_is_strict():
    health = {"status": "healthy", "uptime_seconds": float("inf"), "node_count": 10**100}
    models = {
        "models": ["good:1b", "odd:1b"],
        "details": {
            "good:1b": {"nodes": 10**100, "free_slots": 2, "tokens_per_s": 1e308},
            "odd:1b": {"nodes": 1, "free_slots": 10**400, "tokens_per_s": -(10**400)},
        },
    }
    network = {
        "slots": 3,
        "free_slots": float("nan"),
        "models": [{"name": "good:1b", "tokens_per_s": float("nan")}, {"name": ["x"]}, "odd:1b"],
    }
    with router(health, models, network) as server:
        env = script_env(IDLECLAW_SERVER=server.url)
        shown = run_script("status.py", env=env)
        printed = run_script("status.py", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[2:] == [
        "uptime:    unknown",
        "nodes:     >999999 online",
        "models:    2",
        "  MODEL      NODES     FREE  QUEUED  TOKENS/S  CAPABILITIES",
        "  good:1b  >999999        2       -   >999999  -",
        "  odd:1b         1  >999999       -         -  -",
    ]
    assert printed.returncode == 0, printed.stderr
    answer = _strict(printed.stdout)
    assert answer["health"]["uptime_seconds"] is None
    assert answer["network"]["free_slots"] is None
    assert answer["health"]["node_count"] == 10**100


def test_tens_of_thousands_of_models_are_tabled_in_linear_time():
    names = [f"m{i}:1b" for i in range(20_000)]
    models = {"models": names, "details": {name: {"nodes": 1} for name in names}}
    network = {"models": [{"name": name, "tokens_per_s": 1.0} for name in names]}
    started = time.monotonic()
    rows = status.model_rows(models, network)
    assert time.monotonic() - started < 2.0
    assert [row.name for row in rows] == names
    assert rows[-1].nodes == 1 and rows[-1].tokens_per_s == 1.0


def test_a_redirect_is_not_followed_and_exits_1():
    with (
        router() as elsewhere,
        FakeHTTPServer(
            lambda h: send_json(h, 302, {}, {"Location": f"{elsewhere.url}/health"})
        ) as redirecting,
    ):
        result = run_script("status.py", env=script_env(IDLECLAW_SERVER=redirecting.url))
    assert result.returncode == 1
    assert elsewhere.requests == []
    assert result.stdout.splitlines()[1] == (
        f"OFFLINE: {redirecting.url}/health answered HTTP 302, a redirect to "
        f"{elsewhere.url}/health, which is not followed"
    )
