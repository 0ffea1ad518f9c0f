"""The embedded default's channel layer: channels' in-memory layer without its per-message costs.

Every chunk of every answer crosses the channel layer once, so what the layer does per message
is paid per token. ``InMemoryChannelLayer`` deep-copies each message (to behave like a layer
that serialises), scans every channel for expired messages on each receive (O(connected nodes)
per token), and builds a throwaway ``asyncio.Queue`` on every call (bench/RESULTS.md). Here:

- a message is copied one level deep only. Every sender in this code base builds a fresh event
  and never touches it after sending, and receivers only read, so nothing is shared that anyone
  changes;
- expired messages are swept at most once a second, which keeps the expiry meaningful (a
  message is dropped between ``expiry`` and ``expiry`` + 1 s after it was sent);
- a channel's queue is created only when it is missing.

Capacity, ``ChannelFull``, expiry, groups and flush behave as in the parent class.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer

SWEEP_INTERVAL = 1.0


class InProcessChannelLayer(InMemoryChannelLayer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_sweep = 0.0

    def _queue(self, channel: str) -> asyncio.Queue:
        queue = self.channels.get(channel)
        if queue is None:
            queue = self.channels[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
        return queue

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        assert "__asgi_channel__" not in message
        try:
            self._queue(channel).put_nowait((time.time() + self.expiry, dict(message)))
        except asyncio.QueueFull:
            raise ChannelFull(channel) from None

    async def receive(self, channel: str) -> dict[str, Any]:
        self.require_valid_channel_name(channel)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self._clean_expired()
        queue = self._queue(channel)
        try:
            _, message = await queue.get()
        finally:
            if queue.empty() and self.channels.get(channel) is queue:
                del self.channels[channel]
        return message

    async def flush(self) -> None:
        await super().flush()
        self._next_sweep = 0.0
