"""The emulator's searching model (``searches=yes``), through the official ``ollama`` client:
it calls ``web_search`` when asked to search and quotes the result it is given."""

from __future__ import annotations

import ollama
import pytest

from bench.emulator import ModelSpec, OllamaEmulator, parse_model_spec

SEARCHER = "searcher:1b"
WEB_SEARCH = {
    "type": "function",
    "function": {
        "name": "web_search",
        "description": "Search the web",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    },
}
OTHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {}, "required": []},
    },
}


@pytest.fixture
async def client():
    models = [
        ModelSpec(SEARCHER, 1_000_000_000, ("completion", "tools"), searches=True),
        ModelSpec("llama3.2:3b", 2_019_393_189, ("completion", "tools")),
    ]
    async with OllamaEmulator(models=models) as emulator:
        yield ollama.AsyncClient(host=emulator.url)


async def test_asked_to_search_it_calls_web_search_with_the_rest_of_the_prompt(client):
    chunks = [
        chunk
        async for chunk in await client.chat(
            model=SEARCHER,
            messages=[{"role": "user", "content": "Please search for tallest tree in Europe"}],
            tools=[OTHER_TOOL, WEB_SEARCH],
            stream=True,
        )
    ]
    calls = [call for chunk in chunks for call in chunk.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("web_search", {"query": "tallest tree in Europe"})
    ]
    assert "".join(chunk.message.content or "" for chunk in chunks) == ""
    assert chunks[-1].done


async def test_after_a_tool_result_it_quotes_the_results_first_line(client):
    messages = [
        {"role": "user", "content": "search tallest tree"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "web_search", "arguments": {"query": "x"}}}]},
        {"role": "tool", "content": "1. Hyperion (tree)\n   https://example.org/h\n",
         "tool_name": "web_search"},
    ]
    response = await client.chat(model=SEARCHER, messages=messages, tools=[WEB_SEARCH])
    assert response.message.content == "From the web: 1. Hyperion (tree)"
    assert not response.message.tool_calls


@pytest.mark.parametrize(
    ("prompt", "tools"),
    [("what is the tallest tree?", [WEB_SEARCH]), ("search tallest tree", [OTHER_TOOL]),
     ("search tallest tree", None)],
)
async def test_without_a_search_request_or_the_tool_it_answers_in_words(client, prompt, tools):
    response = await client.chat(
        model=SEARCHER, messages=[{"role": "user", "content": prompt}], tools=tools
    )
    assert not response.message.tool_calls
    assert len(response.message.content.split()) == 20


async def test_other_models_still_call_the_first_tool_offered(client):
    response = await client.chat(
        model="llama3.2:3b", messages=[{"role": "user", "content": "search x"}],
        tools=[OTHER_TOOL, WEB_SEARCH],
    )
    assert [c.function.name for c in response.message.tool_calls] == ["get_time"]


def test_the_model_spec_names_a_searching_model():
    assert parse_model_spec("s:1b,caps=completion+tools,searches=yes").searches
    assert not parse_model_spec("s:1b,caps=completion+tools").searches
    with pytest.raises(ValueError, match="yes or no"):
        parse_model_spec("s:1b,searches=maybe")
