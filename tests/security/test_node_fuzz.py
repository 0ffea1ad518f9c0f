"""Property test: whatever a node sends, nothing escapes the router (issue 12, "Also").

Random and mutated ``register`` frames, and for a registered node random ``inference_chunk``
(content, thinking, tool calls, stats), ``inference_chunks`` batches, ``inference_error``,
heartbeats and malformed frames, while a consumer waits for the answer on one of the front ends.
Invariants: the router never crashes (no exception escapes a consumer or a view, no traceback in
the log); every stream ends with its front end's final event; every byte a consumer gets is
strict JSON (``NaN`` fails, as in a browser); ``/health`` keeps answering within 100 ms while the
node sends; nothing is left held afterwards. In-process through the real ASGI application, like
the consumer fuzz (tests/security/test_fuzz.py).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from nodes.protocol import CloseReason
from tests.routing.test_views import HttpClient, strict_json
from tests.scripted_node import ScriptedNode, register_frame
from tests.security.hostile import front_end_request, leftovers, read_answer, read_body
from tests.security.test_fuzz import FUZZ_SETTINGS, json_values, server_errors

pytestmark = [pytest.mark.django_db(transaction=True)]

MODEL = "llama3.2:3b"
CLOSE_REASONS = {reason.value for reason in CloseReason}
FRONT_ENDS = ["api-chat-sse", "v1-stream", "v1-json", "ollama-chat-ndjson", "ollama-chat-json",
              "ollama-generate-ndjson", "ollama-generate-json"]
OFFERED = [{"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}]

# --- What a node may send ------------------------------------------------------------------

texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from([
        "<script>alert(1)</script>", "List<String> xs", "```html\n<div>x</div>\n```", "`a<b`",
        "\x1b]0;PWNED\x07", "\ud800", "NaN", "<" * 2_000 + "a" + ">b" * 2_000, "x" * 20_000,
        "<img src=x onerror=alert(1)>", "<!--", "</", "<scr<b>ipt>",
    ]),
    json_values,
)
integers = st.one_of(st.integers(), st.sampled_from([2**53, 2**53 + 1, -1, int("9" * 3000)]),
                     st.floats(), st.booleans(), st.text(max_size=5))
tool_calls = st.lists(
    st.one_of(
        st.fixed_dictionaries({"function": st.fixed_dictionaries(
            {"name": st.sampled_from(["get_weather", "rm_rf", "", "x y"]) | json_values},
            optional={"arguments": st.one_of(
                st.fixed_dictionaries({"city": texts}),
                st.sampled_from(['{"city": "Oslo"}', '{"city": NaN}', "[" * 3_000, "{}"]),
                json_values,
            )})}),
        json_values,
    ),
    max_size=20,
) | json_values
messages = st.fixed_dictionaries(
    {},
    optional={"role": st.just("assistant") | json_values, "content": texts, "thinking": texts,
              "tool_calls": tool_calls},
) | json_values
chunks = st.fixed_dictionaries(
    {"message": messages},
    optional={"done": st.booleans() | json_values,
              "done_reason": st.sampled_from(["stop", "length", "load", "evil"]) | json_values,
              "eval_count": integers, "eval_duration": integers, "prompt_eval_count": integers,
              "total_duration": integers},
) | json_values


@st.composite
def node_frames(draw: st.DrawFn, request_id: str) -> str | bytes:
    """One frame about the request (or not), mostly well-formed, sometimes not JSON at all."""
    kind = draw(st.sampled_from(["chunk"] * 6 + ["chunks"] * 2 + ["error", "heartbeat",
                                                                  "other", "raw"]))
    rid = draw(st.sampled_from([request_id] * 8 + ["never-sent", ""]) | json_values)
    if kind == "chunk":
        frame: Any = {"type": "inference_chunk", "request_id": rid, "chunk": draw(chunks)}
    elif kind == "chunks":
        batch = draw(st.lists(chunks, max_size=8) | st.integers(250, 300).map(
            lambda n: [{"message": {"content": "x"}, "done": False}] * n) | json_values)
        frame = {"type": "inference_chunks", "request_id": rid, "chunks": batch}
    elif kind == "error":
        frame = {"type": "inference_error", "request_id": rid,
                 "error": draw(st.sampled_from(["ollama_error", "invalid_request", "evil"])
                               | json_values)}
    elif kind == "heartbeat":
        frame = {"type": "heartbeat", "active_requests": draw(integers),
                 "available": draw(st.booleans() | json_values)}
    elif kind == "other":
        frame = draw(json_values)
    else:
        return draw(st.sampled_from([
            '{"type":"inference_chunk","request_id":"' + request_id
            + '","chunk":{"message":{"content":NaN}}}',
            '{"type":"heartbeat","active_requests":Infinity}', "{", "[]", "null", b"\x00\xff",
            '{"type": "inference_chunk", "request_id": "' + request_id + '", "chunk": '
            + "[" * 50_000 + "]" * 50_000 + "}",
        ]) | st.binary(max_size=50))
    text = json.dumps(frame)
    if draw(st.integers(0, 9)) == 0:  # now and then a mutated one
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "NaN", "}", "\\ud800", '"'])) + text[cut:]
    return text


@st.composite
def sessions(draw: st.DrawFn) -> tuple[str, bool, list[Any]]:
    front_end = draw(st.sampled_from(FRONT_ENDS))
    offer = draw(st.booleans()) and "chat" in front_end and "api" not in front_end
    frames = draw(st.lists(node_frames("REQUEST"), min_size=1, max_size=8))
    return front_end, offer, frames


# --- The properties --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _registrations_welcome(settings):
    """Every example registers a node from the same address."""
    settings.IDLECLAW_RATE_NODE_REGISTER = "100000/h"
    settings.IDLECLAW_MAX_NODES_PER_IP = 1000


async def timed_health() -> float:
    started = time.perf_counter()
    client = HttpClient("GET", "/health")
    status, _ = await client.start()
    await client.read_all()
    assert status == 200
    return time.perf_counter() - started


async def send_raw(node: ScriptedNode, frame: str | bytes) -> None:
    key = "bytes" if isinstance(frame, bytes) else "text"
    await node.communicator.send_input({"type": "websocket.receive", key: frame})


def check_ended(front_end: str, status: int, body: bytes) -> None:
    """The answer ended as its clients expect, in strict JSON all through."""
    if status != 200:
        # 400: the node called the request invalid, on the first try and on the retry.
        assert status in (400, 502), (status, body[:300])
        strict_json(body)
        return
    seen = read_answer(front_end, status, body)  # strict JSON; SSE must end with [DONE]
    if "ndjson" in front_end:
        last = strict_json(body.splitlines()[-1])
        assert last.get("done") is True or "error" in last, last
    elif front_end == "api-chat-sse" or front_end == "v1-stream":
        assert seen.finish is not None or seen.error, seen


# 100 sessions rather than the 150 of the other fuzz tests: each is a whole node session and a
# consumer's request (about 0.1 s), and the suite has a 10-minute budget.
@settings(FUZZ_SETTINGS, max_examples=100)
@given(session=sessions())
async def test_whatever_a_node_sends_every_stream_ends_and_the_router_keeps_serving(
    channel_layer, caplog, session
):
    front_end, offer, frames = session
    caplog.clear()
    node = ScriptedNode(ip="10.9.0.1")
    await node.register(node_id=f"fuzzed-{uuid.uuid4()}", max_concurrent=4,
                        models=[{"name": MODEL, "capabilities": ["tools", "thinking"]}])
    client = front_end_request(front_end, **({"tools": OFFERED} if offer else {}))
    await client.app.send_input({"type": "http.request", "body": client.body})
    request_id = (await node.recv())["request_id"]
    health = asyncio.create_task(timed_health())
    for frame in frames:
        if isinstance(frame, str):
            frame = frame.replace("REQUEST", request_id)
        await send_raw(node, frame)
    await node.chunk(request_id, "", done=True, done_reason="stop")  # if it still can
    assert await health < 0.1
    await asyncio.sleep(0.05)
    await node.disconnect()  # whatever is still open ends now, with an error event
    event(front_end)

    start = await client.app.receive_output(10)
    assert start["type"] == "http.response.start"
    check_ended(front_end, start["status"], await read_body(client, timeout=10))
    assert server_errors(caplog) == []
    assert await leftovers() == (0, 0, 0)


@st.composite
def register_frames(draw: st.DrawFn) -> str:
    frame: dict[str, Any] = register_frame(node_id="registering-node")
    for key in draw(st.lists(st.sampled_from(["node_id", "models", "max_concurrent",
                                              "protocol", "client", "ollama_version",
                                              "resume_token", "type"]), max_size=3)):
        if key == "models":
            frame[key] = draw(st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from(["llama3.2:3b", "<b>x</b>", "ll\u0430ma", ""])
                 | st.text(max_size=70) | json_values},
                optional={"size": integers, "capabilities": json_values}), max_size=22)
                | json_values)
        else:
            frame[key] = draw(integers | texts | json_values)
    text = json.dumps(frame)
    if draw(st.integers(0, 5)) == 0:
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["NaN", "}", "Infinity"])) + text[cut:]
    return text


@FUZZ_SETTINGS
@given(frame=register_frames())
async def test_any_register_frame_is_accepted_cleanly_or_refused_with_a_reason(
    channel_layer, caplog, frame
):
    caplog.clear()
    node = ScriptedNode(ip="10.9.0.2")
    await node.open()
    await node.communicator.send_to(text_data=frame)
    output = await node.communicator.receive_output(3)
    if output["type"] == "websocket.close":
        assert output.get("code") in (1008, 1009)
        assert output.get("reason") in CLOSE_REASONS
        event(f"refused: {output.get('reason')}")
    else:
        reply = strict_json(output["text"])
        assert reply["type"] == "registered"
        event("registered")
        client = HttpClient("GET", "/ollama/api/tags")
        await client.start()
        for model in strict_json(await client.read_all())["models"]:
            assert model["name"].isascii() and "<" not in model["name"]
    await node.disconnect()
    assert server_errors(caplog) == []
