"""The node WebSocket through the real ASGI application (PROTOCOL §1)."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from nodes import worker
from nodes.models import NodeBan, NodeSession
from nodes.protocol import MAX_CHUNKS_PER_FRAME, CloseReason, EventType, FrameType
from tests.scripted_node import ScriptedNode, register_frame, text_chunk

pytestmark = [pytest.mark.django_db(transaction=True)]


@sync_to_async
def sessions() -> list[NodeSession]:
    return list(NodeSession.objects.prefetch_related("models"))


async def refused_with(frame_text: str, *, ip: str = "10.0.0.1") -> tuple[int, str]:
    node = ScriptedNode(ip=ip)
    await node.open()
    await node.communicator.send_to(text_data=frame_text)
    result = await node.closed()
    await node.disconnect()
    return result


async def test_register_is_answered_with_registered_and_creates_a_session(channel_layer):
    node = ScriptedNode()
    reply = await node.register(node_id="node-a", max_concurrent=4, client="idleclaw-skill/0.3")
    assert reply["node_id"] == "node-a"
    assert reply["heartbeat_interval"] == 15
    assert len(reply["resume_token"]) >= 32
    [session] = await sessions()
    assert session.node_id == "node-a"
    assert session.max_concurrent == 4
    assert session.client_ip == "10.0.0.1"
    assert [(m.name, m.size) for m in session.models.all()] == [("llama3.2:3b", 2019393189)]
    await node.disconnect()
    assert await sessions() == []


async def test_trailing_slash_path_is_accepted(channel_layer):
    node = ScriptedNode(path="/ws/node/")
    assert (await node.register())["type"] == "registered"
    await node.disconnect()


@pytest.mark.parametrize("max_concurrent, stored", [(0, 1), (-5, 1), (99, 10), ("x", 2), (7, 7)])
async def test_max_concurrent_is_clamped(channel_layer, max_concurrent, stored):
    node = ScriptedNode()
    await node.register(max_concurrent=max_concurrent)
    [session] = await sessions()
    assert session.max_concurrent == stored
    await node.disconnect()


@pytest.mark.parametrize(
    "frame, reason",
    [
        ({"type": "heartbeat", "node_id": "x"}, CloseReason.EXPECTED_REGISTER),
        (register_frame(node_id=""), CloseReason.INVALID_NODE_ID),
        (register_frame(node_id="n" * 65), CloseReason.INVALID_NODE_ID),
        (register_frame(node_id=123), CloseReason.INVALID_NODE_ID),
        (register_frame(models=[]), CloseReason.NO_MODELS),
        ({"type": "register", "node_id": "x"}, CloseReason.NO_MODELS),
        (
            register_frame(models=[{"name": f"m{i}"} for i in range(21)]),
            CloseReason.TOO_MANY_MODELS,
        ),
        (register_frame(models=[{"name": ""}]), CloseReason.INVALID_MODEL_NAME),
        (register_frame(models=[{"name": "m" * 65}]), CloseReason.INVALID_MODEL_NAME),
        (register_frame(models=["llama3.2:3b"]), CloseReason.INVALID_MODEL_NAME),
    ],
)
async def test_bad_registration_is_closed_with_1008_and_its_reason(channel_layer, frame, reason):
    assert await refused_with(json.dumps(frame)) == (1008, reason)
    assert await sessions() == []


async def test_non_json_first_frame_is_refused(channel_layer):
    code, reason = await refused_with("not json {")
    assert code == 1008
    assert reason == CloseReason.INVALID_FRAME


async def test_frame_over_100000_bytes_is_closed_with_1009(channel_layer):
    frame = register_frame(ollama_version="x" * 100_001)
    assert await refused_with(json.dumps(frame)) == (1009, CloseReason.FRAME_TOO_LARGE)


async def test_twenty_models_are_accepted(channel_layer):
    node = ScriptedNode()
    await node.register(models=[{"name": f"m{i}", "size": i} for i in range(20)])
    [session] = await sessions()
    assert session.models.count() == 20
    await node.disconnect()


async def test_fourth_node_from_one_ip_is_refused(channel_layer, settings):
    settings.IDLECLAW_MAX_NODES_PER_IP = 3
    nodes = [ScriptedNode(ip="10.1.1.1") for _ in range(3)]
    for node in nodes:
        await node.register()
    assert await refused_with(json.dumps(register_frame()), ip="10.1.1.1") == (
        1008,
        CloseReason.TOO_MANY_NODES,
    )
    other_ip = ScriptedNode(ip="10.1.1.2")
    await other_ip.register()
    for node in [*nodes, other_ip]:
        await node.disconnect()


async def test_nodes_from_one_ipv6_64_count_as_one_host(channel_layer, settings):
    """Red team 4 of issue 20: one IPv6 host holds a whole /64."""
    settings.IDLECLAW_MAX_NODES_PER_IP = 2
    nodes = [ScriptedNode(ip=f"2001:db8:7:7::{i}") for i in range(1, 3)]
    for node in nodes:
        await node.register()
    assert await refused_with(json.dumps(register_frame()), ip="2001:db8:7:7::99") == (
        1008,
        CloseReason.TOO_MANY_NODES,
    )
    other_prefix = ScriptedNode(ip="2001:db8:7:8::1")
    await other_prefix.register()
    for node in [*nodes, other_prefix]:
        await node.disconnect()


async def test_banned_ip_and_node_id_are_refused(channel_layer):
    await sync_to_async(NodeBan.objects.create)(kind="ip", value="10.6.6.6", reason="spam")
    await sync_to_async(NodeBan.objects.create)(kind="node_id", value="bad-node")
    assert await refused_with(json.dumps(register_frame()), ip="10.6.6.6") == (
        1008,
        CloseReason.BANNED,
    )
    assert await refused_with(json.dumps(register_frame(node_id="bad-node"))) == (
        1008,
        CloseReason.BANNED,
    )


async def test_an_ip_ban_in_another_spelling_still_refuses_the_node(channel_layer):
    """Red team 4 of issue 20: a ban is stored as nodes' addresses are, so the spelling the
    operator typed (upper case, uncompressed IPv6, IPv4 mapped into IPv6) does not matter; a
    node reaching a dual-stack socket is its plain IPv4 address."""

    def ban(value: str) -> None:
        ban = NodeBan(kind="ip", value=value)
        ban.full_clean()
        ban.save()

    await sync_to_async(ban)("2001:DB8:0:0:0:0:0:7")
    await sync_to_async(ban)("::ffff:192.0.2.9")
    for ip in ("2001:db8::7", "192.0.2.9", "::ffff:192.0.2.9"):
        assert await refused_with(json.dumps(register_frame()), ip=ip) == (
            1008,
            CloseReason.BANNED,
        ), ip


async def test_an_ipv6_ban_holds_for_the_hosts_whole_network(channel_layer):
    """Red team 4 of issue 20: nodes are counted per host (an IPv6 address by its /64), and an
    IP ban holds for the same host, or the banned node would come back from the next address of
    its prefix. Another /64 is another host."""
    ban = NodeBan(kind="ip", value="2001:db8:1:2::1", reason="garbles answers")
    await sync_to_async(ban.full_clean)()
    await sync_to_async(ban.save)()
    assert str(ban) == "IP address 2001:db8:1:2::1 (all of 2001:db8:1:2::/64)"
    for ip in ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:DB8:1:2:0:0:0:ABCD"):
        assert await refused_with(json.dumps(register_frame()), ip=ip) == (
            1008,
            CloseReason.BANNED,
        ), ip
    neighbour = ScriptedNode(ip="2001:db8:1:3::1")
    await neighbour.register()
    await neighbour.disconnect()


async def test_an_ip_ban_row_that_names_no_address_bans_nothing(channel_layer):
    """A row written around the admin's check (a network typed in a shell) is no address: it
    neither refuses nor cuts any node, and breaks neither registration nor housekeeping."""
    from nodes import worker

    await sync_to_async(NodeBan.objects.create)(kind="ip", value="2001:db8:4:4::/64")
    node = ScriptedNode(ip="2001:db8:4:4::1")
    await node.register(node_id="still-welcome")
    await worker._housekeeping_once(first=False)
    assert await node.nothing_sent()
    assert [s.node_id for s in await sessions()] == ["still-welcome"]
    await node.disconnect()


async def test_expired_ban_no_longer_refuses(channel_layer):
    await sync_to_async(NodeBan.objects.create)(
        kind="ip", value="10.6.6.7", expires_at=timezone.now() - timezone.timedelta(seconds=1)
    )
    node = ScriptedNode(ip="10.6.6.7")
    await node.register()
    await node.disconnect()


async def test_registrations_over_the_rate_are_refused(channel_layer, settings):
    settings.IDLECLAW_RATE_NODE_REGISTER = "2/h"
    ip = "10.9.9.9"
    first, second = ScriptedNode(ip=ip), ScriptedNode(ip=ip)
    await first.register()
    await second.register()
    third = ScriptedNode(ip=ip)
    await third.open()
    assert await third.closed() == (1008, CloseReason.RATE_LIMITED)
    await first.disconnect()
    await second.disconnect()


async def test_silent_socket_is_closed_with_registration_timeout(channel_layer, settings):
    settings.IDLECLAW_REGISTRATION_TIMEOUT = 0.2
    node = ScriptedNode()
    await node.open()
    assert await node.closed() == (1008, CloseReason.REGISTRATION_TIMEOUT)


async def test_node_silent_past_the_timeout_is_closed_and_removed(channel_layer, settings):
    settings.IDLECLAW_NODE_TIMEOUT = 1
    node = ScriptedNode()
    await node.register()
    code, reason = await node.closed(timeout=4)
    assert (code, reason) == (1008, CloseReason.NODE_TIMEOUT)
    await node.disconnect()
    assert await sessions() == []


async def test_heartbeats_keep_a_node_alive(channel_layer, settings):
    settings.IDLECLAW_NODE_TIMEOUT = 1
    node = ScriptedNode()
    await node.register(node_id="beating")
    for _ in range(6):
        await node.send({"type": "heartbeat", "node_id": "beating", "active_requests": 0})
        assert await node.nothing_sent(0.3)
    assert [s.node_id for s in await sessions()] == ["beating"]
    await node.disconnect()


async def test_live_node_id_is_not_taken_over_without_its_resume_token(channel_layer):
    owner = ScriptedNode()
    await owner.register(node_id="shared-id")
    thief = ScriptedNode(ip="10.0.0.2")
    await thief.open()
    await thief.send(register_frame(node_id="shared-id", resume_token="guess"))
    assert await thief.closed() == (1008, CloseReason.NODE_ID_IN_USE)
    [session] = await sessions()
    assert session.client_ip == "10.0.0.1"
    assert await owner.nothing_sent()
    await owner.disconnect()


async def test_resume_token_takes_over_the_live_session(channel_layer):
    old = ScriptedNode()
    registered = await old.register(node_id="resumer")
    new = ScriptedNode(ip="10.0.0.3")
    await new.register(node_id="resumer", resume_token=registered["resume_token"])
    assert await old.closed() == (1008, CloseReason.NODE_ID_IN_USE)
    await old.disconnect()
    [session] = await sessions()
    assert session.client_ip == "10.0.0.3"
    await new.disconnect()
    assert await sessions() == []


async def test_heartbeat_naming_another_node_only_refreshes_the_sender(channel_layer):
    victim = ScriptedNode()
    await victim.register(node_id="victim")
    liar = ScriptedNode(ip="10.0.0.4")
    await liar.register(node_id="liar")
    before = {s.node_id: s.last_seen for s in await sessions()}
    await liar.send({"type": "heartbeat", "node_id": "victim", "available": False})
    await liar.nothing_sent()
    await worker.flush_seen_sessions()  # heartbeats are written in batches, about every second
    after = {s.node_id: s.last_seen for s in await sessions()}
    assert after["victim"] == before["victim"]
    assert after["liar"] > before["liar"]
    await victim.disconnect()
    await liar.disconnect()


async def test_chunks_for_requests_not_sent_to_this_connection_are_dropped(channel_layer):
    honest = ScriptedNode()
    await honest.register(node_id="honest")
    liar = ScriptedNode(ip="10.0.0.5")
    await liar.register(node_id="liar")
    reply_channel = await channel_layer.new_channel()
    [session] = [s for s in await sessions() if s.node_id == "honest"]
    await channel_layer.send(
        session.channel_name,
        {
            "type": EventType.NODE_REQUEST,
            "request_id": "r1",
            "reply_channel": reply_channel,
            "ollama_params": {"model": "llama3.2:3b", "messages": [], "stream": True},
        },
    )
    request = await honest.recv()
    assert request["type"] == FrameType.INFERENCE_REQUEST
    await liar.chunk("r1", "injected", done=True)
    await honest.chunk("r1", "genuine")
    event = await channel_layer.receive(reply_channel)
    assert [c["message"]["content"] for c in event["chunks"]] == ["genuine"]
    await honest.disconnect()
    await liar.disconnect()


async def test_cancel_event_sends_cancel_request_to_the_node(channel_layer):
    node = ScriptedNode()
    await node.register()
    [session] = await sessions()
    reply_channel = await channel_layer.new_channel()
    await channel_layer.send(
        session.channel_name,
        {
            "type": EventType.NODE_REQUEST,
            "request_id": "r2",
            "reply_channel": reply_channel,
            "ollama_params": {},
        },
    )
    await node.recv()
    await channel_layer.send(
        session.channel_name, {"type": EventType.NODE_CANCEL, "request_id": "r2"}
    )
    assert await node.recv() == {"type": "cancel_request", "request_id": "r2"}
    # After the cancel, late chunks for that request go nowhere.
    await node.chunk("r2", "late")
    await node.disconnect()


async def test_unknown_fields_are_ignored(channel_layer):
    node = ScriptedNode()
    await node.register(future_field={"x": 1})
    await node.send({"type": "heartbeat", "node_id": "x", "active_requests": 0, "gpu": "big"})
    assert await node.nothing_sent()
    assert len(await sessions()) == 1
    await node.disconnect()


@pytest.mark.parametrize(
    "frame, reason",
    [
        ({"type": "something_new"}, CloseReason.UNKNOWN_FRAME_TYPE),
        ({"type": "heartbeat", "active_requests": "many"}, CloseReason.INVALID_FRAME),
        ({"type": "heartbeat", "available": "yes"}, CloseReason.INVALID_FRAME),
        ({"type": "inference_chunk", "request_id": 5, "chunk": {}}, CloseReason.INVALID_FRAME),
        (
            {"type": "inference_chunk", "request_id": "r", "chunk": "text"},
            CloseReason.INVALID_FRAME,
        ),
        (
            {"type": "inference_chunk", "request_id": "r", "chunk": {"message": []}},
            CloseReason.INVALID_FRAME,
        ),
        (
            {"type": "inference_error", "request_id": "r", "error": {"x": 1}},
            CloseReason.INVALID_FRAME,
        ),
        (
            {"type": "inference_chunks", "request_id": 5, "chunks": [text_chunk("x")]},
            CloseReason.INVALID_FRAME,
        ),
        ({"type": "inference_chunks", "chunks": [text_chunk("x")]}, CloseReason.INVALID_FRAME),
        ({"type": "models_update", "models": []}, CloseReason.NO_MODELS),
        (register_frame(), CloseReason.INVALID_FRAME),
        ([1, 2], CloseReason.INVALID_FRAME),
    ],
)
async def test_malformed_frames_after_registration_close_with_1008(channel_layer, frame, reason):
    node = ScriptedNode()
    await node.register()
    await node.communicator.send_to(text_data=json.dumps(frame))
    assert await node.closed() == (1008, reason)
    await node.disconnect()
    assert await sessions() == []


async def test_frames_for_unknown_requests_are_dropped_then_the_node_is_closed(
    channel_layer, settings
):
    settings.IDLECLAW_NODE_MAX_STRIKES = 3
    node = ScriptedNode()
    await node.register()
    for i in range(3):
        await node.chunk(f"never-sent-{i}", "spam")
        assert await node.nothing_sent(0.05)
    await node.send({"type": "inference_error", "request_id": "never-sent", "error": "x"})
    assert await node.closed() == (1008, CloseReason.TOO_MANY_STRIKES)
    await node.disconnect()


async def test_a_node_flooding_frames_is_closed(channel_layer, settings):
    settings.IDLECLAW_NODE_MAX_FRAMES_PER_S = 10
    node = ScriptedNode()
    await node.register()
    for _ in range(25):
        await node.send({"type": "heartbeat", "node_id": "x"})
    assert await node.closed() == (1008, CloseReason.RATE_LIMITED)
    await node.disconnect()


async def test_models_update_replaces_the_models(channel_layer):
    node = ScriptedNode()
    await node.register()
    await node.send({"type": "models_update", "models": [{"name": "qwen3:0.6b", "size": 5}]})
    await node.nothing_sent()
    [session] = await sessions()
    assert [m.name for m in session.models.all()] == ["qwen3:0.6b"]
    await node.disconnect()


async def test_models_updates_faster_than_one_a_second_are_held_and_the_latest_applied(
    channel_layer,
):
    """Red-team M1 of issue 17: hundreds of models_update frames a second, each rewriting the
    node's model rows."""
    node = ScriptedNode()
    await node.register()
    for name in ("qwen3:0.6b", "a:1b", "b:1b", "c:1b"):
        await node.send({"type": "models_update", "models": [{"name": name, "size": 5}]})
        await node.nothing_sent(0.05)  # well within the second between two updates
        [session] = await sessions()
        assert [m.name for m in session.models.all()] == ["qwen3:0.6b"]  # the first one holds
    await asyncio.sleep(1.0)
    [session] = await sessions()
    assert [m.name for m in session.models.all()] == ["c:1b"]  # then the latest, once
    await node.disconnect()


