"""End to end: a real daphne router, the Ollama emulator and a real contribute.py, with a
hand-written hostile node on a real WebSocket (websocket-client) next to them."""

from __future__ import annotations

import json
import sqlite3
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from nodes.protocol import MAX_FRAME_BYTES, CloseReason
from tests import procs
from tests.conftest import ROOMY_ENV
from tests.e2e.test_skeleton import direct_answer
from tests.security.hostile import EVIL_MODEL, MODEL, chat_body

pytestmark = pytest.mark.e2e


class RawNode:
    """A node written by hand on websocket-client: it sends whatever the test tells it to."""

    def __init__(self, router_url: str) -> None:
        self.ws = websocket.create_connection(router_url.replace("http", "ws", 1) + "/ws/node",
                                              timeout=10)

    def send(self, frame: dict[str, Any] | str) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def register(self, node_id: str, model: str = EVIL_MODEL, **extra: Any) -> dict[str, Any]:
        self.send({"type": "register", "node_id": node_id, "models": [{"name": model}],
                   "max_concurrent": 2, **extra})
        reply = json.loads(self.ws.recv())
        assert reply["type"] == "registered", reply
        return reply

    def close_frame(self) -> tuple[int | None, str]:
        """Read until the router closes the socket; return its (code, reason)."""
        while True:
            # recv_frame, not recv_data: recv_data answers the close frame, and that answer
            # meets a broken pipe when the router has already dropped the connection.
            frame = self.ws.recv_frame()
            if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                if len(frame.data) < 2:
                    return None, ""
                return struct.unpack("!H", frame.data[:2])[0], frame.data[2:].decode()

    def close(self) -> None:
        self.ws.close()


@dataclass
class Network:
    router: procs.Proc
    url: str
    emulator_url: str
    contributor: procs.Proc
    contributor_id: str
    db: Path


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> Iterator[Network]:
    """One router (logging at DEBUG, the most it ever writes), one emulator and one real
    contributor, shared by this module's tests."""
    db = tmp_path_factory.mktemp("security") / "router.sqlite3"
    router, url = procs.start_router(db, {**ROOMY_ENV, "IDLECLAW_LOG_LEVEL": "DEBUG"})
    emulator, emulator_url = procs.start_emulator("--token-delay", "0.03")
    contributor = procs.start_contributor(url, emulator_url, "--max-concurrent", "4")
    try:
        node_id = contributor.wait_for_line(r"registered with \S+ as node (\S+):").group(1)
        procs.wait_until(
            lambda: MODEL in requests.get(f"{url}/api/models", timeout=5).json()["models"],
            what="the contributor's models",
        )
        yield Network(router, url, emulator_url, contributor, node_id, db)
    finally:
        contributor.stop()
        emulator.stop()
        router.stop()


def sse_data(response: requests.Response) -> Iterator[Any]:
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            data = line[len(b"data: "):]
            yield data.decode() if data == b"[DONE]" else json.loads(data)


def chat_text(url: str, prompt: str) -> str:
    with requests.post(f"{url}/api/chat", json=chat_body(prompt), stream=True,
                       timeout=30) as response:
        assert response.status_code == 200
        return "".join(e["choices"][0]["delta"].get("content", "")
                       for e in sse_data(response) if e != "[DONE]")


def test_hostile_node_next_to_a_real_contributor_changes_nothing(network):
    hostile = RawNode(network.url)
    hostile.register("hostile-e2e")
    prompt = "What does a hostile node change?"
    with requests.post(f"{network.url}/api/chat", json=chat_body(prompt), stream=True,
                       timeout=30) as response:
        assert response.status_code == 200
        events = sse_data(response)
        seen = [next(events)]
        # While the contributor streams: frames about requests it was never sent (it cannot see
        # the real id), a heartbeat and a drain in the contributor's name, a takeover attempt
        # of its node id, and an oversize frame.
        for _ in range(3):
            hostile.send({"type": "inference_chunk", "request_id": uuid.uuid4().hex,
                          "chunk": {"message": {"role": "assistant", "content": "INJECTED"},
                                    "done": True}})
        hostile.send({"type": "inference_error", "request_id": uuid.uuid4().hex,
                      "error": "ollama_error"})
        hostile.send({"type": "heartbeat", "node_id": network.contributor_id,
                      "active_requests": 99, "available": False})
        thief = RawNode(network.url)
        thief.send({"type": "register", "node_id": network.contributor_id,
                    "models": [{"name": MODEL}], "resume_token": "guess"})
        thief.close_frame()  # refused; the code is checked below
        thief.close()
        hostile.send("x" * (MAX_FRAME_BYTES + 1))
        hostile.close_frame()
        hostile.close()
        seen += list(events)

    assert seen[-1] == "[DONE]"
    choices = [event["choices"][0] for event in seen[:-1]]
    assert "".join(c["delta"].get("content", "") for c in choices) == direct_answer(
        network.emulator_url, prompt)
    assert choices[-1]["finish_reason"] == "stop"
    # The contributor kept its session and still serves.
    assert "reconnecting" not in network.contributor.output
    details = requests.get(f"{network.url}/api/models", timeout=5).json()["details"]
    assert details[MODEL]["nodes"] == 1
    assert chat_text(network.url, "and now?") == direct_answer(network.emulator_url, "and now?")


