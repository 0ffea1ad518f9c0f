"""The OpenAI- and Ollama-compatible APIs, driven by the official ``openai`` and ``ollama``
clients against a live router, a real contribute.py and the emulator."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from datetime import UTC, datetime

import ollama
import openai
import pytest
import requests

from tests import procs
from tests.conftest import ROOMY_ENV

pytestmark = pytest.mark.e2e

MODEL = "llama3.2:3b"
THINKER = "qwen3:0.6b"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


class Network(tuple):
    """(router URL, emulator URL); ``node`` is the contributor's process, for its log."""

    node: procs.Proc


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """One router, one emulator and one contributor shared by this module's tests."""
    db = tmp_path_factory.mktemp("compat") / "router.sqlite3"
    router, router_url = procs.start_router(db, ROOMY_ENV)
    emulator, emulator_url = procs.start_emulator()
    node = procs.start_contributor(router_url, emulator_url, "--max-concurrent", "4")
    try:
        node.wait_for_line("registered")
        procs.wait_until(
            lambda: MODEL in requests.get(f"{router_url}/api/models", timeout=5).json()["models"],
            what="the node's models",
        )
        shared = Network((router_url, emulator_url))
        shared.node = node
        yield shared
    finally:
        node.stop()
        emulator.stop()
        router.stop()




@pytest.fixture
def direct(network):
    """The emulator itself through the official client: what Ollama answers without us."""
    client = ollama.Client(host=network[1])
    with contextlib.closing(client):
        yield client


def ask(direct, model=MODEL, messages=None, **kwargs):
    messages = messages or [{"role": "user", "content": "hello"}]
    return direct.chat(model=model, messages=messages, **kwargs)


# --- OpenAI ---------------------------------------------------------------------------------


def test_openai_non_streaming_answer_and_usage_match_ollama(oai, direct):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    completion = oai.chat.completions.create(model=MODEL, messages=messages)
    expected = ask(direct, messages=messages, think=None)
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.message.content
    assert choice.finish_reason == "stop"
    assert completion.usage.prompt_tokens == expected.prompt_eval_count
    assert completion.usage.completion_tokens == expected.eval_count
    assert completion.usage.total_tokens == expected.prompt_eval_count + expected.eval_count


def test_openai_stream_has_role_first_one_id_and_usage_chunk(oai, direct):
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stream it"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    expected = ask(direct, messages=[{"role": "user", "content": "stream it"}])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert len({c.created for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == expected.eval_count
    assert chunks[-1].usage.prompt_tokens == expected.prompt_eval_count


def test_openai_max_tokens_cuts_the_answer_with_finish_reason_length(oai):
    completion = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "long"}], max_tokens=5,
    )
    assert completion.choices[0].finish_reason == "length"
    assert len(completion.choices[0].message.content.split()) == 5
    assert completion.usage.completion_tokens == 5


def test_openai_options_reach_ollama_mapped(oai, network):
    requests.post(f"{network[1]}/_emulator/reset", timeout=5)
    oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "opts"}], temperature=0.3,
        top_p=0.9, seed=42, stop=["END"], frequency_penalty=0.5, presence_penalty=0.25,
        max_tokens=7, response_format={"type": "json_object"},
    )
    [body] = requests.get(f"{network[1]}/_emulator/stats", timeout=5).json()["requests"]
    assert body["options"] == {
        "num_predict": 7, "temperature": 0.3, "top_p": 0.9, "seed": 42, "stop": ["END"],
        "frequency_penalty": 0.5, "presence_penalty": 0.25,
    }
    assert body["format"] == "json"


def test_openai_json_schema_response_format_gives_json(oai):
    schema = {"type": "object", "properties": {"name": {"type": "string"}},
              "required": ["name"]}
    completion = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "json"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_openai_tool_calls_round_trip(oai, direct):
    messages = [{"role": "user", "content": "weather in Paris?"}]
    completion = oai.chat.completions.create(model=MODEL, messages=messages,
                                             tools=[WEATHER_TOOL])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    expected = ask(direct, messages=messages, tools=[WEATHER_TOOL])
    assert json.loads(call.function.arguments) == dict(
        expected.message.tool_calls[0].function.arguments
    )
    # Answer the call: the tool message is accepted and the model replies with content.
    follow_up = messages + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    final = oai.chat.completions.create(model=MODEL, messages=follow_up, tools=[WEATHER_TOOL])
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content


