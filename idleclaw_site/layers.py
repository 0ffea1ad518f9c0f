"""The channel layers: channels' own, without costs paid per token.

``InProcessChannelLayer`` is the embedded default; ``RedisChannelLayer`` serves several workers.

The embedded default's channel layer is channels' in-memory layer without its per-message costs.

Every chunk of every answer crosses the channel layer once, so what the layer does per message
is paid per token. ``InMemoryChannelLayer`` deep-copies each message (to behave like a layer
that serialises), scans every channel for expired messages on each receive (O(connected nodes)
per token), and builds a throwaway ``asyncio.Queue`` on every call (bench/RESULTS.md). Here:

- a message is copied one level deep only. Every sender in this code base builds a fresh event
  and never touches it after sending, and receivers only read, so nothing is shared that anyone
  changes;
- expired messages are swept at most once a second, which keeps the expiry meaningful (a
  message is dropped between ``expiry`` and ``expiry`` + 1 s after it was sent);
- a channel's queue is created only when it is missing;
- a channel name is checked once, not on every message.

Capacity, ``ChannelFull``, expiry, groups and flush behave as in the parent class.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer as ChannelsRedisLayer

SWEEP_INTERVAL = 1.0
VALID_NAMES_REMEMBERED = 4096
# Messages the Redis layer's pump takes off a worker's key in one round trip, beyond the first.
PUMP_BATCH = 256

logger = logging.getLogger("idleclaw.layers")


class InProcessChannelLayer(InMemoryChannelLayer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_sweep = 0.0
        self._valid_names: set[str] = set()

    def require_valid_channel_name(self, name: str, receive: bool = False) -> bool:
        """Channels' check (a regular expression) once per name rather than on every send and
        receive of every token; the names of a few thousand recent channels are remembered."""
        if name in self._valid_names and not receive:
            return True
        super().require_valid_channel_name(name, receive)
        if len(self._valid_names) >= VALID_NAMES_REMEMBERED:
            self._valid_names.clear()
        self._valid_names.add(name)
        return True

    def _queue(self, channel: str) -> asyncio.Queue:
        queue = self.channels.get(channel)
        if queue is None:
            queue = self.channels[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
        return queue

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        self.send_now(channel, message)

    def send_now(self, channel: str, message: dict[str, Any]) -> None:
        """``send`` as a plain call. This layer never waits to deliver, so a sender on the event
        loop can skip the coroutine (and a task to await it in): the node consumer does, for
        every frame of chunks."""
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

    def receive_now(self, channel: str) -> dict[str, Any] | None:
        """The channel's next message if one is already waiting, else None, without waiting: a
        receiver just handed one message can take those queued behind it in the same step (the
        relay writes them to its consumer together)."""
        self.require_valid_channel_name(channel)
        queue = self.channels.get(channel)
        if queue is None or queue.empty():
            return None
        _, message = queue.get_nowait()
        if queue.empty() and self.channels.get(channel) is queue:
            del self.channels[channel]
        return message

    async def flush(self) -> None:
        await super().flush()
        self._next_sweep = 0.0


# Drop expired messages, refuse a full channel, add the message and renew the key's expiry: what
# channels-redis does in four commands, in one atomic script. Returns 0 when the channel is full.
_SEND_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class RedisChannelLayer(ChannelsRedisLayer):
    """channels-redis with one round trip to Redis per message sent and one per message
    received, instead of four and three.

    ``send`` in channels-redis awaits ZREMRANGEBYSCORE, ZCOUNT, ZADD and EXPIRE one after the
    other: every chunk and every request sent to a node paid four round trips in a row before
    the receiving worker could see it (bench/RESULTS.md). The script does the same in one,
    atomically, so the capacity check cannot race another sender either.

    Receiving, channels-redis runs a clean-up script, BZPOPMIN, then copies the popped message
    to a backup set, and after delivery a task removes it from there. The backup is restored
    only if the receiver is cancelled while writing it; a cancellation during BZPOPMIN itself
    (redis-py then drops the connection and the reply) loses the message with or without it.
    Here a receive is the BZPOPMIN alone, and nothing waits between the pop and the delivery.
    A message lost on the way is still caught: chunks are numbered (a gap ends the answer with
    an error) and a request a node never got runs into the stall timeout and fails over.

    Process-local channels (every relay's and node connection's) are received through one pump
    per process into per-channel inboxes (``receive``), so no receiver's cancellation can lose
    another's message. Storage, capacity, expiry and the receiving of shared channels are
    channels-redis's own.
    """

    _send_script: Any = None
    # Sends waiting for the next pipeline, per connection index: (key, args, future).
    _outgoing: dict[int, list[tuple[str, list[Any], asyncio.Future[Any]]]] | None = None
    _senders: dict[int, asyncio.Task[None]] | None = None

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send through the script above, in order, through one connection per Redis server:
        sends made while a pipeline is on its way go together in the next one (``_sending``).
        A worker relaying many streams pays a round trip per batch rather than per message, and
        never needs more connections than it has servers: with one per concurrent send, 200
        streams ran redis-py's pool out of its 100 connections, and their chunks were lost
        (issue 14's benchmark)."""
        assert isinstance(message, dict), "message is not a dict"
        assert self.require_valid_channel_name(channel), "Channel name not valid"
        assert "__asgi_channel__" not in message
        key_name = channel
        if "!" in channel:
            if channel.startswith(self._own_prefix):
                # A channel of this very process (a node and its consumer on the same worker):
                # straight into its inbox, without the round trip through Redis.
                self._deliver_here(channel, message)
                return
            # A process-local channel: its messages live in the process's key and carry the
            # full name, as channels-redis stores them.
            message = {**message, "__asgi_channel__": channel}
            key_name = self.non_local_name(channel)
            index = self.consistent_hash(channel)
        else:
            index = next(self._send_index_generator)
        now = time.time()
        args = [
            int(now) - int(self.expiry),
            self.get_capacity(channel),
            now,
            self.serialize(message),
            int(self.expiry),
        ]
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._outgoing is None or self._senders is None:
            self._outgoing, self._senders = {}, {}
        self._outgoing.setdefault(index, []).append((self.prefix + key_name, args, future))
        sender = self._senders.get(index)
        if sender is None or sender.done():
            self._senders[index] = loop.create_task(self._sending(index))
        # A cancelled sender stops waiting at once; its message may still go out.
        if not await future:
            raise ChannelFull()

    async def _sending(self, index: int) -> None:
        """Send what is waiting for server ``index``, one pipeline at a time, until nothing is.
        Each sender learns its own result: sent, refused because the channel is full, or the
        error Redis gave."""
        connection = self.connection(index)
        if self._send_script is None:
            # EVALSHA with the script's digest, not the script text with every message.
            self._send_script = connection.register_script(_SEND_SCRIPT)
        while batch := self._outgoing.pop(index, None):
            try:
                pipe = connection.pipeline(transaction=False)
                for key, args, _ in batch:
                    await self._send_script(keys=[key], args=args, client=pipe)
                results = await pipe.execute()
            except asyncio.CancelledError:
                for *_, future in batch:
                    future.cancel()
                raise
            except Exception as error:
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (*_, future), added in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(added)

    async def _brpop_with_clean(self, index: int, channel: str, timeout: int) -> bytes | None:
        popped = await self.connection(index).bzpopmin(channel, timeout=timeout)
        return None if popped is None else popped[1]

    async def _clean_receive_backup(self, index: int, channel: str) -> None:
        return  # nothing was backed up

    # --- process-local channels: one pump per process, inboxes per channel ------------------

    _pump: asyncio.Task[None] | None = None
    _inboxes: dict[str, _Inbox] | None = None

    async def receive(self, channel: str) -> dict[str, Any]:
        """A process-local channel's next message, from its inbox.

        All process-local channels of a worker share one Redis key. channels-redis has whichever
        receiver holds a lock pop from it for everyone; when that receiver is cancelled while
        its BZPOPMIN is under way (a relay's timeout while it waits in the queue, a consumer
        hanging up), the message popped for another channel is lost: 58 of 1,000 chunks in
        ``tests/scaleout/test_channel_layer.py``, "part of the answer was lost" under load.
        Here one pump task, which no receiver can cancel, pops messages (many per round trip
        when they queue up) into per-channel inboxes, and a receiver only waits on its inbox."""
        if not channel.startswith(self._own_prefix):
            return await super().receive(channel)  # a shared channel (or another prefix's)
        assert self.require_valid_channel_name(channel)
        self._start_pump()
        inbox = self._inbox(channel)
        inbox.waiting += 1
        try:
            return await inbox.queue.get()
        finally:
            inbox.waiting -= 1
            inbox.touched = time.monotonic()

    def receive_now(self, channel: str) -> dict[str, Any] | None:
        """The next message already in a process-local channel's inbox, without waiting (the
        relay writes what arrived together in one go)."""
        inbox = (self._inboxes or {}).get(channel)
        if inbox is None or inbox.queue.empty():
            return None
        return inbox.queue.get_nowait()

    def _inbox(self, channel: str) -> _Inbox:
        if self._inboxes is None:
            self._inboxes = {}
        inbox = self._inboxes.get(channel)
        if inbox is None:
            inbox = self._inboxes[channel] = _Inbox(
                queue=asyncio.Queue(), touched=time.monotonic()
            )
        return inbox

    def _start_pump(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._pumping())

    async def _pumping(self) -> None:
        real_channel = self._own_prefix
        key = self.prefix + real_channel
        connection = self.connection(self.consistent_hash(real_channel))
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while True:
            try:
                popped = await connection.bzpopmin(key, timeout=self.brpop_timeout)
                batch = []
                if popped is not None:
                    batch.append(popped[1])
                    # What queued up meanwhile, in the same order, in one more round trip.
                    batch.extend(raw for raw, _ in await connection.zpopmin(key, PUMP_BATCH))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("receiving from Redis failed; retrying in 1 s")
                await asyncio.sleep(1.0)
                continue
            for raw in batch:
                self._deliver(self.deserialize(raw))
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                self._sweep_inboxes(now)

    @property
    def _own_prefix(self) -> str:
        """The start of every channel name ``new_channel`` gives this process."""
        return f"specific.{self.client_prefix}!"

    def _deliver_here(self, channel: str, message: dict[str, Any]) -> None:
        """A message for a channel of this process, sent by this process: its inbox's capacity
        is the channel's, as Redis would have enforced it."""
        inbox = self._inbox(channel)
        if inbox.queue.qsize() >= self.get_capacity(channel):
            raise ChannelFull()
        inbox.queue.put_nowait(dict(message))

    def _deliver(self, message: dict[str, Any]) -> None:
        targets = message.pop("__asgi_channel__", None)
        for channel in targets if isinstance(targets, list) else [targets]:
            if not isinstance(channel, str):
                continue
            inbox = self._inbox(channel)
            if inbox.queue.qsize() >= self.get_capacity(channel):
                # A receiver this far behind has stopped: its chunks are numbered, so the gap
                # ends its answer with an error rather than growing without bound.
                logger.warning("dropped a message for %s: its inbox is full", channel)
                continue
            inbox.queue.put_nowait(message)

    def _sweep_inboxes(self, now: float) -> None:
        """Forget inboxes nobody is waiting on that have been quiet for the expiry: messages that
        came after their receiver was done (a late chunk, a wake-up)."""
        stale = [
            channel
            for channel, inbox in self._inboxes.items()
            if not inbox.waiting and now - inbox.touched > self.expiry
        ]
        for channel in stale:
            del self._inboxes[channel]

    async def flush(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump
            self._pump = None
        self._inboxes = None
        await super().flush()


@dataclass
class _Inbox:
    queue: asyncio.Queue
    touched: float  # when a receive last ended, or the inbox was made
    waiting: int = 0  # receivers waiting on it now
