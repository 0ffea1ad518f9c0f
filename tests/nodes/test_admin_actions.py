"""The operator's admin acts on live nodes and requests (issue 17): every action reaches the
node's socket through the channel layer, and is logged with the operator who took it.

Scripted nodes and consumers through the real ASGI application; the admin through Django's
async test client, logged in as members of the documented groups.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.contrib.admin.models import LogEntry
from django.utils import timezone

from nodes.models import NodeBan, NodeSession
from nodes.protocol import CloseReason, FrameType
from routing import metrics
from routing.models import InflightRequest, QueuedRequest
from tests.ops import NODES, REQUESTS, act, staff_client
from tests.routing.test_relay import answer, chat, leftovers
from tests.routing.test_views import sse_events, text_of
from tests.scripted_node import ScriptedNode, register_frame

pytestmark = [pytest.mark.django_db(transaction=True)]


async def settled_leftovers(expected: tuple[int, int]) -> tuple[int, int]:
    """``leftovers`` once an aborted request has cleaned up (or after 2 s): its consumer gets
    the error event first, the rows it held go on the database thread after."""
    for _ in range(100):
        if await leftovers() == expected:
            break
        await asyncio.sleep(0.02)
    return await leftovers()

QUEUED = "/admin/routing/queuedrequest/"


@sync_to_async
def session_of(node_id: str) -> NodeSession | None:
    return NodeSession.objects.filter(node_id=node_id).first()


@sync_to_async
def log() -> list[tuple[str, str, str]]:
    """The admin log: (operator, object, message), oldest first."""
    return [
        (entry.user.username, entry.object_repr, entry.change_message)
        for entry in LogEntry.objects.select_related("user").order_by("pk")
    ]


async def test_disconnect_closes_the_node_with_a_reason_it_logs(channel_layer):
    node = ScriptedNode()
    await node.register(node_id="node-kicked")
    session = await session_of("node-kicked")
    operator = await staff_client("operator")
    response = await act(operator, NODES, "disconnect", [session.pk])
    assert response.status_code == 302
    assert await node.closed() == (1008, "disconnected by an operator")
    assert await log() == [("operator", "node-kicked", "Disconnected by an operator")]


async def test_drain_lets_the_request_in_flight_finish_and_sends_the_node_no_new_one(
    channel_layer, settings
):
    settings.IDLECLAW_QUEUE_TIMEOUT = 0.3
    node = ScriptedNode()
    await node.register(node_id="node-drained", max_concurrent=2)
    serving = chat("first")
    await serving.start()
    request = await node.recv()
    operator = await staff_client("operator")
    await act(operator, NODES, "drain", [(await session_of("node-drained")).pk])
    assert (await session_of("node-drained")).draining
    # The node still has a free slot, but gets nothing new: the newcomer waits, then a 503.
    status, _ = await chat("second").start()
    assert status == 503
    assert await node.nothing_sent()
    await answer(node, request, ["still", "served"])
    assert text_of(sse_events(await serving.read_all())) == "stillserved"
    assert await log() == [
        ("operator", "node-drained", "Drained: no new requests; those in flight finish")
    ]
    # The node cannot undo the operator's drain with its own undrain (red-team H1).
    await node.send({"type": FrameType.UNDRAIN})
    assert await node.nothing_sent()
    assert (await session_of("node-drained")).draining
    await node.disconnect()


async def test_ban_asks_what_to_ban_then_bans_and_disconnects(channel_layer):
    node = ScriptedNode(ip="10.0.0.9")
    await node.register(node_id="node-banned")
    pk = (await session_of("node-banned")).pk
    operator = await staff_client("operator")
    form = await act(operator, NODES, "ban", [pk])
    assert form.status_code == 200
    page = form.content.decode()
    assert 'value="node-banned"' in page and 'value="10.0.0.9"' in page
    assert await node.nothing_sent()  # nothing happens before the operator confirms
    response = await act(
        operator, NODES, "ban", [pk], apply="1", node_ids=["node-banned"], ips=["10.0.0.9"],
        length="1d", reason="sends garbage",
    )  # fmt: skip
    assert response.status_code == 302
    assert await node.closed() == (1008, CloseReason.BANNED)
    bans = await sync_to_async(list)(NodeBan.objects.order_by("kind"))
    assert [(ban.kind, ban.value, ban.reason) for ban in bans] == [
        ("ip", "10.0.0.9", "sends garbage"),
        ("node_id", "node-banned", "sends garbage"),
    ]
    for ban in bans:
        assert abs(ban.expires_at - (timezone.now() + timedelta(days=1))) < timedelta(minutes=1)
    again = ScriptedNode(ip="10.0.0.9")
    await again.open()
    await again.send(register_frame(node_id="another-id"))
    assert await again.closed() == (1008, CloseReason.BANNED)
    entries = await log()
    assert ("operator", "IP address 10.0.0.9", "Banned for a day by an operator") in entries
    assert ("operator", "node-banned", "Banned for a day and disconnected") in entries


async def test_banning_an_ipv6_node_disconnects_every_node_of_its_network(channel_layer):
    banned = ScriptedNode(ip="2001:db8:5:5::9")
    await banned.register(node_id="node-v6")
    same_host = ScriptedNode(ip="2001:db8:5:5::10")
    await same_host.register(node_id="node-v6-twin")
    other_host = ScriptedNode(ip="2001:db8:5:6::9")
    await other_host.register(node_id="node-v6-other")
    operator = await staff_client("operator")
    pk = (await session_of("node-v6")).pk
    form = (await act(operator, NODES, "ban", [pk])).content.decode()
    assert "2001:db8:5:5::9 (all of 2001:db8:5:5::/64)" in form  # said before it is done
    response = await act(
        operator, NODES, "ban", [pk], apply="1", node_ids=[], ips=["2001:db8:5:5::9"],
        length="1h", reason="garbles answers",
    )  # fmt: skip
    assert response.status_code == 302
    assert await banned.closed() == (1008, CloseReason.BANNED)
    assert await same_host.closed() == (1008, CloseReason.BANNED)
    assert await other_host.nothing_sent()
    entries = await log()
    assert (
        "operator",
        "IP address 2001:db8:5:5::9 (all of 2001:db8:5:5::/64)",
        "Banned for an hour by an operator",
    ) in entries
    for node in (banned, same_host, other_host):
        await node.disconnect()


async def test_cancel_ends_the_request_for_the_consumer_and_the_node_and_frees_the_slot(
    channel_layer, monkeypatch
):
    monkeypatch.setattr(metrics, "PROGRESS_AFTER", 0.0)  # the row's progress without waiting
    node = ScriptedNode()
    await node.register(node_id="node-serving")
    consumer = chat("a long story")
    await consumer.start()
    request = await node.recv()
    await node.chunk(request["request_id"], "Once")
    shown = await consumer.read_part()
    await metrics.flush()  # what the consumer's worker writes about once a second
    operator = await staff_client("operator")
    listing = (await operator.get(REQUESTS)).content.decode()
    for column in ("node-serving", "10.2.0.1", "streaming", "chat", "llama3.2:3b"):
        assert column in listing
    detail = await operator.get(f"{NODES}{(await session_of('node-serving')).pk}/change/")
    assert request["request_id"] in detail.content.decode()  # its live requests
    await act(operator, REQUESTS, "cancel", [request["request_id"]])
    assert await node.recv() == {
        "type": FrameType.CANCEL_REQUEST,
        "request_id": request["request_id"],
    }
    events = sse_events(shown + await consumer.read_all())
    assert text_of(events) == "Once\n\n[Error: an operator ended this request]"
    assert events[-2]["choices"][0]["finish_reason"] == "error" and events[-1] == "[DONE]"
    assert await settled_leftovers((0, 0)) == (0, 0)
    # Not the node's fault: it is not counted as a failure.
    session = await session_of("node-serving")
    assert (session.failed, session.consecutive_failures) == (0, 0)
    assert await log() == [
        ("operator", request["request_id"], "Cancelled by an operator (node node-serving)")
    ]


async def test_a_viewer_sees_the_network_but_cannot_act(channel_layer):
    node = ScriptedNode()
    await node.register(node_id="node-watched", max_concurrent=3, client="idleclaw-skill/0.3")
    consumer = chat()
    await consumer.start()
    await node.recv()
    viewer = await staff_client("viewer")
    listing = await viewer.get(NODES)
    assert listing.status_code == 200
    page = listing.content.decode()
    for shown in ("node-watched", "10.0.0.1", "idleclaw-skill/0.3, Ollama 0.12.3", "1 / 3"):
        assert shown in page
    assert "Disconnect the selected nodes" not in page
    session = await session_of("node-watched")
    in_flight = await sync_to_async(InflightRequest.objects.get)()
    await act(viewer, NODES, "disconnect", [session.pk])
    await act(viewer, REQUESTS, "cancel", [in_flight.pk])
    assert await node.nothing_sent()
    assert await log() == []
    assert (await viewer.get("/admin/")).status_code == 200
    assert (await viewer.get("/admin/nodes/nodeban/add/")).status_code == 403


async def test_cancel_ends_a_request_still_waiting_in_the_queue(channel_layer, settings):
    """Requests waiting for a free node are listed (the queue's admin) and can be cancelled:
    the consumer is told an operator ended it, and the queue forgets it."""
    settings.IDLECLAW_QUEUE_NOTICE_INTERVAL = 0.2
    node = ScriptedNode()
    await node.register(node_id="node-busy", max_concurrent=1)
    serving = chat("first")
    await serving.start()
    first = await node.recv()
    waiting = chat("second")
    assert (await waiting.start())[0] == 200  # the stream starts with queue notices
    [queued] = await sync_to_async(list)(QueuedRequest.objects.all())
    operator = await staff_client("operator")
    listing = (await operator.get(QUEUED)).content.decode()
    assert queued.request_id in listing
    await act(operator, QUEUED, "cancel", [queued.request_id])
    events = sse_events(await waiting.read_all())
    assert text_of(events) == "\n\n[Error: an operator ended this request]"
    assert events[-1] == "[DONE]"
    # Forgotten by the queue (the first request still holds its slot).
    assert await settled_leftovers((1, 0)) == (1, 0)
    # The request on the node goes on, untouched.
    await answer(node, first, ["served"])
    assert text_of(sse_events(await serving.read_all())) == "served"
    assert await log() == [
        ("operator", queued.request_id, "Cancelled by an operator while it waited")
    ]
    viewer = await staff_client("viewer")
    assert "Cancel the selected" not in (await viewer.get(QUEUED)).content.decode()
    await node.disconnect()
