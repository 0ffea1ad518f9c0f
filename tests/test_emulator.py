"""The Ollama emulator, checked the way its users see it: over real HTTP.

Each emulator runs as a subprocess (``python -m bench.emulator``), and most checks go
through the official ``ollama`` client so a wire-format slip fails here first.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import selectors
import signal
import subprocess
import sys
import time
from array import array
from collections.abc import Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import ollama
import pytest

from bench.emulator import ModelSpec, OllamaEmulator, reply_for, vector_for

ROOT = Path(__file__).resolve().parent.parent

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "days": {"type": "integer", "description": "How many days ahead"},
                "metric": {"type": "boolean"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "note": {"type": "string", "description": "optional, so never filled"},
            },
            "required": ["city", "days", "metric", "unit"],
        },
    },
}


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _start_emulator(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.emulator", "--port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=15):
            proc.kill()
            pytest.fail("emulator did not announce its address within 15 s")
    line = proc.stdout.readline()
    if not line.startswith("listening on http://"):
        proc.kill()
        _, stderr = proc.communicate(timeout=5)
        pytest.fail(f"unexpected first line {line!r}; stderr: {stderr}")
    return proc, line.removeprefix("listening on ").strip()


def _stop_emulator(proc: subprocess.Popen[str]) -> int:
    proc.terminate()
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode


@pytest.fixture(scope="module")
def emulator_url() -> Iterator[str]:
    """The default emulator: default models, 20-token replies, no delays."""
    proc, url = _start_emulator()
    yield url
    _stop_emulator(proc)


@pytest.fixture(scope="module")
def slow_url() -> Iterator[str]:
    """A slow emulator with custom models, for timing and disconnect checks."""
    proc, url = _start_emulator(
        "--token-delay",
        "0.05",
        "--load-delay",
        "0.2",
        "--reply-tokens",
        "40",
        "--version",
        "9.9.9-test",
        "--model",
        "tiny:1m,size=1000,caps=completion+thinking",
        "--model",
        "llama3.2:3b",
    )
    yield url
    _stop_emulator(proc)


@pytest.fixture
def client(emulator_url: str) -> Iterator[ollama.Client]:
    with closing(ollama.Client(host=emulator_url, timeout=10)) as client:
        yield client


@pytest.fixture
def slow_client(slow_url: str) -> Iterator[ollama.Client]:
    with closing(ollama.Client(host=slow_url, timeout=10)) as client:
        yield client


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/_emulator/stats", timeout=5).json()


def _wait_for(url: str, key: str, value: int, timeout: float = 2.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(url)
        if stats[key] >= value or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


# --------------------------------------------------------------------------- plain endpoints


def test_root_answers_get_and_head_like_ollama(emulator_url: str) -> None:
    got = httpx.get(emulator_url + "/", timeout=5)
    head = httpx.head(emulator_url + "/", timeout=5)

    assert (got.status_code, got.text) == (200, "Ollama is running")
    assert head.status_code == 200
    assert head.content == b""


def test_version_is_ollama_0_12_3_unless_configured(emulator_url: str, slow_url: str) -> None:
    assert httpx.get(f"{emulator_url}/api/version", timeout=5).json() == {"version": "0.12.3"}
    assert httpx.get(f"{slow_url}/api/version", timeout=5).json() == {"version": "9.9.9-test"}


def test_unknown_route_is_a_plain_404(emulator_url: str) -> None:
    response = httpx.get(f"{emulator_url}/api/nothing", timeout=5)

    assert (response.status_code, response.text) == (404, "404 page not found")


def test_list_shows_the_default_models_with_details(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}

    assert set(models) == {"llama3.2:3b", "qwen3:0.6b", "smollm2:135m"}
    assert models["llama3.2:3b"].size == 2019393189
    assert models["qwen3:0.6b"].size == 522653767
    assert models["smollm2:135m"].size == 270898672
    llama = models["llama3.2:3b"]
    assert llama.details.family == "llama"
    assert llama.details.format == "gguf"
    assert llama.details.parameter_size == "3B"
    assert len(llama.digest) == 64
    assert llama.modified_at is not None


def test_tags_carry_name_and_model_fields(emulator_url: str) -> None:
    entry = httpx.get(f"{emulator_url}/api/tags", timeout=5).json()["models"][0]

    assert entry["name"] == entry["model"]
    assert set(entry["details"]) == {
        "parent_model",
        "format",
        "family",
        "families",
        "parameter_size",
        "quantization_level",
    }


def test_model_option_replaces_the_default_models(slow_client: ollama.Client) -> None:
    models = {m.model: m for m in slow_client.list().models}

    assert set(models) == {"tiny:1m", "llama3.2:3b"}
    assert models["tiny:1m"].size == 1000


def test_show_reports_capabilities_and_details(client: ollama.Client) -> None:
    qwen = client.show("qwen3:0.6b")
    llama = client.show("llama3.2:3b")
    smol = client.show("smollm2:135m")

    assert set(qwen.capabilities or []) == {"completion", "tools", "thinking"}
    assert set(llama.capabilities or []) == {"completion", "tools"}
    assert smol.capabilities == ["completion"]
    assert qwen.details is not None and qwen.details.family == "qwen3"
    assert qwen.modelinfo and qwen.modelinfo["general.architecture"] == "qwen3"
    assert qwen.modelfile and qwen.template is not None and qwen.modified_at is not None
    assert llama.details is not None and llama.details.parameter_size == "3B"
    assert llama.details.quantization_level == "Q4_K_M" and llama.details.format == "gguf"
    assert llama.modelinfo and llama.modelinfo["llama.context_length"] == 131072
    assert qwen.modelinfo["qwen3.context_length"] == 40960


def test_show_accepts_the_legacy_name_field(emulator_url: str) -> None:
    response = httpx.post(f"{emulator_url}/api/show", json={"name": "qwen3:0.6b"}, timeout=5)

    assert response.status_code == 200
    assert "thinking" in response.json()["capabilities"]


def test_show_unknown_model_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("nonexistent:1b")

    assert caught.value.status_code == 404
    assert caught.value.error == "model 'nonexistent:1b' not found"


def test_ps_lists_models_after_use_with_expiry(client: ollama.Client) -> None:
    client.chat(model="smollm2:135m", messages=_user("load me"), stream=False)

    running = {m.model: m for m in client.ps().models}

    smol = running["smollm2:135m"]
    assert smol.size_vram == smol.size == 270898672
    assert smol.context_length == 4096
    assert smol.expires_at is not None and smol.expires_at > datetime.now(UTC)
    assert smol.details is not None and smol.details.family == "llama"


def test_keep_alive_zero_on_an_empty_generate_unloads_the_model(client: ollama.Client) -> None:
    client.generate(model="qwen3:0.6b", prompt="hello", think=False)
    assert "qwen3:0.6b" in {m.model for m in client.ps().models}

    unloaded = client.generate(model="qwen3:0.6b", prompt="", keep_alive=0)

    assert unloaded.done_reason == "unload"
    assert "qwen3:0.6b" not in {m.model for m in client.ps().models}


# --------------------------------------------------------------------------- chat


def test_chat_stream_concatenates_to_the_non_streamed_reply(client: ollama.Client) -> None:
    messages = _user("Why is the sky blue?")

    chunks = list(client.chat(model="llama3.2:3b", messages=messages, stream=True))
    whole = client.chat(model="llama3.2:3b", messages=messages, stream=False)

    *tokens, final = chunks
    content = [c.message.content for c in tokens]
    assert "".join(content) == whole.message.content
    assert all(not c.done for c in tokens)
    assert final.done and final.done_reason == "stop" and final.message.content == ""
    assert final.eval_count == len(content) == 20
    assert whole.eval_count == 20 and whole.done_reason == "stop"
    for stat in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(final, stat), int) and getattr(final, stat) > 0
    assert final.prompt_eval_count and final.prompt_eval_count > 0


def test_chat_tokens_are_distinct_and_spaced(client: ollama.Client) -> None:
    chunks = list(client.chat(model="llama3.2:3b", messages=_user("tokens"), stream=True))

    tokens = [c.message.content for c in chunks[:-1]]
    assert len(set(tokens)) == len(tokens)
    assert not tokens[0].startswith(" ")
    assert all(t.startswith(" ") and " " not in t[1:] for t in tokens[1:])


def test_chat_reply_is_deterministic_per_conversation(client: ollama.Client) -> None:
    first = client.chat(model="llama3.2:3b", messages=_user("same"), stream=False)
    again = client.chat(model="llama3.2:3b", messages=_user("same"), stream=False)
    other = client.chat(model="llama3.2:3b", messages=_user("different"), stream=False)
    other_model = client.chat(model="smollm2:135m", messages=_user("same"), stream=False)

    assert first.message.content == again.message.content
    assert other.message.content != first.message.content
    assert other_model.message.content != first.message.content


def test_reply_for_predicts_what_the_server_sends(client: ollama.Client) -> None:
    messages = _user("predict me")

    served = client.chat(model="llama3.2:3b", messages=messages, stream=False)

    expected = reply_for("llama3.2:3b", messages=messages)
    assert served.message.content == expected.text
    assert served.eval_count == expected.eval_count
    assert served.prompt_eval_count == expected.prompt_eval_count


def test_chat_streaming_is_chunked_ndjson_on_the_wire(emulator_url: str) -> None:
    target = urlsplit(emulator_url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=5)
    body = json.dumps({"model": "llama3.2:3b", "messages": _user("wire")})
    conn.request("POST", "/api/chat", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()

    assert response.status == 200
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Length") is None
    assert response.getheader("Content-Type") == "application/x-ndjson"
    lines = raw.splitlines()
    objects = [json.loads(line) for line in lines]
    assert len(objects) == 21
    assert set(objects[0]) == {"model", "created_at", "message", "done"}
    assert objects[0]["message"] == {
        "role": "assistant",
        "content": objects[0]["message"]["content"],
    }
    assert objects[-1]["done"] is True and objects[-1]["done_reason"] == "stop"
    assert objects[0]["created_at"].endswith("Z")


def test_non_streamed_chat_is_one_json_object(emulator_url: str) -> None:
    response = httpx.post(
        f"{emulator_url}/api/chat",
        json={"model": "llama3.2:3b", "messages": _user("whole"), "stream": False},
        timeout=5,
    )

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["done"] is True and body["message"]["role"] == "assistant"
    assert len(body["message"]["content"].split()) == 20


def test_num_predict_truncates_with_done_reason_length(client: ollama.Client) -> None:
    messages = _user("truncate")
    full = client.chat(model="llama3.2:3b", messages=messages, stream=False)

    cut = client.chat(
        model="llama3.2:3b", messages=messages, stream=False, options={"num_predict": 5}
    )
    streamed = list(
        client.chat(model="llama3.2:3b", messages=messages, options={"num_predict": 5}, stream=True)
    )

    assert cut.done_reason == "length" and cut.eval_count == 5
    assert len(cut.message.content.split()) == 5
    assert full.message.content.startswith(cut.message.content)
    assert len(streamed) == 6 and streamed[-1].done_reason == "length"
    generous = client.chat(
        model="llama3.2:3b", messages=messages, stream=False, options={"num_predict": 50}
    )
    assert generous.done_reason == "stop" and generous.message.content == full.message.content


def test_thinking_streams_thinking_tokens_before_content(client: ollama.Client) -> None:
    messages = _user("think about it")

    chunks = list(client.chat(model="qwen3:0.6b", messages=messages, think=True, stream=True))
    whole = client.chat(model="qwen3:0.6b", messages=messages, think=True, stream=False)

    body = chunks[:-1]
    kinds = ["thinking" if c.message.thinking else "content" for c in body]
    first_content = kinds.index("content")
    assert first_content > 0 and all(k == "content" for k in kinds[first_content:])
    thinking = [c.message.thinking for c in body if c.message.thinking]
    content = [c.message.content for c in body if c.message.content]
    assert not set(thinking) & set(content)
    assert "".join(thinking) == whole.message.thinking
    assert "".join(content) == whole.message.content
    assert chunks[-1].eval_count == len(thinking) + len(content)


def test_thinking_model_thinks_by_default_and_not_when_told_not_to(
    client: ollama.Client,
) -> None:
    messages = _user("default thinking")

    default = client.chat(model="qwen3:0.6b", messages=messages, stream=False)
    off = client.chat(model="qwen3:0.6b", messages=messages, think=False, stream=False)

    assert default.message.thinking
    assert not off.message.thinking
    assert off.message.content == default.message.content


def test_thinking_on_a_model_without_it_is_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="llama3.2:3b", messages=_user("hi"), think=True)

    assert caught.value.status_code == 400
    assert caught.value.error == '"llama3.2:3b" does not support thinking'


def test_tools_produce_a_call_with_typed_arguments(client: ollama.Client) -> None:
    response = client.chat(
        model="llama3.2:3b",
        messages=_user("Weather in Paris?"),
        tools=[WEATHER_TOOL],
        stream=False,
    )

    assert response.done_reason == "stop"
    assert response.message.content == ""
    (call,) = response.message.tool_calls or []
    assert call.function.name == "get_weather"
    arguments = dict(call.function.arguments)
    assert set(arguments) == {"city", "days", "metric", "unit"}
    assert isinstance(arguments["city"], str) and arguments["city"]
    assert isinstance(arguments["days"], int) and not isinstance(arguments["days"], bool)
    assert isinstance(arguments["metric"], bool)
    assert arguments["unit"] == "celsius"


def test_streamed_tool_call_arrives_in_one_chunk(client: ollama.Client) -> None:
    chunks = list(
        client.chat(
            model="llama3.2:3b", messages=_user("Weather?"), tools=[WEATHER_TOOL], stream=True
        )
    )

    with_calls = [c for c in chunks if c.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done
    assert chunks[-1].done and chunks[-1].done_reason == "stop"


def test_tool_result_gets_an_ordinary_answer(client: ollama.Client) -> None:
    messages = [
        *_user("Weather in Paris?"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny, 21 degrees", "tool_name": "get_weather"},
    ]

    response = client.chat(
        model="llama3.2:3b", messages=messages, tools=[WEATHER_TOOL], stream=False
    )

    assert not response.message.tool_calls
    assert len(response.message.content.split()) == 20


def test_tools_on_a_model_without_them_is_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="smollm2:135m", messages=_user("hi"), tools=[WEATHER_TOOL])

    assert caught.value.status_code == 400
    assert "does not support tools" in caught.value.error


def test_format_json_and_schema_give_parseable_content(client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }

    loose = client.chat(model="llama3.2:3b", messages=_user("json"), format="json", stream=False)
    strict = list(
        client.chat(model="llama3.2:3b", messages=_user("schema"), format=schema, stream=True)
    )

    assert isinstance(json.loads(loose.message.content), dict)
    parsed = json.loads("".join(c.message.content for c in strict))
    assert isinstance(parsed["name"], str) and isinstance(parsed["age"], int)


def test_unknown_model_is_404_with_ollamas_wording(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="nonexistent:1b", messages=_user("hi"))

    assert caught.value.status_code == 404
    assert caught.value.error == 'model "nonexistent:1b" not found, try pulling it first'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "missing request body"),
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": []}', "model is required"),
        (b'{"model": "llama3.2:3b", "messages": "hi"}', None),
        (b'{"model": "llama3.2:3b", "messages": [], "stream": "yes"}', None),
    ],
)
def test_malformed_chat_requests_are_400(
    emulator_url: str, body: bytes, message: str | None
) -> None:
    response = httpx.post(f"{emulator_url}/api/chat", content=body, timeout=5)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error and (message is None or error == message)


def test_empty_messages_just_load_the_model(client: ollama.Client) -> None:
    response = client.chat(model="llama3.2:3b", messages=[])

    assert response.done and response.done_reason == "load"
    assert response.message.content == ""


async def test_async_client_streams_concurrent_chats_without_crosstalk(
    emulator_url: str,
) -> None:
    client = ollama.AsyncClient(host=emulator_url, timeout=10)

    async def chat(index: int) -> tuple[str, str]:
        messages = _user(f"question {index}")
        parts = [
            part.message.content
            async for part in await client.chat(model="llama3.2:3b", messages=messages, stream=True)
        ]
        return "".join(parts), reply_for("llama3.2:3b", messages=messages).text

    try:
        results = await asyncio.gather(*(chat(i) for i in range(8)))
    finally:
        await client.close()

    assert all(got == expected for got, expected in results)
    assert len({got for got, _ in results}) == 8


async def test_in_process_emulator_serves_what_expected_reply_predicts() -> None:
    thinker = ModelSpec("thinker:1b", 1234, ("completion", "thinking"))
    async with OllamaEmulator(models=[thinker], reply_tokens=7) as emulator:
        client = ollama.AsyncClient(host=emulator.url, timeout=10)
        body = {"model": "thinker:1b", "messages": _user("predict"), "stream": False}

        try:
            served = await client.chat(model="thinker:1b", messages=body["messages"], stream=False)
        finally:
            await client.close()
        expected = emulator.expected_reply("/api/chat", body)

        assert expected is not None
        assert served.message.content == expected.text and len(expected.content) == 7
        assert served.message.thinking == expected.thinking_text != ""
        assert emulator.expected_reply("/api/generate", {"model": "thinker:1b"}) is None
        with pytest.raises(ValueError, match="^404: "):
            emulator.expected_reply("/api/chat", {"model": "llama3.2:3b", "messages": []})
        assert emulator.stats()["chat_completed"] == 1


# --------------------------------------------------------------------------- generate


def test_generate_streams_and_returns_the_same_text(client: ollama.Client) -> None:
    chunks = list(client.generate(model="llama3.2:3b", prompt="Tell me a story", stream=True))
    whole = client.generate(model="llama3.2:3b", prompt="Tell me a story", stream=False)

    *tokens, final = chunks
    assert "".join(c.response for c in tokens) == whole.response
    assert final.done and final.done_reason == "stop" and final.response == ""
    assert final.eval_count == len(tokens) == 20
    assert final.context and all(isinstance(t, int) for t in final.context)
    assert whole.context == final.context


def test_generate_with_thinking_fills_the_thinking_field(client: ollama.Client) -> None:
    response = client.generate(model="qwen3:0.6b", prompt="hmm?", think=True, stream=False)

    assert response.thinking and response.response
    assert not set(response.thinking.split()) & set(response.response.split())


def test_generate_empty_prompt_loads_the_model(client: ollama.Client) -> None:
    response = client.generate(model="smollm2:135m", prompt="")

    assert response.done and response.done_reason == "load" and response.response == ""


def test_generate_raw_mode_returns_no_context(client: ollama.Client) -> None:
    response = client.generate(model="llama3.2:3b", prompt="[INST] hi [/INST]", raw=True)

    assert response.done and not response.context


# --------------------------------------------------------------------------- timing and stats


def test_only_a_model_that_is_not_loaded_waits_the_load_delay(slow_client: ollama.Client) -> None:
    slow_client.generate(model="llama3.2:3b", prompt="", keep_alive=0)  # whatever ran before

    def ask() -> ollama.ChatResponse:
        return slow_client.chat(
            model="llama3.2:3b", messages=_user("slow"), stream=False, options={"num_predict": 2}
        )

    cold, warm = ask(), ask()

    assert cold.load_duration >= 200_000_000
    assert cold.total_duration >= cold.load_duration + 2 * 50_000_000
    assert cold.eval_count == 2
    assert warm.load_duration < 100_000_000
    assert "llama3.2:3b" in {m.model for m in slow_client.ps().models}


async def test_requests_arriving_during_a_load_wait_for_the_same_load() -> None:
    async with OllamaEmulator(load_delay=0.6) as emulator:
        client = ollama.AsyncClient(host=emulator.url, timeout=10)

        async def ask() -> ollama.ChatResponse:
            return await client.chat(model="qwen3:0.6b", messages=_user("x"), think=False)

        try:
            first = asyncio.ensure_future(ask())
            await asyncio.sleep(0.3)
            second = await ask()
            first_done = await first
        finally:
            await client.close()

    assert first_done.load_duration >= 600_000_000
    # It waited only for the rest of the load the first request started.
    assert second.load_duration < 500_000_000


def test_stats_log_request_bodies_and_reset_clears_them(emulator_url: str) -> None:
    httpx.post(f"{emulator_url}/_emulator/reset", timeout=5)
    body = {"model": "llama3.2:3b", "messages": _user("logged"), "stream": False}
    httpx.post(f"{emulator_url}/api/chat", json=body, timeout=5)
    httpx.post(f"{emulator_url}/api/generate", json={"model": "nope", "prompt": "x"}, timeout=5)

    stats = _stats(emulator_url)
    reset = httpx.post(f"{emulator_url}/_emulator/reset", timeout=5).json()

    assert stats["requests"] == [body, {"model": "nope", "prompt": "x"}]
    assert stats["chat_started"] == stats["chat_completed"] == 1
    assert stats["generate_started"] == 0 and stats["rejected"] == 1
    assert stats["active"] == 0
    assert reset["requests"] == [] and reset["chat_completed"] == 0


def test_closing_the_connection_mid_stream_counts_as_cancelled(slow_url: str) -> None:
    before = _stats(slow_url)
    target = urlsplit(slow_url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=5)
    body = json.dumps({"model": "llama3.2:3b", "messages": _user("hang up on me")})
    conn.request("POST", "/api/chat", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    first = json.loads(response.readline())
    second = json.loads(response.readline())
    during = _stats(slow_url)

    response.close()
    conn.close()
    after = _wait_for(slow_url, "chat_cancelled", before["chat_cancelled"] + 1)

    assert not first["done"] and not second["done"]
    assert during["active"] == before["active"] + 1
    assert after["chat_cancelled"] == before["chat_cancelled"] + 1
    assert after["chat_completed"] == before["chat_completed"]
    assert after["active"] == before["active"]


def test_hanging_up_on_a_non_streamed_generate_counts_as_cancelled(slow_url: str) -> None:
    before = _stats(slow_url)
    target = urlsplit(slow_url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=5)
    body = json.dumps({"model": "llama3.2:3b", "prompt": "too slow", "stream": False})
    conn.request("POST", "/api/generate", body, {"Content-Type": "application/json"})
    time.sleep(0.3)

    conn.close()
    # Generating takes 0.2 + 40 * 0.05 s; noticing the hang-up must not wait for that.
    after = _wait_for(slow_url, "generate_cancelled", before["generate_cancelled"] + 1, timeout=1.0)

    assert after["generate_cancelled"] == before["generate_cancelled"] + 1
    assert after["generate_completed"] == before["generate_completed"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_emulator_cleanly(signum: signal.Signals) -> None:
    proc, url = _start_emulator()
    assert httpx.get(url + "/", timeout=5).status_code == 200

    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=5)

    assert proc.returncode == 0
    assert stdout == "" and stderr == ""


# --------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def embed_client() -> Iterator[ollama.Client]:
    """An emulator with the embedding models too (``--embedding-models``)."""
    proc, url = _start_emulator("--embedding-models", "--model", "llama3.2:3b")
    with closing(ollama.Client(host=url, timeout=10)) as client:
        yield client
    _stop_emulator(proc)


def _norm(vector: Sequence[float]) -> float:
    return math.sqrt(sum(value * value for value in vector))


def test_embed_answers_deterministic_unit_vectors_of_the_models_length(
    embed_client: ollama.Client,
) -> None:
    answer = embed_client.embed(model="nomic-embed-text", input=["a cat", "a dog"])
    again = embed_client.embed(model="nomic-embed-text:latest", input="a dog")
    small = embed_client.embed(model="all-minilm", input="a dog")

    assert answer.model == "nomic-embed-text"
    first, second = answer.embeddings
    assert (len(first), len(second), len(small.embeddings[0])) == (768, 768, 384)
    assert list(again.embeddings[0]) == list(second) != list(first)
    assert list(second) == vector_for("nomic-embed-text:latest", "a dog", 768)
    assert abs(_norm(first) - 1) < 1e-6
    assert answer.prompt_eval_count == 4  # about four characters a token
    assert answer.total_duration > 0 and answer.load_duration > 0
    # Each number is a float32 written with at most nine significant digits, as Ollama does.
    assert all(float(f"{array('f', [value])[0]:.9g}") == value for value in first)


def test_embed_dimensions_cut_and_normalize_again(embed_client: ollama.Client) -> None:
    whole = embed_client.embed(model="nomic-embed-text", input="text").embeddings[0]
    cut = embed_client.embed(model="nomic-embed-text", input="text", dimensions=64).embeddings[0]

    assert len(cut) == 64
    assert abs(_norm(cut) - 1) < 1e-6
    scale = _norm(whole[:64])
    assert all(abs(c - w / scale) < 1e-6 for c, w in zip(cut, whole[:64], strict=True))


def test_embed_truncates_long_input_unless_told_not_to(embed_client: ollama.Client) -> None:
    long_text = "word " * 5000  # 25,000 characters: past the 4096-token context
    cut = embed_client.embed(model="all-minilm", input=long_text)
    assert cut.prompt_eval_count == 4096
    assert list(cut.embeddings[0]) == vector_for("all-minilm", long_text[: 4096 * 4], 384)

    with pytest.raises(ollama.ResponseError) as refused:
        embed_client.embed(model="all-minilm", input=long_text, truncate=False)
    assert refused.value.status_code == 400
    assert "exceeds the context length" in refused.value.error


def test_embed_edge_cases_answer_like_ollama(embed_client: ollama.Client) -> None:
    assert embed_client.embed(model="all-minilm", input=[]).embeddings == []
    assert len(embed_client.embed(model="llama3.2:3b", input="x").embeddings[0]) == 2048
    with pytest.raises(ollama.ResponseError) as missing:
        embed_client.embed(model="nope", input="x")
    assert (missing.value.status_code, missing.value.error) == (404, "model 'nope' not found")
    host = str(embed_client._client.base_url).rstrip("/")
    bad = httpx.post(f"{host}/api/embed", json={"model": "all-minilm", "input": [1]}, timeout=5)
    assert (bad.status_code, bad.json()) == (400, {"error": "invalid input type"})


def test_the_older_embeddings_endpoint(embed_client: ollama.Client) -> None:
    answer = embed_client.embeddings(model="nomic-embed-text", prompt="a dog")
    assert list(answer.embedding) == vector_for("nomic-embed-text", "a dog", 768)
    assert embed_client.embeddings(model="nomic-embed-text", prompt="").embedding == []


def test_embedding_models_are_listed_and_shown_with_their_capability(
    embed_client: ollama.Client,
) -> None:
    names = {m.model for m in embed_client.list().models}
    shown = embed_client.show("nomic-embed-text")

    assert {"nomic-embed-text:latest", "all-minilm:latest", "llama3.2:3b"} <= names
    assert shown.capabilities == ["embedding"]
    assert shown.modelinfo["nomic.embedding_length"] == 768
async def test_models_can_be_pulled_and_removed_through_the_control_endpoint() -> None:
    first = ModelSpec("first:1b", 1234)
    async with OllamaEmulator(models=[first]) as emulator:
        client = ollama.AsyncClient(host=emulator.url, timeout=10)
        try:
            await client.generate(model="first:1b")  # loaded
            async with httpx.AsyncClient() as http:
                installed = await http.post(
                    f"{emulator.url}/_emulator/models",
                    json={"models": ["second:7b,size=7000,caps=completion+tools"]},
                )
                refused = await http.post(
                    f"{emulator.url}/_emulator/models", json={"models": ["x,caps=magic"]}
                )
            listed = await client.list()
            running = await client.ps()
            with pytest.raises(ollama.ResponseError) as gone:
                await client.chat(model="first:1b", messages=_user("still there?"))
        finally:
            await client.close()
    assert [m["name"] for m in installed.json()["models"]] == ["second:7b"]
    assert refused.status_code == 400 and "magic" in refused.json()["error"]
    assert [(m.model, m.size) for m in listed.models] == [("second:7b", 7000)]
    assert running.models == []  # the removed model was unloaded
    assert gone.value.status_code == 404


def test_a_lying_emulator_answers_as_another_model_or_at_random_and_never_by_default() -> None:
    body = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}]}

    async def replies(**kwargs: object) -> list[str]:
        emulator = OllamaEmulator(**kwargs)  # type: ignore[arg-type]
        return ["".join(emulator.expected_reply("/api/chat", body).content) for _ in range(2)]

    honest = asyncio.run(replies())
    assert honest[0] == honest[1] == "".join(
        reply_for("smollm2:135m", messages=body["messages"]).content
    )
    mislabelled = asyncio.run(replies(answer_as="llama3.2:3b"))
    assert mislabelled[0] == mislabelled[1] != honest[0]
    assert mislabelled[0] == "".join(reply_for("llama3.2:3b", messages=body["messages"]).content)
    garbled = asyncio.run(replies(garble=True))
    assert garbled[0] != garbled[1] and honest[0] not in garbled
