"""The consumer API through the real ASGI application, with a scripted node on the other end."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator

from idleclaw_site.asgi import application
from routing.models import InflightRequest
from tests.scripted_node import OPEN, ScriptedNode

pytestmark = [pytest.mark.django_db(transaction=True)]

MESSAGES = [{"role": "user", "content": "hi"}]


class HttpClient:
    """One HTTP exchange over ASGI, read part by part so streaming and hang-ups are real."""

    def __init__(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.body = body or b""
        sent = {"content-type": "application/json", "host": "testserver", **(headers or {})}
        self.app = ApplicationCommunicator(
            application,
            {
                "type": "http", "http_version": "1.1", "method": method, "path": path,
                "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
                "headers": [(k.lower().encode(), v.encode()) for k, v in sent.items()],
                "client": ("10.2.0.1", 5000), "server": ("testserver", 80),
            },
        )
        OPEN.append(self.app)

    async def start(self) -> tuple[int, dict[str, str]]:
        await self.app.send_input({"type": "http.request", "body": self.body})
        start = await self.app.receive_output(5)
        assert start["type"] == "http.response.start"
        headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
        return start["status"], headers

    async def read_part(self, timeout: float = 5) -> bytes:
        message = await self.app.receive_output(timeout)
        assert message["type"] == "http.response.body"
        return message.get("body", b"")

    async def read_all(self) -> bytes:
        body = b""
        while True:
            message = await self.app.receive_output(5)
            body += message.get("body", b"")
            if not message.get("more_body"):
                return body

    async def hang_up(self) -> None:
        await self.app.send_input({"type": "http.disconnect"})
        await self.app.wait(5)


def chat_client() -> HttpClient:
    return HttpClient("POST", "/api/chat", {"model": "llama3.2:3b", "messages": MESSAGES})


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON: a browser's JSON.parse would fail here")


def strict_json(text: str | bytes) -> Any:
    """Parse JSON as a browser's ``JSON.parse`` does: ``NaN`` and ``Infinity`` are errors."""
    return json.loads(text, parse_constant=_not_json)


def sse_events(body: bytes) -> list[Any]:
    events = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else strict_json(data))
    return events


def text_of(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e != "[DONE]")


async def post_chat(body: Any) -> tuple[int, dict[str, str], bytes]:
    client = HttpClient("POST", "/api/chat", body)
    status, headers = await client.start()
    return status, headers, await client.read_all()


async def inflight_count() -> int:
    return await sync_to_async(InflightRequest.objects.count)()


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"messages": MESSAGES}, 422, "model"),
        ({"model": "m" * 65, "messages": MESSAGES}, 422, "at most 64"),
        ({"model": "../etc/passwd", "messages": MESSAGES}, 422, "model"),
        ({"model": "llama3.2:3b"}, 422, "messages"),
        ({"model": "llama3.2:3b", "messages": []}, 422, "messages"),
        ({"model": "llama3.2:3b", "messages": MESSAGES * 51}, 422, "at most 50"),
        ({"model": "llama3.2:3b", "messages": [{"role": "system", "content": "x"}]}, 422, "role"),
        ({"model": "llama3.2:3b", "messages": [{"role": "user", "content": ""}]}, 422, "content"),
        ({"model": "llama3.2:3b", "messages": [{"role": "user", "content": 5}]}, 422, "content"),
        ({"model": "llama3.2:3b", "messages": [{"role": "user", "content": "x" * 10_001}]},
         422, "10000"),
        ({"model": "llama3.2:3b", "messages": [{"role": "user", "content": "x" * 9_000}] * 12},
         422, "100000"),
        ({"model": "llama3.2:3b", "messages": MESSAGES, "think": "yes"}, 422, "think"),
    ],
)
async def test_invalid_chat_requests_get_a_json_detail(channel_layer, body, status, fragment):
    got_status, headers, raw = await post_chat(body)
    assert got_status == status
    assert headers["content-type"] == "application/json"
    assert fragment in json.loads(raw)["detail"]


