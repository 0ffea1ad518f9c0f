"""Flow control on node sockets (``idleclaw_site/ws_flow.py``): a node that sends frames faster
than the router handles them is read no faster, and its answers still arrive whole and in order.

The guard tests at the end fail if daphne, Twisted or asyncio stop working the way the hook
relies on (issue 13: every patch of a third-party internal is guarded)."""

from __future__ import annotations

import asyncio
import inspect
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import websocket
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import tcp

from idleclaw_site import ws_flow
from tests import procs
from tests.e2e.test_sanitizer_e2e import Node, sse

MODEL = "sanitizer-test:1b"
# ~2.5 MB of frames sent without a pause: far more than the router handles in the time the
# node takes to write them, so reading pauses and resumes many times.
TOKENS = 20_000


@pytest.fixture
def router_env(router_env: dict[str, str]) -> dict[str, str]:
    return {
        **router_env,
        "IDLECLAW_MAX_RESPONSE_CHARS": "10000000",
        "IDLECLAW_NODE_MAX_FRAMES_PER_S": "1000000",
    }


@pytest.mark.e2e
def test_a_flood_of_frames_from_a_node_arrives_whole_and_in_order(router):
    node = Node(router.url)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "stream": True}
    with ThreadPoolExecutor(1) as pool:
        def consume() -> list[Any]:
            with requests.post(f"{router.url}/v1/chat/completions", json=body, stream=True,
                               timeout=120) as response:
                assert response.status_code == 200
                return sse(response)

        reply = pool.submit(consume)
        request_id = node.request_id()
        for i in range(TOKENS):
            node.chunk(request_id, f"{i} ")
        node.chunk(request_id, "", done=True)
        events = reply.result(timeout=120)
    node.close()
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "".join(f"{i} " for i in range(TOKENS))
    health = requests.get(f"{router.url}/health", timeout=5)
    assert health.status_code == 200


class Transport:
    """Twisted's side of a connection as the queue sees it: counts pauses and resumes."""

    connected = True
    disconnecting = False

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self.paused += 1

    def resumeProducing(self) -> None:  # noqa: N802
        self.resumed += 1


def test_the_queue_pauses_reading_when_long_and_resumes_when_drained():
    async def scenario() -> tuple[int, int, list[int]]:
        queue: asyncio.Queue = asyncio.Queue()
        queue.__class__ = ws_flow.FrameQueue  # as install() does
        queue.transport = transport = Transport()
        for i in range(ws_flow.PAUSE_AT + 10):
            queue.put_nowait(i)
        assert (transport.paused, transport.resumed) == (1, 0)
        got = []
        while queue.qsize() > ws_flow.RESUME_AT + 1:
            got.append(await queue.get())
        assert transport.resumed == 0
        got.append(await queue.get())
        return transport.paused, transport.resumed, got

    paused, resumed, got = asyncio.run(scenario())
    assert (paused, resumed) == (1, 1)
    assert got == list(range(len(got)))


# Guards: what ws_flow relies on in the libraries it hooks.

def test_daphne_still_gives_each_websocket_a_plain_asyncio_queue_fed_by_put_nowait():
    create = inspect.getsource(Server.create_application)
    assert "input_queue = asyncio.Queue()" in create
    assert "receive=input_queue.get" in create
    assert list(inspect.signature(WebSocketProtocol.applicationCreateWorked).parameters) == [
        "self", "application_queue"]
    on_message = inspect.getsource(WebSocketProtocol.onMessage)
    assert "self.application_queue.put_nowait(" in on_message


def test_asyncio_queue_get_still_takes_items_through_get_nowait():
    assert "return self.get_nowait()" in inspect.getsource(asyncio.Queue.get)
    # The class swap needs the same instance layout: FrameQueue adds no slots.
    assert "__slots__" not in vars(ws_flow.FrameQueue)


def test_twisted_still_reads_a_connection_bufferSize_bytes_at_a_time():  # noqa: N802
    assert "self.bufferSize" in inspect.getsource(tcp.Connection.doRead)
    # Pausing a connection stops reading its socket; resuming starts it again.
    assert "self.stopReading()" in inspect.getsource(tcp.Connection.pauseProducing)
    assert "self.startReading()" in inspect.getsource(tcp.Connection.resumeProducing)


def test_install_wraps_daphne_once():
    ws_flow.install()
    ws_flow.install()
    assert WebSocketProtocol._idleclaw_flow
    assert WebSocketProtocol.applicationCreateWorked.__name__ == "application_create_worked"


@pytest.mark.e2e
def test_a_node_flooding_pings_without_reading_is_dropped(router):
    # autobahn answers pings itself, out of reach of the frame allowance; a node that pings
    # and never reads made the router keep every pong (74 -> 418 MB in 20 s).
    node = Node(router.url)
    node.ws.settimeout(5)
    dropped = False
    try:
        for _ in range(2000):
            node.ws.ping(b"x" * 100)
    except (OSError, websocket.WebSocketException):
        dropped = True
    if not dropped:
        try:
            while True:  # the pongs answered before the limit, then the end
                opcode, _ = node.ws.recv_data(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
        except (OSError, websocket.WebSocketException):
            pass
        dropped = True
    procs.wait_until(
        lambda: requests.get(f"{router.url}/health", timeout=5).json()["node_count"] == 0,
        what="the pinging node to be dropped",
    )
    assert dropped


def test_autobahn_still_answers_pings_in_on_ping_and_can_drop_a_connection():
    from autobahn.websocket.protocol import WebSocketProtocol as Base

    assert "self.sendPong(payload)" in inspect.getsource(Base.onPing)
    assert "abort" in inspect.signature(Base.dropConnection).parameters
    from twisted.internet import abstract

    for name in ("self.dataBuffer", "self.offset", "self._tempDataLen"):
        assert name in inspect.getsource(abstract.FileDescriptor)
