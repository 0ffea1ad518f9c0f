"""Routing that survives real networks: the queue, failover, stalls, limits and measured node
quality, with scripted nodes through the real ASGI application."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async

from nodes.models import Contributor, ContributorHour, NodeSession
from routing.models import InflightRequest, QueuedRequest
from tests.routing.test_views import HttpClient, sse_events, text_of
from tests.scripted_node import ScriptedNode, text_chunk

pytestmark = [pytest.mark.django_db(transaction=True)]

MODEL = "llama3.2:3b"


def chat(prompt: str = "hi", path: str = "/api/chat", **extra) -> HttpClient:
    return HttpClient("POST", path, {"model": MODEL,
                                     "messages": [{"role": "user", "content": prompt}], **extra})


async def leftovers() -> tuple[int, int]:
    inflight = await sync_to_async(InflightRequest.objects.count)()
    queued = await sync_to_async(QueuedRequest.objects.count)()
    return inflight, queued


async def answer(node: ScriptedNode, request: dict, words: list[str], **final) -> None:
    for word in words:
        await node.chunk(request["request_id"], word)
    await node.chunk(request["request_id"], "", done=True, done_reason="stop", **final)


async def serving() -> tuple[ScriptedNode, HttpClient, dict]:
    """One node, one consumer's chat, and the request as the node received it."""
    node = ScriptedNode()
    await node.register()
    client = chat()
    await client.start()
    return node, client, await node.recv()


@pytest.fixture
def fast_queue(settings):
    settings.IDLECLAW_QUEUE_NOTICE_INTERVAL = 0.2
    settings.IDLECLAW_QUEUE_TIMEOUT = 10


# --- queue ----------------------------------------------------------------------------------


async def test_queue_timeout_is_a_503_with_retry_after(channel_layer, settings):
    settings.IDLECLAW_QUEUE_TIMEOUT = 0.5
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    busy = chat()
    await busy.start()
    waiting = chat()
    status, headers = await waiting.start()
    assert status == 503
    assert int(headers["retry-after"]) > 0
    assert "no slot became free in time" in json.loads(await waiting.read_all())["detail"]
    assert await leftovers() == (1, 0)
    await node.disconnect()


async def test_full_queue_is_a_503_at_once(channel_layer, settings):
    settings.IDLECLAW_MAX_QUEUE = 0
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    await chat().start()
    status, headers = await chat().start()
    assert status == 503 and "retry-after" in headers
    await node.disconnect()


async def test_a_full_queue_gives_the_largest_consumers_last_place_to_a_newcomer(
    channel_layer, fast_queue, settings
):
    """Red-team M1 of issue 20: one consumer filling the queue cannot keep others out; the
    request that gave its place up is told so, and the newcomer is served."""
    settings.IDLECLAW_MAX_QUEUE = 2
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    busy = chat("busy")
    await busy.start()
    busy_request = await node.recv()
    first = chat("first")
    assert (await first.start())[0] == 200
    waiting = chat("waiting")
    assert (await waiting.start())[0] == 200
    assert await waiting.read_part() == b": queued position=2\n\n"
    newcomer = chat("newcomer")
    newcomer.app.scope["client"] = ("10.3.0.1", 5000)
    assert (await newcomer.start())[0] == 200
    events = sse_events(await waiting.read_all())
    assert events[-2]["choices"][0]["finish_reason"] == "error"
    assert "too many requests are waiting" in json.dumps(events[-2]), events
    # X's first queued request, then the newcomer.
    await answer(node, busy_request, ["one"])
    first_request = await node.recv()
    assert first_request["ollama_params"]["messages"][0]["content"] == "first"
    await answer(node, first_request, ["two"])
    served = await node.recv()
    assert served["ollama_params"]["messages"][0]["content"] == "newcomer"
    await answer(node, served, ["three"])
    assert text_of(sse_events(await busy.read_all())) == "one"
    assert text_of(sse_events(await first.read_all())) == "two"
    assert text_of(sse_events(await newcomer.read_all())) == "three"
    assert await leftovers() == (0, 0)
    await node.disconnect()


