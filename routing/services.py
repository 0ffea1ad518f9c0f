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
from django.db.models import Q
from django.utils import timezone

from nodes.models import NodeModel, NodeSession, RouterWorker
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


_CANDIDATES_SQL = """
SELECT id, CAST(active AS REAL) / max_concurrent AS load,
       CASE WHEN failures >= %(cooldown_after)s THEN 0 ELSE failures END AS penalty, speed
FROM (
    SELECT s.id AS id, s.max_concurrent AS max_concurrent,
           s.consecutive_failures AS failures, s.cooldown_until AS cooldown_until,
           (SELECT COUNT(*) FROM {inflight} i WHERE i.session_id = s.id) AS active,
           COALESCE(s.tokens_per_s, %(unmeasured)s) AS speed
    FROM {session} s
    JOIN {model} m ON m.session_id = s.id AND m.name = %(model)s
    JOIN {worker} w ON w.worker_id = s.worker_id
    WHERE NOT s.draining AND s.last_seen >= %(node_cutoff)s AND w.last_seen >= %(worker_cutoff)s
) c
WHERE active < max_concurrent
  AND (failures < %(cooldown_after)s OR (cooldown_until <= %(now)s AND active = 0))
ORDER BY load, penalty, speed DESC, max_concurrent DESC
LIMIT %(limit)s
"""


def _candidates(model: str, exclude: Collection[int], now: datetime) -> list[int]:
    """Live nodes with a free slot, best first: the least loaded, then the most reliable and
    fastest. A cooled-down node is skipped; once its cooldown is over it gets one trial request
    at a time until it succeeds, ranked like a fresh node so that the trial really happens.

    Hand-written SQL: this runs for every request, and the ORM's version (a GROUP BY over every
    column of the session) cost ten times as much (bench/RESULTS.md).
    """
    sql = _CANDIDATES_SQL.format(
        inflight=InflightRequest._meta.db_table,
        session=NodeSession._meta.db_table,
        model=NodeModel._meta.db_table,
        worker=RouterWorker._meta.db_table,
    )
    adapt = connection.ops.adapt_datetimefield_value
    params = {
        "unmeasured": UNMEASURED_TOKENS_PER_S,
        "model": model,
        "node_cutoff": adapt(live_cutoff(now)),
        "worker_cutoff": adapt(worker_cutoff(now)),
        "cooldown_after": COOLDOWN_AFTER,
        "now": adapt(now),
        # Sessions this request already failed on are dropped here rather than in SQL.
        "limit": CANDIDATES + len(exclude),
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = [row for row in cursor.fetchall() if row[0] not in exclude][:CANDIDATES]
    # Spread exact ties instead of always picking the oldest connection.
    if rows:
        best = rows[0][1:]
        ties = [row for row in rows if row[1:] == best]
        random.shuffle(ties)
        rows = ties + [row for row in rows if row[1:] != best]
    return [row[0] for row in rows]


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
    return queue_heads(session_id=session_id)


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


def queue_heads(*, models: Iterable[str] = (), session_id: int | None = None) -> list[str]:
    """Reply channels of the oldest waiting request of each model (given, or served by the
    session): the only ones allowed to claim next. One query."""
    waiting = QueuedRequest.objects.all()
    if session_id is not None:
        waiting = waiting.filter(
            model__in=NodeModel.objects.filter(session_id=session_id).values("name")
        )
    else:
        waiting = waiting.filter(model__in=list(models))
    heads: dict[str, str] = {}
    for model, channel in waiting.order_by("arrived_at", "request_id").values_list(
        "model", "reply_channel"
    ):
        heads.setdefault(model, channel)
    return list(heads.values())


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


def request_admit(
    *,
    request_id: str,
    client_ip: str | None,
    worker_id: str,
    model: str,
    attempt_id: str,
    reply_channel: str,
    arrived_at: datetime,
) -> Claim | NoSlot | None:
    """A consumer's request arrives: count it against its address and try for a slot, in one
    trip to the database thread. None when the address has too many requests open."""
    with transaction.atomic():
        if not consumer_stream_open(
            request_id=request_id, client_ip=client_ip, worker_id=worker_id
        ):
            return None
        return inflight_claim(
            model=model,
            request_id=attempt_id,
            reply_channel=reply_channel,
            worker_id=worker_id,
            arrived_at=arrived_at,
        )


def request_end(*, request_id: str, attempt_id: str | None, outcome: Outcome | None) -> list[str]:
    """A consumer's request is over: free its slot, its queue place and its count, in one trip.
    Returns the reply channels of queued requests that may now take the slot."""
    with transaction.atomic():
        wake = inflight_finish(request_id=attempt_id, outcome=outcome) if attempt_id else []
        QueuedRequest.objects.filter(request_id=request_id).delete()
        ConsumerStream.objects.filter(request_id=request_id).delete()
    return wake


@dataclass(frozen=True)
class Leftover:
    """A slot held past any possible request's lifetime: its node is told to stop."""

    request_id: str
    node_channel: str


def stale_requests_reap(*, worker_id: str) -> list[Leftover]:
    """Free what this worker's requests still hold long after they must have ended.

    A relay frees its rows itself however it ends, except when its response was never started
    (the consumer hung up between the view returning and the first byte): then nothing runs its
    clean-up. No request outlives the bounds used here.
    """
    now = timezone.now()
    attempt_life = timedelta(seconds=settings.IDLECLAW_RESPONSE_TIMEOUT + 60)
    request_life = timedelta(
        seconds=(settings.IDLECLAW_QUEUE_TIMEOUT + settings.IDLECLAW_RESPONSE_TIMEOUT)
        * settings.IDLECLAW_MAX_ATTEMPTS
        + 60
    )
    with transaction.atomic():
        stale = InflightRequest.objects.filter(
            worker_id=worker_id, created_at__lt=now - attempt_life
        )
        leftovers = [
            Leftover(request_id=rid, node_channel=channel)
            for rid, channel in stale.values_list("request_id", "session__channel_name")
        ]
        stale.delete()
        old_streams = ConsumerStream.objects.filter(
            worker_id=worker_id, started_at__lt=now - request_life
        )
        QueuedRequest.objects.filter(request_id__in=old_streams.values("request_id")).delete()
        old_streams.delete()
    return leftovers
