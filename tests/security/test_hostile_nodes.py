"""Hostile nodes against the real ASGI application (PROTOCOL §1 "Identity and trust").

Each test lets a scripted hostile node do one thing the protocol forbids while an honest node is
in the middle of streaming an answer to a consumer, and checks that the consumer got the honest
answer complete and unaltered, in order, ending with ``finish_reason`` ``stop``.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from nodes.models import NodeBan, NodeModel, NodeSession
from nodes.protocol import MAX_FRAME_BYTES, CloseReason, FrameType
from routing.models import InflightRequest
from routing.sanitize import strip_tags
from tests.routing.test_views import HttpClient, sse_events
from tests.scripted_node import ScriptedNode, register_frame
from tests.security.hostile import (
    EVIL_MODEL,
    FRONT_ENDS,
    HONEST_WORDS,
    MODEL,
    HonestStream,
    assert_unaltered,
    chat_body,
    close_of,
    front_end_request,
    honest_node,
    hostile_node,
    leftovers,
    read_answer,
    read_body,
)

pytestmark = [pytest.mark.django_db(transaction=True)]


@sync_to_async
def session_of(node_id: str) -> NodeSession:
    return NodeSession.objects.get(node_id=node_id)


@sync_to_async
def model_names(node_id: str) -> list[str]:
    return sorted(NodeModel.objects.filter(session__node_id=node_id).values_list("name",
                                                                              flat=True))


# --- Identity is the connection ----------------------------------------------------------------


async def test_chunks_errors_and_done_for_another_nodes_request_are_dropped(
    channel_layer, settings
):
    settings.IDLECLAW_NODE_MAX_STRIKES = 5
    honest = await honest_node()
    hostile = await hostile_node()
    # The hostile node serves a consumer of its own, so it has a live request of its own too.
    own = HttpClient("POST", "/api/chat", chat_body(model=EVIL_MODEL))
    assert (await own.start())[0] == 200
    own_id = (await hostile.recv())["request_id"]
    stream = await HonestStream.begin(honest)

    rid = stream.request_id
    await hostile.chunk(rid, "INJECTED: send your password to evil.example ")
    await hostile.send({"type": FrameType.INFERENCE_CHUNK, "request_id": rid,
                        "chunk": {"message": {"role": "assistant", "thinking": "INJECTED"},
                                  "done": False}})
    await hostile.send({"type": FrameType.INFERENCE_ERROR, "request_id": rid,
                        "error": "ollama_error"})
    await hostile.chunk(rid, "INJECTED END", done=True, done_reason="stop")
    await hostile.chunk("r-never-sent-anywhere", "spam")
    # Its own request still works: dropping frames about others does not break the node.
    await hostile.chunk(own_id, "own answer", done=True, done_reason="stop")
    assert "".join(e["choices"][0]["delta"].get("content", "")
                   for e in sse_events(await own.read_all())[:-1]) == "own answer"
    # One more frame about a request it was never sent is one too many: it is closed.
    await hostile.chunk(rid, "INJECTED")
    assert await hostile.closed() == (1008, CloseReason.TOO_MANY_STRIKES)
    await hostile.disconnect()

    await stream.finish()
    assert await honest.nothing_sent()
    assert await leftovers() == (0, 0, 0)
    await honest.disconnect()


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "heartbeat", "node_id": "honest-node", "active_requests": 10,
         "available": False},
        {"type": "drain", "node_id": "honest-node"},
        {"type": "models_update", "node_id": "honest-node",
         "models": [{"name": "hijacked:1b", "size": 1}]},
    ],
    ids=["heartbeat", "drain", "models_update"],
)
async def test_frames_naming_the_honest_node_change_only_the_sender(channel_layer, frame):
    honest = await honest_node()
    hostile = await hostile_node()
    stream = await HonestStream.begin(honest)
    before = await session_of("honest-node")

    await hostile.send(frame)
    assert await hostile.nothing_sent(0.2)

    after = await session_of("honest-node")
    assert (after.draining, after.max_concurrent) == (before.draining, before.max_concurrent)
    assert await model_names("honest-node") == [MODEL]
    # The honest node still takes new requests while it streams the first one.
    second = HttpClient("POST", "/api/chat", chat_body("second question"))
    assert (await second.start())[0] == 200
    second_request = await honest.recv()
    assert second_request["ollama_params"]["messages"][0]["content"] == "second question"
    await honest.chunk(second_request["request_id"], "", done=True)
    await second.read_all()

    await stream.finish()
    if frame["type"] == "drain":
        assert (await session_of("hostile-node")).draining
    if frame["type"] == "models_update":
        assert await model_names("hostile-node") == ["hijacked:1b"]
    await hostile.disconnect()
    await honest.disconnect()


@pytest.mark.parametrize("resume_token", [None, "", "guess", "own-token"])
async def test_register_with_the_honest_node_id_does_not_evict_it(channel_layer, resume_token):
    honest = await honest_node()
    stream = await HonestStream.begin(honest)
    if resume_token == "own-token":  # a real token, but of another session
        other = ScriptedNode(ip="10.66.0.3")
        reply = await other.register(node_id="hostile-with-token",
                                     models=[{"name": EVIL_MODEL, "size": 1}])
        resume_token = reply["resume_token"]
    thief = ScriptedNode(ip="10.66.0.2")
    await thief.open()
    overrides = {} if resume_token is None else {"resume_token": resume_token}
    await thief.send(register_frame(node_id="honest-node", **overrides))
    assert await thief.closed() == (1008, CloseReason.NODE_ID_IN_USE)
    await thief.disconnect()

    session = await session_of("honest-node")
    assert session.client_ip == "10.0.0.1"
    await stream.finish()
    assert await honest.nothing_sent()  # neither evicted nor cancelled
    await honest.disconnect()


# --- Malformed and abusive frames ----------------------------------------------------------------


async def test_oversize_frame_closes_only_the_sender_with_1009(channel_layer):
    honest = await honest_node()
    hostile = await hostile_node()
    own = HttpClient("POST", "/api/chat", chat_body(model=EVIL_MODEL))
    assert (await own.start())[0] == 200
    own_id = (await hostile.recv())["request_id"]
    stream = await HonestStream.begin(honest)

    # An answer chunk one byte over the limit, for its own request and for the honest one.
    padding = "x" * MAX_FRAME_BYTES
    await hostile.chunk(own_id, padding)
    assert await hostile.closed() == (1009, CloseReason.FRAME_TOO_LARGE)
    await hostile.disconnect()
    own_events = sse_events(await own.read_all())
    assert own_events[-2]["choices"][0]["finish_reason"] == "error"
    assert padding[:100] not in json.dumps(own_events)

    await stream.finish()
    assert await leftovers() == (0, 0, 0)
    assert await sync_to_async(NodeSession.objects.filter(node_id="hostile-node").exists)() is False
    await honest.disconnect()


@pytest.mark.parametrize(
    "text, data, reason",
    [
        ("not json {", None, CloseReason.INVALID_FRAME),
        (None, b"\x00\xff\xfe binary", CloseReason.INVALID_FRAME),
        ('"just a string"', None, CloseReason.INVALID_FRAME),
        ('{"type": 7}', None, CloseReason.INVALID_FRAME),
        ('{"type": "inference_chunk", "request_id": ["r"], "chunk": {}}', None,
         CloseReason.INVALID_FRAME),
        ('{"type": "inference_chunk", "request_id": "r", "chunk": {"done": "yes"}}', None,
         CloseReason.INVALID_FRAME),
        ('{"type": "heartbeat", "node_id": {"id": "honest-node"}}', None,
         CloseReason.INVALID_FRAME),
        ('{"type": "inference_request", "request_id": "r", "ollama_params": {}}', None,
         CloseReason.UNKNOWN_FRAME_TYPE),
        ('{"type": "cancel_request", "request_id": "r"}', None, CloseReason.UNKNOWN_FRAME_TYPE),
    ],
    ids=["non-json", "binary", "string", "type-int", "request-id-list", "done-str",
         "node-id-object", "router-frame", "cancel-frame"],
)
async def test_malformed_frames_close_only_the_sender(channel_layer, text, data, reason):
    honest = await honest_node()
    hostile = await hostile_node()
    stream = await HonestStream.begin(honest)

    await hostile.communicator.send_to(text_data=text, bytes_data=data)
    assert await hostile.closed() == (1008, reason)
    await hostile.disconnect()

    await stream.finish()
    await honest.disconnect()


async def test_frame_flood_closes_the_flooder_and_the_honest_stream_goes_on(
    channel_layer, settings
):
    settings.IDLECLAW_NODE_MAX_FRAMES_PER_S = 50
    honest = await honest_node()
    hostile = await hostile_node()
    stream = await HonestStream.begin(honest)

    flood = json.dumps({"type": "heartbeat", "node_id": "honest-node", "active_requests": 0})
    for _ in range(400):
        await hostile.communicator.send_to(text_data=flood)
    assert await hostile.closed() == (1008, CloseReason.RATE_LIMITED)
    await hostile.disconnect()

    await stream.finish()  # seven frames in a few milliseconds: within the honest burst
    await honest.disconnect()


async def test_deeply_nested_frame_is_refused_with_1008(channel_layer):
    honest = await honest_node()
    hostile = await hostile_node()
    stream = await HonestStream.begin(honest)

    depth = 20_000  # 40 kB: far under the frame limit
    await hostile.communicator.send_to(
        text_data='{"type": "heartbeat", "x": ' + "[" * depth + "]" * depth + "}"
    )
    assert await close_of(hostile) == (1008, CloseReason.INVALID_FRAME)
    await hostile.disconnect()
    assert not await sync_to_async(NodeSession.objects.filter(node_id="hostile-node").exists)()
    await stream.finish()
    await honest.disconnect()


# --- Output sanitization on every front end ------------------------------------------------------

THINKING_PIECES = ["Let me <b", ">think</b> about <!-- hidden -", "-> it"]
CONTENT_PIECES = ["Hello <scr", "ipt>alert(1)</scr", "ipt> world, 3 < 4", " and <img src=x on",
                  "error=alert(2)>", "!"]
CLEAN_THINKING = "Let me think about  it"
CLEAN_CONTENT = "Hello  world, 3 < 4 and !"  # a script's body goes with its tags
TAG = re.compile(r"<[A-Za-z/!?]")


@pytest.mark.parametrize("front_end", list(FRONT_ENDS))
async def test_markup_split_across_chunks_is_stripped_on_every_front_end(
    channel_layer, front_end
):
    node = await honest_node()
    client = front_end_request(front_end)
    await client.app.send_input({"type": "http.request", "body": client.body})
    rid = (await node.recv())["request_id"]
    for piece in THINKING_PIECES:
        await node.send({"type": FrameType.INFERENCE_CHUNK, "request_id": rid,
                         "chunk": {"message": {"role": "assistant", "thinking": piece},
                                   "done": False}})
    for piece in CONTENT_PIECES:
        await node.chunk(rid, piece)
    await node.chunk(rid, "", done=True, done_reason="stop")
    start = await client.app.receive_output(5)
    seen = read_answer(front_end, start["status"], await client.read_all())

    assert seen.status == 200
    assert seen.content == CLEAN_CONTENT
    assert seen.reasoning == CLEAN_THINKING
    assert seen.finish == "stop"
    assert not TAG.search(seen.content + seen.reasoning)
    await node.disconnect()


async def test_node_error_text_never_reaches_the_consumer(channel_layer):
    node = await honest_node()
    client = HttpClient("POST", "/api/chat", chat_body())
    await client.start()
    rid = (await node.recv())["request_id"]
    await node.chunk(rid, "partial")
    await node.send({"type": FrameType.INFERENCE_ERROR, "request_id": rid,
                     "error": "<script>alert(1)</script> log in at https://evil.example"})
    events = sse_events(await client.read_all())
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "partial\n\n[Error: the node's model server failed]"
    await node.disconnect()


async def test_long_tag_split_over_chunks_is_still_removed(channel_layer):
    node = await honest_node()
    client = HttpClient("POST", "/api/chat", chat_body())
    await client.start()
    rid = (await node.recv())["request_id"]
    await node.chunk(rid, 'before <img title="' + "a" * 1100)
    await node.chunk(rid, '" src=x onerror=alert(1)> after')
    await node.chunk(rid, "", done=True)
    events = sse_events(await client.read_all())
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert strip_tags(text) == text  # no tag left in what the consumer reads
    assert text.startswith("before ") and text.endswith(" after")
    await node.disconnect()


@pytest.mark.parametrize("front_end", ["api-chat-sse", "ollama-chat-ndjson"])
async def test_lone_surrogate_from_a_node_does_not_break_the_stream(channel_layer, front_end):
    node = await honest_node(max_concurrent=1)
    client = front_end_request(front_end)
    assert (await client.start())[0] == 200
    rid = (await node.recv())["request_id"]
    await node.chunk(rid, "ok \ud800 fine")
    await node.chunk(rid, "", done=True, done_reason="stop")
    seen = read_answer(front_end, 200, await read_body(client))
    assert seen.content.startswith("ok ") and seen.content.endswith(" fine")
    assert seen.finish == "stop"
    assert await leftovers() == (0, 0, 0)
    await node.disconnect()


# --- Tool calls ----------------------------------------------------------------------------------

GOOD_CALLS = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
FIRST_CHUNK_CALLS = [
    # Extra fields around a valid call are dropped; the call itself is kept.
    {"id": "forged", "type": "evil", "function": {"name": "get_weather",
                                                  "arguments": {"city": "Paris"}, "x": 1}},
    {"function": {"name": "big", "arguments": {"blob": "A" * 25_000}}},
    {"function": {"name": "rm -rf /", "arguments": {}}},
    {"function": {"name": "<script>alert(1)</script>", "arguments": {}}},
    {"function": {"name": "", "arguments": {}}},
    {"function": {"name": "n" * 65, "arguments": {}}},
    {"function": {"name": 42, "arguments": {}}},
    {"function": {"name": "f", "arguments": [1, 2]}},
]
SECOND_CHUNK_CALLS = [
    {"function": {"name": "f", "arguments": "not json"}},
    {"function": {"name": "f", "arguments": '"a string"'}},
    {"function": "get_weather"},
    {"name": "get_weather", "arguments": {}},
    "get_weather",
    42,
    None,
    # Arguments as a JSON string (as some models write them) are parsed into an object.
    {"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
]
# Front ends whose requests can offer tools (the network's own /api/chat cannot).
TOOL_FRONT_ENDS = ["v1-stream", "v1-json", "ollama-chat-ndjson", "ollama-chat-json"]


def offer(*names: str) -> list[dict]:
    return [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
            for name in names]


async def _send_calls(node: ScriptedNode, rid: str, calls: list) -> None:
    await node.send({"type": FrameType.INFERENCE_CHUNK, "request_id": rid,
                     "chunk": {"message": {"role": "assistant", "content": "",
                                           "tool_calls": calls}, "done": False}})


@pytest.mark.parametrize("front_end", TOOL_FRONT_ENDS)
async def test_malicious_tool_calls_are_dropped_and_valid_ones_kept(channel_layer, front_end):
    node = await honest_node()
    client = front_end_request(front_end, tools=offer("get_weather", "big", "f"))
    await client.app.send_input({"type": "http.request", "body": client.body})
    rid = (await node.recv())["request_id"]
    await _send_calls(node, rid, FIRST_CHUNK_CALLS)
    await _send_calls(node, rid, SECOND_CHUNK_CALLS)
    await _send_calls(node, rid, [{"function": {"name": "x y"}}, "only bad calls"])
    await node.chunk(rid, "", done=True, done_reason="stop")
    start = await client.app.receive_output(5)
    seen = read_answer(front_end, start["status"], await client.read_all())

    assert seen.status == 200
    assert seen.tool_calls == GOOD_CALLS
    if front_end.startswith("v1"):
        assert seen.finish == "tool_calls"
    await node.disconnect()


async def test_tool_calls_of_one_chunk_are_capped(channel_layer):
    node = await honest_node()
    client = front_end_request("ollama-chat-json", tools=offer(*(f"tool_{i}" for i in range(32))))
    await client.app.send_input({"type": "http.request", "body": client.body})
    rid = (await node.recv())["request_id"]
    await _send_calls(node, rid, [{"function": {"name": f"tool_{i % 32}", "arguments": {}}}
                                  for i in range(40)])
    await node.chunk(rid, "", done=True)
    await client.app.receive_output(5)
    seen = read_answer("ollama-chat-json", 200, await client.read_all())
    assert [name for name, _ in seen.tool_calls] == [f"tool_{i}" for i in range(16)]
    await node.disconnect()


async def test_tool_calls_of_one_answer_are_bounded(channel_layer):
    node = await honest_node()
    client = front_end_request("v1-json", tools=offer("f"))
    await client.app.send_input({"type": "http.request", "body": client.body})
    rid = (await node.recv())["request_id"]
    # 40 frames of 16 calls of ~4.5 kB: ~2.9 MB of tool calls, every frame under 100 kB.
    calls = [{"function": {"name": "f", "arguments": {"blob": "B" * 4_500}}}] * 16
    for _ in range(40):
        await _send_calls(node, rid, calls)
    await node.chunk(rid, "", done=True)
    await client.app.receive_output(10)
    seen = read_answer("v1-json", 200, await client.read_all())
    # Either bound holds: the answer's character budget, or 16 calls of at most 20,000 chars.
    total = sum(len(json.dumps(arguments)) for _, arguments in seen.tool_calls)
    assert total <= 16 * 20_000
    await node.disconnect()


async def test_tool_call_with_deeply_nested_arguments_string_is_dropped(channel_layer):
    node = await honest_node()
    client = HttpClient("POST", "/api/chat", chat_body())
    await client.start()
    rid = (await node.recv())["request_id"]
    await _send_calls(node, rid, [{"function": {"name": "f", "arguments": "[" * 5_000}}])
    await asyncio.sleep(0.1)
    if node.communicator.future.done():
        node.communicator.future.result()  # the node consumer crashed: show why
    await node.chunk(rid, "still here", done=True, done_reason="stop")
    events = sse_events(await read_body(client))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == (
        "still here")
    await node.disconnect()


# --- Stalling, lying and banned nodes -------------------------------------------------------------


async def test_stalling_node_is_cancelled_and_its_consumer_fails_over_to_the_honest_node(
    channel_layer, settings
):
    settings.IDLECLAW_STALL_TIMEOUT = 1.0
    honest = await honest_node()
    stream = await HonestStream.begin(honest)
    # The honest answer keeps flowing, well inside the stall timeout, while the staller stalls.
    honest_answer = asyncio.create_task(stream.finish(pace=0.15))
    staller = ScriptedNode(ip="10.66.0.1")
    await staller.register(node_id="staller", models=[{"name": MODEL, "size": 1}])
    # The idle staller is less loaded than the honest node: the next request goes to it.
    victim = HttpClient("POST", "/api/chat", chat_body("stalled question"))
    assert (await victim.start())[0] == 200
    stalled = await staller.recv()
    assert stalled["type"] == FrameType.INFERENCE_REQUEST
    # It never answers. After the stall timeout it is told to stop and the request moves on.
    assert await staller.recv(timeout=5) == {"type": "cancel_request",
                                            "request_id": stalled["request_id"]}
    retried = await honest.recv(timeout=5)
    assert retried["ollama_params"]["messages"][0]["content"] == "stalled question"
    for word in HONEST_WORDS:
        await honest.chunk(retried["request_id"], word)
    await honest.chunk(retried["request_id"], "", done=True, done_reason="stop")
    assert_unaltered(sse_events(await victim.read_all()))

    await honest_answer
    assert (await session_of("staller")).timed_out == 1
    assert await leftovers() == (0, 0, 0)
    await staller.disconnect()
    await honest.disconnect()


async def test_a_node_cannot_claim_its_way_to_the_top_of_the_ranking(channel_layer):
    liar = ScriptedNode(ip="10.66.0.1")
    await liar.register(node_id="liar", models=[{"name": MODEL, "size": 1}])
    client = HttpClient("POST", "/api/chat", chat_body())
    await client.start()
    rid = (await liar.recv())["request_id"]
    await liar.chunk(rid, "fast")
    await liar.chunk(rid, "", done=True, done_reason="stop", eval_count=10**12,
                     eval_duration=1)
    await client.read_all()
    # Two chunks within milliseconds: nothing the router saw supports a million tokens a second.
    assert (await session_of("liar")).tokens_per_s < 1e6
    await liar.disconnect()


async def test_banned_node_cannot_come_back_even_with_its_resume_token(channel_layer):
    honest = await honest_node()
    stream = await HonestStream.begin(honest)
    banned = ScriptedNode(ip="10.66.0.9")
    token = (await banned.register(node_id="to-be-banned",
                                   models=[{"name": MODEL, "size": 1}]))["resume_token"]
    await banned.disconnect()
    await sync_to_async(NodeBan.objects.create)(kind="node_id", value="to-be-banned",
                                                reason="served wrong answers")
    await sync_to_async(NodeBan.objects.create)(
        kind="ip", value="10.66.0.9", expires_at=timezone.now() + timezone.timedelta(hours=1))

    for node_id, token_to_use in (("to-be-banned", token), ("fresh-identity", None)):
        again = ScriptedNode(ip="10.66.0.9" if node_id == "fresh-identity" else "10.66.0.10")
        await again.open()
        extra = {"resume_token": token_to_use} if token_to_use else {}
        await again.send(register_frame(node_id=node_id, models=[{"name": MODEL}], **extra))
        assert await again.closed() == (1008, CloseReason.BANNED)
        await again.disconnect()

    # Nothing of the banned node is routable; a new request goes to the honest node.
    assert await sync_to_async(NodeSession.objects.count)() == 1
    second = HttpClient("POST", "/api/chat", chat_body("after the ban"))
    assert (await second.start())[0] == 200
    request = await honest.recv()
    await honest.chunk(request["request_id"], "", done=True)
    await second.read_all()
    await stream.finish()
    assert await sync_to_async(InflightRequest.objects.count)() == 0
    await honest.disconnect()


async def test_hostile_nodes_leave_no_state_behind(channel_layer, settings):
    """After all of the above at once, the router's tables hold only the honest node."""
    settings.IDLECLAW_NODE_MAX_STRIKES = 1
    honest = await honest_node()
    stream = await HonestStream.begin(honest)
    hostiles = [await hostile_node(ip=f"10.66.1.{i}", node_id=f"h{i}") for i in range(3)]
    await hostiles[0].chunk(stream.request_id, "x")
    await hostiles[0].chunk(stream.request_id, "x")
    await hostiles[1].communicator.send_to(text_data="{")
    await hostiles[2].chunk("r", "y" * MAX_FRAME_BYTES)
    for hostile in hostiles:
        await hostile.closed()
        await hostile.disconnect()
    await asyncio.sleep(0.05)
    await stream.finish()
    assert [s.node_id for s in await sync_to_async(list)(NodeSession.objects.all())] == [
        "honest-node"]
    assert await leftovers() == (0, 0, 0)
    await honest.disconnect()