async def test_unknown_model_gets_503_with_retry_after(channel_layer):
    status, headers, raw = await post_chat({"model": "nobody:1b", "messages": MESSAGES})
    assert status == 503
    assert int(headers["retry-after"]) > 0
    assert "nobody:1b" in json.loads(raw)["detail"]


async def test_get_on_chat_is_405(channel_layer):
    client = HttpClient("GET", "/api/chat")
    status, _ = await client.start()
    assert status == 405


async def test_chat_streams_the_nodes_chunks_as_sse(channel_layer):
    node = ScriptedNode()
    await node.register(models=[{"name": "llama3.2:3b", "size": 5}])
    client = chat_client()
    status, headers = await client.start()
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    request = await node.recv()
    assert request["type"] == "inference_request"
    assert request["ollama_params"] == {
        "model": "llama3.2:3b", "messages": MESSAGES, "stream": True, "think": False,
    }
    rid = request["request_id"]
    await node.chunk(rid, "Hel")
    first = sse_events(await client.read_part())
    assert text_of(first) == "Hel"
    await node.send({"type": "inference_chunk", "request_id": rid,
                     "chunk": {"message": {"role": "assistant", "thinking": "hmm"}, "done": False}})
    await node.chunk(rid, "lo")
    await node.chunk(rid, "", done=True, done_reason="stop", prompt_eval_count=7, eval_count=2)
    events = first + sse_events(await client.read_all())
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[:3] == [{"content": "Hel"}, {"content": "hmm", "reasoning": True},
                          {"content": "lo"}]
    final = events[-2]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert len({e["id"] for e in events[:-1]}) == 1
    assert await inflight_count() == 0
    await node.disconnect()


async def test_node_error_ends_the_stream_with_an_error_event(channel_layer):
    node = ScriptedNode()
    await node.register(node_id="secret-node-id")
    client = chat_client()
    await client.start()
    rid = (await node.recv())["request_id"]
    await node.chunk(rid, "partial")
    await node.send({"type": "inference_error", "request_id": rid, "error": "ollama_error"})
    events = sse_events(await client.read_all())
    assert events[-1] == "[DONE]"
    last = events[-2]["choices"][0]
    assert last["finish_reason"] == "error"
    assert last["delta"]["content"].startswith("\n\n[Error: ")
    assert "secret-node-id" not in last["delta"]["content"]
    assert await inflight_count() == 0
    await node.disconnect()


async def test_node_disconnecting_mid_stream_ends_the_stream_with_an_error(channel_layer):
    node = ScriptedNode()
    await node.register()
    client = chat_client()
    await client.start()
    rid = (await node.recv())["request_id"]
    await node.chunk(rid, "partial")
    await node.disconnect()
    events = sse_events(await client.read_all())
    assert text_of(events).startswith("partial\n\n[Error: ")
    assert events[-2]["choices"][0]["finish_reason"] == "error"
    assert await inflight_count() == 0


async def test_consumer_hanging_up_cancels_the_node_and_frees_the_slot(channel_layer):
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    client = chat_client()
    await client.start()
    rid = (await node.recv())["request_id"]
    await node.chunk(rid, "tok")
    await client.read_part()
    assert await inflight_count() == 1
    await client.hang_up()
    assert await node.recv() == {"type": "cancel_request", "request_id": rid}
    assert await inflight_count() == 0
    # The freed slot serves the next consumer.
    second = chat_client()
    status, _ = await second.start()
    assert status == 200
    assert (await node.recv())["type"] == "inference_request"
    await node.disconnect()


async def test_a_server_breaking_asgi_mid_stream_is_an_error_and_frees_the_slot(channel_layer):
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    client = chat_client()
    await client.start()
    rid = (await node.recv())["request_id"]
    # After the whole body only a disconnect may come; Django's handler raises on anything else.
    await client.app.send_input({"type": "http.request", "body": b"more"})
    with pytest.raises(AssertionError, match="Invalid ASGI message"):
        await client.app.wait(5)
    assert await node.recv() == {"type": "cancel_request", "request_id": rid}
    assert await inflight_count() == 0
    await node.disconnect()