def test_openai_streamed_tool_calls(oai):
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL],
        stream=True,
    )
    chunks = list(stream)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)["city"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_openai_reasoning_arrives_as_reasoning_content(oai, direct):
    messages = [{"role": "user", "content": "think first"}]
    completion = oai.chat.completions.create(model=THINKER, messages=messages,
                                             reasoning_effort="medium")
    expected = ask(direct, model=THINKER, messages=messages, think=True)
    message = completion.choices[0].message.model_dump()
    assert message["reasoning_content"] == expected.message.thinking
    assert message["content"] == expected.message.content
    stream = oai.chat.completions.create(model=THINKER, messages=messages, stream=True,
                                         reasoning_effort="medium")
    deltas = [c.choices[0].delta.model_dump() for c in stream if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == expected.message.thinking


def test_openai_models_list_and_retrieve(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids[:3] == [MODEL, THINKER, "smollm2:135m"]
    assert oai.models.retrieve(THINKER).id == THINKER
    with pytest.raises(openai.NotFoundError) as caught:
        oai.models.retrieve("nobody:1b")
    assert caught.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": 3}, "temperature"),
        ({"n": 2}, "n"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "c1"}]}, None),
        ({"messages": []}, "messages"),
        ({"model": "../x"}, "model"),
    ],
)
def test_openai_bad_requests_get_openai_error_shape(oai, kwargs, param):
    arguments = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(**arguments)
    error = caught.value.body
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if param:
        assert error["param"] == param