@pytest.mark.parametrize("breach", ["takeover", "oversize", "non-json"])
def test_refusals_reach_the_node_with_their_close_code_and_reason(network, breach):
    node = RawNode(network.url)
    if breach == "takeover":
        node.send({"type": "register", "node_id": network.contributor_id,
                   "models": [{"name": MODEL}]})
        expected = (1008, CloseReason.NODE_ID_IN_USE)
    else:
        node.register(f"breach-{breach}")
        node.send("x" * (MAX_FRAME_BYTES + 1) if breach == "oversize" else "{not json")
        expected = ((1009, CloseReason.FRAME_TOO_LARGE) if breach == "oversize"
                    else (1008, CloseReason.INVALID_FRAME))
    assert node.close_frame() == expected
    node.close()


def _deep_frame() -> str:
    depth = 20_000
    return '{"type": "heartbeat", "x": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("breach", ["oversize", "deep"])
def test_node_closed_for_a_protocol_breach_leaves_no_ghost_session(network, breach):
    model = f"ghost-{breach}:1b"
    ghost = RawNode(network.url)
    ghost.register(f"ghost-{breach}", model=model)
    ghost.send("x" * (MAX_FRAME_BYTES + 1) if breach == "oversize" else _deep_frame())
    try:
        ghost.close_frame()
    except (websocket.WebSocketException, OSError):
        pass  # dropped without a close frame
    ghost.close()

    def gone() -> bool:
        return model not in requests.get(f"{network.url}/api/models", timeout=5).json()["models"]

    procs.wait_until(gone, timeout=2, what="the closed node's session to go")


def _table_dump(db: Path) -> str:
    with sqlite3.connect(db) as connection:
        tables = [name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert "nodes_nodesession" in tables and "routing_inflightrequest" in tables
        return "\n".join(repr(row) for table in tables
                         for row in connection.execute(f'SELECT * FROM "{table}"'))


def test_prompts_and_answers_reach_no_log_and_no_database_row(network):
    marker = f"PRIVATE-{uuid.uuid4().hex}"
    prompt = f"My bank PIN is {marker}; remember it."
    served_before = network.contributor.output.count("finished: model=")
    url = network.url
    answer = chat_text(url, prompt)
    assert answer == direct_answer(network.emulator_url, prompt)
    openai = requests.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "system", "content": f"Secret: {marker}"},
                                     {"role": "user", "content": prompt}]})
    assert openai.status_code == 200
    generate = requests.post(f"{url}/ollama/api/generate", timeout=30, json={
        "model": MODEL, "prompt": prompt, "system": marker, "stream": False})
    assert generate.status_code == 200
    # Refused bodies that carry the marker: their error messages must not quote it either.
    refused = [
        requests.post(f"{url}/api/chat", timeout=10, json=chat_body(marker + "x" * 10_000)),
        requests.post(f"{url}/ollama/api/chat", timeout=10, json={
            "model": MODEL, "messages": [{"role": "wizard", "content": marker}]}),
        requests.post(f"{url}/v1/chat/completions", timeout=10, json={
            "model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                       "text": marker}]}]}),
    ]
    assert [r.status_code for r in refused] == [422, 400, 400]
    assert not any(marker in r.text for r in refused)
    procs.wait_until(
        lambda: network.contributor.output.count("finished: model=") >= served_before + 3,
        what="the contributor to log the three answers",
    )
    secrets = [marker, answer, openai.json()["choices"][0]["message"]["content"],
               generate.json()["response"]]

    for proc in (network.router, network.contributor):
        leaked = [line for line in proc.lines if any(s in line for s in secrets)]
        assert leaked == [], f"{proc.name} logged chat text"
    dump = _table_dump(network.db)
    assert not any(s in dump for s in secrets)
    # Deleted rows linger in free pages: the raw files must not hold the text either.
    for path in network.db.parent.glob(network.db.name + "*"):
        raw = path.read_bytes()
        assert not any(s.encode() in raw for s in secrets), path.name


@pytest.fixture(scope="module")
def limited_router(tmp_path_factory) -> Iterator[str]:
    """A router with tight rates: 2 registrations and 2 chats an hour per address.

    The windows are an hour so that a test's requests do not straddle the start of a new window
    (django-ratelimit's windows are fixed): with a minute, a full run once let the third
    through."""
    env = {**ROOMY_ENV, "IDLECLAW_RATE_NODE_REGISTER": "2/h", "IDLECLAW_RATE_CHAT": "2/h"}
    router, url = procs.start_router(tmp_path_factory.mktemp("limited") / "router.sqlite3", env)
    yield url
    router.stop()


def test_chat_rate_holds_through_real_daphne(limited_router):
    url = limited_router
    body = chat_body(model="nobody:1b")
    for _ in range(2):
        assert requests.post(f"{url}/api/chat", json=body, timeout=10).status_code == 503
    # A forged X-Forwarded-For from an untrusted peer changes nothing.
    over = requests.post(f"{url}/v1/chat/completions", json=body, timeout=10,
                         headers={"X-Forwarded-For": "203.0.113.9"})
    assert over.status_code == 429
    assert 1 <= int(over.headers["Retry-After"]) <= 3600
    assert "rate limit" in over.json()["error"]["message"]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_registration_over_the_rate_is_closed_1008_rate_limited(limited_router):
    nodes = [RawNode(limited_router) for _ in range(2)]
    try:
        for i, node in enumerate(nodes):
            node.register(f"rate-{i}")
        # The third socket from this address is refused before it can say anything.
        third = RawNode(limited_router)
        assert third.close_frame() == (1008, CloseReason.RATE_LIMITED)
        third.close()
    finally:
        for node in nodes:
            node.close()