async def test_stalled_node_is_cancelled_and_the_stream_ends(channel_layer, settings):
    settings.IDLECLAW_STALL_TIMEOUT = 0.3
    node = ScriptedNode()
    await node.register()
    client = chat_client()
    await client.start()
    rid = (await node.recv())["request_id"]
    events = sse_events(await client.read_all())
    assert events[-2]["choices"][0]["finish_reason"] == "error"
    assert "stopped responding" in text_of(events)
    assert await node.recv() == {"type": "cancel_request", "request_id": rid}
    await node.disconnect()


async def test_health_and_models_describe_live_nodes(channel_layer):
    small = ScriptedNode()
    await small.register(models=[{"name": "smollm2:135m", "size": 270898672}])
    big = ScriptedNode(ip="10.0.0.9")
    await big.register(
        max_concurrent=3,
        models=[
            {"name": "llama3.2:3b", "size": 2019393189, "capabilities": ["completion", "tools"]},
            {"name": "qwen3:0.6b", "size": 522653767,
             "capabilities": ["completion", "tools", "thinking"]},
        ],
    )
    client = HttpClient("GET", "/health")
    assert (await client.start())[0] == 200
    health = json.loads(await client.read_all())
    assert health["status"] == "healthy"
    assert health["node_count"] == 2
    assert isinstance(health["uptime_seconds"], int)
    client = HttpClient("GET", "/api/models")
    await client.start()
    models = json.loads(await client.read_all())
    assert models["models"] == ["llama3.2:3b", "qwen3:0.6b", "smollm2:135m"]
    assert models["capabilities"]["qwen3:0.6b"] == {
        "thinking": True, "tool_calls": True, "chat": True}
    assert models["capabilities"]["smollm2:135m"] == {
        "thinking": False, "tool_calls": False, "chat": True}
    assert models["details"]["llama3.2:3b"]["free_slots"] == 3
    await big.disconnect()
    client = HttpClient("GET", "/api/models")
    await client.start()
    assert json.loads(await client.read_all())["models"] == ["smollm2:135m"]
    await small.disconnect()


async def test_ollama_ps_lists_models_with_requests_in_flight(channel_layer):
    node = ScriptedNode()
    await node.register(models=[{"name": "llama3.2:3b", "size": 5}, {"name": "qwen3:0.6b"}])
    client = HttpClient("GET", "/ollama/api/ps")
    await client.start()
    assert json.loads(await client.read_all()) == {"models": []}
    chat = HttpClient("POST", "/ollama/api/chat",
                      {"model": "llama3.2:3b", "messages": MESSAGES})
    status, headers = await chat.start()
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    await node.recv()
    client = HttpClient("GET", "/ollama/api/ps")
    await client.start()
    running = json.loads(await client.read_all())["models"]
    assert [m["model"] for m in running] == ["llama3.2:3b"]
    await node.disconnect()


@pytest.mark.parametrize(
    "path, shape",
    [("/v1/nothing", "error.message"), ("/ollama/api/nothing", "error"), ("/nothing", "detail")],
)
async def test_unknown_paths_get_json_404_in_each_apis_shape(channel_layer, path, shape):
    client = HttpClient("GET", path)
    status, headers = await client.start()
    assert status == 404
    body = json.loads(await client.read_all())
    for key in shape.split("."):
        body = body[key]
    assert "no such endpoint" in body


