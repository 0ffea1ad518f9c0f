"""Helpers for the adversarial tests: an honest node serving a consumer word by word, so a test
can let a hostile node act in the middle of the honest stream and then check that the consumer
got exactly what the honest node sent; and readers that turn each front end's answer (SSE,
NDJSON, JSON) into the text, reasoning, tool calls and finish reason a consumer would see."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async

from nodes.protocol import FrameType
from routing.models import ConsumerStream, InflightRequest, QueuedRequest
from tests.routing.test_views import HttpClient, sse_events, strict_json
from tests.scripted_node import ScriptedNode

MODEL = "llama3.2:3b"
# The hostile node offers a model nobody asks for, so every consumer request for MODEL goes to
# the honest node and the test decides exactly what the hostile node sees.
EVIL_MODEL = "evil:1b"
HONEST_WORDS = ["The sky ", "is blue ", "because ", "air ", "scatters ", "short ", "waves."]
HONEST_TEXT = "".join(HONEST_WORDS)
PROMPT = "Why is the sky blue?"


def chat_body(prompt: str = PROMPT, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


async def honest_node(ip: str = "10.0.0.1", node_id: str = "honest-node",
                      max_concurrent: int = 4) -> ScriptedNode:
    node = ScriptedNode(ip=ip)
    await node.register(node_id=node_id, max_concurrent=max_concurrent,
                        models=[{"name": MODEL, "size": 2019393189}])
    return node


async def hostile_node(ip: str = "10.66.0.1", node_id: str = "hostile-node",
                       **overrides: Any) -> ScriptedNode:
    node = ScriptedNode(ip=ip)
    await node.register(node_id=node_id, models=[{"name": EVIL_MODEL, "size": 1}], **overrides)
    return node


@dataclass
class HonestStream:
    """One ``/api/chat`` consumer served by the honest node. ``request_id`` is what the honest
    node was sent: tests hand it to the hostile node, the worst case of an id that leaked."""

    node: ScriptedNode
    client: HttpClient
    request_id: str
    events: list[Any] = field(default_factory=list)

    @classmethod
    async def begin(cls, node: ScriptedNode, prompt: str = PROMPT) -> HonestStream:
        client = HttpClient("POST", "/api/chat", chat_body(prompt))
        status, _ = await client.start()
        assert status == 200
        request = await node.recv()
        assert request["type"] == FrameType.INFERENCE_REQUEST
        stream = cls(node=node, client=client, request_id=request["request_id"])
        # The first word reaches the consumer before the hostile node acts: mid-stream.
        await node.chunk(stream.request_id, HONEST_WORDS[0])
        stream.events += sse_events(await client.read_part())
        return stream

    async def finish(self, pace: float = 0.0) -> None:
        """Send the rest of the honest answer (``pace`` seconds apart) and check the consumer
        got all of it, unaltered, in order, ending with ``finish_reason`` ``stop``."""
        for word in HONEST_WORDS[1:]:
            await asyncio.sleep(pace)
            await self.node.chunk(self.request_id, word)
        await self.node.chunk(self.request_id, "", done=True, done_reason="stop",
                              prompt_eval_count=9, eval_count=len(HONEST_WORDS))
        self.events += sse_events(await self.client.read_all())
        assert_unaltered(self.events)


def assert_unaltered(events: list[Any]) -> None:
    assert events[-1] == "[DONE]"
    choices = [event["choices"][0] for event in events[:-1]]
    texts = [c["delta"]["content"] for c in choices if "content" in c["delta"]]
    assert "".join(texts) == HONEST_TEXT
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["stop"]
    assert not any(c["delta"].get("reasoning") or c["delta"].get("tool_calls") for c in choices)


async def next_output(communicator: Any, timeout: float = 5) -> dict[str, Any]:
    """The application's next message, or its exception the moment it crashes (the
    communicators' own ``receive_output`` only notices a crash after its timeout)."""
    get = asyncio.ensure_future(communicator.output_queue.get())
    done, _ = await asyncio.wait({get, communicator.future}, timeout=timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    if communicator.future.done():
        communicator.future.result()  # raises what the application raised
        raise AssertionError("the application ended without answering")
    raise TimeoutError(f"no output within {timeout} s")


async def read_body(client: HttpClient, timeout: float = 5) -> bytes:
    body = b""
    while True:
        message = await next_output(client.app, timeout)
        assert message["type"] == "http.response.body", message
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def close_of(node: ScriptedNode, timeout: float = 3) -> tuple[int, str]:
    """Like ``ScriptedNode.closed``, but fails at once if the node consumer crashed."""
    while True:
        message = await next_output(node.communicator, timeout)
        if message["type"] == "websocket.close":
            return message.get("code"), message.get("reason", "")


@sync_to_async
def leftovers() -> tuple[int, int, int]:
    """Slots, queue places and consumer streams still held: all zero once every answer ended."""
    return (InflightRequest.objects.count(), QueuedRequest.objects.count(),
            ConsumerStream.objects.count())


# --- What a consumer sees on each front end ----------------------------------------------------


@dataclass
class Seen:
    """A whole answer as one front end's consumer reads it."""

    status: int
    content: str = ""
    reasoning: str = ""
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None


# (path, extra body fields) for every front end that relays a node's answer.
FRONT_ENDS = {
    "api-chat-sse": ("/api/chat", {"think": True}),
    "v1-stream": ("/v1/chat/completions", {"stream": True}),
    "v1-json": ("/v1/chat/completions", {"stream": False}),
    "ollama-chat-ndjson": ("/ollama/api/chat", {}),
    "ollama-chat-json": ("/ollama/api/chat", {"stream": False}),
    "ollama-generate-ndjson": ("/ollama/api/generate", {}),
    "ollama-generate-json": ("/ollama/api/generate", {"stream": False}),
}


def front_end_request(name: str, **more: Any) -> HttpClient:
    path, extra = FRONT_ENDS[name]
    extra = {**extra, **more}
    if "generate" in path:
        body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, **extra}
    else:
        body = chat_body(**extra)
    return HttpClient("POST", path, body)


