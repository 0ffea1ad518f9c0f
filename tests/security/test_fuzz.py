"""Property test: whatever a consumer sends, every endpoint answers with a documented status, an
error body in its API's own JSON shape, never a 500 or a traceback, and the router keeps
serving honest requests (PROTOCOL §2 and §3; issue 6 "Consumers are untrusted").

Runs in-process through the real ASGI application, with a scripted node that answers every
request it is sent, so valid-looking bodies really stream. Function-scoped fixtures are shared
by all examples on purpose: the node, its session and the channel layer are the long-lived
router the examples hammer; each example checks that it left no slot, queue place or stream
behind, so nothing carries over from one example to the next.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nodes.protocol import FrameType
from tests.routing.test_views import HttpClient
from tests.scripted_node import ScriptedNode
from tests.security.hostile import MODEL, chat_body, leftovers, read_answer, read_body

pytestmark = [pytest.mark.django_db(transaction=True)]

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repository
    # The fixtures are the shared router under test, not per-example state (module docstring).
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DETAIL, OPENAI, OLLAMA = "detail", "openai", "ollama"
# Documented statuses of each endpoint (PROTOCOL §2, README "Use the APIs...").
POST_ENDPOINTS: dict[str, tuple[str, set[int]]] = {
    "/api/chat": (DETAIL, {200, 400, 405, 413, 422, 429, 503}),
    "/v1/chat/completions": (OPENAI, {200, 400, 404, 405, 413, 429, 503}),
    "/ollama/api/chat": (OLLAMA, {200, 400, 404, 405, 413, 429, 503}),
    "/ollama/api/generate": (OLLAMA, {200, 400, 404, 405, 413, 429, 503}),
    "/ollama/api/show": (OLLAMA, {200, 400, 404, 405, 413, 429}),
    "/v1/embeddings": (OPENAI, {200, 400, 404, 405, 413, 429, 503}),
    "/ollama/api/embed": (OLLAMA, {200, 400, 404, 405, 413, 429, 503}),
    "/ollama/api/embeddings": (OLLAMA, {200, 400, 404, 405, 413, 429, 503}),
}
MANAGEMENT = ["/ollama/api/pull", "/ollama/api/push", "/ollama/api/create", "/ollama/api/copy",
              "/ollama/api/delete"]
GET_ENDPOINTS: dict[str, tuple[str, set[int]]] = {
    "/health": (DETAIL, {200, 429}),
    "/api/models": (DETAIL, {200, 429}),
    "/v1/models": (OPENAI, {200, 429}),
    "/v1/models/{id}": (OPENAI, {200, 404, 429}),
    "/ollama/api/tags": (OLLAMA, {200, 429}),
    "/ollama/api/ps": (OLLAMA, {200, 429}),
    "/ollama/api/version": (OLLAMA, {200, 429}),
}

# --- Generated bodies ------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=24))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
model_names = st.sampled_from([
    MODEL, MODEL, "nobody:1b", "", " ", "../etc/passwd", "m" * 64, "m" * 65, "a..b",
    "llama3.2:3b ", "LLAMA3.2:3B", "a/b_c-d.e:f", "-llama", "llama\u00e9", "<script>",
]) | st.text(max_size=70) | json_values
roles = st.sampled_from(["user", "user", "assistant", "system", "tool", "developer", "",
                         "USER", "function"]) | json_values
contents = (
    st.sampled_from(["hi", "", "x" * 10_000, "x" * 10_001, "<b>hi</b>", "\ud800"])
    | st.text(max_size=40)
    | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 5]),
                                      "text": st.text(max_size=10) | json_values}),
               max_size=3)
    | json_values
)
tool_call = st.fixed_dictionaries(
    {"function": st.fixed_dictionaries(
        {"name": st.sampled_from(["get_weather", "", "bad name"]) | json_values},
        optional={"arguments": st.sampled_from(['{"city": "Oslo"}', "not json", "{}"])
                  | json_values})},
    optional={"id": st.sampled_from(["call_1", "call_2"]) | json_values},
)
message = st.fixed_dictionaries(
    {"role": roles, "content": contents},
    optional={"tool_calls": st.lists(tool_call, max_size=2) | json_values,
              "images": st.sampled_from([["aGk="], [], None]) | json_values,
              "tool_call_id": st.sampled_from(["call_1", "call_9"]) | json_values,
              "tool_name": st.sampled_from(["get_weather", "other"]) | json_values,
              "thinking": json_values},
)
messages = (
    st.lists(message, max_size=4)
    | st.sampled_from([49, 50, 51]).map(lambda n: [{"role": "user", "content": "hi"}] * n)
    | st.just([{"role": "user", "content": "x" * 9_000}] * 12)
    | json_values
)
tool = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "code_interpreter"]) | json_values,
     "function": st.fixed_dictionaries(
         {"name": st.sampled_from(["get_weather", "", "n" * 65]) | json_values},
         optional={"description": json_values,
                   "parameters": st.just({"type": "object", "properties": {}}) | json_values})},
)
numbers = st.floats() | st.integers() | json_values
FIELD_VALUES: dict[str, Any] = {
    "model": model_names,
    "name": model_names,
    "messages": messages,
    "prompt": contents,
    "system": contents,
    "stream": st.booleans() | json_values,
    "think": st.sampled_from([True, False, "low", "high", "max"]) | json_values,
    "options": st.dictionaries(st.sampled_from(["temperature", "num_predict", "stop", "seed",
                                                "num_gpu", "penalize_newline"]),
                               numbers, max_size=3) | json_values,
    "format": st.sampled_from(["json", "", "xml", {"type": "object"}]) | json_values,
    "tools": st.lists(tool, max_size=2) | json_values,
    "tool_choice": st.sampled_from(["none", "auto"]) | json_values,
    "response_format": st.sampled_from([
        {"type": "json_object"}, {"type": "text"}, {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}},
    ]) | json_values,
    "max_tokens": numbers, "max_completion_tokens": numbers, "temperature": numbers,
    "top_p": numbers, "seed": numbers, "n": numbers, "frequency_penalty": numbers,
    "stop": st.sampled_from(["\n", ["a", "b"], [""], ["x"] * 5]) | json_values,
    "stream_options": st.sampled_from([{"include_usage": True}, None]) | json_values,
    "reasoning_effort": st.sampled_from(["low", "none", "extreme"]) | json_values,
    "keep_alive": st.sampled_from(["5m", 0, -1]) | json_values,
    "images": st.sampled_from([["aGk="], None]) | json_values,
    "input": st.sampled_from(["hi", "", ["a", "b"], ["a", ""], [1, 2], [[1, 2]], ["x"] * 257,
                              "\u754c" * 34_000, "x" * 90_001]) | json_values,
    "dimensions": st.sampled_from([1, 2, 8192, 8193, 0, -1]) | numbers,
    "encoding_format": st.sampled_from(["float", "base64", "hex"]) | json_values,
    "truncate": st.booleans() | json_values,
}
BASES: dict[str, dict[str, Any]] = {
    "/api/chat": chat_body(think=False),
    "/v1/chat/completions": chat_body(stream=True),
    "/ollama/api/chat": chat_body(),
    "/ollama/api/generate": {"model": MODEL, "prompt": "hi"},
    "/ollama/api/show": {"model": MODEL},
    "/v1/embeddings": {"model": MODEL, "input": ["hi", "there"]},
    "/ollama/api/embed": {"model": MODEL, "input": "hi"},
    "/ollama/api/embeddings": {"model": MODEL, "prompt": "hi"},
}


@st.composite
def near_valid_body(draw: st.DrawFn, path: str) -> bytes:
    """A valid body of ``path`` with a few fields dropped, retyped or pushed past a limit."""
    body = dict(BASES.get(path, {"model": MODEL}))
    body["model"] = draw(st.sampled_from([MODEL, MODEL, MODEL, "nobody:1b"]))
    for key in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=3, unique=True)):
        if key in body and draw(st.booleans()):
            del body[key]
        else:
            body[key] = draw(FIELD_VALUES[key])
    return json.dumps(body).encode()


def bodies(path: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        near_valid_body(path),
        near_valid_body(path),
        json_values.map(lambda value: json.dumps(value).encode()),
        st.binary(max_size=200),
    )


@st.composite
def post_requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    # Mostly POSTs to the chat endpoints; now and then another method or model management.
    if draw(st.sampled_from(range(10))) == 3:
        path = draw(st.sampled_from(MANAGEMENT))
    else:
        path = draw(st.sampled_from(list(POST_ENDPOINTS)))
    method = "POST"
    if draw(st.sampled_from(range(10))) == 3:
        method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
    return method, path, draw(bodies(path))


@st.composite
def get_requests(draw: st.DrawFn) -> tuple[str, str]:
    template = draw(st.sampled_from(list(GET_ENDPOINTS)))
    model = draw(st.sampled_from([MODEL, "nobody:1b", "x" * 300]) | st.text(min_size=1,
                                                                             max_size=40))
    return template, template.replace("{id}", model)


# --- The router under test -------------------------------------------------------------------


@pytest.fixture
async def answering_node(channel_layer):
    """A node that answers every request it is sent with "ok", for as long as the test runs."""
    node = ScriptedNode(ip="10.0.0.1")
    await node.register(node_id="answering-node", max_concurrent=10, features=["embeddings"],
                        models=[{"name": MODEL, "size": 2019393189,
                                 "capabilities": ["completion", "tools", "thinking"]}])

    async def answer_forever() -> None:
        while True:
            frame = await node.recv(timeout=3600)
            if frame["type"] == FrameType.EMBED_REQUEST:
                params = frame["embed_params"]
                vector = [0.6, 0.8][: params.get("dimensions", 2)]
                await node.send({"type": FrameType.EMBED_VECTORS,
                                 "request_id": frame["request_id"],
                                 "embeddings": [vector] * len(params["input"]), "done": True})
            if frame["type"] == FrameType.INFERENCE_REQUEST:
                await node.chunk(frame["request_id"], "ok")
                await node.chunk(frame["request_id"], "", done=True, done_reason="stop",
                                 prompt_eval_count=3, eval_count=1)

    task = asyncio.create_task(answer_forever())
    yield node
    task.cancel()
    await node.disconnect()


async def exchange(method: str, path: str, body: bytes = b"") -> tuple[int, dict, bytes]:
    client = HttpClient(method, path, body)
    # A real HTTP client sends the percent-encoded path; the server decodes it.
    client.app.scope["raw_path"] = urllib.parse.quote(path).encode()
    status, headers = await client.start()
    return status, headers, await read_body(client, timeout=10)


def check_error_shape(shape: str, body: bytes) -> None:
    answer = json.loads(body)
    if shape == DETAIL:
        assert isinstance(answer["detail"], str) and answer["detail"]
    elif shape == OPENAI:
        error = answer["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str)
        assert {"param", "code"} <= error.keys()
    else:
        assert isinstance(answer["error"], str) and answer["error"]


def check_answer(method: str, path: str, headers: dict[str, str], body: bytes) -> None:
    """A 200 from a chat endpoint is a whole, error-free answer in its own format."""
    content_type = headers["content-type"]
    if path == "/api/chat":
        seen = read_answer("api-chat-sse", 200, body)
    elif path == "/v1/chat/completions":
        name = "v1-stream" if content_type.startswith("text/event-stream") else "v1-json"
        seen = read_answer(name, 200, body)
    elif path in ("/ollama/api/chat", "/ollama/api/generate"):
        kind = "chat" if path.endswith("chat") else "generate"
        name = f"ollama-{kind}-{'ndjson' if 'ndjson' in content_type else 'json'}"
        seen = read_answer(name, 200, body)
        if seen.finish in ("load", "unload"):  # no messages or prompt: Ollama's load answer
            return
    elif path == "/v1/embeddings":
        answer = json.loads(body)
        assert answer["data"] and all(item["embedding"] for item in answer["data"])
        return
    elif path == "/ollama/api/embed":
        assert isinstance(json.loads(body)["embeddings"], list)
        return
    else:
        json.loads(body)
        return
    assert seen.error is None
    assert seen.content == "ok"
    assert seen.finish in ("stop", "tool_calls")


async def check_router_still_serves() -> None:
    assert await leftovers() == (0, 0, 0)  # no slot, queue place or stream left behind
    status, _, body = await exchange("POST", "/api/chat", json.dumps(chat_body()).encode())
    assert status == 200
    assert read_answer("api-chat-sse", status, body).content == "ok"


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Tracebacks and 500s logged while answering. Django logs every 5xx response at ERROR,
    the documented 501 and 503 included; those are answers, not failures."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.exc_info
        or "Internal Server Error" in record.getMessage()
        or (record.levelno >= logging.ERROR and record.name != "django.request")
    ]


@FUZZ_SETTINGS
@given(request=post_requests())
async def test_any_body_gets_a_documented_status_and_the_router_keeps_serving(
    answering_node, caplog, request
):
    method, path, body = request
    caplog.clear()
    status, headers, answer = await exchange(method, path, body)
    event(f"{status} {path}")

    if path in MANAGEMENT:
        shape, allowed = OLLAMA, {501}
    else:
        shape, allowed = POST_ENDPOINTS[path]
    assert status in allowed, (status, answer[:300])
    assert b"Traceback" not in answer
    if status == 200:
        check_answer(method, path, headers, answer)
    else:
        assert headers["content-type"] == "application/json"
        check_error_shape(shape, answer)
    if status == 405:
        assert method != "POST"
    assert server_errors(caplog) == []
    await check_router_still_serves()


@settings(FUZZ_SETTINGS, max_examples=40)
@given(request=get_requests())
async def test_read_endpoints_answer_any_model_id(answering_node, caplog, request):
    template, path = request
    caplog.clear()
    status, headers, answer = await exchange("GET", path)
    event(f"{status} {template}")
    shape, allowed = GET_ENDPOINTS[template]
    assert status in allowed, (status, answer[:300])
    assert headers["content-type"] == "application/json"
    if status == 200:
        json.loads(answer)
    else:
        check_error_shape(shape, answer)
    assert server_errors(caplog) == []