async def test_queued_request_is_served_when_a_slot_frees(channel_layer, fast_queue):
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    first = chat("first")
    await first.start()
    first_request = await node.recv()
    second = chat("second")
    status, _ = await second.start()  # the stream opens while it waits
    assert status == 200
    notice = await second.read_part()
    assert notice == b": queued position=1\n\n"
    await answer(node, first_request, ["one"])
    assert text_of(sse_events(await first.read_all())) == "one"
    second_request = await node.recv()
    assert second_request["ollama_params"]["messages"][0]["content"] == "second"
    await answer(node, second_request, ["two"])
    events = sse_events(await second.read_all())
    assert text_of(events) == "two"
    assert await leftovers() == (0, 0)
    await node.disconnect()


async def test_waiting_requests_are_served_first_in_first_out(channel_layer, fast_queue):
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    holder = chat("holder")
    await holder.start()
    request = await node.recv()
    waiting = []
    for name in ("a", "b", "c", "d"):
        client = chat(name)
        assert (await client.start())[0] == 200
        waiting.append(client)
        await asyncio.sleep(0.05)
    served = []
    for _ in waiting:
        await answer(node, request, ["x"])
        request = await node.recv(timeout=5)
        served.append(request["ollama_params"]["messages"][0]["content"])
    assert served == ["a", "b", "c", "d"]
    await answer(node, request, ["x"])
    for client in waiting:
        events = sse_events(await client.read_all())
        assert events[-1] == "[DONE]"
    assert await leftovers() == (0, 0)
    await node.disconnect()


async def test_queue_waits_for_a_node_that_registers_later(channel_layer, fast_queue):
    busy_node = ScriptedNode()
    await busy_node.register(max_concurrent=1)
    await chat().start()
    await busy_node.recv()
    waiting = chat("late")
    assert (await waiting.start())[0] == 200
    newcomer = ScriptedNode(ip="10.0.0.8")
    await newcomer.register()
    request = await newcomer.recv(timeout=3)
    assert request["ollama_params"]["messages"][0]["content"] == "late"
    await busy_node.disconnect()
    await newcomer.disconnect()


async def test_consumer_leaving_the_queue_removes_its_place(channel_layer, fast_queue):
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    await chat().start()
    waiting = chat()
    await waiting.start()
    await waiting.read_part()
    assert (await leftovers())[1] == 1
    await waiting.hang_up()
    assert (await leftovers())[1] == 0
    await node.disconnect()


# --- failover -------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["error", "disconnect", "stall"])
async def test_failure_before_the_first_token_fails_over_invisibly(
    channel_layer, settings, failure
):
    settings.IDLECLAW_STALL_TIMEOUT = 0.5
    bad, good = ScriptedNode(ip="10.0.0.1"), ScriptedNode(ip="10.0.0.2")
    await bad.register(node_id="bad")
    client = chat("fail over")
    await client.start()
    request = await bad.recv()
    await good.register(node_id="good")
    if failure == "error":
        await bad.send({"type": "inference_error", "request_id": request["request_id"],
                        "error": "ollama_unavailable"})
    elif failure == "disconnect":
        await bad.disconnect()
    retried = await good.recv(timeout=3)
    if failure == "stall":
        assert await bad.recv() == {"type": "cancel_request",
                                    "request_id": request["request_id"]}
    assert retried["ollama_params"] == request["ollama_params"]
    await answer(good, retried, ["complete", " answer"])
    events = sse_events(await client.read_all())
    assert text_of(events) == "complete answer"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert await leftovers() == (0, 0)
    await good.disconnect()
    if failure != "disconnect":
        await bad.disconnect()


async def test_failover_stops_after_max_attempts(channel_layer, settings):
    settings.IDLECLAW_MAX_ATTEMPTS = 2
    settings.IDLECLAW_QUEUE_TIMEOUT = 0.3
    nodes = [ScriptedNode(ip=f"10.0.1.{i}") for i in range(3)]
    for node in nodes:
        await node.register()
    client = chat()
    await client.start()
    seen = 0
    for _ in range(2):
        for node in nodes:
            if not await node.nothing_sent(0.2):
                request = await node.recv()
                seen += 1
                await node.send({"type": "inference_error", "request_id": request["request_id"],
                                 "error": "ollama_error"})
    events = sse_events(await client.read_all())
    assert seen == 2
    assert events[-2]["choices"][0]["finish_reason"] == "error"
    assert "[Error: the node's model server failed]" in text_of(events)
    assert await leftovers() == (0, 0)
    for node in nodes:
        await node.disconnect()