@pytest.mark.parametrize(
    "banned, node_ip, bystander_ip",
    [
        ("10.7.7.7", "10.7.7.7", "10.7.7.8"),
        # An IPv6 ban holds for its /64: another address of it is cut, the next /64 is not.
        ("2001:db8:7:7::1", "2001:db8:7:7::5", "2001:db8:7:8::5"),
    ],
)
async def test_a_ban_added_while_a_node_is_connected_closes_it(
    channel_layer, banned, node_ip, bystander_ip
):
    from nodes import worker

    node = ScriptedNode(ip=node_ip)
    await node.register(node_id="soon-banned")
    bystander = ScriptedNode(ip=bystander_ip)
    await bystander.register(node_id="bystander")
    await sync_to_async(NodeBan.objects.create)(kind="ip", value=banned, reason="abuse")
    await worker._housekeeping_once(first=False)
    assert await node.closed() == (1008, CloseReason.BANNED)
    await node.disconnect()
    assert await bystander.nothing_sent()
    assert [s.node_id for s in await sessions()] == ["bystander"]
    await bystander.disconnect()


async def test_heartbeats_of_many_nodes_are_written_together(channel_layer):
    nodes = [ScriptedNode(ip=f"10.3.0.{i}") for i in range(3)]
    for i, node in enumerate(nodes):
        await node.register(node_id=f"beat-{i}")
    # Only the flush below may write, not the worker's own flush running in between.
    worker._flush_task.cancel()
    before = {s.node_id: s.last_seen for s in await sessions()}
    for i, node in enumerate(nodes[:2]):
        await node.send({"type": "heartbeat", "node_id": f"beat-{i}"})
    await nodes[0].nothing_sent()
    await worker.flush_seen_sessions()
    after = {s.node_id: s.last_seen for s in await sessions()}
    assert after["beat-0"] == after["beat-1"] > before["beat-0"]
    assert after["beat-2"] == before["beat-2"]
    for node in nodes:
        await node.disconnect()


