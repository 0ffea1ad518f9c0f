"""Bound what an HTTP connection costs the router before its request is in (issue 12).

Under daphne 4.2.3 HTTP is parsed by Twisted 26.10.0's ``HTTPChannel``, which caps a request
head's size (16 KiB, 500 headers) but not the time it takes, nor the body:

- **Bodies are buffered whole.** ``Request.gotLength`` stores any body in ``request.content``
  (a temporary file above 100,000 bytes), and daphne's ``WebRequest.process`` then reads all of
  it into the application's queue before the application sees a byte: a 1,000 MB POST took the
  router to 1.14 GB of memory before the view could refuse it. Here a body over the API's limit
  (``routing.validation.MAX_BODY_BYTES``, the number the views check) is refused with a 413 in
  the API's own JSON shape as soon as it is known to be too big: at once from
  ``Content-Length``, or when a chunked body crosses the limit; then the connection is closed
  without reading the rest. The admin has no form near that size, so it gets the same limit.
  A body in more than ``MAX_BODY_PIECES`` pieces (one-byte chunks) is refused the same way,
  with a 400: each piece costs the event loop work.
- **A request may take forever.** ``HTTPChannel``'s idle timeout (``timeOut``, 60 s) restarts
  on every byte received, so a head trickled a line at a time, or a body trickled a byte at a
  time (held in memory or in a temporary file meanwhile), never times out, and any number of
  such connections may come from one address until the process runs out of descriptors. Here a
  connection must complete a request head within ``IDLECLAW_HTTP_HEAD_TIMEOUT`` seconds of
  opening, or of the end of its previous response when it is kept alive (an idle kept-alive
  connection is waiting for a head like a new one), and then its body within
  ``IDLECLAW_HTTP_BODY_TIMEOUT`` seconds of the head, or it gets a 408 in the API's shape.
  Until its whole request is in, a connection is pending: one address may hold
  ``IDLECLAW_MAX_PENDING_CONNECTIONS_PER_IP`` pending connections; more are closed as they are
  accepted. Reverse proxies in ``IDLECLAW_TRUSTED_PROXIES`` are exempt from that cap (all their
  clients share their address; the proxy bounds its own clients' requests), not from the
  timeouts.
- **Descriptors.** The soft ``RLIMIT_NOFILE`` is raised to the hard limit, and pending
  connections may hold all but ``IDLECLAW_RESERVED_DESCRIPTORS`` of it (at least half), a body
  buffered in a temporary file counting as a second descriptor: when they would take more, the
  one due soonest is closed to make room, so a new connection (a health check, a node) always
  gets in and the rest of the table stays free for requests being answered and for node
  sockets.

Once its request is complete the connection is the application's: a WebSocket after its
upgrade, or a request streaming its answer, is not affected.

How it hooks in, without rewriting Twisted's parser:
- ``daphne.http_protocol.HTTPFactory.buildProtocol`` is wrapped: it decides admission (a
  factory returning ``None`` refuses the connection, ``IProtocolFactory.buildProtocol``), makes
  requests ``GuardedRequest``s, and hooks ``makeConnection``/``connectionLost`` on the one
  protocol instance it returns.
- ``GuardedRequest`` is daphne's ``WebRequest`` with Twisted's request hooks overridden:
  ``gotLength`` (called once the head is complete, with the declared length or ``None`` for a
  chunked body), ``handleContentChunk`` (each piece of body), ``requestReceived`` (called
  once the whole body is in; at once after ``gotLength`` when there is none) and ``finish``.
- A refusal is shaped after the request's path, which ``HTTPChannel`` keeps in ``_path`` from
  the request line on (``tests/security/test_http_intake.py`` fails if any of this changes).
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections import OrderedDict
from typing import Any

from daphne.http_protocol import HTTPFactory, WebRequest
from django.conf import settings

from idleclaw_site import net, request_ids

logger = logging.getLogger("idleclaw.http")

# How often, at most, refused and closed connections are reported in the log.
REPORT_INTERVAL = 10.0
# Pieces a body may arrive in. Twisted decodes a chunked body one chunk at a time on the event
# loop, about 5 us each: a megabyte sent as one-byte chunks (6 MB on the wire) would hold the
# loop for 5 s. A body sent in reads of a segment each stays far below this (1 MB in 1,460-byte
# segments is 685 pieces); 10,000 pieces cost about 50 ms.
MAX_BODY_PIECES = 10_000


def install() -> None:
    """Put the guard in front of every HTTP connection daphne accepts; idempotent."""
    if getattr(HTTPFactory, "_idleclaw_http_guard", False):
        return
    raise_descriptor_limit()
    guard = IntakeGuard(
        head_timeout=settings.IDLECLAW_HTTP_HEAD_TIMEOUT,
        body_timeout=settings.IDLECLAW_HTTP_BODY_TIMEOUT,
        per_ip=settings.IDLECLAW_MAX_PENDING_CONNECTIONS_PER_IP,
        reserved_descriptors=settings.IDLECLAW_RESERVED_DESCRIPTORS,
        exempt=settings.IDLECLAW_TRUSTED_PROXIES,
    )
    GuardedRequest.guard = guard
    build_protocol = HTTPFactory.buildProtocol

    def buildProtocol(self: Any, addr: Any) -> Any:
        connection = guard.admit(getattr(addr, "host", None))
        if connection is None:
            return None
        protocol = build_protocol(self, addr)
        if protocol is None:
            guard.forget(connection)
            return None
        protocol.requestFactory = GuardedRequest
        make_connection = protocol.makeConnection
        connection_lost = protocol.connectionLost

        def makeConnection(transport: Any) -> None:
            connection.transport = transport
            # Requests find their connection through the transport they share with the channel.
            transport._idleclaw_intake = connection
            make_connection(transport)

        def connectionLost(reason: Any) -> None:
            guard.forget(connection)
            connection_lost(reason)

        protocol.makeConnection = makeConnection
        protocol.connectionLost = connectionLost
        return protocol

    HTTPFactory.buildProtocol = buildProtocol
    HTTPFactory._idleclaw_http_guard = True


def raise_descriptor_limit() -> int:
    """Raise the soft limit on open descriptors to the hard limit; return the soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the descriptor limit from %s to %s: %s", soft, hard,
                           exc)
    return soft


