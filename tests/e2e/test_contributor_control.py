"""contribute.py's options as a contributor uses them, against a live router and the emulator:
the drain on Ctrl+C, caps and keep_alive, models that change, pausing for a program or outside
the serving hours, and the JSON log. One router and one emulator for the module; each test's
node shares a model of its own, so that no test sees another's node."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from datetime import datetime, timedelta

import ollama
import openai
import pytest
import requests

from tests import procs
from tests.conftest import ROOMY_ENV

pytestmark = pytest.mark.e2e

CAPPED = "llama3.2:3b"
DRAINING = "drain:1b"
STOPPING = "stopnow:1b"
PAUSING = "paused:1b"
NIGHT = "night:1b"
UPDATED = "updatable:1b"
LATER = "later:1b"
MODELS = [f"{CAPPED},caps=completion+tools", DRAINING, STOPPING, PAUSING, NIGHT, UPDATED, LATER]
GAME = "idleclaw-e2e-game"


def _hours_outside_now() -> str:
    start = datetime.now() + timedelta(hours=2)
    return f"{start:%H:%M}-{start + timedelta(hours=1):%H:%M}"


# Each node's options; all start together (their Python start-ups overlap).
NODES = {
    "capped": [
        "--models",
        CAPPED,
        "--max-ctx",
        "2048",
        "--max-predict",
        "16",
        "--keep-alive",
        "7m",
        "--json-log",
    ],
    "draining": ["--models", DRAINING],
    "stopping": ["--models", STOPPING],
    "pausing": ["--models", PAUSING, "--pause-while", GAME, "--recheck-seconds", "0.3"],
    "night": ["--models", NIGHT, "--hours", _hours_outside_now()],
    "updated": ["--models", f"{UPDATED},{LATER}", "--recheck-seconds", "0.3"],
}


class Network:
    def __init__(self, router: str, emulator: str, nodes: dict[str, procs.Proc]) -> None:
        self.router = router
        self.emulator = emulator
        self.nodes = nodes

    def details(self) -> dict[str, dict]:
        return requests.get(f"{self.router}/api/models", timeout=5).json()["details"]

    def free_slots(self, model: str) -> int | None:
        return self.details().get(model, {}).get("free_slots")

    def emulator_requests(self) -> list[dict]:
        return requests.get(f"{self.emulator}/_emulator/stats", timeout=5).json()["requests"]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    db = tmp_path_factory.mktemp("control") / "router.sqlite3"
    router, router_url = procs.start_router(db, ROOMY_ENV)
    # Answers of 40 tokens, 50 ms apart: two seconds, long enough to stop a node in the middle.
    emulator, emulator_url = procs.start_emulator(
        "--token-delay", "0.05", "--reply-tokens", "40",
        *[arg for spec in MODELS for arg in ("--model", spec)],
    )  # fmt: skip
    nodes = {
        name: procs.start_contributor(router_url, emulator_url, *args)
        for name, args in NODES.items()
    }
    try:
        for node in nodes.values():
            node.wait_for_line("registered")
        shared = Network(router_url, emulator_url, nodes)
        procs.wait_until(lambda: len(shared.details()) == len(MODELS), what="every node's models")
        yield shared
    finally:
        for node in nodes.values():
            node.stop()
        emulator.stop()
        router.stop()


def _stream(network: Network, model: str) -> tuple[requests.Response, threading.Event, list]:
    """Start a streamed /ollama/api/chat; return it, an event set at its first line, and the
    list its lines go to (read by a thread)."""
    response = requests.post(
        f"{network.router}/ollama/api/chat",
        json={"model": model, "messages": [{"role": "user", "content": "a long answer"}]},
        stream=True,
        timeout=20,
    )
    assert response.status_code == 200, response.text
    first = threading.Event()
    lines: list[dict] = []

    def read() -> None:
        for line in response.iter_lines():
            lines.append(json.loads(line))
            first.set()

    threading.Thread(target=read, daemon=True).start()
    assert first.wait(10)
    return response, first, lines


# --------------------------------------------------------------------------- Ctrl+C


def test_ctrl_c_drains_the_node_and_exits_0_once_the_answer_in_flight_is_complete(network):
    node = network.nodes["draining"]
    response, _, lines = _stream(network, DRAINING)
    node.signal(signal.SIGINT)
    node.wait_for_line(r"stopping: finishing 1 request in flight first")
    # The router sends it nothing new: its slots are gone from the network at once.
    procs.wait_until(lambda: network.free_slots(DRAINING) == 0, timeout=5, what="the drain")
    assert node.wait(10) == 0
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    assert len([line for line in lines if line["message"]["content"]]) == 40
    assert "stopped; goodbye" in node.output
    response.close()
    procs.wait_until(lambda: DRAINING not in network.details(), what="the node to be gone")


def test_a_second_ctrl_c_stops_at_once_and_the_answer_ends_with_an_error(network):
    node = network.nodes["stopping"]
    response, _, lines = _stream(network, STOPPING)
    node.signal(signal.SIGINT)
    node.wait_for_line("stopping: finishing 1 request in flight first")
    started = time.monotonic()
    node.signal(signal.SIGINT)
    assert node.popen.wait(5) == 0
    assert time.monotonic() - started < 2.5
    node.wait_for_line("stopping at once: 1 request in flight cancelled")
    procs.wait_until(lambda: lines and "error" in lines[-1], timeout=10, what="the error line")
    assert lines[-1]["error"] == "the node serving this request disconnected"
    assert not any(line.get("done") for line in lines)
    response.close()


# --------------------------------------------------------------------------- caps, keep_alive


def test_a_request_over_the_nodes_caps_is_refused_at_once_naming_the_limit(network):
    client = ollama.Client(host=f"{network.router}/ollama")
    with pytest.raises(ollama.ResponseError) as over:
        client.chat(
            model=CAPPED, messages=[{"role": "user", "content": "x"}], options={"num_ctx": 4096}
        )
    assert over.value.status_code == 400
    assert over.value.error == (
        f"options.num_ctx: at most 2048 for {CAPPED} on this network "
        "(the largest any node serving it allows)"
    )
    oai = openai.OpenAI(base_url=f"{network.router}/v1", api_key="-", max_retries=0)
    with pytest.raises(openai.BadRequestError) as too_long:
        oai.chat.completions.create(
            model=CAPPED, max_tokens=100, messages=[{"role": "user", "content": "x"}]
        )
    assert too_long.value.body["param"] == "max_tokens"
    assert too_long.value.body["message"].startswith(f"max_tokens: at most 16 for {CAPPED}")
    # Neither reached the node's Ollama.
    assert not [r for r in network.emulator_requests() if r["messages"][0]["content"] == "x"]


def test_a_request_within_the_caps_is_served_with_the_nodes_caps_and_keep_alive(network):
    client = ollama.Client(host=f"{network.router}/ollama")
    answer = client.chat(
        model=CAPPED,
        messages=[{"role": "user", "content": "within the caps"}],
        options={"num_ctx": 1024},
        keep_alive=0,  # the node does not let a consumer unload its model
    )
    assert answer.done_reason == "length" and answer.eval_count == 16
    oai = openai.OpenAI(base_url=f"{network.router}/v1", api_key="-", max_retries=0)
    completion = oai.chat.completions.create(
        model=CAPPED, max_tokens=5, messages=[{"role": "user", "content": "five tokens"}]
    )
    assert completion.usage.completion_tokens == 5
    seen = {r["messages"][0]["content"]: r for r in network.emulator_requests()}
    assert seen["within the caps"]["options"] == {"num_ctx": 1024, "num_predict": 16}
    assert seen["within the caps"]["keep_alive"] == "7m"
    assert seen["five tokens"]["options"] == {"num_predict": 5}
    assert seen["five tokens"]["keep_alive"] == "7m"


def test_the_json_log_is_one_object_per_line_with_each_request(network):
    client = ollama.Client(host=f"{network.router}/ollama")
    client.chat(model=CAPPED, messages=[{"role": "user", "content": "logged"}])
    node = network.nodes["capped"]
    node.wait_for_line(r'"event": "request".*"outcome": "finished"')
    events = [json.loads(line) for line in node.lines]  # every line parses
    registered = next(e for e in events if e["event"] == "registered")
    assert registered["models"] == [CAPPED]
    assert registered["limits"] == {"num_ctx": 2048, "num_predict": 16}
    finished = [e for e in events if e["event"] == "request" and e["outcome"] == "finished"]
    assert {e["model"] for e in finished} == {CAPPED}
    assert all(e["tokens"] <= 16 and e["tokens_per_s"] > 0 and e["id"] for e in finished)
    assert all(e["level"] == "info" and e["time"] for e in finished)


# --------------------------------------------------------------------------- pausing


def test_a_node_drains_while_a_named_program_runs_and_serves_again_after(network):
    node = network.nodes["pausing"]
    assert network.free_slots(PAUSING) == 2
    game = subprocess.Popen(["bash", "-c", f"exec -a {GAME} sleep 30"])
    try:
        node.wait_for_line(f"paused: {GAME} is running")
        procs.wait_until(lambda: network.free_slots(PAUSING) == 0, timeout=5, what="the drain")
    finally:
        game.kill()
        game.wait()
    node.wait_for_line(rf"resumed \(was paused: {GAME} is running\)")
    procs.wait_until(lambda: network.free_slots(PAUSING) == 2, timeout=5, what="the undrain")
    answer = ollama.Client(host=f"{network.router}/ollama").chat(
        model=PAUSING, messages=[{"role": "user", "content": "back?"}], options={"num_predict": 2}
    )
    assert answer.done


def test_outside_its_serving_hours_a_node_is_connected_but_takes_no_requests(network):
    node = network.nodes["night"]
    node.wait_for_line(rf"paused: outside the serving hours {NODES['night'][-1]}")
    assert network.details()[NIGHT]["nodes"] == 1
    assert network.free_slots(NIGHT) == 0


# --------------------------------------------------------------------------- Ollama's models


def test_models_removed_from_and_added_to_ollama_reach_the_router(network):
    node = network.nodes["updated"]

    def install(specs: list[str]) -> None:
        status, _ = procs.http_json(f"{network.emulator}/_emulator/models", {"models": specs})
        assert status == 200

    install([spec for spec in MODELS if spec != LATER])
    try:
        node.wait_for_line(f"sharing 1 models: {UPDATED} .*removed: {LATER}")
        procs.wait_until(lambda: LATER not in network.details(), timeout=5, what="the update")
    finally:
        install(MODELS)
    node.wait_for_line(f"added: {LATER}")
    procs.wait_until(lambda: LATER in network.details(), timeout=5, what="the model back")
    assert "registered" not in node.output.split("Ollama's models changed")[1]  # no reconnect