async def test_a_node_whose_session_was_removed_is_closed_after_its_next_heartbeat(
    channel_layer,
):
    node = ScriptedNode()
    await node.register(node_id="reaped")
    bystander = ScriptedNode(ip="10.0.0.9")
    await bystander.register(node_id="bystander")
    # As a reaping worker does when it saw no heartbeat in time.
    await sync_to_async(NodeSession.objects.filter(node_id="reaped").delete)()
    assert await node.nothing_sent()
    await node.send({"type": "heartbeat", "node_id": "reaped"})
    await bystander.send({"type": "heartbeat", "node_id": "bystander"})
    # No explicit flush: the worker's own loop writes the heartbeats within about a second.
    assert await node.closed(timeout=3) == (1008, CloseReason.NODE_TIMEOUT)
    await node.disconnect()
    assert await bystander.nothing_sent()
    assert [s.node_id for s in await sessions()] == ["bystander"]
    await bystander.disconnect()


# --- the inference_chunks extension (docs/node-protocol-extensions.md) -----------------------


async def serving(channel_layer, node: ScriptedNode, request_id: str = "r1") -> str:
    """Send ``request_id`` to the node as the HTTP side does; return the reply channel."""
    reply_channel = await channel_layer.new_channel()
    [session] = [s for s in await sessions() if s.node_id == node.node_id]
    await channel_layer.send(
        session.channel_name,
        {
            "type": EventType.NODE_REQUEST,
            "request_id": request_id,
            "reply_channel": reply_channel,
            "ollama_params": {"model": "llama3.2:3b", "messages": [], "stream": True},
        },
    )
    request = await node.recv()
    assert request["type"] == FrameType.INFERENCE_REQUEST
    return reply_channel


