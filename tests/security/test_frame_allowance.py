"""The frame allowance against a real daphne (issue 12, defect 12): an honest node that sends one
frame per token, as the network's existing nodes do, is never cut while it serves all its slots
at full speed; a node that floods frames its requests do not explain still is."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from nodes.protocol import CloseReason
from tests import procs
from tests.conftest import ROOMY_ENV
from tests.security.hostile import MODEL, chat_body
from tests.security.test_e2e import RawNode, sse_data

pytestmark = pytest.mark.e2e

SLOTS = 10
TOKENS_PER_S = 500
SECONDS = 3
TOKENS = TOKENS_PER_S * SECONDS


@pytest.fixture(scope="module")
def router_url(tmp_path_factory) -> Iterator[str]:
    # The frame limits are the defaults: those are what the issue is about.
    router, url = procs.start_router(tmp_path_factory.mktemp("frames") / "router.sqlite3",
                                     ROOMY_ENV)
    try:
        yield url
    finally:
        router.stop()


def consume(url: str, prompt: str, body: dict | None = None) -> tuple[str, str | None]:
    """One streamed answer: its text and finish reason."""
    text, finish = [], None
    body = {**(body or chat_body()), "messages": [{"role": "user", "content": prompt}]}
    with requests.post(f"{url}/api/chat", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        for event in sse_data(response):
            if event == "[DONE]":
                break
            choice = event["choices"][0]
            text.append(choice["delta"].get("content", ""))
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


def stream_paced(node: RawNode, request_ids: list[str], tokens: int, rate: float) -> None:
    """Every request's answer, ``rate`` tokens a second each, one frame per token."""
    started = time.monotonic()
    sent = 0
    while sent < tokens:
        due = min(tokens, int((time.monotonic() - started) * rate) + 1)
        for index in range(sent, due):
            for request_id in request_ids:
                node.send({"type": "inference_chunk", "request_id": request_id,
                           "chunk": {"message": {"role": "assistant", "content": f"{index} "},
                                     "done": False}})
        sent = due
        time.sleep(0.01)
    for request_id in request_ids:
        node.send({"type": "inference_chunk", "request_id": request_id,
                   "chunk": {"message": {"role": "assistant", "content": ""}, "done": True,
                             "done_reason": "stop"}})


def test_a_node_streaming_every_slot_at_500_tokens_a_second_is_never_cut(router_url):
    node = RawNode(router_url)
    node.register("fast-node", model=MODEL, max_concurrent=SLOTS)
    with ThreadPoolExecutor(SLOTS) as pool:
        answers = [pool.submit(consume, router_url, f"question {i}") for i in range(SLOTS)]
        request_ids = [json.loads(node.ws.recv())["request_id"] for _ in range(SLOTS)]
        stream_paced(node, request_ids, TOKENS, TOKENS_PER_S)
        expected = "".join(f"{i} " for i in range(TOKENS))
        for answer in answers:
            assert answer.result(timeout=60) == (expected, "stop")
    # Still connected and serving: it answers one more request.
    with ThreadPoolExecutor(1) as pool:
        last = pool.submit(consume, router_url, "one more")
        request_id = json.loads(node.ws.recv())["request_id"]
        stream_paced(node, [request_id], 5, TOKENS_PER_S)
        assert last.result(timeout=30) == ("0 1 2 3 4 ", "stop")
    node.close()


def test_an_instant_model_answering_every_slot_at_once_is_not_cut(router_url):
    """A fast model's answers arrive as bursts far above any sustained rate: each request
    brings a burst of its own."""
    node = RawNode(router_url)
    node.register("instant-node", model="instant:1b", max_concurrent=SLOTS)
    tokens = 1_000
    with ThreadPoolExecutor(SLOTS) as pool:
        body = chat_body(model="instant:1b")
        answers = [pool.submit(consume, router_url, f"q{i}", body) for i in range(SLOTS)]
        request_ids = [json.loads(node.ws.recv())["request_id"] for _ in range(SLOTS)]
        stream_paced(node, request_ids, tokens, rate=1e9)  # no pacing: all at once
        expected = "".join(f"{i} " for i in range(tokens))
        for answer in answers:
            assert answer.result(timeout=60) == (expected, "stop")
    node.close()


def test_a_node_flooding_one_request_far_beyond_any_model_is_cut(router_url):
    node = RawNode(router_url)
    node.register("flood-node", model="flood:1b", max_concurrent=SLOTS)
    consumer = threading.Thread(target=lambda: requests.post(
        f"{router_url}/api/chat", json=chat_body(model="flood:1b"), timeout=30).close())
    consumer.start()
    request_id = json.loads(node.ws.recv())["request_id"]
    frame = json.dumps({"type": "inference_chunk", "request_id": request_id,
                        "chunk": {"message": {"role": "assistant", "content": "x"},
                                  "done": False}})
    # 20,000 frames as fast as they go: many times what one request at any real speed explains.
    try:
        for _ in range(20_000):
            node.send(frame)
    except OSError:
        pass  # closed while still sending
    assert node.close_frame() == (1008, CloseReason.RATE_LIMITED)
    consumer.join(30)


def test_a_node_flooding_frames_for_no_request_is_cut(router_url):
    node = RawNode(router_url)
    node.register("idle-flooder")
    heartbeat = json.dumps({"type": "heartbeat", "node_id": "idle-flooder"})
    try:
        for _ in range(2_000):
            node.send(heartbeat)
    except OSError:
        pass
    assert node.close_frame() == (1008, CloseReason.RATE_LIMITED)
