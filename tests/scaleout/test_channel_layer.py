"""The Redis channel layer exactly as settings configure it, against a real Redis."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from channels.exceptions import ChannelFull

from idleclaw_site.layers import RedisChannelLayer
from tests.scaleout.cluster import load_settings

pytestmark = pytest.mark.scaleout


@pytest.fixture
async def layer(monkeypatch, redis_url):
    config = load_settings(monkeypatch, REDIS_URL=redis_url)["CHANNEL_LAYERS"]["default"]
    assert config["BACKEND"] == "idleclaw_site.layers.RedisChannelLayer"
    layer = RedisChannelLayer(**config["CONFIG"])
    yield layer
    await layer.flush()


async def test_cancelling_a_send_is_never_swallowed(layer):
    # A relay is cancelled when its consumer hangs up or a stall timeout fires, often while it
    # sends to Redis. With a socket timeout, redis-py sends through asyncio.wait_for, which on
    # Python 3.11 returns normally when the cancellation lands as the send completes (CPython
    # gh-86296): two thirds of these cancellations were lost, and the node kept generating.
    swallowed = 0
    for _ in range(200):
        channel = f"test.{uuid.uuid4().hex}"

        async def sending(channel: str = channel) -> None:
            while True:
                await layer.send(channel, {"type": "stream.chunk"})

        task = asyncio.create_task(sending())
        await asyncio.sleep(random.random() * 0.002)
        task.cancel()
        await asyncio.sleep(0.005)
        if not task.done():
            swallowed += 1
        while not task.done():
            task.cancel()
            await asyncio.sleep(0.001)
    assert swallowed == 0


async def test_messages_cross_between_layers_in_order(layer, monkeypatch, redis_url):
    config = load_settings(monkeypatch, REDIS_URL=redis_url)["CHANNEL_LAYERS"]["default"]
    other = RedisChannelLayer(**config["CONFIG"])  # another worker
    try:
        channel = await other.new_channel()
        for seq in range(50):
            await layer.send(channel, {"type": "stream.chunk", "seq": seq})
        received = [await asyncio.wait_for(other.receive(channel), 5) for _ in range(50)]
        assert [message["seq"] for message in received] == list(range(50))
        await layer.send("node.shared", {"type": "node.request", "request_id": "r1"})
        message = await asyncio.wait_for(other.receive("node.shared"), 5)
        assert message == {"type": "node.request", "request_id": "r1"}
    finally:
        await other.flush()


async def test_a_full_channel_refuses_the_send_and_expired_messages_make_room(
    monkeypatch, redis_url
):
    config = load_settings(monkeypatch, REDIS_URL=redis_url)["CHANNEL_LAYERS"]["default"]
    layer = RedisChannelLayer(**{**config["CONFIG"], "capacity": 3, "expiry": 1})
    try:
        for _ in range(3):
            await layer.send("slow.reader", {"type": "x"})
        with pytest.raises(ChannelFull):
            await layer.send("slow.reader", {"type": "x"})
        await asyncio.sleep(2.1)  # past the expiry, judged in whole seconds
        await layer.send("slow.reader", {"type": "fresh"})
        assert await asyncio.wait_for(layer.receive("slow.reader"), 5) == {"type": "fresh"}
    finally:
        await layer.flush()


async def test_receivers_that_give_up_waiting_lose_nobody_elses_messages(
    layer, monkeypatch, redis_url
):
    # A relay waiting in the queue gives up its receive every two seconds (a timeout cancels
    # it), and hundreds of relays of one worker wait at once. All of that worker's process-local
    # channels share one Redis key: a receive cancelled while it popped from that key must not
    # take another relay's chunk with it (issue 14: 38 of 338 streams lost chunks).
    config = load_settings(monkeypatch, REDIS_URL=redis_url)["CHANNEL_LAYERS"]["default"]
    consumer_worker = RedisChannelLayer(**config["CONFIG"])
    try:
        stream = await consumer_worker.new_channel()
        queued = [await consumer_worker.new_channel() for _ in range(20)]
        stop = asyncio.Event()

        async def waiting_in_queue(channel: str) -> None:
            while not stop.is_set():
                try:
                    async with asyncio.timeout(random.random() * 0.01):
                        await consumer_worker.receive(channel)
                except TimeoutError:
                    pass

        waiters = [asyncio.create_task(waiting_in_queue(channel)) for channel in queued]
        received = []

        async def relaying() -> None:
            while len(received) < 1000:
                received.append((await consumer_worker.receive(stream))["seq"])

        relay = asyncio.create_task(relaying())
        for seq in range(1000):
            await layer.send(stream, {"type": "stream.chunk", "seq": seq})
            if seq % 50 == 0:
                await asyncio.sleep(0.005)
        try:
            await asyncio.wait_for(asyncio.shield(relay), 10)
        except TimeoutError:
            pass
        stop.set()
        relay.cancel()
        await asyncio.gather(*waiters, relay, return_exceptions=True)
        assert received == list(range(1000)), f"{1000 - len(received)} of 1000 lost"
    finally:
        await consumer_worker.flush()


async def test_a_message_to_a_channel_of_the_same_worker_skips_redis(layer):
    # A node and the consumer of its answer on one worker: the chunks go straight to the inbox.
    channel = await layer.new_channel()
    for seq in range(10):
        await layer.send(channel, {"type": "stream.chunk", "seq": seq})
    key = layer.prefix + layer.non_local_name(channel)
    assert await layer.connection(layer.consistent_hash(channel)).zcard(key) == 0
    received = [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(10)]
    assert [message["seq"] for message in received] == list(range(10))
    assert layer.receive_now(channel) is None


async def test_a_full_channel_of_the_same_worker_refuses_the_send(monkeypatch, redis_url):
    config = load_settings(monkeypatch, REDIS_URL=redis_url)["CHANNEL_LAYERS"]["default"]
    layer = RedisChannelLayer(**{**config["CONFIG"], "capacity": 3})
    try:
        channel = await layer.new_channel()
        for _ in range(3):
            await layer.send(channel, {"type": "x"})
        with pytest.raises(ChannelFull):
            await layer.send(channel, {"type": "x"})
    finally:
        await layer.flush()


async def test_hundreds_of_concurrent_sends_all_arrive(layer, monkeypatch, redis_url):
    # 200 streams relayed by one worker send at once; redis-py's pool holds 100 connections and
    # raised "Too many connections" for the rest, losing their chunks (issue 14's benchmark).
    config = load_settings(monkeypatch, REDIS_URL=redis_url)["CHANNEL_LAYERS"]["default"]
    other = RedisChannelLayer(**config["CONFIG"])  # the consumers' worker
    try:
        channels = [await other.new_channel() for _ in range(300)]

        async def stream(channel: str) -> None:
            for seq in range(5):
                await layer.send(channel, {"type": "stream.chunk", "seq": seq})

        await asyncio.gather(*(stream(channel) for channel in channels))
        for channel in channels:
            got = [(await asyncio.wait_for(other.receive(channel), 5))["seq"] for _ in range(5)]
            assert got == list(range(5))
    finally:
        await other.flush()