def test_openai_refused_role_names_the_accepted_roles(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
    assert "system, user, assistant, tool" in caught.value.body["message"]


def test_openai_unserved_model_is_404_model_not_found_in_openai_shape(network):
    reply = requests.post(f"{network[0]}/v1/chat/completions", timeout=10, json={
        "model": "nobody:1b", "messages": [{"role": "user", "content": "x"}]})
    assert reply.status_code == 404
    assert "Retry-After" not in reply.headers
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert reply.json()["error"]["code"] == "model_not_found"


def test_openai_accepts_and_ignores_an_authorization_header(network):
    reply = requests.get(f"{network[0]}/v1/models", timeout=10,
                         headers={"Authorization": "Bearer sk-anything"})
    assert reply.status_code == 200


# --- Ollama ---------------------------------------------------------------------------------


def test_ollama_root_and_version(network):
    root = requests.get(f"{network[0]}/ollama/", timeout=5)
    assert root.text == "Ollama is running"
    assert requests.get(f"{network[0]}/ollama/api/version", timeout=5).json()["version"]


def test_ollama_tags_list_live_models_with_size(olc):
    models = {m.model: m for m in olc.list().models}
    assert set(models) == {MODEL, THINKER, "smollm2:135m"}
    assert models[MODEL].size == 2019393189
    assert models[MODEL].details.format == "gguf"


def test_ollama_show_and_404(olc):
    shown = olc.show(THINKER)
    assert "thinking" in shown.capabilities and "completion" in shown.capabilities
    with pytest.raises(ollama.ResponseError) as caught:
        olc.show("nobody:1b")
    assert caught.value.status_code == 404


def test_ollama_chat_streaming_matches_direct_with_final_stats(olc, direct):
    messages = [{"role": "user", "content": "hi ollama"}]
    parts = list(olc.chat(model=MODEL, messages=messages, stream=True))
    expected = ask(direct, messages=messages)
    assert "".join(p.message.content for p in parts) == expected.message.content
    final = parts[-1]
    assert final.done and final.done_reason == "stop"
    assert final.eval_count == expected.eval_count
    assert final.prompt_eval_count == expected.prompt_eval_count
    assert final.total_duration > 0
    assert all(not p.done for p in parts[:-1])


def test_ollama_chat_non_streaming_thinking_and_tools(olc, direct):
    messages = [{"role": "user", "content": "think"}]
    thought = olc.chat(model=THINKER, messages=messages, think=True)
    expected = ask(direct, model=THINKER, messages=messages, think=True)
    assert thought.message.thinking == expected.message.thinking
    assert thought.message.content == expected.message.content
    called = olc.chat(model=MODEL, messages=[{"role": "user", "content": "weather"}],
                      tools=[WEATHER_TOOL])
    assert called.message.tool_calls[0].function.name == "get_weather"


def test_ollama_generate_both_ways(olc, direct):
    streamed = list(olc.generate(model=MODEL, prompt="a poem", stream=True))
    whole = olc.generate(model=MODEL, prompt="a poem")
    assert "".join(p.response for p in streamed) == whole.response
    expected = ask(direct, messages=[{"role": "user", "content": "a poem"}])
    assert whole.response == expected.message.content
    assert whole.done_reason == "stop" and whole.eval_count == expected.eval_count
    loaded = olc.generate(model=MODEL, prompt="")
    assert loaded.done_reason == "load"


def test_ollama_errors_use_ollamas_shape(olc, network):
    with pytest.raises(ollama.ResponseError) as caught:
        olc.chat(model="nobody:1b", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    reply = requests.post(f"{network[0]}/ollama/api/chat", data=b"{bad", timeout=5)
    assert reply.status_code == 400 and "error" in reply.json()
    reply = requests.post(f"{network[0]}/ollama/api/pull", json={"model": MODEL}, timeout=5)
    assert reply.status_code == 501 and "error" in reply.json()


# --- Browsers, request ids, HEAD and honest 404s (issue 19) ----------------------------------

APP = "https://app.example"
# What the official openai JavaScript client sends from a browser, besides Authorization.
SDK_HEADERS = ["authorization", "content-type", "x-stainless-lang", "x-stainless-os",
               "x-stainless-retry-count", "x-stainless-timeout", "x-stainless-package-version"]
HEX_ID = re.compile(r"[0-9a-f]{32}")


def preflight(url: str, origin: str = APP) -> requests.Response:
    """What a browser asks before a cross-origin POST with JSON and an API key."""
    return requests.options(url, timeout=5, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": ", ".join(SDK_HEADERS)})


def header_list(reply: requests.Response, name: str) -> set[str]:
    return {item.strip().lower() for item in reply.headers.get(name, "").split(",")}


def test_browser_preflight_is_answered_on_every_public_api(network):
    for path in ("/v1/chat/completions", "/ollama/v1/chat/completions", "/ollama/api/chat",
                 "/api/chat", "/health"):
        reply = preflight(f"{network[0]}{path}")
        assert reply.status_code == 200, path
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
        assert "post" in header_list(reply, "Access-Control-Allow-Methods")
        assert set(SDK_HEADERS) <= header_list(reply, "Access-Control-Allow-Headers")
        assert "Access-Control-Allow-Credentials" not in reply.headers


def test_cross_origin_answers_streamed_or_not_carry_cors_headers(network):
    url, origin = network[0], {"Origin": APP}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    models = requests.get(f"{url}/v1/models", headers=origin, timeout=5)
    whole = requests.post(f"{url}/v1/chat/completions", json=chat, headers=origin, timeout=10)
    streamed = requests.post(f"{url}/ollama/api/chat", json=chat, headers=origin, timeout=10,
                             stream=True)
    missing = requests.post(f"{url}/v1/chat/completions", json={**chat, "model": "nobody:1b"},
                            headers=origin, timeout=10)
    for reply, status in ((models, 200), (whole, 200), (streamed, 200), (missing, 404)):
        assert reply.status_code == status
        assert reply.headers["Access-Control-Allow-Origin"] == "*"
        assert {"retry-after", "x-request-id"} <= header_list(
            reply, "Access-Control-Expose-Headers")
    lines = [json.loads(line) for line in streamed.iter_lines() if line]
    assert lines[-1]["done"] is True


def test_admin_and_chat_page_get_no_cors_headers(network):
    for path in ("/admin/login/", "/", "/network"):
        reply = requests.get(f"{network[0]}{path}", headers={"Origin": APP}, timeout=5)
        assert reply.status_code == 200
        assert "Access-Control-Allow-Origin" not in reply.headers, path
    assert "Access-Control-Allow-Origin" not in preflight(f"{network[0]}/admin/login/").headers


def test_cors_origins_setting_limits_which_pages_may_call(tmp_path):
    """A router with IDLECLAW_CORS_ORIGINS set answers only those origins."""
    env = {"IDLECLAW_CORS_ORIGINS": "https://App.example, http://localhost:5173"}
    router, url = procs.start_router(tmp_path / "router.sqlite3", env)
    try:
        allowed = preflight(f"{url}/v1/chat/completions")
        assert allowed.headers["Access-Control-Allow-Origin"] == APP
        other = preflight(f"{url}/v1/chat/completions", origin="https://evil.example")
        assert "Access-Control-Allow-Origin" not in other.headers
        local = requests.get(f"{url}/v1/nothing", headers={"Origin": "http://localhost:5173"},
                             timeout=5)
        assert local.status_code == 404
        assert local.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    finally:
        router.stop()


def test_openai_sdk_with_default_retries_raises_not_found_within_a_second(network):
    client = openai.OpenAI(base_url=f"{network[0]}/v1", api_key="x")  # retries as shipped
    messages = [{"role": "user", "content": "x"}]
    try:
        started = time.monotonic()
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="nobody:1b", messages=messages)
        assert time.monotonic() - started < 1.0
        assert caught.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nobody:1b", messages=messages, stream=True)
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("nobody:1b")
        assert time.monotonic() - started < 3.0
    finally:
        client.close()


def test_ollama_unknown_model_is_404_in_ollamas_words(olc):
    calls = [
        lambda: olc.chat(model="nobody:1b", messages=[{"role": "user", "content": "x"}]),
        lambda: list(olc.chat(model="nobody:1b", messages=[{"role": "user", "content": "x"}],
                              stream=True)),
        lambda: olc.generate(model="nobody:1b", prompt="x"),
        lambda: olc.generate(model="nobody:1b"),
        lambda: olc.show("nobody:1b"),
    ]
    for call in calls:
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 404
        assert caught.value.error == "model 'nobody:1b' not found"


def test_ollama_v1_answers_like_v1_for_the_openai_client(network, oai):
    client = openai.OpenAI(base_url=f"{network[0]}/ollama/v1", api_key="ollama", max_retries=0)
    messages = [{"role": "user", "content": "the same under /ollama/v1"}]
    try:
        expected = oai.chat.completions.create(model=MODEL, messages=messages)
        whole = client.chat.completions.create(model=MODEL, messages=messages)
        assert whole.choices[0].message.content == expected.choices[0].message.content
        assert whole.usage == expected.usage
        stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == expected.choices[0].message.content
        assert [m.id for m in client.models.list()] == [m.id for m in oai.models.list()]
        assert client.models.retrieve(MODEL).id == MODEL
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("nobody:1b")
    finally:
        client.close()
    reply = requests.get(f"{network[0]}/ollama/v1/nothing", timeout=5)
    assert reply.status_code == 404 and "no such endpoint" in reply.json()["error"]["message"]


def test_x_request_id_is_the_id_the_node_saw(network, oai):
    messages = [{"role": "user", "content": "which request is this?"}]
    whole = oai.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
    with oai.chat.completions.with_streaming_response.create(
        model=MODEL, messages=messages, stream=True
    ) as streamed:
        streamed_id = streamed.headers["x-request-id"]
        list(streamed.iter_lines())
    for request_id in (whole.headers["x-request-id"], streamed_id):
        assert HEX_ID.fullmatch(request_id)
        network.node.wait_for_line(rf"request {request_id} started", timeout=5)
    # Every other answer has an id of its own, in the same format.
    others = [requests.get(f"{network[0]}{path}", timeout=5).headers["x-request-id"]
              for path in ("/health", "/v1/models", "/v1/nothing", "/api/chat")]
    assert all(HEX_ID.fullmatch(request_id) for request_id in others)
    assert len({*others, whole.headers["x-request-id"], streamed_id}) == 6


def test_a_body_refused_before_it_is_read_has_a_request_id(network):
    host, port = network[0].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n")
        head = conn.recv(65536).split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head.startswith("http/1.1 413")
    assert HEX_ID.fullmatch(re.search(r"\nx-request-id: (\S+)", head).group(1))


def raw_exchange(url: str, method: str, path: str) -> tuple[str, dict[str, str], bytes]:
    """One request on its own connection, read to the end: what the server really sends."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return status, headers, body


def test_head_answers_like_get_without_a_body(network):
    for path in ("/", "/network", "/network.json", "/assets/older/chat.js", "/health",
                 "/v1/models", "/ollama/v1/models", "/ollama/api/tags", "/v1/nothing"):
        got = raw_exchange(network[0], "GET", path)
        head = raw_exchange(network[0], "HEAD", path)
        assert head[0] == got[0], path
        assert got[2] and head[2] == b"", path
        # The id is each request's own; the length of a body not sent is not announced.
        unlike = {"x-request-id", "transfer-encoding", "content-length"}
        assert {k: v for k, v in head[1].items() if k not in unlike} == {
            k: v for k, v in got[1].items() if k not in unlike}, path


def test_keep_alive_zero_with_nothing_to_say_unloads_as_ollama_answers(network, olc):
    unloaded = olc.generate(model=MODEL, keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    assert olc.chat(model=MODEL, keep_alive="0s").done_reason == "unload"
    assert olc.chat(model=MODEL, keep_alive="5m").done_reason == "load"
    # The fields Ollama's handlers send for an unload (server/routes.go): nothing else.
    chat = requests.post(f"{network[0]}/ollama/api/chat", timeout=5,
                         json={"model": MODEL, "keep_alive": 0}).json()
    assert set(chat) == {"model", "created_at", "message", "done", "done_reason"}
    assert chat["message"] == {"role": "assistant", "content": ""}
    generate = requests.post(f"{network[0]}/ollama/api/generate", timeout=5,
                             json={"model": MODEL, "prompt": "", "keep_alive": "0m"}).json()
    assert set(generate) == {"model", "created_at", "response", "done", "done_reason"}
    assert generate["response"] == "" and generate["done_reason"] == "unload"
# --- Loaded models and model details (issue 19) ---------------------------------------------


def running(olc) -> dict[str, ollama.ProcessResponse.Model]:
    return {model.model: model for model in olc.ps().models}


def test_ollama_ps_lists_a_model_once_a_chat_loaded_it(olc):
    small = "smollm2:135m"
    assert small not in running(olc)
    olc.chat(model=small, messages=[{"role": "user", "content": "load it"}])
    # The node reports soon after a request that loaded its model, not at its next heartbeat.
    loaded = procs.wait_until(lambda: running(olc).get(small), timeout=12, what="ps to list it")
    assert loaded.name == small
    assert loaded.size_vram == loaded.size == 270898672
    assert loaded.expires_at > datetime.now(UTC)
    assert loaded.details.family == "llama" and loaded.details.parameter_size == "135M"
    assert loaded.context_length == 8192


def test_show_list_and_v1_models_carry_the_nodes_details(olc, oai):
    shown = olc.show(MODEL)
    assert shown.details.family == "llama"
    assert shown.details.parameter_size == "3B"
    assert shown.details.quantization_level == "Q4_K_M"
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 131072
    listed = {m.model: m for m in olc.list().models}
    assert listed[THINKER].details.parameter_size == "0.6B"
    assert listed[THINKER].details.family == "qwen3"
    model = oai.models.retrieve(THINKER)
    assert model.model_extra["context_length"] == 40960
    assert model.model_extra["details"]["quantization_level"] == "Q4_K_M"


def test_requests_go_to_the_node_that_has_the_model_loaded(olc, network):
    router_url, warm_url = network
    olc.chat(model=THINKER, messages=[{"role": "user", "content": "warm up"}], think=False)
    procs.wait_until(lambda: THINKER in running(olc), timeout=12, what="the node's report")
    # A second node serving the same model, idle like the first, whose Ollama has nothing
    # loaded; not yet measured, so without the preference it would even be ranked first.
    cold, cold_url = procs.start_emulator()
    second = procs.start_contributor(router_url, cold_url, "--max-concurrent", "4")
    try:
        second.wait_for_line("registered")

        def served() -> tuple[int, int]:
            return tuple(
                requests.get(f"{url}/_emulator/stats", timeout=5).json()["chat_completed"]
                for url in (warm_url, cold_url)
            )

        before = served()
        for index in range(4):
            olc.chat(
                model=THINKER, messages=[{"role": "user", "content": f"q{index}"}], think=False
            )
        warm, cold_count = (after - was for after, was in zip(served(), before, strict=True))
        assert (warm, cold_count) == (4, 0)
    finally:
        second.stop()
        cold.stop()
