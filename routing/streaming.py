"""The relay core and the stream formats built on it.

``relay`` sends one claimed request to its node and yields the node's chunks as they come back
over the channel layer, until the final chunk; it raises ``RelayError`` when the node fails,
falls silent or runs out of time. Whatever ends it (completion, error, the consumer hanging up),
it frees the slot and, unless the node finished, tells the node to stop. The format generators
(SSE for ``/api/chat`` here) are thin adapters over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings
from django.utils import timezone

from idleclaw_site import request_ids, shutdown
from idleclaw_site.db import db
from nodes import actions, worker
from nodes.actions import OPERATOR_CANCELLED
from nodes.protocol import STAT_KEYS, EventType
from routing import identity, metrics, selectors, services
from routing.identity import Consumer
from routing.sanitize import ChunkSanitizer
from routing.services import Claim, Demand, NoSlot, Outcome, OverLimit
from routing.tool_calls import ToolPolicy
from routing.tools import for_request as tools_for_request
from routing.tools import services as tool_services
from routing.tools.rounds import ToolRounds, ToolStatus, tool_timeout

logger = logging.getLogger("idleclaw.routing")

# What a consumer is told for each failure; never a node id or a trace (PROTOCOL §2).
ERROR_MESSAGES = {
    "node_disconnected": "the node serving this request disconnected",
    "stalled": "the node stopped responding",
    "timeout": "the response took too long",
    "invalid_request": (
        "the model server refused the request as invalid (check options such as keep_alive, "
        "num_ctx or truncate)"
    ),
    "ollama_unavailable": "the node's model server is unavailable",
    "ollama_error": "the node's model server failed",
    "consumer_stalled": "the stream was not read fast enough",
    "queue_timeout": "no node became free in time; try again later",
    "queue_full": "too many requests are waiting for this model; try again later",
    "lost_chunks": "part of the answer was lost in the router; try again",
    "no_node": "no node is serving this model right now",
    "bad_embeddings": "the node sent invalid embeddings",
    "internal": "the router failed while relaying this answer; try again",
    OPERATOR_CANCELLED: "an operator ended this request",
    shutdown.RESTARTING: "the router is restarting; try again in a few seconds",
}


class RelayError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code

    @property
    def status(self) -> int:
        """The HTTP status of a whole (non-streamed) answer that failed this way: 400 for a
        request two nodes' Ollama refused as invalid, 503 while the router restarts or when a
        full queue gave the request's place away, else 502."""
        if self.code == "invalid_request":
            return 400
        return 503 if self.code in (shutdown.RESTARTING, "queue_full") else 502

    @property
    def message(self) -> str:
        return ERROR_MESSAGES.get(self.code, "the request failed")


@dataclass(frozen=True)
class Unavailable:
    """No slot could be had before the stream started: the answer is a 503."""

    model: str
    served: bool
    queue_full: bool = False
    restarting: bool = False
    cancelled: bool = False  # by an operator, while it waited

    @property
    def message(self) -> str:
        if self.cancelled:
            return ERROR_MESSAGES[OPERATOR_CANCELLED]
        if self.restarting:
            return ERROR_MESSAGES[shutdown.RESTARTING]
        if not self.served:
            return f"no node is serving {self.model} right now"
        if self.queue_full:
            return f"too many requests are waiting for {self.model}; try again later"
        return f"all nodes serving {self.model} are busy; no slot became free in time"


@dataclass(frozen=True)
class TooMany:
    """The client already has as many requests open as it may: the answer is a 429."""

    limit: int

    @property
    def message(self) -> str:
        return f"at most {self.limit} requests at once per client; wait for one to finish"


@dataclass(frozen=True)
class Queued:
    """The request is waiting for a slot; ``position`` 1 is next."""

    position: int


