"""The relay core and the stream formats built on it.

``relay`` sends one claimed request to its node and yields the node's chunks as they come back
over the channel layer, until the final chunk; it raises ``RelayError`` when the node fails,
falls silent or runs out of time. Whatever ends it (completion, error, the consumer hanging up),
it frees the slot and, unless the node finished, tells the node to stop. The format generators
(SSE for ``/api/chat`` here) are thin adapters over it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings

from nodes import worker
from nodes.protocol import STAT_KEYS, EventType
from routing import selectors
from routing.services import Claim, inflight_claim, inflight_finish

logger = logging.getLogger("idleclaw.routing")

# What a consumer is told for each failure; never a node id or a trace (PROTOCOL §2).
ERROR_MESSAGES = {
    "node_disconnected": "the node serving this request disconnected",
    "stalled": "the node stopped responding",
    "timeout": "the response took too long",
    "invalid_request": "the node refused the request",
    "ollama_unavailable": "the node's model server is unavailable",
    "ollama_error": "the node's model server failed",
    "consumer_stalled": "the stream was not read fast enough",
}


class RelayError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code

    @property
    def message(self) -> str:
        return ERROR_MESSAGES.get(self.code, "the request failed")


@dataclass(frozen=True)
class Unavailable:
    """No node could take the request; ``served`` tells "all busy" from "nobody has it"."""

    model: str
    served: bool

    @property
    def message(self) -> str:
        if self.served:
            return f"all nodes serving {self.model} are busy"
        return f"no node is serving {self.model} right now"


async def open_relay(
    *, model: str, ollama_params: dict[str, Any]
) -> AsyncIterator[dict[str, Any]] | Unavailable:
    """Claim a node's slot for ``model`` and return the relay of its answer.

    The one entry point every front end (``/api/chat``, ``/v1``, ``/ollama``) uses, so routing,
    limits and clean-up behave the same on all of them.
    """
    await worker.ensure_started()
    layer = get_channel_layer()
    reply_channel = await layer.new_channel()
    claim = await database_sync_to_async(inflight_claim)(
        model=model,
        request_id=uuid.uuid4().hex,
        reply_channel=reply_channel,
        worker_id=worker.WORKER_ID,
    )
    if claim is None:
        served = await database_sync_to_async(selectors.model_is_served)(model=model)
        return Unavailable(model=model, served=served)
    if settings.IDLECLAW_SYSTEM_PROMPT:
        ollama_params = {
            **ollama_params,
            "messages": [
                {"role": "system", "content": settings.IDLECLAW_SYSTEM_PROMPT},
                *ollama_params["messages"],
            ],
        }
    return relay(layer=layer, claim=claim, reply_channel=reply_channel, ollama_params=ollama_params)


async def relay(
    *,
    layer: BaseChannelLayer,
    claim: Claim,
    reply_channel: str,
    ollama_params: dict[str, Any],
) -> AsyncIterator[dict[str, Any]]:
    """Yield the node's chunks for ``claim``; the last one has ``done: True``."""
    request_id = claim.request_id
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.IDLECLAW_RESPONSE_TIMEOUT
    stall = settings.IDLECLAW_STALL_TIMEOUT
    finished = False
    try:
        await layer.send(
            claim.node_channel,
            {
                "type": EventType.NODE_REQUEST,
                "request_id": request_id,
                "reply_channel": reply_channel,
                "ollama_params": ollama_params,
            },
        )
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RelayError("timeout")
            try:
                event = await asyncio.wait_for(
                    layer.receive(reply_channel), timeout=min(stall, remaining)
                )
            except TimeoutError:
                raise RelayError("stalled" if remaining > stall else "timeout") from None
            if event.get("request_id") != request_id:
                continue
            if event.get("type") == EventType.STREAM_ERROR:
                finished = True  # the node side already dropped the request
                raise RelayError(str(event.get("error")))
            chunk = event["chunk"]
            if chunk["done"]:
                finished = True
            yield chunk
            if finished:
                return
    finally:
        await asyncio.shield(_release(layer, claim, finished))


async def _release(layer: BaseChannelLayer, claim: Claim, finished: bool) -> None:
    if not finished:
        await layer.send(
            claim.node_channel, {"type": EventType.NODE_CANCEL, "request_id": claim.request_id}
        )
    await database_sync_to_async(inflight_finish)(request_id=claim.request_id)


@dataclass
class Answer:
    """A whole answer gathered from a relay, for the non-streaming APIs."""

    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    done_reason: str = "stop"
    stats: dict[str, int] = field(default_factory=dict)


async def collect(chunks: AsyncIterator[dict[str, Any]]) -> Answer:
    """Read a relay to its end; raises ``RelayError`` like the relay."""
    content: list[str] = []
    thinking: list[str] = []
    answer = Answer()
    async for chunk in chunks:
        message = chunk["message"]
        content.append(message.get("content", ""))
        thinking.append(message.get("thinking", ""))
        answer.tool_calls.extend(message.get("tool_calls", ()))
        if chunk["done"]:
            answer.done_reason = chunk.get("done_reason", "stop")
            answer.stats = {key: chunk[key] for key in STAT_KEYS if key in chunk}
    answer.content = "".join(content)
    answer.thinking = "".join(thinking)
    return answer


def finish_reason_of(chunk: dict[str, Any], saw_tool_calls: bool) -> str:
    if saw_tool_calls:
        return "tool_calls"
    if chunk.get("done_reason") == "length":
        return "length"
    return "stop"


def usage_of(chunk: dict[str, Any]) -> dict[str, int] | None:
    prompt = chunk.get("prompt_eval_count")
    completion = chunk.get("eval_count")
    if prompt is None and completion is None:
        return None
    prompt = prompt or 0
    completion = completion or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def sse_chat(chunks: AsyncIterator[dict[str, Any]], *, model: str) -> AsyncIterator[bytes]:
    """The network's own ``/api/chat`` stream (PROTOCOL §2)."""
    head = (
        f'{{"id":"chatcmpl-{uuid.uuid4().hex[:24]}","object":"chat.completion.chunk",'
        f'"created":{int(time.time())},"model":{_dumps(model)},"choices":[{{"index":0,"delta":'
    )

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        tail = "}]" + "".join(f",{_dumps(k)}:{_dumps(v)}" for k, v in extra.items()) + "}"
        body = f'{head}{_dumps(delta)},"finish_reason":{_dumps(finish)}{tail}'
        return f"data: {body}\n\n".encode()

    saw_tool_calls = False
    try:
        async for chunk in chunks:
            message = chunk["message"]
            if "thinking" in message:
                yield event({"content": message["thinking"], "reasoning": True})
            if "content" in message:
                yield event({"content": message["content"]})
            if "tool_calls" in message:
                saw_tool_calls = True
                yield event({"tool_calls": message["tool_calls"]})
            if chunk["done"]:
                extra: dict[str, Any] = {}
                usage = usage_of(chunk)
                if usage is not None:
                    extra["usage"] = usage
                yield event({}, finish_reason_of(chunk, saw_tool_calls), **extra)
    except RelayError as error:
        logger.info("stream for %s ended with error %s", model, error.code)
        yield event({"content": f"\n\n[Error: {error.message}]"}, "error")
    yield b"data: [DONE]\n\n"