async def received(
    channel_layer, reply_channel: str, *, seen: int = 0
) -> tuple[list[dict], list[dict]]:
    """Events on ``reply_channel`` up to the final chunk or an error, after ``seen`` chunks
    already received: (events, chunks)."""
    events: list[dict] = []
    chunks: list[dict] = []
    while True:
        async with asyncio.timeout(3):
            event = await channel_layer.receive(reply_channel)
        events.append(event)
        if event["type"] == EventType.STREAM_ERROR:
            return events, chunks
        assert event["seq"] == seen + len(chunks), "a gap in the chunks"
        chunks.extend(event["chunks"])
        if chunks[-1]["done"]:
            return events, chunks


async def registered_node(node_id: str, **register) -> ScriptedNode:
    node = ScriptedNode()
    await node.register(node_id=node_id, **register)
    node.node_id = node_id
    return node


async def test_registered_offers_the_router_features(channel_layer):
    node = ScriptedNode()
    reply = await node.register()
    assert reply["features"] == [
        "inference_chunks", "loaded_models", "embeddings", "drain", "models_update"
    ]
    await node.disconnect()


async def test_batched_chunks_reach_the_consumer_in_order_one_message_per_frame(channel_layer):
    node = await registered_node("batcher")
    reply_channel = await serving(channel_layer, node)
    words = [f"w{i} " for i in range(12)]
    await node.chunks("r1", [text_chunk(w) for w in words[:5]])
    first = await channel_layer.receive(reply_channel)
    assert (first["seq"], len(first["chunks"])) == (0, 5)
    await node.chunk("r1", words[5])  # classic frames still count in the same sequence
    await node.chunks(
        "r1",
        [text_chunk(w) for w in words[6:]]
        + [text_chunk("", done=True, done_reason="stop", eval_count=12)],
    )
    events, chunks = await received(channel_layer, reply_channel, seen=5)
    assert [c["message"]["content"] for c in first["chunks"] + chunks[:-1]] == words
    assert chunks[-1] == {
        "message": {"role": "assistant"},
        "done": True,
        "done_reason": "stop",
        "eval_count": 12,
    }
    assert len(events) <= 2
    # The request is over: a later batch for it is dropped, not relayed.
    await node.chunks("r1", [text_chunk("late")])
    assert await node.nothing_sent()
    await node.disconnect()


