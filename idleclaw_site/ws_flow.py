"""Flow control on node sockets: the router reads a node's frames no faster than it handles them.

daphne 4.2.3 (with autobahn 26.10.2 on Twisted 26.10.0) reads a WebSocket's socket whenever the
kernel has bytes, up to 64 KB a read (``tcp.Connection.bufferSize``); autobahn parses every frame
of the read in that one callback and daphne puts each into the connection's unbounded
``asyncio.Queue`` for the application. A node streaming one token per frame sends ~150 bytes a
frame, so one read queues ~400 frames, and under load the queue of a busy node holds hundreds:
a new request's first token waits behind all of them, and the loop turns that parse and drain
them are long (issue 13, bench/RESULTS.md).

Here a node socket reads at most ``READ_BYTES`` at a time, and its reading pauses
(``pauseProducing``) once ``PAUSE_AT`` frames wait in its queue and resumes when the consumer
has taken it down to ``RESUME_AT``: the rest waits in the kernel and, once that is full, in the
node, which TCP slows down, as the ``websockets`` library bounds its own queue (``max_queue``).

Pings are answered by autobahn inside the protocol, so they escape both this queue and the
node consumer's frame allowance: ``WebSocketProtocol.onPing`` is wrapped to allow a node
``PINGS_PER_S`` (bursts of ``PING_BURST``) and to drop a connection that pings while more than
``MAX_UNSENT_BYTES`` wait to be written to it (it is not reading).

How it hooks in: ``WebSocketProtocol.applicationCreateWorked`` (called once with the queue
daphne made in ``Server.create_application``, before the first frame) is wrapped to give that
queue ``FrameQueue``'s methods (a subclass of ``asyncio.Queue`` that adds no state the base
class lacks, so the instance's class can change) and the transport its read size.
``tests/test_ws_flow.py`` fails if daphne or Twisted stop working this way.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

# Frames queued for the node consumer at which the socket stops being read, and at which it
# is read again. A frame costs the consumer ~30 us, so a full queue is ~1 ms of work.
PAUSE_AT = 32
RESUME_AT = 8
# Bytes read from a node socket at a time: ~100 one-token frames, parsed in one callback.
READ_BYTES = 16 * 1024
# Pings a node may send: autobahn answers each with a pong inside the protocol, so they reach
# neither the frame allowance nor the queue above. A node that pings without reading made the
# router keep every pong: 74 -> 418 MB in 20 s (red team, issue 14). Heartbeats are frames, not
# pings; a WebSocket library's keep-alive pings every ~20 s.
PINGS_PER_S = 5.0
PING_BURST = 20.0
# Bytes waiting to be written to a node beyond which a ping is not answered but the connection
# dropped: the node is not reading what it asks for.
MAX_UNSENT_BYTES = 1024 * 1024


class FrameQueue(asyncio.Queue):
    """A connection's queue of ASGI messages that pauses the socket's reading when it is long.

    ``transport`` is set once the queue is made the connection's (``install``)."""

    transport: Any = None
    paused: bool = False

    def put_nowait(self, item: Any) -> None:
        super().put_nowait(item)
        if not self.paused and self.qsize() >= PAUSE_AT and self.transport is not None:
            self.paused = True
            self.transport.pauseProducing()

    def get_nowait(self) -> Any:
        item = super().get_nowait()
        if self.paused and self.qsize() <= RESUME_AT:
            self.paused = False
            if self.transport.connected and not self.transport.disconnecting:
                self.transport.resumeProducing()
        return item


def install() -> None:
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # not served by daphne (tests with WebsocketCommunicator)
        return
    if getattr(WebSocketProtocol, "_idleclaw_flow", False):
        return
    original = WebSocketProtocol.applicationCreateWorked

    def application_create_worked(self: Any, application_queue: asyncio.Queue) -> None:
        if type(application_queue) is asyncio.Queue and self.transport is not None:
            application_queue.__class__ = FrameQueue
            application_queue.transport = self.transport
            if hasattr(self.transport, "bufferSize"):
                self.transport.bufferSize = READ_BYTES
        original(self, application_queue)

    def on_ping(self: Any, payload: bytes) -> None:
        now = time.monotonic()
        allowance = min(
            PING_BURST,
            getattr(self, "_idleclaw_pings", PING_BURST)
            + (now - getattr(self, "_idleclaw_pinged", now)) * PINGS_PER_S,
        )
        self._idleclaw_pinged = now
        self._idleclaw_pings = allowance - 1
        if allowance < 1 or unsent_bytes(self.transport) > MAX_UNSENT_BYTES:
            self.dropConnection(abort=True)
            return
        on_ping_original(self, payload)

    on_ping_original = WebSocketProtocol.onPing
    WebSocketProtocol.applicationCreateWorked = application_create_worked
    WebSocketProtocol.onPing = on_ping
    WebSocketProtocol._idleclaw_flow = True


def unsent_bytes(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds that the kernel has not taken yet."""
    if transport is None:
        return 0
    buffered = getattr(transport, "dataBuffer", b"")
    return len(buffered) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)