def descriptor_limit() -> int | None:
    """The process's soft limit on open descriptors, read each time: an operator may change it
    on a running process (prlimit)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


class PendingConnection:
    """A connection between accept (or its last response) and a complete request: first its
    head, then its body."""

    __slots__ = ("ip", "transport", "deadline", "queue", "descriptors", "request", "closed")

    def __init__(self, ip: str | None) -> None:
        self.ip = ip  # None: not counted against any address
        self.transport: Any = None
        self.deadline = 0.0
        self.queue: OrderedDict[PendingConnection, None] | None = None  # None: not pending
        self.descriptors = 1  # its socket, and the temporary file its body may be buffered in
        self.request: GuardedRequest | None = None  # whose body is due, once its head is in
        self.closed = False


class IntakeGuard:
    """Connections waiting for a request head or body: per-address counts, deadlines, eviction.

    ``heads`` and ``bodies`` are each ordered by deadline, since every connection in one gets
    the same timeout: their first entries are the next to expire, so one timer serves them all,
    and every step is O(1) per connection.
    """

    def __init__(self, *, head_timeout: float, body_timeout: float, per_ip: int,
                 reserved_descriptors: int, exempt: list[str]) -> None:
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.per_ip = per_ip
        self.reserved_descriptors = reserved_descriptors
        self.exempt = net.networks(tuple(exempt))
        self.heads: OrderedDict[PendingConnection, None] = OrderedDict()
        self.bodies: OrderedDict[PendingConnection, None] = OrderedDict()
        self.by_ip: dict[str, int] = {}
        self.descriptors = 0  # held by pending connections
        self._timer: Any = None
        self._timer_due = 0.0
        self._refused = self._heads_expired = self._bodies_expired = self._evicted = 0
        self._reported_at = time.monotonic() - REPORT_INTERVAL  # the first is reported at once
        self._report_later: Any = None

    def admit(self, host: str | None) -> PendingConnection | None:
        """A new connection from ``host``: its record, or None to refuse it."""
        ip = None if host is None or self._is_exempt(host) else host
        if ip is not None and self.by_ip.get(ip, 0) >= self.per_ip:
            self._refused += 1
            self._report()
            return None
        self._make_room(1)
        connection = PendingConnection(ip)
        self.wait(connection)
        return connection

    def room(self) -> int:
        """How many descriptors connections waiting for a head or body may hold at once."""
        limit = descriptor_limit()
        if limit is None:
            return 1 << 62
        return max(limit - self.reserved_descriptors, limit // 2)

    def wait(self, connection: PendingConnection) -> None:
        """``connection`` is waiting for a request head from now on."""
        if connection.closed or connection.queue is not None:
            return
        connection.descriptors = 1
        self.descriptors += 1
        if connection.ip is not None:
            self.by_ip[connection.ip] = self.by_ip.get(connection.ip, 0) + 1
        self._enqueue(connection, self.heads, self.head_timeout)

    def body_due(self, connection: PendingConnection, request: GuardedRequest, *,
                 descriptors: int) -> None:
        """The head of ``request`` is complete: its body is due within the body timeout, and
        the connection now holds ``descriptors`` (a temporary file for the body is one more)."""
        if connection.queue is None:
            return
        del connection.queue[connection]
        grown = descriptors - connection.descriptors
        self.descriptors += grown
        connection.descriptors = descriptors
        connection.request = request
        self._enqueue(connection, self.bodies, self.body_timeout)
        if grown > 0:
            self._make_room(0, keep=connection)

    def request_received(self, connection: PendingConnection) -> None:
        """A whole request is in: the connection no longer counts until its response is done."""
        if connection.queue is None:
            return
        del connection.queue[connection]
        connection.queue = None
        connection.request = None
        self.descriptors -= connection.descriptors
        if connection.ip is not None:
            left = self.by_ip[connection.ip] - 1
            if left:
                self.by_ip[connection.ip] = left
            else:
                del self.by_ip[connection.ip]

    def forget(self, connection: PendingConnection) -> None:
        """The connection is closed (or about to be)."""
        self.request_received(connection)
        connection.closed = True

    def _is_exempt(self, host: str) -> bool:
        return bool(self.exempt) and net.in_networks(host, self.exempt)

    def _enqueue(self, connection: PendingConnection,
                 queue: OrderedDict[PendingConnection, None], timeout: float) -> None:
        connection.deadline = time.monotonic() + timeout
        connection.queue = queue
        queue[connection] = None  # the latest deadline in its queue: appended at the end
        if self._timer is None or connection.deadline < self._timer_due:
            self._arm()

    def _next_due(self, keep: PendingConnection | None = None) -> PendingConnection | None:
        """The pending connection whose deadline comes first, ``keep`` aside."""
        due = None
        for queue in (self.heads, self.bodies):
            for connection in queue:
                if connection is not keep:
                    if due is None or connection.deadline < due.deadline:
                        due = connection
                    break
        return due

    def _make_room(self, needed: int, *, keep: PendingConnection | None = None) -> None:
        """Close the connections due soonest until ``needed`` more descriptors fit."""
        room = self.room()
        while self.descriptors + needed > room:
            due = self._next_due(keep)
            if due is None:
                break
            self.forget(due)
            self._evicted += 1
            if due.transport is not None:
                due.transport.abortConnection()  # its descriptors are needed now
        if self._evicted:
            self._report()

    def _arm(self) -> None:
        from twisted.internet import reactor

        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        due = self._next_due()
        if due is None:
            self._timer = None
            return
        self._timer_due = due.deadline
        self._timer = reactor.callLater(max(due.deadline - time.monotonic(), 0.0), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        while (due := self._next_due()) is not None and due.deadline <= now:
            request = due.request
            self.forget(due)
            if request is not None:
                self._bodies_expired += 1
                request.body_overdue(self.body_timeout)
            else:
                self._heads_expired += 1
            if due.transport is not None:
                _close(due.transport, grace=self.head_timeout)
        self._arm()
        if self._heads_expired or self._bodies_expired:
            self._report()

    def _report(self) -> None:
        from twisted.internet import reactor

        now = time.monotonic()
        if now - self._reported_at < REPORT_INTERVAL:
            # Once the interval is over, even if nothing else happens by then.
            if self._report_later is None:
                self._report_later = reactor.callLater(
                    self._reported_at + REPORT_INTERVAL - now, self._report_pending)
            return
        if self._report_later is not None:
            if self._report_later.active():
                self._report_later.cancel()
            self._report_later = None
        logger.warning(
            "HTTP intake: %d connections refused (over %d waiting from one address), "
            "%d closed without a request head within %ss, %d without a whole body within %ss "
            "of its head, %d closed to keep descriptors free",
            self._refused, self.per_ip, self._heads_expired, self.head_timeout,
            self._bodies_expired, self.body_timeout, self._evicted,
        )
        self._refused = self._heads_expired = self._bodies_expired = self._evicted = 0
        self._reported_at = now

    def _report_pending(self) -> None:
        self._report_later = None
        self._report()


def _close(transport: Any, *, grace: float) -> None:
    """Close after what is already written (a kept-alive connection's last response may still
    be on its way), and abort if that has not happened within ``grace`` seconds."""
    from twisted.internet import reactor

    transport.loseConnection()
    reactor.callLater(grace, transport.abortConnection)  # a no-op once it is closed


class GuardedRequest(WebRequest):
    """daphne's request, refusing an oversized body before it is buffered, and telling the
    guard when its head is complete, when its body is, and when its connection waits for the
    next request."""

    guard: IntakeGuard  # set by install()
    _body_bytes = 0
    _body_pieces = 0
    _refused = False

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        self._intake = getattr(channel.transport, "_idleclaw_intake", None)
        super().__init__(channel, *args, **kwargs)

    def gotLength(self, length: int | None) -> None:
        too_big = length is not None and length > body_limit()
        super().gotLength(0 if too_big else length)
        if self._intake is not None and length != 0:
            # The head is in; the connection stays pending until the body is too (red-team F2:
            # a trickled body held its buffer and descriptor without bound). Without a body the
            # request is received right after this, so it stays on its head's deadline.
            # Twisted buffers a body in memory when it declares fewer than 100,000 bytes, and
            # otherwise in a temporary file: one more descriptor.
            in_memory = isinstance(self.content, io.BytesIO)
            self.guard.body_due(self._intake, self, descriptors=1 if in_memory else 2)
        if too_big:
            self._refuse(413, f"request body is larger than {body_limit()} bytes")

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return  # what was read along with the head: dropped with the connection
        self._body_bytes += len(data)
        self._body_pieces += 1
        if self._body_bytes > body_limit():
            self._refuse(413, f"request body is larger than {body_limit()} bytes")
        elif self._body_pieces > MAX_BODY_PIECES:
            self._refuse(400, f"request body arrives in more than {MAX_BODY_PIECES} pieces")
        else:
            super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return  # a chunked body that ended in the bytes already read: never served
        if self._intake is not None:
            self.guard.request_received(self._intake)
        super().requestReceived(command, path, version)

    def body_overdue(self, timeout: float) -> None:
        """The body did not arrive within ``timeout`` seconds of the head: answer 408 (the guard
        closes the connection)."""
        if not self._refused:
            self._refuse(408, f"request body not received within {timeout:g} s of its head")

    def finish(self) -> None:
        channel = getattr(self, "channel", None)
        if self._intake is not None and channel is not None and channel.persistent:
            # Before Twisted replays any pipelined bytes, which may complete the next head.
            self.guard.wait(self._intake)
        super().finish()

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        # No "100 Continue" after the answer: Twisted sends it after gotLength returns.
        self.requestHeaders.removeHeader(b"expect")
        self.channel.write(refusal(getattr(self.channel, "_path", b"/"), status, message))
        self.channel.loseConnection()  # unread bytes are left unread


def body_limit() -> int:
    """The largest request body the router reads, the one the API views check."""
    from routing.validation import MAX_BODY_BYTES

    return MAX_BODY_BYTES


REASONS = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Content Too Large"}


def refusal(target: bytes, status: int, message: str) -> bytes:
    """A complete response closing the connection, in the JSON shape of the API that the
    request ``target`` belongs to."""
    from routing.views import error_for_path

    path = target.split(b"?", 1)[0].decode("latin-1")
    response = error_for_path(path, status, message)
    body = response.content
    head = (
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status])
        + b"Content-Type: " + response["Content-Type"].encode("latin-1") + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        + request_id_line()
        + _cors_lines(path)
        + b"Connection: close\r\n\r\n"
    )
    return head + body


def _cors_lines(path: str) -> bytes:
    """With CORS open to every origin (``IDLECLAW_CORS_ORIGINS`` ``*``, the default), what
    django-cors-headers would add to an API answer, so that a page sees the 413 or 408 rather
    than a failed fetch. With a list of origins the request's ``Origin`` would have to be
    checked; those refusals then carry none, and a page sees a failed fetch."""
    if not settings.CORS_ALLOW_ALL_ORIGINS or not re.match(settings.CORS_URLS_REGEX, path):
        return b""
    exposed = ", ".join(settings.CORS_EXPOSE_HEADERS)
    return (
        b"Access-Control-Allow-Origin: *\r\n"
        + f"Access-Control-Expose-Headers: {exposed}\r\n".encode("latin-1")
    )


def request_id_line() -> bytes:
    """The ``x-request-id`` of every API answer, here for a request no view ever saw."""
    return f"{request_ids.HEADER}: {request_ids.new_id()}\r\n".encode()