async def test_a_batch_of_the_most_chunks_allowed_is_relayed(channel_layer):
    node = await registered_node("full-batch")
    reply_channel = await serving(channel_layer, node)
    batch = [text_chunk(str(i)) for i in range(MAX_CHUNKS_PER_FRAME - 1)]
    await node.chunks("r1", [*batch, text_chunk("", done=True)])
    _, chunks = await received(channel_layer, reply_channel)
    assert len(chunks) == MAX_CHUNKS_PER_FRAME
    assert [c["message"].get("content") for c in chunks[:-1]] == [
        str(i) for i in range(MAX_CHUNKS_PER_FRAME - 1)
    ]
    await node.disconnect()


async def test_a_batch_costs_a_frame_plus_an_eighth_of_one_per_chunk(channel_layer, settings):
    settings.IDLECLAW_NODE_MAX_FRAMES_PER_S = 100
    settings.IDLECLAW_NODE_FRAMES_PER_S_PER_REQUEST = 0  # the idle budget alone
    node = await registered_node("fast-batcher")
    reply_channel = await serving(channel_layer, node)
    # 20 frames of 40 chunks cost 20 * (1 + 40 / 8) = 120 of the burst of 200: 800 chunks in
    # frames of their own would have been refused.
    for frame in range(20):
        await node.chunks("r1", [text_chunk(f"{frame}.{i} ") for i in range(40)])
    await node.chunks("r1", [text_chunk("", done=True)])
    _, chunks = await received(channel_layer, reply_channel)
    assert len(chunks) == 801
    assert chunks[40]["message"]["content"] == "1.0 "
    assert await node.nothing_sent()
    await node.disconnect()


