"""A consumer that stops reading for a while still gets the whole answer, in order.

The router writes to a socket at once while nothing is queued for it, and queues behind the
kernel once the socket is full (``idleclaw_site/prompt_writes.py``). A reader with a tiny
receive buffer that pauses while a long answer streams makes both happen in one response."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from urllib.parse import urlsplit

import pytest

from tests import procs
from tests.conftest import ROOMY_ENV
from tests.e2e.test_skeleton import MODEL, direct_answer, wait_for_model

pytestmark = pytest.mark.e2e

# About 7 MB of SSE: more than the kernel buffers of both ends of a loopback connection hold.
LONG_REPLY_TOKENS = 40_000


@pytest.fixture
def router_env() -> dict[str, str]:
    return {
        **ROOMY_ENV,
        "IDLECLAW_MAX_RESPONSE_CHARS": "10000000",
        "IDLECLAW_NODE_MAX_FRAMES_PER_S": "100000",
    }


@pytest.fixture
def long_emulator():
    proc, url = procs.start_emulator("--reply-tokens", str(LONG_REPLY_TOKENS))
    proc.url = url
    yield proc
    proc.stop()


def sse_content(body: bytes) -> str:
    parts = []
    for line in body.decode("utf-8").split("\n"):
        if line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            parts.append(delta.get("content", ""))
    return "".join(parts)


def ask_with_a_tiny_buffer(url: str) -> http.client.HTTPConnection:
    """Ask for the long answer on a connection whose receive buffer is 4 KB, without reading."""
    address = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect((address.hostname, address.port))
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    connection.sock = sock
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long one"}]}
    connection.request(
        "POST", "/api/chat", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    return connection


def test_a_reader_that_pauses_gets_every_token_in_order(router, long_emulator):
    node = procs.start_contributor(router.url, long_emulator.url)
    try:
        node.wait_for_line("registered")
        wait_for_model(router.url)
        connection = ask_with_a_tiny_buffer(router.url)
        time.sleep(2.0)  # the answer streams meanwhile, into full buffers
        reply = connection.getresponse()
        assert reply.status == 200
        received = reply.read()
        connection.close()
        assert received.endswith(b"data: [DONE]\n\n")
        expected = direct_answer(long_emulator.url, "a long one")
        assert len(expected.split()) == LONG_REPLY_TOKENS
        assert sse_content(received) == expected
    finally:
        node.stop()


def test_a_restart_waits_for_a_slow_reader_to_take_an_answer_that_is_already_complete(
    tmp_path, router_env, long_emulator
):
    # The relay is done and the response complete, but megabytes still wait in the router for
    # a reader that pauses: a restart within the grace period still delivers them.
    router, url = procs.start_router(tmp_path / "slow.sqlite3",
                                     {**router_env, "IDLECLAW_SHUTDOWN_GRACE": "20"})
    node = procs.start_contributor(url, long_emulator.url)
    try:
        node.wait_for_line("registered")
        wait_for_model(url)
        connection = ask_with_a_tiny_buffer(url)
        node.wait_for_line("request .* finished")
        router.signal(signal.SIGTERM)
        time.sleep(1.0)  # the router drains while nobody reads
        reply = connection.getresponse()
        received = reply.read()
        connection.close()
        assert received.endswith(b"data: [DONE]\n\n")
        assert len(sse_content(received).split()) == LONG_REPLY_TOKENS
        assert router.popen.wait(timeout=20) == 0
    finally:
        node.stop()
        router.stop()