def _ollama_calls(calls: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def _openai_calls(calls: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(c["function"]["name"], strict_json(c["function"]["arguments"])) for c in calls]


def read_answer(name: str, status: int, body: bytes) -> Seen:
    """Parse a front end's answer the way its clients do."""
    seen = Seen(status=status)
    if name == "api-chat-sse":
        events = sse_events(body)
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            choice = event["choices"][0]
            delta = choice["delta"]
            if delta.get("reasoning"):
                seen.reasoning += delta["content"]
            else:
                seen.content += delta.get("content", "")
            seen.tool_calls += _ollama_calls(delta.get("tool_calls", []))
            seen.finish = choice["finish_reason"] or seen.finish
    elif name == "v1-stream":
        events = sse_events(body)
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            if "error" in event:
                seen.error = event["error"]["message"]
                continue
            for choice in event["choices"]:
                delta = choice["delta"]
                seen.content += delta.get("content") or ""
                seen.reasoning += delta.get("reasoning_content") or ""
                seen.tool_calls += _openai_calls(delta.get("tool_calls", []))
                seen.finish = choice["finish_reason"] or seen.finish
    elif name == "v1-json":
        answer = strict_json(body)
        message = answer["choices"][0]["message"]
        seen.content = message["content"] or ""
        seen.reasoning = message.get("reasoning_content", "")
        seen.tool_calls = _openai_calls(message.get("tool_calls", []))
        seen.finish = answer["choices"][0]["finish_reason"]
    elif name.startswith("ollama"):
        lines = [strict_json(line) for line in body.splitlines()] if "ndjson" in name else [
            strict_json(body)]
        for line in lines:
            if "error" in line:
                seen.error = line["error"]
                continue
            if "message" in line:
                seen.content += line["message"].get("content", "")
                seen.reasoning += line["message"].get("thinking", "")
                seen.tool_calls += _ollama_calls(line["message"].get("tool_calls", []))
            else:
                seen.content += line["response"]
                seen.reasoning += line.get("thinking", "")
            if line["done"]:
                seen.finish = line["done_reason"]
    return seen
