"""Claiming and releasing node slots, and the per-model queue for when none is free.

A slot is an ``InflightRequest`` row; a node's load is the count of its rows, so there is no
counter to drift. A waiting request is a ``QueuedRequest`` row; a claim is refused while an
older request for the same model still waits, which makes the queue first in, first out across
every worker.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, Count, F, FloatField, IntegerField, Q, Value, When
from django.db.models.functions import Cast, Coalesce
from django.utils import timezone

from nodes.models import NodeModel, NodeSession
from nodes.services import live_cutoff, worker_cutoff
from routing.models import ConsumerStream, InflightRequest, QueuedRequest

# How many of the best candidates a claim tries before giving up on a race.
CANDIDATES = 8
# Weight of the newest measurement in a node's moving averages.
EMA_WEIGHT = 0.3
# Failures in a row that cool a node down.
COOLDOWN_AFTER = 3
# Assumed speed of a node not measured yet: optimistic, so new nodes get traffic and a
# measurement.
UNMEASURED_TOKENS_PER_S = 1e9


@dataclass(frozen=True)
class Claim:
    request_id: str
    session_id: int
    node_channel: str
    node_id: str


@dataclass(frozen=True)
class NoSlot:
    """Why no slot was taken: ``served`` is False when no live node has the model at all;
    ``blocked`` when an older request for the model is still waiting."""

    served: bool
    blocked: bool = False


def _older_than(arrived_at: datetime, request_id: str) -> Q:
    return Q(arrived_at__lt=arrived_at) | Q(arrived_at=arrived_at, request_id__lt=request_id)


def _routable(model: str, now: datetime) -> Q:
    return Q(
        models__name=model,
        draining=False,
        last_seen__gte=live_cutoff(now),
        worker__last_seen__gte=worker_cutoff(now),
    )


def _candidates(model: str, exclude: Collection[int], now: datetime) -> list[int]:
    """Live nodes with a free slot, best first: the least loaded, then the most reliable and
    fastest. A cooled-down node is skipped; once its cooldown is over it gets one trial request
    at a time until it succeeds."""
    rows = (
        NodeSession.objects.filter(_routable(model, now))
        .exclude(pk__in=list(exclude))
        .annotate(active=Count("inflight", distinct=True))
        .filter(active__lt=F("max_concurrent"))
        .filter(
            Q(consecutive_failures__lt=COOLDOWN_AFTER)
            | (Q(cooldown_until__lte=now) & Q(active=0))
        )
        .annotate(
            load=Cast(F("active"), FloatField()) / F("max_concurrent"),
            speed=Coalesce("tokens_per_s", Value(UNMEASURED_TOKENS_PER_S)),
            # Recent failures count against a node; one back from its cooldown is ranked like
            # a fresh node so that its trial request really happens.
            penalty=Case(
                When(consecutive_failures__gte=COOLDOWN_AFTER, then=Value(0)),
                default=F("consecutive_failures"),
                output_field=IntegerField(),
            ),
        )
        .order_by("load", "penalty", "-speed", "-max_concurrent")
        .values_list("pk", "load", "penalty", "speed")[:CANDIDATES]
    )
    candidates = list(rows)
    # Spread exact ties instead of always picking the oldest connection.
    if candidates:
        best = candidates[0][1:]
        ties = [c for c in candidates if c[1:] == best]
        random.shuffle(ties)
        candidates = ties + [c for c in candidates if c[1:] != best]
    return [pk for pk, *_ in candidates]


def inflight_claim(
    *,
    model: str,
    request_id: str,
    reply_channel: str,
    worker_id: str,
    arrived_at: datetime,
    queued_as: str | None = None,
    exclude: Collection[int] = (),
) -> Claim | NoSlot:
    """Take a free slot on the best live node serving ``model``.

    ``arrived_at`` is when the consumer's request arrived: a claim is refused while an older
    request for the model waits in the queue (``queued_as`` is the caller's own queue row).
    ``exclude`` lists sessions that already failed this request. The node's row is locked while
    its slots are counted, so two workers never both take the last slot.
    """
    now = timezone.now()
    waiting = QueuedRequest.objects.filter(model=model).filter(
        _older_than(arrived_at, queued_as or "")
    )
    if queued_as is not None:
        waiting = waiting.exclude(request_id=queued_as)
    if waiting.exists():
        return NoSlot(served=True, blocked=True)
    for session_pk in _candidates(model, exclude, now):
        with transaction.atomic():
            session = (
                NodeSession.objects.select_for_update()
                .filter(pk=session_pk, draining=False)
                .only("pk", "channel_name", "node_id", "max_concurrent")
                .first()
            )
            if session is None:
                continue
            active = InflightRequest.objects.filter(session_id=session.pk).count()
            if active >= session.max_concurrent:
                continue
            InflightRequest.objects.create(
                request_id=request_id,
                session_id=session.pk,
                worker_id=worker_id,
                model=model,
                reply_channel=reply_channel,
                created_at=now,
            )
            if queued_as is not None:
                QueuedRequest.objects.filter(request_id=queued_as).delete()
            return Claim(
                request_id=request_id,
                session_id=session.pk,
                node_channel=session.channel_name,
                node_id=session.node_id,
            )
    served = (
        NodeSession.objects.filter(
            models__name=model, last_seen__gte=live_cutoff(now),
            worker__last_seen__gte=worker_cutoff(now),
        )
        .exclude(pk__in=list(exclude))
        .exists()
    )
    return NoSlot(served=served)


@dataclass(frozen=True)
class Outcome:
    """How a request ended on a node, for that node's measured quality."""

    kind: str  # completed, failed, timed_out, cancelled (by the consumer: not the node's fault)
    ttft_ms: float | None = None
    tokens_per_s: float | None = None


def _ema(old: float | None, new: float | None) -> float | None:
    if new is None:
        return old
    if old is None:
        return new
    return old + EMA_WEIGHT * (new - old)


def inflight_finish(*, request_id: str, outcome: Outcome | None = None) -> list[str]:
    """Free the request's slot (idempotent), fold the outcome into the node's measurements,
    and return the reply channels of queued requests that may now take a slot."""
    with transaction.atomic():
        row = (
            InflightRequest.objects.filter(request_id=request_id)
            .values_list("session_id", flat=True)
            .first()
        )
        if row is None:
            return []
        session_id = row
        InflightRequest.objects.filter(request_id=request_id).delete()
        session = NodeSession.objects.select_for_update().filter(pk=session_id).first()
        if session is None:
            return []
        if outcome is not None and outcome.kind != "cancelled":
            _record(session, outcome)
    return queue_heads(models=NodeModel.objects.filter(session_id=session_id).values_list(
        "name", flat=True
    ))


def _record(session: NodeSession, outcome: Outcome) -> None:
    now = timezone.now()
    fields = ["ttft_ms", "tokens_per_s", "consecutive_failures", "cooldown_until"]
    session.ttft_ms = _ema(session.ttft_ms, outcome.ttft_ms)
    session.tokens_per_s = _ema(session.tokens_per_s, outcome.tokens_per_s)
    if outcome.kind == "completed":
        session.completed += 1
        session.consecutive_failures = 0
        session.cooldown_until = None
        fields.append("completed")
    else:
        if outcome.kind == "timed_out":
            session.timed_out += 1
            fields.append("timed_out")
        else:
            session.failed += 1
            fields.append("failed")
        session.consecutive_failures += 1
        if session.consecutive_failures >= COOLDOWN_AFTER:
            session.cooldown_until = now + timedelta(seconds=settings.IDLECLAW_NODE_COOLDOWN)
    session.save(update_fields=fields)


def queue_join(
    *, request_id: str, model: str, reply_channel: str, worker_id: str, arrived_at: datetime
) -> bool:
    """Put a request in its model's queue; False when the queue is full."""
    with transaction.atomic():
        serialize_on(f"queue:{model}")
        if QueuedRequest.objects.filter(model=model).count() >= settings.IDLECLAW_MAX_QUEUE:
            return False
        QueuedRequest.objects.create(
            request_id=request_id,
            model=model,
            reply_channel=reply_channel,
            worker_id=worker_id,
            arrived_at=arrived_at,
        )
    return True


def queue_leave(*, request_id: str) -> None:
    QueuedRequest.objects.filter(request_id=request_id).delete()


def queue_heads(*, models: Iterable[str]) -> list[str]:
    """Reply channels of the oldest waiting request of each model: the only ones allowed to
    claim next."""
    channels = []
    for model in set(models):
        head = (
            QueuedRequest.objects.filter(model=model)
            .values_list("reply_channel", flat=True)
            .first()
        )
        if head is not None:
            channels.append(head)
    return channels


def serialize_on(key: str) -> None:
    """Serialise transactions that count rows before inserting one (per-address limits, queue
    length). SQLite already runs one writer at a time; PostgreSQL takes a transaction-scoped
    advisory lock on the key, since row locks cannot cover rows not yet inserted."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [key])


def consumer_stream_open(*, request_id: str, client_ip: str | None, worker_id: str) -> bool:
    """Count a consumer's request against its address; False when the address already has
    ``IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP`` requests open."""
    with transaction.atomic():
        if client_ip is not None:
            serialize_on(f"consumer:{client_ip}")
            open_now = ConsumerStream.objects.filter(client_ip=client_ip).count()
            if open_now >= settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP:
                return False
        ConsumerStream.objects.create(
            request_id=request_id,
            client_ip=client_ip,
            worker_id=worker_id,
            started_at=timezone.now(),
        )
    return True


def consumer_stream_close(*, request_id: str) -> None:
    ConsumerStream.objects.filter(request_id=request_id).delete()