async def next_request(nodes: list[ScriptedNode]) -> tuple[ScriptedNode, dict]:
    """The next inference request any of ``nodes`` receives, and which node got it."""
    for _ in range(100):
        for node in nodes:
            if not await node.nothing_sent(0.02):
                message = await node.recv()
                if message["type"] == "inference_request":
                    return node, message
    raise AssertionError("no node received the request")


@sync_to_async
def failures_of(*node_ids: str) -> list[int]:
    sessions = {s.node_id: s for s in NodeSession.objects.filter(node_id__in=node_ids)}
    return [sessions[node_id].consecutive_failures for node_id in node_ids]


async def test_a_request_two_nodes_refuse_as_invalid_is_a_400_and_blames_neither(channel_layer):
    """Red-team C1 of issue 19: a request every Ollama refuses (a bad option) counted as a
    failure of each node it was tried on, so three such requests cooled honest nodes down."""
    first, second = ScriptedNode(ip="10.0.0.1"), ScriptedNode(ip="10.0.0.2")
    await first.register(node_id="first")
    await second.register(node_id="second")
    for _ in range(3):
        client = chat("refused", path="/ollama/api/chat", stream=False)
        await client.app.send_input({"type": "http.request", "body": client.body})
        tried = set()
        for _ in range(2):  # one node, then the other: each says its Ollama refused it
            node, request = await next_request([first, second])
            tried.add(node)
            await node.send({"type": "inference_error", "request_id": request["request_id"],
                             "error": "invalid_request"})
        assert tried == {first, second}
        start = await client.app.receive_output(5)
        assert start["status"] == 400
        assert "refused the request as invalid" in json.loads(await client.read_all())["error"]
    assert await failures_of("first", "second") == [0, 0]
    assert await leftovers() == (0, 0)
    for node in (first, second):
        await node.disconnect()


async def test_one_node_refusing_as_invalid_hands_the_request_to_another(channel_layer):
    """A hostile node cannot deny a consumer by calling every request invalid."""
    liar, honest = ScriptedNode(ip="10.0.0.1"), ScriptedNode(ip="10.0.0.2")
    await liar.register(node_id="liar")
    client = chat()
    await client.start()
    request = await liar.recv()
    await honest.register(node_id="honest")
    await liar.send({"type": "inference_error", "request_id": request["request_id"],
                     "error": "invalid_request"})
    retried = await honest.recv(timeout=3)
    await answer(honest, retried, ["served"])
    assert text_of(sse_events(await client.read_all())) == "served"
    for node in (liar, honest):
        await node.disconnect()


async def test_failure_after_the_first_token_is_an_error_not_a_retry(channel_layer):
    first, spare = ScriptedNode(ip="10.0.0.1"), ScriptedNode(ip="10.0.0.2")
    await first.register(node_id="first")
    client = chat()
    await client.start()
    request = await first.recv()
    await spare.register(node_id="spare")
    await first.chunk(request["request_id"], "half")
    await first.disconnect()
    events = sse_events(await client.read_all())
    assert text_of(events).startswith("half\n\n[Error: ")
    assert events[-2]["choices"][0]["finish_reason"] == "error"
    assert await spare.nothing_sent()
    await spare.disconnect()


# --- chunks that arrive together ------------------------------------------------------------


async def test_chunks_queued_together_reach_the_consumer_in_one_write(channel_layer):
    node, client, request = await serving()
    # Three frames in a row, before the router has run: they queue up for the relay together.
    for word in ("one", " two", " three"):
        await node.chunk(request["request_id"], word)
    assert text_of(sse_events(await client.read_part())) == "one two three"
    await node.chunk(request["request_id"], "", done=True, done_reason="stop")
    events = sse_events(await client.read_all())
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert await leftovers() == (0, 0)
    await node.disconnect()


