"""Probes on the router's side (issue 20): one request sent to one given node exactly as a
consumer's request of the same shape would be, its answer handed back to the prober only.

``manage.py probe_nodes`` (nodes/management/commands/probe_nodes.py) runs in its own process,
and in the embedded default only the daphne process can reach a node (the channel layer is in
its memory), so the command asks the router over HTTP: ``POST /api/internal/probe``, with a
bearer token derived from ``SECRET_KEY``, which the command shares with the router by reading
the same settings. Without that token the endpoint answers 404, like any path that does not
exist.

What the node sees cannot be told from a consumer's request: the body is parsed by the OpenAI
front end's own parser (``routing.openai_api.parse_completion_request``), and sent by the
relay every front end uses (``routing.streaming.Relay``) under an id issued like any other
(``idleclaw_site.request_ids``), with the operator's system prompt and the router's tools as
any request gets them. It holds one of the node's slots like any request, but is not held back
by the model's queue (red team F4 of issue 20: a queue kept full by an accomplice shielded
every node of a model from probes): it reserves the node's next free slot ahead of queued
consumers (``routing.services.inflight_reserve``; the node counts as full meanwhile) and waits
for it up to ``SLOT_WAIT`` seconds, else it is not sent at all ("busy"; the prober tries that
node another round). It is one request per node per round, so the queue loses one slot for one
answer. It never fails over to another node.

What differs is after the answer: it counts against no consumer's limits (no
``ConsumerStream`` row), is not counted in the consumer metrics (``RequestCount``), and leaves
the node's session counters (completed, failed, cooldown) alone: probes judge a node through
its reputation (nodes/probes.py), not twice. Its answer goes back to the prober and is never
logged or stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from idleclaw_site import shutdown
from idleclaw_site.db import db
from nodes import worker
from nodes.actions import OPERATOR_CANCELLED
from nodes.models import NodeModel
from nodes.services import live_cutoff
from routing import metrics, services
from routing.services import Claim, Outcome
from routing.streaming import Relay, RelayError, collect

# What the probe token is derived from, beside SECRET_KEY: a token for nothing else.
_TOKEN_PURPOSE = b"idleclaw internal probe v1"

ANSWERED = "answered"
BUSY = "busy"  # no slot came free on the node in time: not sent; try again later
FAILED = "failed"  # the node failed, fell silent or took too long
GONE = "gone"  # no such live session, or the router is shutting down
ABORTED = "aborted"  # ended by the router or an operator, not by the node: nobody is judged

# How long a probe waits for its node's next free slot, and how often it looks.
SLOT_WAIT = 30.0
SLOT_POLL = 0.25

# Relay errors that are no fault of the node: a probe ended by one of them judges nobody.
_NOT_THE_NODES = frozenset(
    {shutdown.RESTARTING, OPERATOR_CANCELLED, "lost_chunks", "internal", "consumer_stalled"}
)


def probe_token() -> str:
    """The bearer token of ``POST /api/internal/probe``: an HMAC of ``SECRET_KEY``, so the
    router and ``manage.py probe_nodes`` (same settings) share it with no configuration, and
    it changes with the key."""
    return hmac.new(settings.SECRET_KEY.encode(), _TOKEN_PURPOSE, hashlib.sha256).hexdigest()


def probe_authorized(header: str | None) -> bool:
    """``Authorization: Bearer <probe token>``, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), probe_token().encode())


@dataclass
class ProbeAnswer:
    """What the node answered, for the prober only."""

    status: str
    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    done_reason: str = ""
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "content": self.content,
            "thinking": self.thinking,
            "tool_calls": self.tool_calls,
            "done_reason": self.done_reason,
            "error": self.error,
        }


class ProbeRelay(Relay):
    """A ``Relay`` pinned to one session, that gives its slot back without counting anything
    (module docstring)."""

    def __init__(self, *, session_id: int, model: str, ollama_params: dict[str, Any]) -> None:
        self.session = session_id
        # As a /v1 request: the probe's body is one.
        super().__init__(model=model, ollama_params=ollama_params, api=metrics.API_OPENAI)

    async def claim_slot(self) -> bool:
        """Take the session's next free slot, ahead of any consumer queued for the model:
        reserve it now (``services.inflight_reserve``), then wait until it is within the
        node's slots, at most ``SLOT_WAIT`` seconds. False when there is no such session, or
        no slot came free in time."""
        await self._open()
        self.attempts += 1
        claim = await db(services.inflight_reserve)(
            model=self.model,
            request_id=self._next_claim_id(),
            reply_channel=self.reply_channel,
            worker_id=worker.WORKER_ID,
            session=self.session,
            demand=self.demand,
        )
        if claim is None:
            self.attempts -= 1
            shutdown.relay_ended(self)
            return False
        self._claim_id = None
        until = self.loop.time() + SLOT_WAIT
        while True:
            ready = await db(services.inflight_ready)(request_id=claim.request_id)
            if ready:
                self.claim = claim
                return True
            if ready is None or self.loop.time() >= until or shutdown.draining():
                break
            await asyncio.sleep(SLOT_POLL)
        await self._release(claim, Outcome(kind="cancelled"), cancel=False, final=True)
        shutdown.relay_ended(self)
        return False

    async def _give_back(
        self, claim: Claim, outcome: Outcome, *, final: bool, ended: BaseException | None
    ) -> list[str]:
        # Only the slot, with no outcome: the session's counters are the consumers' record, not
        # the probes'.
        return await db(services.inflight_finish)(request_id=claim.request_id, outcome=None)

    async def _close(self) -> None:
        # Nothing was counted against a consumer, so nothing is given back or recorded.
        shutdown.relay_ended(self)


async def probe_send(*, session_id: int, model: str, ollama_params: dict[str, Any]) -> ProbeAnswer:
    """Send one probe to one session and gather its answer (module docstring)."""
    if shutdown.draining():
        return ProbeAnswer(status=GONE, error=shutdown.RESTARTING)
    relay = ProbeRelay(session_id=session_id, model=model, ollama_params=ollama_params)
    if not await relay.claim_slot():
        live = await db(_session_serves)(session_id=session_id, model=model)
        return ProbeAnswer(status=BUSY if live else GONE)
    try:
        answer = await collect(relay.events())
    except RelayError as error:
        status = ABORTED if error.code in _NOT_THE_NODES else FAILED
        return ProbeAnswer(status=status, error=error.code)
    return ProbeAnswer(
        status=ANSWERED,
        content=answer.content,
        thinking=answer.thinking,
        tool_calls=answer.tool_calls,
        done_reason=answer.done_reason,
    )


def _session_serves(*, session_id: int, model: str) -> bool:
    return NodeModel.objects.filter(
        session_id=session_id, name=model, session__last_seen__gte=live_cutoff()
    ).exists()
