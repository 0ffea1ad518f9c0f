"""``web_search`` end to end (issue 15): a real router under daphne, the real ``contribute.py``
relaying a searching model of the emulator, and a SearXNG stand-in; each API read by its own
client (``consume.py``, ``openai``, ``ollama``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import ollama
import openai
import pytest
import requests

from tests import procs
from tests.conftest import ROOMY_ENV
from tests.tools.searxng import FakeSearxng

pytestmark = pytest.mark.e2e

SEARCHER = "searcher:1b"
PROMPT = "Please search for the tallest tree"
# The emulator's searching model quotes the first line of the result it reads.
ANSWER = "From the web: 1. Hyperion (tree)"


@dataclass
class Network:
    router: str
    emulator: str
    node: procs.Proc
    searx: FakeSearxng


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> Iterator[Network]:
    with FakeSearxng().in_thread() as searx:
        db = tmp_path_factory.mktemp("tools") / "router.sqlite3"
        router, router_url = procs.start_router(
            db, {**ROOMY_ENV, "IDLECLAW_SEARXNG_URL": searx.url}
        )
        emulator, emulator_url = procs.start_emulator(
            "--model", f"{SEARCHER},caps=completion+tools,searches=yes"
        )
        node = procs.start_contributor(router_url, emulator_url)
        try:
            node.wait_for_line("registered")
            procs.wait_until(
                lambda: SEARCHER in requests.get(f"{router_url}/api/models", timeout=5).json()[
                    "models"],
                what="the node's model",
            )
            yield Network(router_url, emulator_url, node, searx)
        finally:
            node.stop()
            emulator.stop()
            router.stop()


def emulator_requests(network: Network) -> list[dict]:
    return requests.get(f"{network.emulator}/_emulator/stats", timeout=5).json()["requests"]


def test_a_search_on_api_chat_streams_the_status_then_the_answer(network):
    body = {"model": SEARCHER, "messages": [{"role": "user", "content": PROMPT}]}
    with requests.post(f"{network.router}/api/chat", json=body, stream=True,
                       timeout=30) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines(decode_unicode=True)
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices = [json.loads(event)["choices"][0] for event in events[:-1]]
    statuses = [c["delta"]["tool_call"] for c in choices if "tool_call" in c["delta"]]
    assert statuses == [{"name": "web_search", "status": "executing"},
                        {"name": "web_search", "status": "done"}]
    assert "".join(c["delta"].get("content", "") for c in choices) == ANSWER
    assert choices[-1]["finish_reason"] == "stop"
    assert network.searx.queries[-1] == "the tallest tree"
    # contribute.py relayed the model's call and the router's results unchanged: two requests
    # on the node, the second with the call and its result.
    first, second = emulator_requests(network)[-2:]
    assert [t["function"]["name"] for t in first["tools"]] == ["web_search"]
    assert second["messages"][1] == {
        "role": "assistant", "content": "",
        "tool_calls": [{"function": {"name": "web_search",
                                     "arguments": {"query": "the tallest tree"}}}],
    }
    assert second["messages"][2]["role"] == "tool"
    assert second["messages"][2]["tool_name"] == "web_search"
    assert second["messages"][2]["content"].startswith("1. Hyperion (tree)\n")
    started = re.findall(r"request (\S+) started", network.node.output)
    assert len(set(started[-2:])) == 2


def test_consume_py_prints_only_the_answer(network):
    result = procs.run_script("consume.py", "--model", SEARCHER, "--prompt", PROMPT,
                              server=network.router)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ANSWER


def test_the_openai_client_sees_only_the_final_answer(network):
    client = openai.OpenAI(base_url=f"{network.router}/v1", api_key="ignored", max_retries=0)
    try:
        completion = client.chat.completions.create(
            model=SEARCHER, messages=[{"role": "user", "content": PROMPT}]
        )
        stream = client.chat.completions.create(
            model=SEARCHER, messages=[{"role": "user", "content": PROMPT}], stream=True
        )
        parts = [chunk.choices[0] for chunk in stream if chunk.choices]
    finally:
        client.close()
    message = completion.choices[0].message
    assert (message.content, message.tool_calls) == (ANSWER, None)
    assert completion.choices[0].finish_reason == "stop"
    assert "".join(p.delta.content or "" for p in parts) == ANSWER
    assert not any(p.delta.tool_calls for p in parts)


def test_the_ollama_client_sees_only_the_final_answer(network):
    client = ollama.Client(host=f"{network.router}/ollama")
    response = client.chat(model=SEARCHER, messages=[{"role": "user", "content": PROMPT}],
                           stream=False)
    assert (response.message.content, response.message.tool_calls) == (ANSWER, None)
    chunks = list(client.chat(model=SEARCHER,
                              messages=[{"role": "user", "content": PROMPT}], stream=True))
    assert "".join(c.message.content or "" for c in chunks) == ANSWER
    assert not any(c.message.tool_calls for c in chunks)