async def test_chunks_queued_ahead_of_an_error_are_delivered_before_it(channel_layer):
    node, client, request = await serving()
    await node.chunk(request["request_id"], "one")
    await node.chunk(request["request_id"], " two")
    await node.send({"type": "inference_error", "request_id": request["request_id"],
                     "error": "ollama_error"})
    events = sse_events(await client.read_all())
    assert text_of(events) == "one two\n\n[Error: the node's model server failed]"
    assert events[-2]["choices"][0]["finish_reason"] == "error"
    assert await leftovers() == (0, 0)
    await node.disconnect()


async def test_a_hole_in_the_chunks_ends_the_answer_after_what_came_before_it(channel_layer):
    node, client, request = await serving()
    slot = await sync_to_async(InflightRequest.objects.get)()
    # As a channel layer that dropped a message would deliver them: chunk 1 never arrives.
    for seq, word in ((0, "one"), (2, " three")):
        await channel_layer.send(slot.reply_channel, {
            "type": "stream.chunk", "request_id": request["request_id"], "seq": seq,
            "chunks": [{"message": {"role": "assistant", "content": word}, "done": False}],
        })
    events = sse_events(await client.read_all())
    assert text_of(events) == "one\n\n[Error: part of the answer was lost in the router; try again]"
    assert await node.recv() == {"type": "cancel_request", "request_id": request["request_id"]}
    assert await leftovers() == (0, 0)
    await node.disconnect()


async def test_a_consumer_whose_channel_fills_up_ends_and_its_node_is_told_to_stop(
    channel_layer, settings, monkeypatch
):
    settings.IDLECLAW_STALL_TIMEOUT = 2.0
    monkeypatch.setattr(channel_layer, "capacity", 20)
    node, client, request = await serving()
    # 25 frames in one go, before the relay runs: the consumer's channel takes 20 of them.
    for i in range(25):
        await node.chunk(request["request_id"], f"w{i} ")
    # The node is stopped at once, not when the relay's stall timeout would stop it.
    cancel = await node.recv(timeout=0.5)
    assert cancel == {"type": "cancel_request", "request_id": request["request_id"]}
    events = sse_events(await client.read_all())
    kept = "".join(f"w{i} " for i in range(20))
    assert text_of(events) == kept + "\n\n[Error: the node stopped responding]"
    assert await leftovers() == (0, 0)
    await node.disconnect()


# --- stalls and limits ----------------------------------------------------------------------


async def test_stall_after_the_first_chunk_cancels_the_node_and_ends_with_error(
    channel_layer, settings
):
    settings.IDLECLAW_STALL_TIMEOUT = 0.3
    node, client, request = await serving()
    await node.chunk(request["request_id"], "one")
    events = sse_events(await client.read_all())
    assert text_of(events) == "one\n\n[Error: the node stopped responding]"
    assert await node.recv() == {"type": "cancel_request", "request_id": request["request_id"]}
    session = await sync_to_async(NodeSession.objects.get)()
    assert session.timed_out == 1
    await node.disconnect()


async def test_response_timeout_bounds_the_whole_answer(channel_layer, settings):
    settings.IDLECLAW_RESPONSE_TIMEOUT = 0.6
    node, client, request = await serving()
    for _ in range(5):
        await node.chunk(request["request_id"], "tick ")
        await asyncio.sleep(0.2)
    events = sse_events(await client.read_all())
    assert "[Error: the response took too long]" in text_of(events)
    assert {"type": "cancel_request", "request_id": request["request_id"]} in [
        await node.recv() for _ in range(1)
    ]
    await node.disconnect()


async def test_answer_is_cut_at_max_response_chars_with_finish_reason_length(
    channel_layer, settings
):
    settings.IDLECLAW_MAX_RESPONSE_CHARS = 10
    node = ScriptedNode()
    await node.register()
    client = chat(path="/v1/chat/completions", stream=True)
    await client.start()
    request = await node.recv()
    for word in ("abcd", "efgh", "ijkl", "mnop"):
        await node.chunk(request["request_id"], word)
    events = sse_events(await client.read_all())
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "abcdefghij"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert await node.recv() == {"type": "cancel_request", "request_id": request["request_id"]}
    assert await leftovers() == (0, 0)
    await node.disconnect()


