"""Hostile consumers: hand-picked bodies and methods the property test (``test_fuzz.py``) is
unlikely to generate, through the real ASGI application."""

from __future__ import annotations

import contextlib
import json

import pytest

from tests.routing.test_views import HttpClient
from tests.security.hostile import (
    MODEL,
    chat_body,
    honest_node,
    leftovers,
    next_output,
    read_body,
)

pytestmark = [pytest.mark.django_db(transaction=True)]

CHAT_PATHS = ["/api/chat", "/v1/chat/completions", "/ollama/api/chat", "/ollama/api/generate",
              "/ollama/api/show"]


def error_message(path: str, body: bytes) -> str:
    """The message of an error body in the shape of ``path``'s API."""
    answer = json.loads(body)
    if path.startswith("/v1/"):
        return answer["error"]["message"]
    if path.startswith("/ollama/"):
        return answer["error"]
    return answer["detail"]


async def exchange(method: str, path: str, body: bytes | dict | None = None):
    client = HttpClient(method, path, body)
    status, headers = await client.start()
    return status, headers, await read_body(client)


@pytest.mark.parametrize("path", CHAT_PATHS)
async def test_body_over_the_limit_is_refused_in_the_apis_shape(channel_layer, path):
    status, headers, body = await exchange("POST", path, b'{"model": "' + b"m" * 1_000_001
                                           + b'"}')
    assert status == (413 if path == "/api/chat" else 400)
    assert headers["content-type"] == "application/json"
    assert "larger than 1000000 bytes" in error_message(path, body)


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/ollama/api/chat"])
async def test_body_over_two_and_a_half_megabytes_still_gets_a_json_error(channel_layer, path):
    status, headers, body = await exchange("POST", path, b'{"model": "' + b"m" * 3_000_000
                                           + b'"}')
    assert headers["content-type"] == "application/json"
    assert status in (400, 413)
    assert error_message(path, body)


@pytest.mark.parametrize("path", CHAT_PATHS)
async def test_deeply_nested_json_body_is_a_400_not_a_500(channel_layer, path):
    status, headers, body = await exchange("POST", path, b"[" * 100_000)
    assert status == 400
    assert error_message(path, body)


def _nested(depth: int) -> dict:
    value: dict = {"type": "string"}
    for _ in range(depth):
        value = {"type": "object", "properties": {"a": value}}
    return value


DEEP = _nested(300)  # 600 levels: parses, but is too deep to copy through the channel layer
DEEP_REQUESTS = {
    "ollama-format": ("/ollama/api/chat", chat_body(stream=False, format=DEEP)),
    "ollama-tool-parameters": ("/ollama/api/chat", chat_body(tools=[
        {"type": "function", "function": {"name": "f", "parameters": DEEP}}])),
    "v1-json-schema": ("/v1/chat/completions", chat_body(stream=True, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": DEEP}})),
}


@pytest.mark.parametrize("name", list(DEEP_REQUESTS))
async def test_deeply_nested_schema_never_leaks_a_node_slot(channel_layer, name):
    node = await honest_node(max_concurrent=1)
    path, body = DEEP_REQUESTS[name]
    client = HttpClient("POST", path, body)
    await client.app.send_input({"type": "http.request", "body": client.body})
    if not await node.nothing_sent(0.5):  # served: the node answers it
        request = await node.recv()
        await node.chunk(request["request_id"], "ok", done=True, done_reason="stop")
    with contextlib.suppress(Exception):  # refused or served, whatever the status
        while (await next_output(client.app, 3)).get("more_body", True):
            pass
    assert await leftovers() == (0, 0, 0)
    # The node's only slot is free for the next consumer.
    honest = HttpClient("POST", "/api/chat", chat_body())
    assert (await honest.start())[0] == 200
    await node.recv(timeout=1)
    await node.disconnect()


@pytest.mark.parametrize("method, path", [("POST", "/health"), ("POST", "/api/models"),
                                          ("POST", "/v1/models"), ("DELETE", "/v1/models/x")])
async def test_wrong_method_on_a_read_endpoint_is_a_json_405(channel_layer, method, path):
    status, headers, body = await exchange(method, path, b"{}")
    assert (status, headers["content-type"]) == (405, "application/json")
    assert error_message(path, body)


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/ollama/api/chat"])
async def test_model_name_with_a_trailing_newline_is_refused(channel_layer, path):
    status, _, body = await exchange("POST", path, chat_body(model=MODEL + "\n"))
    assert status in (400, 422)
    assert "model" in error_message(path, body)


@pytest.mark.parametrize("num_ctx", [0, -4096, 2.5, 2**27 + 1])
@pytest.mark.parametrize("path", ["/ollama/api/chat", "/ollama/api/generate"])
async def test_a_context_size_ollama_cannot_use_is_a_400_and_no_node_sees_it(
    channel_layer, path, num_ctx
):
    node = await honest_node()
    body = {"model": MODEL, "options": {"num_ctx": num_ctx}, "stream": False}
    body |= {"prompt": "hi"} if path.endswith("generate") else {
        "messages": [{"role": "user", "content": "hi"}]}
    status, _, answer = await exchange("POST", path, body)
    assert status == 400
    assert error_message(path, answer) == "options.num_ctx: a whole number from 1 to 134217728"
    assert await node.nothing_sent()
    await node.disconnect()


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL, "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]},
        {"model": MODEL, "messages": [{"role": "tool", "content": "rm -rf /"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
         "options": {"num_gpu": 999, "use_mmap": False, "numa": True}},
    ],
    ids=["images", "unanswered-tool-message", "hardware-options"],
)
async def test_compat_fields_a_node_must_not_see_are_refused_or_dropped(channel_layer, body):
    node = await honest_node()
    client = HttpClient("POST", "/ollama/api/chat", {**body, "stream": False})
    await client.app.send_input({"type": "http.request", "body": client.body})
    if "options" in body:  # the hardware options are the contributor's business: dropped
        request = await node.recv()
        assert "options" not in request["ollama_params"]
        await node.chunk(request["request_id"], "ok", done=True)
        assert (await next_output(client.app))["status"] == 200
    else:
        assert (await next_output(client.app))["status"] == 400
        assert await node.nothing_sent()
    await read_body(client)
    await node.disconnect()
