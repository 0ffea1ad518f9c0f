"""End to end: a real daphne router, the Ollama emulator, contribute.py, consume.py and
status.py as subprocesses. Only Ollama's weights are faked."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest
import requests

from tests import procs
from tests.conftest import ROOMY_ENV

pytestmark = pytest.mark.e2e

MODEL = "llama3.2:3b"


def direct_answer(emulator_url: str, prompt: str, model: str = MODEL) -> str:
    """What Ollama itself answers, asked directly."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": False,
        "think": False,
    }
    return requests.post(f"{emulator_url}/api/chat", json=body, timeout=10).json()["message"][
        "content"
    ]


def emulator_stats(emulator_url: str) -> dict:
    return requests.get(f"{emulator_url}/_emulator/stats", timeout=5).json()


def wait_for_model(router_url: str, model: str = MODEL, nodes: int = 1) -> None:
    def served() -> bool:
        details = requests.get(f"{router_url}/api/models", timeout=5).json()["details"]
        return details.get(model, {}).get("nodes", 0) >= nodes

    procs.wait_until(served, what=f"{nodes} node(s) serving {model}")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One router, emulator and contributor for the tests that only read from them."""
    router, router_url = procs.start_router(
        tmp_path_factory.mktemp("skeleton") / "router.sqlite3", ROOMY_ENV
    )
    router.url = router_url
    emulator, emulator_url = procs.start_emulator()
    emulator.url = emulator_url
    contributor = procs.start_contributor(router_url, emulator_url)
    try:
        contributor.wait_for_line("registered")
        yield router, emulator, contributor
    finally:
        contributor.stop()
        emulator.stop()
        router.stop()


@pytest.fixture
def contributor(router, emulator):
    proc = procs.start_contributor(router.url, emulator.url)
    proc.wait_for_line("registered")
    yield proc
    proc.stop()


def test_consume_prints_the_complete_answer_in_order(shared):
    router, emulator, contributor = shared
    wait_for_model(router.url)
    result = procs.run_script(
        "consume.py", "--model", MODEL, "--prompt", "hello there", server=router.url
    )
    assert result.returncode == 0, result.stderr
    expected = direct_answer(emulator.url, "hello there")
    assert len(expected.split()) == 20
    assert result.stdout.strip() == expected
    contributor.wait_for_line(r"finished: model=llama3\.2:3b tokens=20")


def test_status_shows_the_node_and_its_models(shared):
    router, _, contributor = shared
    wait_for_model(router.url)
    result = procs.run_script("status.py", server=router.url)
    assert result.returncode == 0, result.stderr
    assert "healthy" in result.stdout
    assert MODEL in result.stdout and "qwen3:0.6b" in result.stdout
    as_json = json.loads(procs.run_script("status.py", "--json", server=router.url).stdout)
    assert as_json["health"]["node_count"] == 1


def test_status_exits_1_when_the_router_is_down(router):
    url = router.url
    router.stop()
    result = procs.run_script("status.py", server=url)
    assert result.returncode == 1
    assert f"OFFLINE: cannot reach the IdleClaw router at {url}" in result.stdout


def test_consume_reports_a_model_nobody_serves(shared):
    router, _, contributor = shared
    wait_for_model(router.url)
    result = procs.run_script(
        "consume.py", "--model", "mistral:7b", "--prompt", "hi", server=router.url
    )
    assert result.returncode == 3
    assert "no node serves mistral:7b" in result.stderr
    assert "status.py" in result.stderr


def test_thinking_arrives_as_reasoning_and_the_answer_as_content(shared):
    router, emulator, contributor = shared
    wait_for_model(router.url, "qwen3:0.6b")
    body = {
        "model": "qwen3:0.6b",
        "messages": [{"role": "user", "content": "think"}],
        "think": True,
    }
    with requests.post(f"{router.url}/api/chat", json=body, stream=True, timeout=10) as reply:
        events = [
            json.loads(line[6:])
            for line in reply.iter_lines(decode_unicode=True)
            if line.startswith("data: {")
        ]
    deltas = [e["choices"][0]["delta"] for e in events]
    reasoning = "".join(d["content"] for d in deltas if d.get("reasoning"))
    content = "".join(d.get("content", "") for d in deltas if not d.get("reasoning"))
    direct = requests.post(
        f"{emulator.url}/api/chat", timeout=10, json={**body, "stream": False}
    ).json()["message"]
    assert reasoning == direct["thinking"]
    assert content == direct["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] > 0


def test_tokens_are_streamed_as_they_are_generated(router, slow_emulator):
    node = procs.start_contributor(router.url, slow_emulator.url)
    try:
        node.wait_for_line("registered")
        wait_for_model(router.url)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "stream please"}]}
        started = time.monotonic()
        with requests.post(f"{router.url}/api/chat", json=body, stream=True, timeout=10) as reply:
            lines = reply.iter_lines(decode_unicode=True)
            first = next(line for line in lines if line.startswith("data: "))
            first_at = time.monotonic() - started
        # 200 tokens at 50 ms take 10 s; the first must come long before the last.
        assert json.loads(first[6:])["choices"][0]["delta"]["content"]
        assert first_at < 3
    finally:
        node.stop()


def test_consumer_hanging_up_stops_generation_at_ollama(router, slow_emulator):
    node = procs.start_contributor(router.url, slow_emulator.url, "--max-concurrent", "1")
    try:
        node.wait_for_line("registered")
        wait_for_model(router.url)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "long story"}]}
        reply = requests.post(f"{router.url}/api/chat", json=body, stream=True, timeout=10)
        lines = reply.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line.startswith("data: "))
        reply.close()
        procs.wait_until(
            lambda: emulator_stats(slow_emulator.url)["chat_cancelled"] == 1,
            timeout=10,
            what="the emulator to see its stream closed",
        )
        stats = emulator_stats(slow_emulator.url)
        assert stats["chat_completed"] == 0
        # The slot is free: with max_concurrent 1, the next request is served.
        procs.wait_until(
            lambda: requests.get(f"{router.url}/health", timeout=5).json()["active_requests"] == 0,
            what="the slot to be freed",
        )
        next_reply = requests.post(f"{router.url}/api/chat", json=body, stream=True, timeout=10)
        assert next_reply.status_code == 200
        next_reply.close()
    finally:
        node.stop()


def test_killing_the_contributor_mid_stream_ends_the_consumer_with_an_error(router, slow_emulator):
    node = procs.start_contributor(router.url, slow_emulator.url)
    node.wait_for_line("registered")
    wait_for_model(router.url)
    consumer = procs.start_consumer(router.url, MODEL, "long story")
    try:
        node.wait_for_line("request .* started")
        time.sleep(0.5)  # a few tokens are on their way
        node.kill()
        code = consumer.wait(15)
        assert code == 1
        assert "error: the node serving this request disconnected" in consumer.output
        # The consumer saw the start of the answer (tokens carry their index), then the error,
        # never the end of it.
        assert re.match(r"[a-z]+0 [a-z]+1 ", consumer.output)
        assert not re.search(r"[a-z]+199\b", consumer.output)
    finally:
        consumer.stop()
    health = requests.get(f"{router.url}/health", timeout=5).json()
    assert health["node_count"] == 0
    assert health["active_requests"] == 0


def test_contributor_reconnects_after_the_router_restarts(tmp_path, emulator, router_env):
    db = tmp_path / "restart.sqlite3"
    first, url = procs.start_router(db, router_env)
    node = procs.start_contributor(url, emulator.url)
    try:
        node.wait_for_line("registered")
        first.stop()
        node.wait_for_line("reconnecting|retrying")
        port = url.rsplit(":", 1)[1]
        second = procs.Proc(
            "router",
            [
                procs.PYTHON,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                port,
                "idleclaw_site.asgi:application",
            ],
            env={"IDLECLAW_SQLITE_PATH": str(db), **router_env},
        )
        try:
            second.wait_for_line("Listening on TCP")
            wait_for_model(url)
            result = procs.run_script(
                "consume.py", "--model", MODEL, "--prompt", "again", server=url
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == direct_answer(emulator.url, "again")
        finally:
            second.stop()
    finally:
        node.stop()
        first.stop()


def test_contributor_exits_with_a_message_when_ollama_is_down(router):
    result = subprocess.run(
        [procs.PYTHON, "skill_scripts/contribute.py"],
        cwd=procs.ROOT,
        env={
            "IDLECLAW_SERVER": router.url,
            "OLLAMA_HOST": "http://127.0.0.1:9",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "Ollama" in result.stderr


def test_ctrl_c_stops_the_contributor_and_removes_its_node(router, emulator):
    node = procs.start_contributor(router.url, emulator.url)
    node.wait_for_line("registered")
    wait_for_model(router.url)
    node.signal(signal.SIGINT)
    assert node.popen.wait(timeout=5) == 0
    procs.wait_until(
        lambda: requests.get(f"{router.url}/health", timeout=5).json()["node_count"] == 0,
        timeout=5,
        what="the node to be removed",
    )
