"""Graceful shutdown: a router told to stop finishes what it is serving before it goes (issue 14).

On SIGTERM (or SIGINT) this process, embedded or one worker of many:
1. stops taking work: ``/health`` answers 503 ``"draining"`` (a proxy's health check takes the
   worker out), new chat requests get a 503 saying the router is restarting, and new node
   connections are closed with ``MOVE_CODE``;
2. tells its nodes to move: each is marked draining at once (no worker gives it new requests)
   and, as soon as it has no request in flight, closed with ``MOVE_CODE`` and ``MOVE_REASON``,
   which ``contribute.py`` answers by reconnecting at once (to another worker behind the proxy,
   or to this router once it is back);
3. lets the streams in flight finish, for up to ``IDLECLAW_SHUTDOWN_GRACE`` seconds;
4. then ends what is left: each remaining stream gets the front end's error event saying the
   router is restarting, and ``[DONE]``; each remaining node is closed; and the process exits 0.

How it hooks in: daphne 4.2.3 registers ``Server.kill_all_applications`` as a Twisted "before
shutdown" trigger, which cancels every application instance at once. Twisted waits for a
Deferred returned by a "before" trigger while the reactor keeps serving, so the wrapped trigger
returns one that drains first and then lets daphne kill whatever is left. The listening ports
stay open until then. ``tests/e2e/test_graceful_shutdown.py`` fails if daphne stops working so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from django.conf import settings

logger = logging.getLogger("idleclaw.shutdown")

# RFC 6455 1012 "Service Restart": the server is restarting, a client may reconnect at once.
MOVE_CODE = 1012
MOVE_REASON = "router restarting"
# How often the drain looks whether the last responses are written.
POLL_SECONDS = 0.1
# The error code a stream cut at the end of the grace period ends with (ERROR_MESSAGES).
RESTARTING = "router_restarting"
# After the grace period: how long cut streams get to write their last event.
FINAL_SECONDS = 2.0


class _State:
    draining = False
    # This process's live relays and node consumers (``routing.streaming.Relay``,
    # ``nodes.consumers.NodeConsumer``); weak, so a forgotten one never holds anything.
    relays: weakref.WeakSet[Any] = weakref.WeakSet()
    nodes: weakref.WeakSet[Any] = weakref.WeakSet()
    # Set when a relay or a node leaves during a drain.
    changed: asyncio.Event | None = None


state = _State()


def draining() -> bool:
    return state.draining


def relay_started(relay: Any) -> None:
    state.relays.add(relay)


def relay_ended(relay: Any) -> None:
    state.relays.discard(relay)
    _changed()


def node_connected(consumer: Any) -> None:
    state.nodes.add(consumer)


def node_gone(consumer: Any) -> None:
    state.nodes.discard(consumer)
    _changed()


def _changed() -> None:
    if state.changed is not None:
        state.changed.set()


async def _until(done: Callable[[], bool], seconds: float) -> None:
    """Wait until ``done()``, at most ``seconds``. Relays ending and nodes leaving set
    ``changed``; a response finishing its last write does not, which the look every
    ``POLL_SECONDS`` notices."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    changed = state.changed
    while not done() and (remaining := deadline - loop.time()) > 0:
        changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(remaining, POLL_SECONDS)):
                await changed.wait()


def _no_requests() -> int:
    return 0


async def drain(grace: float | None = None, requests: Callable[[], int] = _no_requests) -> None:
    """Steps 1-4 above; returns when this process has nothing left to serve, at most
    ``FINAL_SECONDS`` after the grace period. ``requests`` counts the HTTP responses not yet
    complete: still being answered, or with bytes the kernel has not taken yet (a relay ends
    before its response has written its last event, a slow reader leaves bytes waiting)."""
    if state.draining:
        return
    state.draining = True
    state.changed = asyncio.Event()
    grace = settings.IDLECLAW_SHUTDOWN_GRACE if grace is None else grace
    logger.warning(
        "shutting down: %d streams and %d nodes; waiting up to %.0f s for the streams",
        len(state.relays), len(state.nodes), grace,
    )
    try:
        async with asyncio.timeout(grace + FINAL_SECONDS):
            await _finish(grace, requests)
    except TimeoutError:
        logger.warning("shutdown overran its grace period; stopping now")
    logger.warning("shut down")


