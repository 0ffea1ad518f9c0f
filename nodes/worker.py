"""This router process: its identity, liveness row and housekeeping loops.

The per-process state is the worker's own id, its loops, and the sessions of its own node
connections heard from since the last write of ``last_seen``; everything other workers need to
know lives in the database. The loops start with the first node connection or API request
(daphne has no ASGI lifespan events).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.conf import settings
from django.utils import timezone

from idleclaw_site.db import db
from nodes import services
from nodes.protocol import EventType, LoadedModel

logger = logging.getLogger("idleclaw.worker")

WORKER_ID = uuid.uuid4().hex
STARTED_AT = timezone.now()

# How often the node sessions heard from are written as one batch; the node timeout (45 s)
# leaves room for a write this late.
SEEN_FLUSH_INTERVAL = 1.0

_loop_task: asyncio.Task[None] | None = None
_flush_task: asyncio.Task[None] | None = None
_ready: asyncio.Event | None = None
# Session id → its consumer's channel, for sessions of this process heard from since the last
# flush. Only this process's consumers add to it, about their own connections, and the database
# stays the truth: a lost entry delays one session's last_seen by a second, nothing more.
_seen: dict[int, str] = {}
# Session id → the models its Ollama has loaded, as its latest heartbeat that changed them said
# (``NodeConsumer`` sends only changes); written with the next flush. As with ``_seen``, the
# database stays the truth and a lost entry is written again at the node's next change.
_loaded: dict[int, tuple[LoadedModel, ...]] = {}
# Set when the worker leaves the network for good (idleclaw_site/shutdown.py).
_left = False


def session_seen(session_id: int, channel_name: str) -> None:
    """A node connection of this process sent a frame; its ``last_seen`` is written at the next
    flush. A dictionary write: cheap enough for every frame."""
    _seen[session_id] = channel_name


def session_loaded(session_id: int, loaded: tuple[LoadedModel, ...]) -> None:
    """A node connection of this process reported other loaded models; written at the next
    flush, so that a heartbeat never waits for the database."""
    _loaded[session_id] = loaded


def session_forget(session_id: int) -> None:
    """The session is over on this process; do not write it again."""
    _seen.pop(session_id, None)
    _loaded.pop(session_id, None)


async def flush_seen_sessions() -> None:
    """Write ``last_seen`` of every session heard from since the last flush in one batch, and
    close the connections whose session row is gone (reaped while their socket lingered)."""
    global _seen
    if not _seen:
        return
    batch, _seen = _seen, {}
    try:
        gone = await db(services.node_sessions_touch)(session_ids=list(batch))
    except BaseException:
        for session_id, channel in batch.items():  # written at the next flush instead
            _seen.setdefault(session_id, channel)
        raise
    layer = get_channel_layer()
    for session_id in gone:
        await layer.send(batch[session_id], {"type": EventType.NODE_GONE})


async def flush_loaded_models() -> None:
    """Write the loaded models reported since the last flush, in one batch."""
    global _loaded
    if not _loaded:
        return
    reports, _loaded = _loaded, {}
    try:
        await db(services.node_models_loaded)(reports=reports)
    except BaseException:
        for session_id, loaded in reports.items():  # a newer report wins
            _loaded.setdefault(session_id, loaded)
        raise


async def notify_orphans(orphans: list[services.Orphan], error: str) -> None:
    """Tell consumers whose node went away that their request failed."""
    from routing import metrics

    layer = get_channel_layer()
    for orphan in orphans:
        metrics.node_error(error)
        await layer.send(
            orphan.reply_channel,
            {"type": EventType.STREAM_ERROR, "request_id": orphan.request_id, "error": error},
        )


async def _housekeeping_once(first: bool) -> None:
    """One beat: keep this worker alive, then tidy what dead or silent peers left."""
    await _beat(first)
    await _tidy()


async def _beat(first: bool) -> None:
    await db(services.router_worker_beat)(
        worker_id=WORKER_ID, started_at=STARTED_AT, leaving=lambda: _left
    )
    # The in-memory layer lives in this process only: any other worker row is a leftover of a
    # previous run and its nodes' channels are gone.
    single = isinstance(get_channel_layer(), InMemoryChannelLayer)
    reaped = await db(services.router_workers_reap)(
        worker_id=WORKER_ID, everyone_else=single and first
    )
    await notify_orphans(reaped.orphans, "node_disconnected")
    await _cancel_on_nodes(reaped.abandoned)


async def _tidy() -> None:
    from routing import metrics
    from routing.services import stale_requests_reap

    await notify_orphans(await db(services.node_sessions_reap)(), "node_disconnected")
    await _cancel_on_nodes(await db(stale_requests_reap)(worker_id=WORKER_ID))
    layer = get_channel_layer()
    for channel in await db(services.banned_sessions)(worker_id=WORKER_ID):
        await layer.send(channel, {"type": "node.banned"})
    await metrics.fold_when_due()


async def _cancel_on_nodes(requests: list[Any]) -> None:
    """Tell nodes to stop requests nobody waits for any more (``request_id``, ``node_channel``)."""
    layer = get_channel_layer()
    for item in requests:
        await layer.send(
            item.node_channel, {"type": EventType.NODE_CANCEL, "request_id": item.request_id}
        )


async def _housekeeping_loop() -> None:
    assert _ready is not None
    first = True
    while True:
        try:
            await _beat(first)
            first = False
            # Ready once this worker is known alive: the tidying below must not hold up nodes
            # and consumers if one of its steps fails.
            _ready.set()
            await _tidy()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("housekeeping failed; retrying")
        await asyncio.sleep(settings.IDLECLAW_WORKER_BEAT)


async def _flush_loop() -> None:
    # Its own task, so that a slow housekeeping step never holds back the liveness writes.
    from routing import metrics

    while True:
        try:
            await flush_seen_sessions()
            await flush_loaded_models()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("writing node last_seen failed; retrying")
        try:
            # What this worker counted for /metrics, and its requests' progress (issue 17).
            await metrics.flush()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("writing counters failed; retrying")
        await asyncio.sleep(SEEN_FLUSH_INTERVAL)


async def _last_counts() -> None:
    """A worker leaving for good writes what it counted since its last flush, for at most a
    second: the database may be why it is shutting down (idleclaw_site/shutdown.py)."""
    from routing import metrics

    try:
        async with asyncio.timeout(1.0):  # not wait_for: CPython gh-86296 on 3.11
            await metrics.flush(progress=False)
    except Exception:
        logger.exception("could not write the last counters")


def _stale(task: asyncio.Task[None] | None, loop: asyncio.AbstractEventLoop) -> bool:
    return task is None or task.done() or task.get_loop() is not loop


async def ensure_started() -> None:
    """Start this worker's loops if they are not running, and wait for its first beat; not
    any more once the worker has left the network (a shutdown)."""
    global _loop_task, _flush_task, _ready
    if _left:
        return
    loop = asyncio.get_running_loop()
    if _stale(_loop_task, loop):
        _ready = asyncio.Event()
        _loop_task = loop.create_task(_housekeeping_loop())
    if _stale(_flush_task, loop):
        _flush_task = loop.create_task(_flush_loop())
    assert _ready is not None
    if not _ready.is_set():
        async with asyncio.timeout(30):  # not wait_for: CPython gh-86296 on 3.11
            await _ready.wait()


async def stop(*, for_good: bool = False) -> None:
    """Stop this worker's loops (tests, and a clean shutdown). ``for_good``: the worker is
    leaving the network, and nothing may start them again (a request arriving meanwhile would,
    and its beat would write the liveness row back)."""
    global _loop_task, _flush_task, _left
    _left = _left or for_good
    if for_good:
        await _last_counts()
    tasks = (_loop_task, _flush_task)
    _loop_task = _flush_task = None
    for task in tasks:
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    _seen.clear()
    _loaded.clear()