# --- measured node quality ------------------------------------------------------------------


async def test_completed_requests_are_measured(channel_layer):
    node, client, request = await serving()
    await answer(node, request, ["Hello", " there", " friend"], eval_count=50,
                 eval_duration=1_000_000_000, prompt_eval_count=3)
    await client.read_all()
    session = await sync_to_async(NodeSession.objects.get)()
    assert session.completed == 1 and session.failed == 0
    assert session.tokens_per_s == pytest.approx(50.0)
    assert session.ttft_ms is not None and session.ttft_ms >= 0
    await node.disconnect()


async def test_a_nodes_prompt_count_is_believed_only_as_far_as_the_prompt_explains(
    channel_layer,
):
    """A node must not inflate the usage a consumer (or a bill computed from it) sees; an
    honest count, even a template's thousands of tokens, is passed on as it is."""
    node = ScriptedNode()
    await node.register(max_concurrent=2)
    for claimed, most in ((5000, 5000), (10**15, 8192 + 4 * 200)):
        client = chat("hello")
        await client.start()
        request = await node.recv()
        await answer(node, request, ["hi"], eval_count=1, prompt_eval_count=claimed)
        events = sse_events(await client.read_all())
        usage = next(event["usage"] for event in events if event.get("usage"))
        assert 0 < usage["prompt_tokens"] <= most, usage
        if claimed == most:
            assert usage["prompt_tokens"] == claimed
    await node.disconnect()


async def test_empty_chunks_credit_no_tokens_and_no_speed(channel_layer):
    """Red-team F3 of issue 20: a node that pads its answer with empty chunks is credited, in
    its contributor record and its measured speed, only what carried something."""
    node = ScriptedNode()
    await node.register(contributor={"key": "ab" * 32, "name": "padded-node"})
    client = chat()
    await client.start()
    request = await node.recv()
    rid = request["request_id"]
    await node.chunk(rid, "Hi")
    empty = text_chunk("")
    for _ in range(8):
        await node.chunks(rid, [empty] * 256)
    await node.chunk(rid, "!", done=True, done_reason="stop", eval_count=10**9,
                     eval_duration=1, prompt_eval_count=3)
    events = sse_events(await client.read_all())
    assert text_of(events) == "Hi!"
    # The node's own count is believed only as far as three characters explain it.
    usage = next(event["usage"] for event in events if event.get("usage"))
    assert usage["prompt_tokens"] == 3 and usage["completion_tokens"] <= 4 * 3 + 2
    person = await sync_to_async(Contributor.objects.get)(name="padded-node")
    assert person.served == 1 and person.tokens == 2
    hours = await sync_to_async(list)(ContributorHour.objects.values_list("tokens", flat=True))
    assert hours == [2]
    session = await sync_to_async(NodeSession.objects.get)()
    # Two tokens over however long the frames took, with the router's 10 ms floor: at most
    # 200/s, where counting the 2,048 empty chunks would read as more than 200,000/s.
    assert session.tokens_per_s <= 200
    await node.disconnect()


async def test_faster_node_is_preferred_when_both_are_free(channel_layer):
    slow, fast = ScriptedNode(ip="10.0.0.1"), ScriptedNode(ip="10.0.0.2")
    await slow.register(node_id="slow", max_concurrent=4)
    await fast.register(node_id="fast", max_concurrent=4)
    await sync_to_async(NodeSession.objects.filter(node_id="slow").update)(tokens_per_s=5.0)
    await sync_to_async(NodeSession.objects.filter(node_id="fast").update)(tokens_per_s=80.0)
    for _ in range(3):
        client = chat()
        await client.start()
        request = await fast.recv()
        await answer(fast, request, ["x"], eval_count=80, eval_duration=1_000_000_000)
        await client.read_all()
    assert await slow.nothing_sent()
    await slow.disconnect()
    await fast.disconnect()


