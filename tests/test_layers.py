"""The embedded default's channel layer keeps the channel-layer contract of its parent."""

from __future__ import annotations

import asyncio

import pytest
from channels.exceptions import ChannelFull

from idleclaw_site import layers
from idleclaw_site.layers import InProcessChannelLayer


async def test_messages_arrive_in_order_and_channels_are_dropped_when_empty():
    layer = InProcessChannelLayer(capacity=10, expiry=60)
    channel = await layer.new_channel()
    for seq in range(3):
        await layer.send(channel, {"type": "stream.chunk", "seq": seq})
    assert [(await layer.receive(channel))["seq"] for _ in range(3)] == [0, 1, 2]
    assert layer.channels == {}


async def test_a_receiver_waiting_first_gets_the_message():
    layer = InProcessChannelLayer()
    channel = await layer.new_channel()
    waiting = asyncio.create_task(layer.receive(channel))
    await asyncio.sleep(0)
    await layer.send(channel, {"type": "queue.wake"})
    assert await asyncio.wait_for(waiting, 1) == {"type": "queue.wake"}


async def test_a_sent_message_is_not_changed_by_its_sender_changing_the_dict():
    layer = InProcessChannelLayer()
    event = {"type": "node.request", "request_id": "a"}
    await layer.send("node.one", event)
    event["request_id"] = "b"
    assert (await layer.receive("node.one"))["request_id"] == "a"


async def test_a_full_channel_refuses_the_send():
    layer = InProcessChannelLayer(capacity=2)
    await layer.send("slow.reader", {"type": "x"})
    await layer.send("slow.reader", {"type": "x"})
    with pytest.raises(ChannelFull):
        await layer.send("slow.reader", {"type": "x"})


async def test_expired_messages_are_swept_within_a_second():
    layer = InProcessChannelLayer(expiry=1)
    await layer.send("stale", {"type": "old"})
    await asyncio.sleep(1.1 + layers.SWEEP_INTERVAL)
    await layer.send("fresh", {"type": "new"})
    assert await layer.receive("fresh") == {"type": "new"}
    assert "stale" not in layer.channels
    with pytest.raises(TimeoutError):  # the expired message is never delivered
        async with asyncio.timeout(0.2):
            await layer.receive("stale")


async def test_invalid_channel_names_are_refused_every_time():
    layer = InProcessChannelLayer(capacity=10, expiry=60)
    for _ in range(2):
        for name in ("has space", "x" * 200, "bad!name!"):
            with pytest.raises(TypeError):
                await layer.send(name, {"type": "stream.chunk"})
    # A valid name, once remembered, stays valid; an invalid one never becomes so.
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "stream.chunk"})
    await layer.send(channel, {"type": "stream.chunk"})
    assert len([await layer.receive(channel) for _ in range(2)]) == 2
    with pytest.raises(TypeError):
        await layer.receive("has space")
