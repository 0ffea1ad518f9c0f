"""consume.py and status.py as a person runs them, against a live router, the Ollama emulator and
a real contribute.py: each prompt source and output mode, the chat, and every exit code.

A second router, with no node and a chat rate of one a minute, gives the answers a busy public
network gives: no node for the model, then 429."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests import procs
from tests.conftest import ROOMY_ENV

pytestmark = pytest.mark.e2e

MODEL = "llama3.2:3b"
THINKER = "qwen3:0.6b"


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """The main router with one contributor sharing the emulator, and a lonely, strict one."""
    folder = tmp_path_factory.mktemp("skill-cli")
    with ThreadPoolExecutor(2) as pool:  # two daphne start-ups overlap
        main = pool.submit(procs.start_router, folder / "main.sqlite3", ROOMY_ENV)
        strict = pool.submit(
            procs.start_router, folder / "strict.sqlite3", {"IDLECLAW_RATE_CHAT": "1/m"}
        )
        emulator, emulator_url = procs.start_emulator()
        (router, router_url), (lonely, lonely_url) = main.result(), strict.result()
    node = procs.start_contributor(router_url, emulator_url, "--max-concurrent", "4")
    try:
        node.wait_for_line("registered")
        procs.wait_until(
            lambda: MODEL in requests.get(f"{router_url}/api/models", timeout=5).json()["models"],
            what="the node's models",
        )
        yield {"router": router_url, "emulator": emulator_url, "lonely": lonely_url}
    finally:
        node.stop()
        for proc in (emulator, router, lonely):  # all at once: each router drains a second
            proc.signal(signal.SIGTERM)
        for proc in (emulator, router, lonely):
            proc.stop()


def run(script: str, *args: str, server: str, stdin: str | None = None):
    """The script as a user runs it; ``stdin`` None leaves it an empty pipe, never a
    terminal."""
    env = {**os.environ, "IDLECLAW_SERVER": server, "NO_PROXY": "*", "no_proxy": "*"}
    return subprocess.run(
        [procs.PYTHON, f"skill_scripts/{script}", *args],
        cwd=procs.ROOT,
        env=env,
        input=stdin or "",
        capture_output=True,
        text=True,
        timeout=60,
    )


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def direct(network, messages, model=MODEL) -> str:
    """What Ollama (the emulator) answers to ``messages`` asked directly."""
    body = {"model": model, "messages": messages, "stream": False, "think": False}
    reply = requests.post(f"{network['emulator']}/api/chat", json=body, timeout=10)
    return reply.json()["message"]["content"]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_prompt_piped_on_stdin_is_answered_exit_0(network):
    result = run(
        "consume.py", "--model", MODEL, server=network["router"], stdin="Why is the sky blue?\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == direct(network, [user("Why is the sky blue?")]) + "\n"
    assert result.stderr == ""


def test_no_stream_prints_the_same_answer_at_once(network):
    result = run(
        "consume.py",
        "--model",
        MODEL,
        "--prompt",
        "all at once",
        "--no-stream",
        server=network["router"],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == direct(network, [user("all at once")]) + "\n"


def test_json_prints_each_event_of_the_stream(network):
    result = run(
        "consume.py", "--model", MODEL, "--prompt", "events", "--json", server=network["router"]
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == direct(network, [user("events")])
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 20


def test_system_prompt_refused_by_this_routers_api_chat_exits_2(network):
    result = run(
        "consume.py",
        "--model",
        MODEL,
        "--prompt",
        "hi",
        "--system",
        "be brief",
        server=network["router"],
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: this router does not take a system prompt on /api/chat; ask without --system"
    )
    assert result.stdout == ""


def test_chat_keeps_the_conversation_switches_model_and_forgets_on_reset(network):
    lines = [
        "Hello there",
        "Tell me more",
        "/model qwen3:0.6b",
        "And now?",
        "/reset",
        "Fresh start",
        "/exit",
        "never sent",
    ]
    result = run(
        "consume.py",
        "--model",
        MODEL,
        "-i",
        server=network["router"],
        stdin="\n".join(lines) + "\n",
    )
    assert result.returncode == 0, result.stderr
    first = direct(network, [user("Hello there")])
    history = [user("Hello there"), {"role": "assistant", "content": first}]
    second = direct(network, [*history, user("Tell me more")])
    history += [user("Tell me more"), {"role": "assistant", "content": second}]
    third = direct(network, [*history, user("And now?")], model=THINKER)
    fresh = direct(network, [user("Fresh start")], model=THINKER)
    assert result.stdout.splitlines() == [first, second, third, fresh]
    assert result.stderr.splitlines() == ["(now asking qwen3:0.6b)", "(conversation forgotten)"]


def test_model_no_node_serves_exits_3_and_points_to_status(network):
    result = run("consume.py", "--model", "mistral:7b", "--prompt", "hi", server=network["router"])
    assert result.returncode == 3
    assert result.stderr == (
        "error: no node serves mistral:7b on this network; retry in 10 s, or run status.py to "
        "see the models on offer\n"
    )


def test_rate_limited_exits_4_with_the_routers_retry_after(network):
    codes, result = [], None
    for _ in range(3):  # 1 a minute: the second ask is refused (the third if a minute turned)
        result = run("consume.py", "--model", MODEL, "--prompt", "hi", server=network["lonely"])
        codes.append(result.returncode)
        if result.returncode == 4:
            break
    assert codes[0] == 3  # no node at all on that router
    assert codes[-1] == 4, codes
    assert re.fullmatch(
        r"error: rate or concurrency limit reached: .*; retry in \d+ s\n", result.stderr
    )


def test_closed_port_exits_1_with_one_line(network):
    closed = f"http://127.0.0.1:{closed_port()}"
    result = run("consume.py", "--model", MODEL, "--prompt", "hi", server=closed)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: cannot reach the IdleClaw router at {closed} (connection refused)\n"
    )


def test_status_table_shows_the_node_its_models_and_measured_speed(network):
    assert (
        run(
            "consume.py", "--model", MODEL, "--prompt", "warm up", server=network["router"]
        ).returncode
        == 0
    )
    result = run("status.py", server=network["router"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1:4] == ["status:    healthy", lines[2], "nodes:     1 online, 4 of 4 slots free"]
    assert re.fullmatch(r"uptime:    \d+s", lines[2])
    row = next(line.split() for line in lines if line.startswith(f"  {MODEL} "))
    assert row[:4] == [MODEL, "1", "4", "0"]
    assert float(row[4]) > 0  # tokens/s, measured from the warm-up answer
    assert row[5:] == ["tools"]
    thinker = next(line.split() for line in lines if line.startswith(f"  {THINKER} "))
    assert thinker[-2:] == ["thinking,", "tools"]


def test_status_json_parses_with_the_routers_answers(network):
    result = run("status.py", "--json", server=network["router"])
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["server"] == network["router"]
    assert status["health"]["node_count"] == 1
    assert {MODEL, THINKER} <= set(status["models"]["models"])
    assert {m["name"] for m in status["network"]["models"]} == set(status["models"]["models"])


def test_status_of_a_router_without_nodes_says_how_to_contribute(network):
    result = run("status.py", server=network["lonely"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [
        "No node is connected. Share your Ollama with this router:",
        f"  IDLECLAW_SERVER={network['lonely']} python3 contribute.py",
    ]


def test_status_of_a_closed_port_is_an_offline_banner_exit_1():
    closed = f"http://127.0.0.1:{closed_port()}"
    result = run("status.py", server=closed)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"IdleClaw router {closed}",
        f"OFFLINE: cannot reach the IdleClaw router at {closed} (connection refused)",
    ]


def test_help_documents_the_exit_codes():
    result = subprocess.run(
        [sys.executable, "skill_scripts/consume.py", "--help"],
        cwd=procs.ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    for code, meaning in [
        ("0", "the answer was printed"),
        ("1", "server or network error"),
        ("2", "usage error"),
        ("3", "no node can take the model"),
        ("4", "rate limited"),
        ("130", "interrupted with Ctrl+C"),
    ]:
        assert re.search(rf"^  {code} +{re.escape(meaning)}", result.stdout, re.M), code
