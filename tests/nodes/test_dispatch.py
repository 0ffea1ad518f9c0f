"""The node consumer's message loop (``idleclaw_site.dispatch``) keeps the guarantees of
channels' own: each source's messages in order, one message handled at a time, and the first
error ends the loop and is raised."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from channels.exceptions import StopConsumer

from idleclaw_site.dispatch import dispatch_from


def source_of(messages: list[dict]) -> tuple[asyncio.Queue, Callable[[], Awaitable[dict]]]:
    queue: asyncio.Queue = asyncio.Queue()
    for message in messages:
        queue.put_nowait(message)
    return queue, queue.get


async def test_messages_are_handled_one_at_a_time_each_source_in_order():
    _, socket = source_of([{"n": f"s{i}"} for i in range(5)])
    _, layer = source_of([{"n": f"l{i}"} for i in range(5)])
    handled: list[str] = []
    busy = False

    async def dispatch(message: dict) -> None:
        nonlocal busy
        assert not busy, "two messages handled at once"
        busy = True
        await asyncio.sleep(0)  # a handler that waits lets nothing else in
        handled.append(message["n"])
        busy = False
        if len(handled) == 10:
            raise StopConsumer

    with pytest.raises(StopConsumer):
        await asyncio.wait_for(dispatch_from([socket, layer], dispatch), 5)
    assert [n for n in handled if n[0] == "s"] == [f"s{i}" for i in range(5)]
    assert [n for n in handled if n[0] == "l"] == [f"l{i}" for i in range(5)]


async def test_an_error_in_a_source_ends_the_loop_and_stops_the_other_reader():
    waiting = asyncio.Event()

    async def broken() -> dict:
        await waiting.wait()
        raise RuntimeError("layer gone")

    idle_queue, idle = source_of([])

    async def dispatch(message: dict) -> None:
        raise AssertionError("nothing to handle")

    loop = asyncio.create_task(dispatch_from([idle, broken], dispatch))
    await asyncio.sleep(0.01)
    waiting.set()
    with pytest.raises(RuntimeError, match="layer gone"):
        await asyncio.wait_for(loop, 5)
    # The other reader was cancelled: a message put now is never taken.
    idle_queue.put_nowait({"n": "late"})
    await asyncio.sleep(0.01)
    assert idle_queue.qsize() == 1