async def test_node_failing_three_times_is_cooled_down_then_tried_again(channel_layer, settings):
    settings.IDLECLAW_NODE_COOLDOWN = 0.5
    settings.IDLECLAW_MAX_ATTEMPTS = 1
    flaky, steady = ScriptedNode(ip="10.0.0.1"), ScriptedNode(ip="10.0.0.2")
    await flaky.register(node_id="flaky")
    await sync_to_async(NodeSession.objects.filter(node_id="flaky").update)(tokens_per_s=999.0)
    for _ in range(3):
        client = chat()
        await client.start()
        request = await flaky.recv()
        await flaky.send({"type": "inference_error", "request_id": request["request_id"],
                          "error": "ollama_error"})
        await client.read_all()
    await steady.register(node_id="steady")
    await sync_to_async(NodeSession.objects.filter(node_id="steady").update)(tokens_per_s=1.0)
    # Cooled down: the faster node is skipped while the cooldown lasts.
    client = chat()
    await client.start()
    request = await steady.recv()
    assert await flaky.nothing_sent()
    await answer(steady, request, ["ok"], eval_count=1, eval_duration=1_000_000_000)
    await client.read_all()
    await asyncio.sleep(0.6)
    # Cooldown over: one trial request; success makes it a normal node again.
    client = chat()
    await client.start()
    request = await flaky.recv()
    await answer(flaky, request, ["back"])
    assert text_of(sse_events(await client.read_all())) == "back"
    session = await sync_to_async(NodeSession.objects.get)(node_id="flaky")
    assert session.consecutive_failures == 0 and session.failed == 3 and session.completed == 1
    await flaky.disconnect()
    await steady.disconnect()


async def test_models_and_health_report_slots_and_queue(channel_layer, fast_queue):
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    await chat().start()
    await node.recv()
    waiting = chat()
    await waiting.start()
    client = HttpClient("GET", "/api/models")
    await client.start()
    details = json.loads(await client.read_all())["details"][MODEL]
    assert details == {"size": 2019393189, "nodes": 1, "free_slots": 0, "queued": 1}
    client = HttpClient("GET", "/health")
    await client.start()
    health = json.loads(await client.read_all())
    assert health["active_requests"] == 1 and health["queued_requests"] == 1
    await node.disconnect()


async def test_a_chunk_lost_between_workers_ends_the_stream_with_an_error(channel_layer):
    node, client, request = await serving()
    await node.chunk(request["request_id"], "one ")
    first = sse_events(await client.read_part())
    row = await sync_to_async(InflightRequest.objects.get)()
    # As if the channel layer had dropped chunks 1 to 4 on the way (a buffer overflow).
    await channel_layer.send(row.reply_channel, {
        "type": "stream.chunk", "request_id": row.request_id, "seq": 5,
        "chunks": [{"message": {"role": "assistant", "content": "six"}, "done": False}]})
    events = first + sse_events(await client.read_all())
    assert text_of(events) == (
        "one \n\n[Error: part of the answer was lost in the router; try again]"
    )
    assert events[-2]["choices"][0]["finish_reason"] == "error"
    assert await node.recv() == {"type": "cancel_request", "request_id": request["request_id"]}
    await node.disconnect()


async def test_a_name_without_a_tag_is_its_latest_tag_as_ollama_resolves_it(channel_layer):
    node = ScriptedNode()
    await node.register(models=[{"name": "smollm2:latest", "size": 1}])
    for path in ("/api/chat", "/ollama/api/chat", "/v1/chat/completions"):
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}],
                "stream": True}
        client = HttpClient("POST", path, body)
        started = asyncio.ensure_future(client.start())
        request = await node.recv()
        assert request["ollama_params"]["model"] == "smollm2:latest"
        await answer(node, request, ["hello"])
        assert (await started)[0] == 200
        assert b"hello" in await client.read_all()
    await node.disconnect()


async def test_a_node_serving_the_bare_name_gets_it_as_asked(channel_layer):
    node = ScriptedNode()
    await node.register(models=[{"name": "custom", "size": 1}])
    client = chat(model="custom")
    await client.start()
    request = await node.recv()
    assert request["ollama_params"]["model"] == "custom"
    await answer(node, request, ["ok"])
    assert text_of(sse_events(await client.read_all())) == "ok"
    await node.disconnect()
