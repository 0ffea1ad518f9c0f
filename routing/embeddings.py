"""Embeddings through the network: the ``embeddings`` extension of the node protocol
(docs/node-protocol-extensions.md) driven by the relay machinery of ``routing.streaming``.

An embedding request takes a slot, waits in its model's queue, fails over and gives its slot
back exactly like a chat request (``EmbedRelay`` is a ``Relay``); only the nodes that declared
the extension are chosen. The node's vectors are checked frame by frame where they arrive
(``nodes.protocol.EmbedCheck``) and put together here; the consumer sees nothing before the
whole answer is in, so any failure of a node may still fail over to another.

The front ends (``/v1/embeddings``, ``/ollama/api/embed``, ``/ollama/api/embeddings``) write the
answer in their own shapes, a vector at a time (``vector_parts``).
"""

from __future__ import annotations

import asyncio
import base64
import sys
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from idleclaw_site.db import db
from nodes.protocol import EMBED_STAT_KEYS, EventType, Feature
from routing import identity, metrics, services
from routing.identity import Consumer
from routing.services import Demand, Outcome, OverLimit
from routing.streaming import (
    Queued,
    Relay,
    RelayError,
    TooMany,
    Unavailable,
    _Failover,
    believed_prompt_count,
)

# Numbers written between two yields to the event loop while an answer goes out: a batch of
# large vectors is megabytes of JSON, and other streams must not wait behind it.
FLOATS_PER_YIELD = 8192


@dataclass
class Embeddings:
    """A node's whole answer: one vector per input, in order, and Ollama's counts."""

    vectors: list[list[float]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return self.stats.get("prompt_eval_count", 0)


class EmbedRelay(Relay):
    """One embedding request through the network (see the module docstring)."""

    feature = Feature.EMBEDDINGS

    def __init__(
        self,
        *,
        model: str,
        embed_params: dict[str, Any],
        client_ip: str | None = None,
        consumer: Consumer | None = None,
        api: str = metrics.API_OPENAI,
    ) -> None:
        self.model = model
        self.client_ip = client_ip
        self.consumer = consumer or identity.anonymous(client_ip)
        self.params = embed_params
        # Counted once when it ends, as chat requests are (routing/metrics.py).
        self.tally = metrics.RequestTally(model=model, api=api, client_ip=client_ip)
        # A node's context cap holds for embeddings too; nothing is predicted.
        self.demand = Demand(num_ctx=Demand.of(embed_params.get("options")).num_ctx)
        self._begin()

    async def _attempt(self) -> AsyncIterator[Embeddings]:
        """Send the request to the claimed node and put its vectors together. Every failure is
        a ``_Failover``: the consumer has been sent nothing yet."""
        claim = self.claim
        assert claim is not None
        sent_at = self.loop.time()
        deadline = sent_at + settings.IDLECLAW_RESPONSE_TIMEOUT
        received = 0  # pieces so far: the channel layer numbers them
        answer = Embeddings()
        outcome = Outcome(kind="cancelled")
        node_done = failing_over = False
        try:
            await self.layer.send(
                claim.node_channel,
                {
                    "type": EventType.NODE_EMBED,
                    "request_id": claim.request_id,
                    "reply_channel": self.reply_channel,
                    "embed_params": self.params,
                },
            )
            while not node_done:
                remaining = deadline - self.loop.time()
                # A node computes the whole batch before its first frame; after that, frames
                # follow each other as fast as the link allows.
                wait = (
                    remaining if not received else min(settings.IDLECLAW_STALL_TIMEOUT, remaining)
                )
                try:
                    async with asyncio.timeout(max(wait, 0.0)):
                        event = await self.layer.receive(self.reply_channel)
                except TimeoutError:
                    if self.aborted:
                        raise RelayError(self.aborted) from None
                    outcome = Outcome(kind="timed_out")
                    raise _Failover("timeout" if wait >= remaining else "stalled") from None
                if self.aborted:
                    raise RelayError(self.aborted)
                if event.get("request_id") != claim.request_id:
                    continue  # a wake-up, or a late event of an earlier attempt
                if event.get("type") == EventType.STREAM_ERROR:
                    node_done = True
                    code = str(event.get("error"))
                    outcome = Outcome(kind="failed")
                    if code == "invalid_request":
                        outcome = Outcome(kind="cancelled")
                        self._refused_by_node()
                    raise _Failover(code)
                if event.get("seq") != received:
                    # A message the channel layer lost: the router's fault, not the node's.
                    raise _Failover("lost_chunks")
                for piece in event["chunks"]:
                    received += 1
                    _add(answer.vectors, piece)
                    if piece["done"]:
                        node_done = True
                        answer.stats = {k: piece[k] for k in EMBED_STAT_KEYS if k in piece}
                        if "prompt_eval_count" in answer.stats:
                            answer.stats["prompt_eval_count"] = believed_prompt_count(
                                answer.stats["prompt_eval_count"], self.params.get("input")
                            )
            # Not a token stream: neither a time to first token nor a speed to rank it by.
            outcome = Outcome(kind="completed")
            yield answer
        except _Failover:
            failing_over = True
            raise
        finally:
            self.claim = None
            self.tried.add(claim.session_id)
            release = self._release(claim, outcome, cancel=not node_done, final=not failing_over)
            if self.aborted:
                self._in_background(release)
            else:
                await asyncio.shield(release)


def _add(vectors: list[list[float]], piece: dict[str, Any]) -> None:
    """Append a piece's vectors; with ``continued`` its first one goes on the last vector."""
    parts = piece["embeddings"]
    if piece["continued"] and parts:
        vectors[-1].extend(parts[0])
        parts = parts[1:]
    vectors.extend(parts)


async def embed(
    *,
    model: str,
    embed_params: dict[str, Any],
    client_ip: str | None,
    api: str,
    consumer: Consumer | None = None,
) -> Embeddings | Unavailable | TooMany | OverLimit:
    """Embed ``embed_params["input"]`` with ``model`` on a node that declared the extension.
    Returns why it cannot start (404/503/429 for the front ends) or the whole answer; raises
    ``RelayError`` when every attempt failed."""
    if ":" not in model:
        model = await db(services.model_resolve)(model)
        embed_params = {**embed_params, "model": model}
    relay = EmbedRelay(
        model=model, embed_params=embed_params, client_ip=client_ip, consumer=consumer, api=api
    )
    refusal = await relay.start(hold=settings.IDLECLAW_QUEUE_TIMEOUT)
    if refusal is not None:
        return refusal
    answer: Embeddings | None = None
    async for item in relay.events():
        if not isinstance(item, Queued):
            answer = item
    if answer is None:  # the relay always yields its answer or raises; never seen
        raise RelayError("internal")
    return answer


def float32_base64(vector: list[float]) -> str:
    """A vector as OpenAI's ``encoding_format: base64`` has it: little-endian float32."""
    packed = array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


async def vector_parts(
    vectors: list[list[float]],
    render: Callable[[int, list[float]], str],
    *,
    head: str,
    tail: str,
) -> AsyncIterator[bytes]:
    """A JSON body written a few vectors at a time: ``head``, each ``render(index, vector)``
    separated by commas, ``tail``; the event loop gets a turn every FLOATS_PER_YIELD numbers."""
    parts = [head]
    written = 0
    for index, vector in enumerate(vectors):
        parts.append(("," if index else "") + render(index, vector))
        written += len(vector)
        if written >= FLOATS_PER_YIELD:
            yield "".join(parts).encode()
            parts, written = [], 0
            await asyncio.sleep(0)
    parts.append(tail)
    yield "".join(parts).encode()
