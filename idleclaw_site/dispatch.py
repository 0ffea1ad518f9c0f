"""A cheaper message loop for a channels consumer that handles many small messages.

The node consumer handles a message for every token a node sends, so what channels' loop
costs per message is paid per token (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


async def dispatch_from(
    sources: list[Callable[[], Awaitable[dict[str, Any]]]],
    dispatch: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """Channels' ``await_many_dispatch``, paid once per connection instead of once per message.

    Channels waits for the next message with ``asyncio.wait`` over one fresh task per source,
    every message: a task, a wait and two more turns of the event loop for each token a node
    sends (bench/RESULTS.md). Here each source has one reader task for the whole connection that
    handles its own messages, one message of any source at a time (a lock), so a source still
    waits while its last message is unhandled. The first error of any reader ends them all and
    is raised here, as channels would raise it."""
    lock = asyncio.Lock()

    async def read(source: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        while True:
            message = await source()
            async with lock:
                await dispatch(message)

    readers = [asyncio.create_task(read(source)) for source in sources]
    try:
        done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_EXCEPTION)
        for reader in done:
            reader.result()
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