class _Failover(Exception):
    """An attempt failed before its first chunk; another node may take the request."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


# How often a queued request looks for a slot on its own, in case a wake-up was lost (a worker
# died, or a node came back from its cooldown). Wake-ups come through the channel layer.
QUEUE_RECHECK = 2.0
WAKE = "queue.wake"
# To a queued request whose place a full queue gave to another consumer's (services.queue_join).
PUSHED_OUT = "queue.pushed_out"
# The most tokens one character of an answer can explain: a byte-level tokenizer may spend a
# token per UTF-8 byte, and a character is at most four. ``eval_count`` above this many per
# character the node sent (plus one per chunk that carried something) is cut down to it.
MAX_TOKENS_PER_CHAR = 4
# Tokens a model's prompt template may add to a request's own (a Modelfile's system prompt,
# role markers): ``prompt_eval_count`` up to this is believed as the node says.
PROMPT_TEMPLATE_TOKENS = 8192


def believed_prompt_count(count: int, prompt: object) -> int:
    """A node's ``prompt_eval_count`` for ``prompt`` (the messages and tools it was sent, or
    the inputs to embed), believed only as far as the prompt's characters explain it: a node
    must not inflate what a consumer's usage (and any bill computed from it) says. The prompt is
    serialised only for a count past ``PROMPT_TEMPLATE_TOKENS``, once per answer."""
    if count <= PROMPT_TEMPLATE_TOKENS:
        return count
    chars = len(json.dumps(prompt, ensure_ascii=False, separators=(",", ":")))
    return min(count, PROMPT_TEMPLATE_TOKENS + MAX_TOKENS_PER_CHAR * chars)


class Relay:
    """One consumer request through the network: claim a slot (or wait in the model's queue),
    send the request to the node, pass its chunks on, fail over to another node if it fails
    before its first chunk, and always give the slot back.

    Every front end (``/api/chat``, ``/v1``, ``/ollama``) drives this same object, so queueing,
    failover, limits and clean-up behave the same on all of them; embeddings
    (``routing.embeddings.EmbedRelay``) answer a different request over the same machinery.
    """

    # The extension a node must have declared to be chosen (``NodeSession.features``); None:
    # any node serving the model.
    feature: str | None = None
    # The one session the request may go to (a probe, routing/probes.py); None: any.
    session: int | None = None

    def __init__(
        self,
        *,
        model: str,
        ollama_params: dict[str, Any],
        client_ip: str | None = None,
        consumer: Consumer | None = None,
        tool_status: bool = False,
        api: str = metrics.API_CHAT,
    ) -> None:
        self.model = model
        self.client_ip = client_ip
        # Who asked (``routing.identity``): its limits, priority and turns in the queue.
        self.consumer = consumer or identity.anonymous(client_ip)
        # What the request did, counted once when it ends (routing/metrics.py).
        self.tally = metrics.RequestTally(model=model, api=api, client_ip=client_ip)
        # The router's own tools this request may be offered, judged on the consumer's request
        # before the operator's system prompt joins it (routing.tools).
        server_tools = tools_for_request(model, ollama_params)
        if settings.IDLECLAW_SYSTEM_PROMPT:
            ollama_params = {
                **ollama_params,
                "messages": [
                    {"role": "system", "content": settings.IDLECLAW_SYSTEM_PROMPT},
                    *ollama_params["messages"],
                ],
            }
        # Only calls to the functions offered here reach the consumer; the node gets the tools
        # without our ``strict`` flag, which Ollama does not know.
        self.tools = ToolPolicy.of(ollama_params.get("tools"))
        if self.tools.strict:
            ollama_params = {
                **ollama_params,
                "tools": [
                    {**tool, "function": _without(tool["function"], "strict")}
                    for tool in ollama_params["tools"]
                ],
            }
        self.params = ollama_params
        # What the request asks of a node's caps: only nodes that take it are chosen.
        self.demand = Demand.of(ollama_params.get("options"))
        self.rounds = ToolRounds(model, server_tools, ollama_params) if server_tools else None
        # Whether the consumer's stream shows the router's tool calls (``ToolStatus``).
        self.tool_status = tool_status
        self._begin()

    def _begin(self) -> None:
        """The state of every kind of request, once the subclass has set its own."""
        self.counted = False
        self.refusals = 0  # nodes whose Ollama refused the request as invalid
        # The request's first node id (``idleclaw_site.request_ids``): the consumer's
        # ``x-request-id``. It also names the request's queue place and its count against the
        # client (other tables than the slots'); the first node request is sent under it.
        self.queue_id = request_ids.issue()
        # The id of the next claim, kept until a claim succeeds under it: a claim that found no
        # slot stored nothing, and the node whose slot is taken at last sees the earliest id.
        self._claim_id: str | None = self.queue_id
        self.arrived_at = timezone.now()
        self.loop = asyncio.get_running_loop()
        self.claim: Claim | None = None
        self.queued = False
        # The request's turn in its model's queue (``services.queue_join``); the last one until
        # it joins.
        self.turn = services.LAST_TURN
        # Set when a full queue gave its place to another consumer's request.
        self.pushed_out = False
        self.tried: set[int] = set()
        self.attempts = 0
        self.layer: BaseChannelLayer | None = None
        self.reply_channel = ""
        # Set when the router ends this request itself (a shutdown's grace period is over).
        self.aborted: str | None = None
        self._aborting = asyncio.Event()
        shutdown.relay_started(self)

    # --- getting a slot ----------------------------------------------------------------------

    async def start(self, *, hold: float) -> Unavailable | TooMany | OverLimit | None:
        """Take a slot, or wait for one up to ``hold`` seconds. ``None``: the answer may start
        (the request has a slot or is still queued); otherwise why it cannot (503, 429, or 400
        for a request over every node's caps)."""
        await self._open()
        self.attempts += 1
        admitted = await db(services.request_admit)(
            request_id=self.queue_id,
            client_ip=self.client_ip,
            worker_id=worker.WORKER_ID,
            model=self.model,
            attempt_id=self._next_claim_id(),
            reply_channel=self.reply_channel,
            arrived_at=self.arrived_at,
            consumer=self.consumer.id,
            max_concurrent=self.consumer.max_concurrent,
            priority=self.consumer.priority,
            feature=self.feature,
            demand=self.demand,
        )
        if admitted is None:
            metrics.rate_limited("concurrent_requests")
            metrics.request_refused(model=self.model, api=self.tally.api)
            return TooMany(limit=self.consumer.max_concurrent)
        self.counted = True
        if isinstance(admitted, Claim):
            self.claim = admitted
            self._claim_id = None
            return None
        self.attempts -= 1
        if admitted.over is not None:
            self.tally.ended = admitted.over  # refused, not served (red-team M2 of issue 17)
            await self._close()
            return admitted.over
        try:
            refusal = await self._first_slot(admitted, hold)
        except BaseException as error:
            self.tally.ended = error
            await asyncio.shield(self._close())
            raise
        if refusal is not None:
            self.tally.ended = refusal
            await self._close()
        return refusal

    async def _first_slot(self, result: NoSlot, hold: float) -> Unavailable | None:
        """No slot was free on arrival: join the queue and wait up to ``hold``."""
        if not result.served:
            return Unavailable(model=self.model, served=False)
        if not await self._join_queue():
            return Unavailable(model=self.model, served=True, queue_full=True)
        # Its turn may put it ahead of a request already woken for a slot that just freed,
        # whose claim then gives way to this one: this one tries at once instead of waiting
        # for the next wake-up.
        result = await self._try_claim()
        if result is None:
            return None
        if not result.served:
            return Unavailable(model=self.model, served=False)
        until = min(self.queue_deadline, self.loop.time() + hold)
        while self.loop.time() < until:
            await self._wait_for_wake(until)
            if self.pushed_out:
                return Unavailable(model=self.model, served=True, queue_full=True)
            if self.aborted == OPERATOR_CANCELLED:
                return Unavailable(model=self.model, served=True, cancelled=True)
            if self.aborted:
                return Unavailable(model=self.model, served=True, restarting=True)
            result = await self._try_claim()
            if result is None:
                return None
            if not result.served:
                return Unavailable(model=self.model, served=False)
        if self.loop.time() >= self.queue_deadline:
            return Unavailable(model=self.model, served=True)
        return None

    async def _open(self) -> None:
        """What every way of getting a slot needs first: the worker's housekeeping, and this
        request's own reply channel."""
        await worker.ensure_started()
        self.layer = get_channel_layer()
        self.reply_channel = await self.layer.new_channel()
        self.queue_deadline = self.loop.time() + settings.IDLECLAW_QUEUE_TIMEOUT

    async def _try_claim(self) -> NoSlot | None:
        """Claim a slot now; None on success."""
        if self.session is not None and self.session in self.tried:
            return NoSlot(served=False)  # pinned to a session that already failed it
        self.attempts += 1
        result = await db(services.inflight_claim)(
            model=self.model,
            request_id=self._next_claim_id(),
            reply_channel=self.reply_channel,
            worker_id=worker.WORKER_ID,
            arrived_at=self.arrived_at,
            queued_as=self.queue_id if self.queued else None,
            priority=self.consumer.priority,
            turn=self.turn if self.queued else services.LAST_TURN,
            exclude=self.tried,
            feature=self.feature,
            demand=self.demand,
            session=self.session,
        )
        if isinstance(result, Claim):
            self.claim = result
            self._claim_id = None
            if self.queued:
                self.queued = False  # the claim removed the queue row
                # The next in line, and whoever could use the node's other free slots.
                heads = await db(services.queue_heads)(
                    models=[self.model], session_id=result.session_id
                )
                await self._wake(heads)
            return None
        self.attempts -= 1
        return result

    def _next_claim_id(self) -> str:
        if self._claim_id is None:
            self._claim_id = request_ids.issue()
        return self._claim_id

    async def _join_queue(self, *, resume: bool = False) -> bool:
        """Take a place in the model's queue (``services.queue_join``); False when it is full.
        A request this one pushed out of a full queue is told so."""
        joined = await db(services.queue_join)(
            request_id=self.queue_id,
            model=self.model,
            reply_channel=self.reply_channel,
            worker_id=worker.WORKER_ID,
            arrived_at=self.arrived_at,
            consumer=self.consumer.id,
            priority=self.consumer.priority,
            resume=resume,
            feature=self.feature,
            demand=self.demand,
            tried=self.tried,
        )
        if joined is None:
            return False
        self.queued = True
        self.turn = joined.turn
        if joined.pushed_out is not None:
            await self.layer.send(joined.pushed_out, {"type": PUSHED_OUT})
        return True

    async def _wait_for_wake(self, until: float) -> None:
        timeout = max(0.0, min(until - self.loop.time(), QUEUE_RECHECK))
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await self.layer.receive(self.reply_channel)
                    if event.get("type") == WAKE:
                        return
                    if event.get("type") == PUSHED_OUT and self.claim is None:
                        # A full queue gave this request's place to another consumer's
                        # (``services.queue_join``).
                        self.pushed_out = True
                        self.queued = False
                        return
                    if event.get("type") == actions.ABORT and self.claim is None:
                        # An operator cancelled it while it waited (nodes.actions).
                        self.aborted = OPERATOR_CANCELLED
                        return
        except TimeoutError:
            return

    async def _wait_in_queue(self) -> AsyncIterator[Queued]:
        """Wait for a slot, telling the consumer where it stands; raises ``RelayError``."""
        interval = settings.IDLECLAW_QUEUE_NOTICE_INTERVAL
        next_notice = self.loop.time()
        while self.claim is None:
            now = self.loop.time()
            if now >= self.queue_deadline:
                raise RelayError("queue_timeout")
            if now >= next_notice:
                position = await db(selectors.queue_position)(request_id=self.queue_id)
                yield Queued(position=position)
                next_notice = now + interval
            await self._wait_for_wake(min(self.queue_deadline, next_notice))
            if self.aborted:
                raise RelayError(self.aborted)
            if self.pushed_out:
                raise RelayError("queue_full")
            result = await self._try_claim()
            if result is not None and not result.served:
                raise RelayError("node_disconnected" if self.tried else "no_node")

    async def _wake(self, channels: list[str]) -> None:
        for channel in channels:
            if channel != self.reply_channel:
                await self.layer.send(channel, {"type": WAKE})

    async def abort(self, code: str) -> None:
        """End this request with ``code`` wherever it is waiting (queue or node): it gives its
        slot back and the consumer gets the error event and the end of its stream."""
        self.aborted = code
        self._aborting.set()
        if self.layer is not None and self.reply_channel:
            await self.layer.send(self.reply_channel, {"type": WAKE})

    # --- the answer --------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Queued | ToolStatus | list[dict[str, Any]]]:
        """``Queued`` notices while waiting, then the node's chunks in lists of those that
        arrived together; the last chunk has ``done: True``. With ``tool_status``, a
        ``ToolStatus`` before and after each call the router runs for the model. Raises
        ``RelayError`` when the request fails."""
        try:
            while True:
                if self.claim is None:
                    async for notice in self._wait_in_queue():
                        yield notice
                try:
                    async for batch in self._attempt():
                        yield batch
                    return
                except (RelayError, asyncio.CancelledError, GeneratorExit):
                    raise
                except _Failover as failure:
                    if self.attempts >= settings.IDLECLAW_MAX_ATTEMPTS:
                        raise RelayError(failure.code) from None
                    logger.info(
                        "request %s for %s fails over after %s",
                        self.queue_id,
                        self.model,
                        failure.code,
                    )
                    result = await self._try_claim()
                    if result is not None:
                        if not result.served:
                            raise RelayError(failure.code) from None
                        await self._requeue()
        except (RelayError, asyncio.CancelledError, GeneratorExit) as error:
            self.tally.ended = error
            raise
        except Exception:
            # Whatever went wrong in here, the consumer still gets its final error event and
            # the end of its stream (the front ends turn a RelayError into both), never a hang.
            logger.exception("relaying a request for %s failed", self.model)
            self.tally.ended = RelayError("internal")
            raise RelayError("internal") from None
        finally:
            await asyncio.shield(self._close())

    def _refused_by_node(self) -> None:
        """A node's Ollama refused the request as invalid (``invalid_request``: a bad
        ``keep_alive``, an input longer than the context with ``truncate`` false). That is not
        held against the node, or any consumer could cool honest nodes down with requests
        Ollama refuses (red-team C1 of issue 19). One node's word may be a hostile node's, so
        another node tries; when a second one refuses it too, the request is what is wrong."""
        self.refusals += 1
        if self.refusals >= 2:
            raise RelayError("invalid_request")

    async def _requeue(self) -> None:
        # The wait starts afresh: the consumer already waited for a node that then failed.
        self.queue_deadline = self.loop.time() + settings.IDLECLAW_QUEUE_TIMEOUT
        if not await self._join_queue(resume=True):
            raise RelayError("queue_full")
        await self._try_claim()  # as in ``_first_slot``: it may be first now

    async def _attempt(self) -> AsyncIterator[ToolStatus | list[dict[str, Any]]]:
        """Serve the request on the claimed node. Raises ``_Failover`` when the node fails
        before the consumer was sent anything, ``RelayError`` after it.

        With the router's own tools (``self.rounds``) the request may take several rounds on
        the node: a round that ends in calls to them is followed by the router running the
        calls and a new node request, with the results, to the same node."""
        claim = self.claim
        assert claim is not None
        sent_at = self.loop.time()
        deadline = sent_at + settings.IDLECLAW_RESPONSE_TIMEOUT
        stall = settings.IDLECLAW_STALL_TIMEOUT
        char_limit = char_budget = settings.IDLECLAW_MAX_RESPONSE_CHARS
        first_at: float | None = None
        chunks = 0  # every chunk of the round, as the node numbers them (``seq``)
        # The chunks that carry something (text, reasoning or a tool call): only these count as
        # tokens and toward the measured speed, so that empty chunks inflate neither.
        carrying = 0
        outcome = Outcome(kind="cancelled")
        node_done = False
        failing_over = False
        ended: BaseException | None = None  # why the attempt ended, if not with the answer
        # Whether the consumer has been sent anything of this attempt; until then a failure
        # may fail over (after a round of tool calls, the node has sent chunks already).
        shown = False
        rounds = self.rounds
        calls: list[dict[str, Any]] | None = None  # the router's tool calls ending a round
        sanitizer = ChunkSanitizer()
        dropped_before = (self.tools.dropped, self.tools.unoffered)
        # A layer that can say what is already queued (the in-process one) lets the chunks that
        # arrived together leave together.
        queued = getattr(self.layer, "receive_now", None) or _nothing_queued
        try:
            params = self.params
            if rounds is not None:
                params = await rounds.start(session_id=claim.session_id, policy=self.tools)
            await self.layer.send(
                claim.node_channel,
                {
                    "type": EventType.NODE_REQUEST,
                    "request_id": claim.request_id,
                    "reply_channel": self.reply_channel,
                    "ollama_params": params,
                },
            )
            while True:
                remaining = deadline - self.loop.time()
                try:
                    async with asyncio.timeout(min(stall, max(remaining, 0.0))):
                        event = await self.layer.receive(self.reply_channel)
                except TimeoutError:
                    if self.aborted:
                        raise RelayError(self.aborted) from None
                    code = "timeout" if remaining <= stall else "stalled"
                    metrics.node_error(code)
                    outcome = Outcome(kind="timed_out")
                    if first_at is None and not shown:
                        raise _Failover(code) from None
                    raise RelayError(code) from None
                if self.aborted:
                    raise RelayError(self.aborted)
                # The chunks of this event and of any queued behind it go out as one write.
                out: list[dict[str, Any]] = []
                while event is not None:
                    if event.get("request_id") != claim.request_id:
                        event = queued(self.reply_channel)
                        continue  # a wake-up, or a late event of an earlier attempt or round
                    if event.get("type") == EventType.STREAM_ERROR:
                        node_done = True
                        code = str(event.get("error"))
                        outcome = Outcome(kind="failed")
                        if code == OPERATOR_CANCELLED:
                            # Ended on purpose: no other node takes it, and this one is not
                            # blamed for it.
                            outcome = Outcome(kind="cancelled")
                            if out:
                                yield out
                            raise RelayError(code)
                        if code == "invalid_request":
                            outcome = Outcome(kind="cancelled")
                            if first_at is None and not shown:
                                self._refused_by_node()
                        if first_at is None and not shown:
                            raise _Failover(code)
                        if out:
                            yield out  # what came before the error, as it came
                        raise RelayError(code)
                    batch = event["chunks"]
                    if event.get("seq", chunks) != chunks:
                        # A channel layer may drop a message when a buffer overflows; never
                        # pass an answer on with a hole in it.
                        outcome = Outcome(kind="cancelled")
                        if out:
                            yield out
                        raise RelayError("lost_chunks")
                    if first_at is None:
                        first_at = self.loop.time()
                        self.tally.first_token()
                    for raw in batch:
                        chunks += 1
                        # The budget counts what the node sent, not what is left once markup is
                        # stripped or held: text that never shows still costs the sanitizer.
                        sent = raw["message"]
                        # A cleaned message holds its role and only what is not empty
                        # (nodes.protocol.clean_chunk): more than the role is a token.
                        if len(sent) > 1:
                            carrying += 1
                            self.tally.tokens += 1
                        size = len(sent.get("content", "")) + len(sent.get("thinking", ""))
                        if rounds is not None and rounds.ends_round(raw, self.tools):
                            # Not the answer's end: markup still held stays held into the next
                            # round, which continues the same text (one sanitizer for all).
                            cleaned = sanitizer.clean({**raw, "done": False})
                            # Its stats and done stay; text not shown yet is held, not lost.
                            chunk = {
                                **raw,
                                "message": {"role": "assistant"},
                                **(cleaned or {}),
                                "done": True,
                            }
                        else:
                            chunk = sanitizer.clean(raw)
                        if chunk is not None and "tool_calls" in chunk["message"]:
                            # Tool calls count against the answer's budget, shown or dropped: a
                            # node can grow an answer, or make the router check calls, only so
                            # far through them.
                            size += len(dumps(chunk["message"]["tool_calls"]))
                            chunk = self._offered_calls_only(chunk)
                        if chunk is None:
                            # Nothing left to show yet (a tag may be arriving, or every call
                            # was dropped or is the router's to run).
                            char_budget -= size
                            if char_budget > 0:
                                continue
                            chunk, size = {"message": {"role": "assistant"}, "done": False}, 0
                        if size > char_budget or (size == char_budget and not chunk["done"]):
                            out.append(_truncated(chunk, max(char_budget, 0)))
                            out.append(
                                {
                                    "message": {"role": "assistant"},
                                    "done": True,
                                    "done_reason": "length",
                                }
                            )
                            self.tally.length = True
                            outcome = _measured("completed", sent_at, first_at, carrying)
                            yield out
                            return
                        char_budget -= size
                        if chunk["done"]:
                            # The node's own count, as consumers see it in their usage, believed
                            # only as far as what it sent can explain (red-team F3 of issue 20).
                            most = MAX_TOKENS_PER_CHAR * (char_limit - char_budget) + carrying
                            if chunk.get("eval_count", 0) > most:
                                chunk = {**chunk, "eval_count": most}
                            if "prompt_eval_count" in chunk:
                                prompt = [params.get("messages"), params.get("tools")]
                                believed = believed_prompt_count(chunk["prompt_eval_count"], prompt)
                                chunk = {**chunk, "prompt_eval_count": believed}
                        out.append(chunk)
                        if chunk["done"]:
                            node_done = True
                            self.tally.length = chunk.get("done_reason") == "length"
                            outcome = _measured("completed", sent_at, first_at, carrying, chunk)
                            if rounds is not None:
                                calls = rounds.round_over(out)
                            break
                    event = None if node_done else queued(self.reply_channel)
                if out:
                    shown = True
                    yield out
                if node_done:
                    if not calls:
                        return
                    # The round ended in calls to the router's own tools: run them, then the
                    # next round on the same node, under a new request id.
                    assert rounds is not None
                    prepared = await rounds.prepare(calls, session_id=claim.session_id)
                    running = [call for call in prepared if call.refusal is None]
                    if self.tool_status:
                        for call in running:
                            shown = True
                            yield ToolStatus(name=call.name, status="executing")
                    seconds = min(tool_timeout(), deadline - self.loop.time())
                    await self._unless_aborted(rounds.run(prepared, seconds=max(seconds, 0.0)))
                    if self.tool_status:
                        for call in running:
                            yield ToolStatus(name=call.name, status="done")
                    if self.aborted:
                        raise RelayError(self.aborted)
                    if self.loop.time() >= deadline:
                        raise RelayError("timeout")
                    next_id = request_ids.issue()
                    moved = await db(tool_services.inflight_next_round)(
                        request_id=claim.request_id, next_request_id=next_id
                    )
                    if not moved:
                        # The node went away between rounds; its session took the slot along.
                        if not shown:
                            raise _Failover("node_disconnected")
                        raise RelayError("node_disconnected")
                    claim = self.claim = dataclasses.replace(claim, request_id=next_id)
                    params = rounds.next(self.tools)
                    sent_at, first_at, chunks, carrying, calls = self.loop.time(), None, 0, 0, None
                    node_done = False
                    outcome = Outcome(kind="cancelled")
                    await self.layer.send(
                        claim.node_channel,
                        {
                            "type": EventType.NODE_REQUEST,
                            "request_id": claim.request_id,
                            "reply_channel": self.reply_channel,
                            "ollama_params": params,
                        },
                    )
        except _Failover:
            failing_over = True
            raise
        except BaseException as error:
            ended = error
            raise
        finally:
            self.claim = None
            self.tried.add(claim.session_id)
            if self.tools.dropped != dropped_before[0]:
                outcome = self._with_dropped_calls(outcome, *dropped_before, claim)
            release = self._release(
                claim, outcome, cancel=not node_done, final=not failing_over, ended=ended
            )
            if self.aborted:
                # A shutdown's grace is over: the consumer's error event goes out now, not
                # after the database (which may be why the shutdown is slow).
                self._in_background(release)
            else:
                await asyncio.shield(release)

    def _offered_calls_only(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk without the tool calls this request did not offer; None if nothing of it
        is left to show."""
        message = chunk["message"]
        calls = self.tools.filter(message["tool_calls"])
        if calls and self.rounds is not None:
            # The request brought no tools of its own, so what passed calls the router's: the
            # router runs them, the consumer never sees them.
            self.rounds.take(calls)
            calls = []
        if len(calls) == len(message["tool_calls"]):
            return chunk
        message = _without(message, "tool_calls")
        if calls:
            message["tool_calls"] = calls
        elif not chunk["done"] and "content" not in message and "thinking" not in message:
            return None
        return {**chunk, "message": message}

    def _with_dropped_calls(
        self, outcome: Outcome, dropped_before: int, unoffered_before: int, claim: Claim
    ) -> Outcome:
        """Dropped calls are counted on the node. A call to a function nobody offered costs it as
        a failure would; one that broke a strict schema does not, since the node never learns
        that the schema is strict (a consumer could otherwise cool honest nodes down at will).
        Never logged: what the calls said."""
        dropped = self.tools.dropped - dropped_before
        unoffered = self.tools.unoffered - unoffered_before
        logger.warning(
            "node %s: %d tool calls dropped (%d to functions the request did not offer)",
            claim.node_id,
            dropped,
            unoffered,
        )
        kind = outcome.kind
        if unoffered and kind == "completed":
            kind = "failed"
        return dataclasses.replace(outcome, kind=kind, dropped_tool_calls=dropped)

    async def _release(
        self,
        claim: Claim,
        outcome: Outcome,
        *,
        cancel: bool,
        final: bool,
        ended: BaseException | None = None,
    ) -> None:
        if cancel:
            await self.layer.send(
                claim.node_channel, {"type": EventType.NODE_CANCEL, "request_id": claim.request_id}
            )
        outcome = dataclasses.replace(
            outcome, consumer=self.consumer.id, consumer_ip=self.client_ip
        )
        await self._wake(await self._give_back(claim, outcome, final=final, ended=ended))

    async def _give_back(
        self, claim: Claim, outcome: Outcome, *, final: bool, ended: BaseException | None
    ) -> list[str]:
        """Give back the slot of ``claim`` (and, when ``final``, all the request held); the
        channels of queued requests to wake."""
        if final:
            # The request is over: everything it held goes in one trip.
            wake = await db(services.request_end)(
                request_id=self.queue_id,
                attempt_id=claim.request_id,
                outcome=outcome,
                record=self.tally.record(ended),
            )
            self.queued = self.counted = False
            return wake
        return await db(services.inflight_finish)(request_id=claim.request_id, outcome=outcome)

    async def _unless_aborted(self, work: Coroutine[Any, Any, None]) -> None:
        """``work`` (the router's own tool calls), cut short by ``abort``."""
        task = asyncio.ensure_future(work)
        aborting = asyncio.ensure_future(self._aborting.wait())
        try:
            await asyncio.wait({task, aborting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            aborting.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.aborted:
            raise RelayError(self.aborted)
        task.result()

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    async def _close(self) -> None:
        shutdown.relay_ended(self)
        if self.aborted and (self.queued or self.counted):
            self.queued = self.counted = False
            self._in_background(
                db(services.request_end)(
                    request_id=self.queue_id,
                    attempt_id=None,
                    outcome=None,
                    record=self.tally.record(self.tally.ended),
                )
            )
        if self.queued or self.counted:
            self.queued = self.counted = False
            await db(services.request_end)(
                request_id=self.queue_id,
                attempt_id=None,
                outcome=None,
                record=self.tally.record(self.tally.ended),
            )


# Clean-up work of aborted relays, kept referenced until done.
_BACKGROUND: set[asyncio.Future[None]] = set()


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


def _nothing_queued(channel: str) -> None:
    """For a layer that cannot tell what is queued: as if nothing were."""
    return None


def _truncated(chunk: dict[str, Any], budget: int) -> dict[str, Any]:
    """The part of a chunk that fits the remaining character budget (reasoning first). Tool
    calls do not fit: a call cut short is no call."""
    message = _without(chunk["message"], "tool_calls")
    thinking = message.pop("thinking", "")[:budget]
    content = message.pop("content", "")[: max(0, budget - len(thinking))]
    if thinking:
        message["thinking"] = thinking
    if content:
        message["content"] = content
    return {"message": message, "done": False}


def _measured(
    kind: str,
    sent_at: float,
    first_at: float,
    carrying: int,
    final: dict[str, Any] | None = None,
) -> Outcome:
    """The outcome of a round, from ``carrying``: the chunks the router relayed that carried
    text, reasoning or a tool call (empty chunks count for nothing, red-team F3 of issue 20)."""
    now = asyncio.get_running_loop().time()
    ttft_ms = (first_at - sent_at) * 1000
    # What the router itself saw: tokens over the time they took (a floor of 10 ms keeps a burst
    # of chunks from reading as infinitely fast).
    seen = carrying / max(now - first_at, 0.01)
    tokens_per_s = seen
    if final and final.get("eval_count") and final.get("eval_duration"):
        # Ollama's own figure is more exact, but only believed as far as the router's timing
        # supports it: a node cannot rank itself first by claiming to be fast.
        tokens_per_s = min(final["eval_count"] / (final["eval_duration"] / 1e9), seen)
    # Tokens as the router saw them (one per chunk that carried something), never the node's own
    # count: they make a contributor's record and priority.
    return Outcome(kind=kind, ttft_ms=ttft_ms, tokens_per_s=tokens_per_s, tokens=carrying)


async def open_relay(
    *,
    model: str,
    ollama_params: dict[str, Any],
    client_ip: str | None,
    consumer: Consumer | None = None,
    stream: bool = True,
    tool_status: bool = False,
    api: str = metrics.API_CHAT,
) -> Events | Unavailable | TooMany | OverLimit:
    """Start a ``Relay`` and return its events, or why it cannot start (a 503, 429 or 400).

    A streaming request waits for a slot up to the queue notice interval before its response
    starts; a non-streaming one up to the whole queue timeout. ``tool_status``: the events
    include a ``ToolStatus`` around each call the router runs for the model.
    """
    if shutdown.draining():
        metrics.request_refused(model=model, api=api)
        return Unavailable(model=model, served=True, restarting=True)
    if ":" not in model:
        model = await db(services.model_resolve)(model)
        ollama_params = {**ollama_params, "model": model}
    relay = Relay(
        model=model,
        ollama_params=ollama_params,
        client_ip=client_ip,
        consumer=consumer,
        tool_status=tool_status,
        api=api,
    )
    hold = settings.IDLECLAW_QUEUE_NOTICE_INTERVAL if stream else settings.IDLECLAW_QUEUE_TIMEOUT
    refusal = await relay.start(hold=hold)
    if refusal is not None:
        return refusal
    return relay.events()


@dataclass
class Answer:
    """A whole answer gathered from a relay, for the non-streaming APIs."""

    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    done_reason: str = "stop"
    stats: dict[str, int] = field(default_factory=dict)


Events = AsyncIterator[Queued | ToolStatus | list[dict[str, Any]]]


async def each_chunk(events: Events) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a relay one by one, without the queue notices."""
    async for batch in events:
        if not isinstance(batch, Queued):
            for chunk in batch:
                yield chunk


async def collect(chunks: Events) -> Answer:
    """Read a relay to its end; raises ``RelayError`` like the relay."""
    content: list[str] = []
    thinking: list[str] = []
    answer = Answer()
    async for chunk in each_chunk(chunks):
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


# Compact JSON as every stream writes it. One encoder for all: ``json.dumps`` with arguments
# builds a new encoder on every call, and the streams call it for every token.
dumps: Callable[[Any], str] = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


async def sse_writes(
    events: Events,
    render: Callable[[dict[str, Any]], Iterable[bytes]],
    render_status: Callable[[ToolStatus], bytes] | None = None,
) -> AsyncIterator[bytes]:
    """Server-sent events from a relay: a queue notice as a comment line, each group of chunks
    that arrived together rendered into one write, and a tool status (only relays opened with
    ``tool_status`` have them) as ``render_status`` makes it."""
    async for batch in events:
        if isinstance(batch, list):
            yield b"".join(part for chunk in batch for part in render(chunk))
        elif isinstance(batch, Queued):
            yield f": queued position={batch.position}\n\n".encode()
        elif render_status is not None:
            yield render_status(batch)


async def sse_chat(chunks: Events, *, model: str) -> AsyncIterator[bytes]:
    """The network's own ``/api/chat`` stream (PROTOCOL §2)."""
    head = (
        f'{{"id":"chatcmpl-{uuid.uuid4().hex[:24]}","object":"chat.completion.chunk",'
        f'"created":{int(time.time())},"model":{dumps(model)},"choices":[{{"index":0,"delta":'
    )

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        tail = "}]" + "".join(f",{dumps(k)}:{dumps(v)}" for k, v in extra.items()) + "}"
        body = f'{head}{dumps(delta)},"finish_reason":{dumps(finish)}{tail}'
        return f"data: {body}\n\n".encode()

    # The event of most tokens, event({"content": text}), assembled around the text alone.
    content_open = f'data: {head}{{"content":'.encode()
    content_close = b'},"finish_reason":null}]}\n\n'

    saw_tool_calls = False

    def render(chunk: dict[str, Any]) -> Iterator[bytes]:
        nonlocal saw_tool_calls
        message = chunk["message"]
        if "thinking" in message:
            yield event({"content": message["thinking"], "reasoning": True})
        if "content" in message:
            yield content_open + dumps(message["content"]).encode() + content_close
        if "tool_calls" in message:
            saw_tool_calls = True
            yield event({"tool_calls": message["tool_calls"]})
        if chunk["done"]:
            usage = usage_of(chunk)
            extra = {"usage": usage} if usage is not None else {}
            yield event({}, finish_reason_of(chunk, saw_tool_calls), **extra)

    def render_status(status: ToolStatus) -> bytes:
        # Which tool and where it stands; never its arguments or results.
        return event({"tool_call": {"name": status.name, "status": status.status}})

    try:
        async for part in sse_writes(chunks, render, render_status):
            yield part
    except RelayError as error:
        logger.info("stream for %s ended with error %s", model, error.code)
        yield event({"content": f"\n\n[Error: {error.message}]"}, "error")
    yield b"data: [DONE]\n\n"