async def test_big_batches_cannot_flood_the_router(channel_layer, settings):
    settings.IDLECLAW_NODE_MAX_FRAMES_PER_S = 10
    settings.IDLECLAW_NODE_FRAMES_PER_S_PER_REQUEST = 0  # the idle budget alone
    node = await registered_node("flooder")
    await serving(channel_layer, node)
    # One frame of 256 empty chunks costs 33 frames: more than the whole burst of 20.
    await node.chunks("r1", [text_chunk("") for _ in range(MAX_CHUNKS_PER_FRAME)])
    assert await node.closed() == (1008, CloseReason.RATE_LIMITED)


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param([], id="empty"),
        pytest.param("text", id="not-a-list"),
        pytest.param({"message": {"content": "x"}, "done": False}, id="a-chunk-not-a-list"),
        pytest.param(None, id="missing"),
        pytest.param([text_chunk("x")] * (MAX_CHUNKS_PER_FRAME + 1), id="257-chunks"),
        pytest.param([text_chunk("x", done=True), text_chunk("y")], id="done-not-last"),
        pytest.param([text_chunk("x"), "y", text_chunk("z")], id="chunk-not-an-object"),
        pytest.param(
            [text_chunk("x"), {"message": ["y"], "done": False}], id="message-not-an-object"
        ),
        pytest.param(
            [text_chunk("x"), {"message": {"content": "y"}, "done": "yes"}], id="done-not-a-boolean"
        ),
    ],
)
async def test_a_malformed_batch_fails_the_request_and_keeps_the_node(channel_layer, batch):
    node = await registered_node("clumsy")
    reply_channel = await serving(channel_layer, node)
    await node.chunk("r1", "before ")
    await node.chunks("r1", batch)
    assert await node.recv() == {"type": "cancel_request", "request_id": "r1"}
    events, chunks = await received(channel_layer, reply_channel)
    # What came before the bad frame reaches the consumer, nothing of the frame, then the error.
    assert [c["message"]["content"] for c in chunks] == ["before "]
    assert events[-1] == {
        "type": EventType.STREAM_ERROR,
        "request_id": "r1",
        "error": "ollama_error",
    }
    # The connection is fine and serves the next request.
    await node.send({"type": "heartbeat", "node_id": "clumsy"})
    reply_channel = await serving(channel_layer, node, "r2")
    await node.chunks("r2", [text_chunk("ok"), text_chunk("", done=True)])
    _, chunks = await received(channel_layer, reply_channel)
    assert [c["message"].get("content") for c in chunks] == ["ok", None]
    await node.disconnect()


