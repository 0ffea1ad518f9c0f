"""This router process: its identity, liveness row and housekeeping loop.

The only per-process state is the worker's own id and its loop; everything other workers need
to know lives in the database. The loop starts with the first node connection or API request
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
from nodes.protocol import EventType

logger = logging.getLogger("idleclaw.worker")

WORKER_ID = uuid.uuid4().hex
STARTED_AT = timezone.now()

_loop_task: asyncio.Task[None] | None = None
_ready: asyncio.Event | None = None


async def notify_orphans(orphans: list[services.Orphan], error: str) -> None:
    """Tell consumers whose node went away that their request failed."""
    layer = get_channel_layer()
    for orphan in orphans:
        await layer.send(
            orphan.reply_channel,
            {"type": EventType.STREAM_ERROR, "request_id": orphan.request_id, "error": error},
        )


async def _housekeeping_once(first: bool) -> None:
    """One beat: keep this worker alive, then tidy what dead or silent peers left."""
    await _beat(first)
    await _tidy()


async def _beat(first: bool) -> None:
    await db(services.router_worker_beat)(worker_id=WORKER_ID, started_at=STARTED_AT)
    # The in-memory layer lives in this process only: any other worker row is a leftover of a
    # previous run and its nodes' channels are gone.
    single = isinstance(get_channel_layer(), InMemoryChannelLayer)
    reaped = await db(services.router_workers_reap)(
        worker_id=WORKER_ID, everyone_else=single and first
    )
    await notify_orphans(reaped.orphans, "node_disconnected")
    await _cancel_on_nodes(reaped.abandoned)


async def _tidy() -> None:
    from routing.services import stale_requests_reap

    await notify_orphans(await db(services.node_sessions_reap)(), "node_disconnected")
    await _cancel_on_nodes(await db(stale_requests_reap)(worker_id=WORKER_ID))
    layer = get_channel_layer()
    for channel in await db(services.banned_sessions)(worker_id=WORKER_ID):
        await layer.send(channel, {"type": "node.banned"})


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


async def ensure_started() -> None:
    """Start this worker's loop if it is not running, and wait for its first beat."""
    global _loop_task, _ready
    loop = asyncio.get_running_loop()
    if _loop_task is None or _loop_task.done() or _loop_task.get_loop() is not loop:
        _ready = asyncio.Event()
        _loop_task = loop.create_task(_housekeeping_loop())
    assert _ready is not None
    if not _ready.is_set():
        async with asyncio.timeout(30):  # not wait_for: CPython gh-86296 on 3.11
            await _ready.wait()


async def stop() -> None:
    """Stop this worker's loop (tests, and a clean shutdown)."""
    global _loop_task
    task, _loop_task = _loop_task, None
    if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