async def test_operator_system_prompt_comes_before_the_clients_own(channel_layer, settings):
    settings.IDLECLAW_SYSTEM_PROMPT = "You are served by IdleClaw."
    node = ScriptedNode()
    await node.register()
    body = {"model": "llama3.2:3b", "messages": [
        {"role": "system", "content": "client rules"}, {"role": "user", "content": "hi"}]}
    client = HttpClient("POST", "/v1/chat/completions", {**body, "stream": True})
    assert (await client.start())[0] == 200
    request = await node.recv()
    assert [m["role"] for m in request["ollama_params"]["messages"]] == ["system", "system",
                                                                         "user"]
    assert request["ollama_params"]["messages"][0]["content"] == "You are served by IdleClaw."
    assert request["ollama_params"]["messages"][1]["content"] == "client rules"
    await node.disconnect()


async def test_operator_can_narrow_the_compatible_roles(channel_layer, settings):
    settings.IDLECLAW_COMPAT_ROLES = ("user", "assistant")
    body = {"model": "llama3.2:3b", "messages": [
        {"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]}
    client = HttpClient("POST", "/v1/chat/completions", body)
    status, _ = await client.start()
    assert status == 400
    error = json.loads(await client.read_all())["error"]
    assert "accepts user, assistant" in error["message"]
    client = HttpClient("POST", "/ollama/api/chat", body)
    status, _ = await client.start()
    assert status == 400
    assert "accepts user, assistant" in json.loads(await client.read_all())["error"]


async def test_node_failure_after_the_start_is_an_error_on_every_front_end(channel_layer):
    node = ScriptedNode()
    await node.register(max_concurrent=3)
    openai_stream = HttpClient("POST", "/v1/chat/completions",
                               {"model": "llama3.2:3b", "messages": MESSAGES, "stream": True})
    ollama_stream = HttpClient("POST", "/ollama/api/chat",
                               {"model": "llama3.2:3b", "messages": MESSAGES})
    ollama_whole = HttpClient("POST", "/ollama/api/generate",
                              {"model": "llama3.2:3b", "prompt": "hi", "stream": False})
    for client in (openai_stream, ollama_stream):
        assert (await client.start())[0] == 200
        rid = (await node.recv())["request_id"]
        await node.chunk(rid, "partial")
        await node.send({"type": "inference_error", "request_id": rid, "error": "ollama_error"})
    await ollama_whole.app.send_input({"type": "http.request", "body": ollama_whole.body})
    rid = (await node.recv())["request_id"]
    await node.send({"type": "inference_error", "request_id": rid, "error": "ollama_error"})

    events = sse_events(await openai_stream.read_all())
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error"
    lines = [json.loads(line) for line in (await ollama_stream.read_all()).splitlines()]
    assert lines[0]["message"]["content"] == "partial"
    assert lines[-1] == {"error": "the node's model server failed"}
    start = await ollama_whole.app.receive_output(5)
    assert start["status"] == 502
    assert json.loads(await ollama_whole.read_all()) == {
        "error": "the node's model server failed"}
    await node.disconnect()


async def test_text_in_the_nodes_last_chunk_reaches_ollama_clients(channel_layer):
    node = ScriptedNode()
    await node.register()
    client = HttpClient("POST", "/ollama/api/chat", {"model": "llama3.2:3b", "messages": MESSAGES})
    await client.start()
    rid = (await node.recv())["request_id"]
    await node.chunk(rid, "first ")
    await node.chunk(rid, "last", done=True, done_reason="stop", eval_count=2)
    lines = [json.loads(line) for line in (await client.read_all()).splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == "first last"
    assert [line["done"] for line in lines][-1] is True
    assert lines[-1]["eval_count"] == 2 and lines[-1]["message"]["content"] == ""
    await node.disconnect()


# --- Request ids, CORS and refusals on the compatible APIs (issue 19) -------------------------


async def test_each_node_a_request_tries_sees_the_request_id_or_a_suffix_of_it(channel_layer):
    first = ScriptedNode()
    await first.register(max_concurrent=1)
    client = HttpClient("POST", "/v1/chat/completions",
                        {"model": "llama3.2:3b", "messages": MESSAGES, "stream": True})
    status, headers = await client.start()
    assert status == 200
    request_id = headers["x-request-id"]
    assert (await first.recv())["request_id"] == request_id
    second = ScriptedNode("10.0.0.2")
    await second.register(max_concurrent=1)
    # The first node fails before its first chunk: the request fails over to the second.
    await first.send({"type": "inference_error", "request_id": request_id,
                      "error": "ollama_unavailable"})
    retried = (await second.recv())["request_id"]
    assert retried == f"{request_id}-2"
    await second.chunk(retried, "hi", done=True, done_reason="stop")
    assert "hi" in (await client.read_all()).decode()
    await first.disconnect()
    await second.disconnect()


async def test_a_queued_request_reaches_its_node_under_its_own_id(channel_layer):
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    busy = HttpClient("POST", "/ollama/api/chat", {"model": "llama3.2:3b", "messages": MESSAGES})
    await busy.start()
    busy_id = (await node.recv())["request_id"]
    waiting = HttpClient("POST", "/ollama/api/chat",
                         {"model": "llama3.2:3b", "messages": MESSAGES})
    await waiting.app.send_input({"type": "http.request", "body": waiting.body})
    assert await node.nothing_sent()  # it waits in the queue, its claims finding no slot
    await node.chunk(busy_id, "done", done=True, done_reason="stop")
    request_id = (await node.recv())["request_id"]
    start = await waiting.app.receive_output(5)
    assert dict(start["headers"])[b"x-request-id"].decode() == request_id
    await node.disconnect()


async def test_a_served_model_with_no_slot_and_a_full_queue_stays_503(channel_layer, settings):
    settings.IDLECLAW_MAX_QUEUE = 0
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    busy = HttpClient("POST", "/api/chat", {"model": "llama3.2:3b", "messages": MESSAGES})
    await busy.start()
    await node.recv()
    body = {"model": "llama3.2:3b", "messages": MESSAGES}
    for path in ("/v1/chat/completions", "/ollama/v1/chat/completions", "/ollama/api/chat",
                 "/api/chat"):
        client = HttpClient("POST", path, body)
        status, headers = await client.start()
        assert status == 503, path
        assert int(headers["retry-after"]) > 0
        reply = json.loads(await client.read_all())
        if "v1" in path:
            assert reply["error"]["code"] == "model_unavailable"
    await node.disconnect()


async def test_a_model_no_node_serves_is_404_on_v1_but_503_under_the_network_contract(
    channel_layer,
):
    body = {"model": "nobody:1b", "messages": MESSAGES, "stream": True}
    plain = HttpClient("POST", "/v1/chat/completions", body)
    status, headers = await plain.start()
    assert status == 404 and "retry-after" not in headers
    assert json.loads(await plain.read_all())["error"]["code"] == "model_not_found"
    page = HttpClient("POST", "/v1/chat/completions", body,
                      headers={"X-IdleClaw-Contract": "network"})
    status, headers = await page.start()
    assert status == 503 and int(headers["retry-after"]) > 0
    error = json.loads(await page.read_all())["error"]
    assert error["message"] == "no node is serving nobody:1b right now"


async def test_cors_allows_any_origin_by_default_on_the_event_loops_thread(channel_layer):
    from corsheaders.signals import check_request_enabled

    threads = []

    def record(sender, request, **kwargs):
        threads.append(threading.get_ident())
        return False

    check_request_enabled.connect(record)
    try:
        client = HttpClient("GET", "/v1/models", headers={"Origin": "https://any.example"})
        status, headers = await client.start()
        page = HttpClient("GET", "/", headers={"Origin": "https://any.example"})
        _, page_headers = await page.start()
    finally:
        check_request_enabled.disconnect(record)
    assert status == 200 and headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-origin" not in page_headers
    # The CORS middleware asked about the page on this thread: no hop to a worker thread.
    assert threads == [threading.get_ident()]


async def test_a_keep_alive_built_to_backtrack_is_answered_at_once(channel_layer):
    """Red-team C1 of issue 19: this 64-character near-miss held the event loop for ten seconds
    in the duration pattern; it is refused in microseconds now (the bound is a thousand times
    that, and ten times below what the old pattern took)."""
    node = ScriptedNode()
    await node.register()
    for keep_alive in ["11111s" * 10 + "111x", "111s" * 15 + "111x", "1" * 63 + "x"]:
        body = {"model": "llama3.2:3b", "prompt": "", "stream": False, "keep_alive": keep_alive}
        started = time.perf_counter()
        client = HttpClient("POST", "/ollama/api/generate", body)
        assert (await client.start())[0] == 400
        assert time.perf_counter() - started < 1.0, keep_alive
    await node.disconnect()


async def test_a_keep_alive_ollama_would_refuse_is_refused_here_and_never_reaches_a_node(
    channel_layer,
):
    """Red-team C1 of issue 19 (second pass): a node's Ollama refused "banana", and each such
    request counted as that node's failure."""
    node = ScriptedNode()
    await node.register()
    for keep_alive in ["banana", "300", "5 m", True, [], {"s": 1}]:
        for path, extra in (("/ollama/api/chat", {"messages": [{"role": "user", "content": "hi"}]}),
                            ("/ollama/api/embed", {"input": "hi"})):
            body = {"model": "llama3.2:3b", "keep_alive": keep_alive, **extra}
            client = HttpClient("POST", path, body)
            assert (await client.start())[0] == 400, (path, keep_alive)
            assert "keep_alive" in json.loads(await client.read_all())["error"]
    assert await node.nothing_sent()
    await node.disconnect()


async def test_keep_alive_zero_unloads_in_every_form_ollama_reads_as_zero(channel_layer):
    node = ScriptedNode()
    await node.register()
    unloading = [0, 0.0, "0", "0s", "-0s", "0m0s", "0.0h", "0ms"]
    loading = [None, 300, "5m", "1ns", -1, "-5m"]
    for keep_alive in unloading + loading:
        body = {"model": "llama3.2:3b", "prompt": "", "stream": False}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        client = HttpClient("POST", "/ollama/api/generate", body)
        assert (await client.start())[0] == 200
        reason = json.loads(await client.read_all())["done_reason"]
        assert reason == ("unload" if keep_alive in unloading else "load"), keep_alive
    assert await node.nothing_sent()
    await node.disconnect()


async def test_a_model_whose_nodes_are_all_below_the_floor_is_not_advertised(channel_layer):
    # Red team F8: its nodes get no traffic, so neither the model nor their slots are offered.
    from nodes.models import NodeSession

    kept = ScriptedNode()
    await kept.register(max_concurrent=2, models=[{"name": "smollm2:135m"}])
    caught = ScriptedNode(ip="10.0.0.9")
    await caught.register(
        node_id="caught", max_concurrent=3,
        models=[{"name": "llama3.2:3b"}, {"name": "smollm2:135m"}],
    )  # fmt: skip
    await sync_to_async(NodeSession.objects.filter(node_id="caught").update)(reputation=0.1)

    async def get(path: str) -> Any:
        client = HttpClient("GET", path)
        assert (await client.start())[0] == 200
        return json.loads(await client.read_all())

    models = await get("/api/models")
    assert models["models"] == ["smollm2:135m"]
    assert models["details"]["smollm2:135m"]["free_slots"] == 2  # the kept node's only
    assert [m["id"] for m in (await get("/v1/models"))["data"]] == ["smollm2:135m"]
    assert [m["name"] for m in (await get("/ollama/api/tags"))["models"]] == ["smollm2:135m"]
    body = {"model": "llama3.2:3b", "messages": MESSAGES, "stream": True}
    refused = HttpClient("POST", "/v1/chat/completions", body)
    assert (await refused.start())[0] == 404
    assert json.loads(await refused.read_all())["error"]["code"] == "model_not_found"
    # The public list says why the caught node is idle.
    bands = sorted(node["reputation"] for node in (await get("/api/network/nodes"))["nodes"])
    assert bands == ["excluded", "new"]
    await caught.disconnect()
    await kept.disconnect()