async def test_batches_for_requests_not_sent_to_this_connection_are_strikes(
    channel_layer, settings
):
    settings.IDLECLAW_NODE_MAX_STRIKES = 3
    honest = await registered_node("honest")
    reply_channel = await serving(channel_layer, honest)
    liar = ScriptedNode(ip="10.0.0.5")
    await liar.register(node_id="liar")
    for _ in range(3):
        await liar.chunks("r1", [text_chunk("injected"), text_chunk("", done=True)])
        assert await liar.nothing_sent(0.05)
    await liar.chunks("never-sent", [])
    assert await liar.closed() == (1008, CloseReason.TOO_MANY_STRIKES)
    await liar.disconnect()
    await honest.chunks("r1", [text_chunk("genuine"), text_chunk("", done=True)])
    _, chunks = await received(channel_layer, reply_channel)
    assert [c["message"].get("content") for c in chunks] == ["genuine", None]
    await honest.disconnect()


async def test_a_batched_answer_reaches_an_sse_consumer_token_by_token(channel_layer):
    from tests.routing.test_views import HttpClient, sse_events

    node = await registered_node("sse-batcher")
    client = HttpClient(
        "POST",
        "/api/chat",
        {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "count"}]},
    )
    assert (await client.start())[0] == 200
    request = await node.recv()
    words = [f"{i} " for i in range(30)]
    for start in range(0, 30, 7):
        await node.chunks(request["request_id"], [text_chunk(w) for w in words[start : start + 7]])
    await node.chunks(request["request_id"], [text_chunk("", done=True, done_reason="stop")])
    events = sse_events(await client.read_all())
    deltas = [e["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert [d for d in deltas if d] == words
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1] == "[DONE]"
    await node.disconnect()


async def test_tool_calls_in_a_batch_cost_eight_frames_each(channel_layer, settings):
    settings.IDLECLAW_NODE_MAX_FRAMES_PER_S = 10
    settings.IDLECLAW_NODE_FRAMES_PER_S_PER_REQUEST = 0  # the idle budget alone
    node = await registered_node("tool-flooder")
    await serving(channel_layer, node)
    call = {"function": {"name": "f", "arguments": {}}}
    chunk = {
        "message": {"role": "assistant", "content": "", "tool_calls": [call] * 3},
        "done": False,
    }
    # One chunk of 3 tool calls: 25 frames' worth, more than the burst of 20.
    await node.chunks("r1", [chunk])
    assert await node.closed() == (1008, CloseReason.RATE_LIMITED)


# --- caps, drain and undrain (docs/node-protocol-extensions.md) ------------------------------


async def test_caps_and_draining_in_register_are_stored_and_undrain_serves_again(channel_layer):
    node = ScriptedNode()
    reply = await node.register(
        limits={"num_ctx": 8192, "num_predict": "lots", "num_gpu": 1}, draining=True
    )
    assert {"drain", "models_update"} <= set(reply["features"])
    [session] = await sessions()
    assert (session.max_ctx, session.max_predict, session.draining) == (8192, None, True)
    await node.send({"type": "undrain"})
    await node.nothing_sent()
    [session] = await sessions()
    assert not session.draining
    await node.send({"type": "drain"})
    await node.nothing_sent()
    assert (await sessions())[0].draining
    await node.disconnect()


@pytest.mark.parametrize(
    "limits",
    [
        {"num_ctx": 0, "num_predict": -1},
        {"num_ctx": True, "num_predict": 2.5},
        {"num_ctx": 2**27 + 1, "num_predict": "64"},
        [8192, 64],
        "8192",
    ],
)
async def test_caps_that_are_not_whole_numbers_in_range_count_as_none(channel_layer, limits):
    node = ScriptedNode()
    await node.register(limits=limits)
    [session] = await sessions()
    assert (session.max_ctx, session.max_predict) == (None, None)
    await node.disconnect()


async def test_a_node_the_router_is_moving_away_cannot_undrain(channel_layer):
    node = await registered_node("moving")
    await serving(channel_layer, node)  # a request in flight keeps it connected for now
    [session] = await sessions()
    await channel_layer.send(session.channel_name, {"type": "node.move"})
    await node.send({"type": "undrain"})
    await node.nothing_sent()
    assert (await sessions())[0].draining
    await node.chunk("r1", "", done=True)
    assert await node.closed() == (1012, "router restarting")
    await node.disconnect()