async def _finish(grace: float, requests: Callable[[], int]) -> None:
    for consumer in list(state.nodes):
        await consumer.move()
    if _single_process():
        # No other worker's node can take a queued request once this one's nodes are moving.
        for relay in list(state.relays):
            if relay.claim is None:
                await relay.abort(RESTARTING)
    await _until(lambda: not (state.relays or state.nodes or requests()), grace)
    if state.relays or state.nodes:
        logger.warning(
            "grace period over: ending %d streams and %d nodes", len(state.relays),
            len(state.nodes),
        )
    for relay in list(state.relays):
        await relay.abort(RESTARTING)
    # The relays cancel their requests on the nodes before the nodes are closed.
    await _until(lambda: not state.relays, FINAL_SECONDS / 2)
    for consumer in list(state.nodes):
        await consumer.leave()
    # Closed nodes end their sessions (other workers' consumers hear of it), the responses write
    # their last bytes.
    await _until(lambda: not (state.nodes or requests()), FINAL_SECONDS / 2)
    await _leave_the_network()


def _single_process() -> bool:
    return settings.CHANNEL_LAYERS["default"]["BACKEND"].endswith("InProcessChannelLayer")


async def _leave_the_network() -> None:
    """Stop this worker's housekeeping for good and remove its liveness row, so the other
    workers need not wait for it to time out. Bounded: a locked or unreachable database does
    not hold the shutdown (the others reap the row then)."""
    from idleclaw_site.db import db
    from nodes import services, worker

    await worker.stop(for_good=True)
    try:
        async with asyncio.timeout(FINAL_SECONDS / 2):
            await db(services.router_worker_leave)(worker_id=worker.WORKER_ID)
    except Exception:
        logger.exception("could not remove this worker's row; the other workers will")


def _exit_if_stuck() -> None:
    """After the reactor has stopped, Python joins the database threads before it exits; one
    stuck on a lock would keep the process alive. Give them ``FINAL_SECONDS``, then exit 0."""

    def exit_now() -> None:
        logger.warning("threads still busy %.0f s after shutdown; exiting", FINAL_SECONDS)
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(FINAL_SECONDS, exit_now)
    timer.daemon = True
    timer.start()


def install() -> None:
    """Make daphne drain before it kills the application instances; idempotent."""
    try:
        from daphne.server import Server
        from daphne.ws_protocol import WebSocketProtocol
        from twisted.internet.defer import Deferred
    except ImportError:  # not served by daphne
        return
    if getattr(Server, "_idleclaw_drain", False):
        return
    kill_all_applications = Server.kill_all_applications

    def drain_then_kill(self: Server) -> Deferred:
        from twisted.internet import reactor, tcp

        def requests() -> int:
            # daphne's connections: protocol -> details, with the application instance (a
            # future) of the request being answered; node WebSockets are counted as nodes.
            answering = sum(
                1
                for protocol, details in list(self.connections.items())
                if not isinstance(protocol, WebSocketProtocol)
                and (instance := details.get("application_instance")) is not None
                and not instance.done()
            )
            # Connections with bytes the kernel has not taken yet wait to be written to.
            unsent = sum(1 for writer in reactor.getWriters() if isinstance(writer, tcp.Server))
            return answering + unsent

        def kill(result: object) -> object:
            if hasattr(result, "getTraceback"):
                logger.error("draining failed: %s", result.getTraceback())
            reactor.addSystemEventTrigger("after", "shutdown", _exit_if_stuck)
            return kill_all_applications(self)

        drained = Deferred.fromFuture(asyncio.ensure_future(drain(requests=requests)))
        drained.addBoth(kill)
        return drained

    Server.kill_all_applications = drain_then_kill
    Server._idleclaw_drain = True
