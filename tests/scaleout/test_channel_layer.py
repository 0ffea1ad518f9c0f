"""The Redis channel layer exactly as settings configure it, against a real Redis."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from channels_redis.core import RedisChannelLayer

from tests.scaleout.cluster import load_settings

pytestmark = pytest.mark.scaleout


@pytest.fixture
async def layer(monkeypatch, redis_url):
    config = load_settings(monkeypatch, REDIS_URL=redis_url)["CHANNEL_LAYERS"]["default"]
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
