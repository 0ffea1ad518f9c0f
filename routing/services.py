"""Claiming and releasing node slots, and the per-model queue for when none is free.

A slot is an ``InflightRequest`` row; a node's load is the count of its rows, so there is no
counter to drift. A waiting request is a ``QueuedRequest`` row; a claim is refused while a
request ordered ahead of it for the same model still waits, which makes the queue's order hold
across every worker. The order is fair (issue 20): round-robin across consumers (each
request's ``turn``: the round it is served in), higher priority first within a round, then
arrival. A waiting request holds back only claims on nodes that could serve it.

The statements that run for every consumer request (admitting it, ending it) are hand-written
SQL: Django compiles each ORM query afresh, which cost about 2 ms of the single database thread
per request and per end (bench/RESULTS.md). The SQL is plain enough for SQLite and PostgreSQL.
Functions that also run inside ``request_admit`` and ``request_end`` open their transaction
without a savepoint: a savepoint is two more statements, and no caller recovers from a failure
halfway.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from idleclaw_site.net import consumer_address
from nodes.models import (
    Contributor,
    ContributorHour,
    ContributorModel,
    NodeModel,
    NodeSession,
    RouterWorker,
)
from nodes.protocol import LOADED_FOREVER
from nodes.services import live_cutoff, worker_cutoff
from routing import metrics
from routing.models import (
    ConsumerStream,
    InflightRequest,
    QueueAccount,
    QueuedRequest,
    QueueRound,
)

# How many of the best candidates a claim tries before giving up on a race.
CANDIDATES = 8
# Free nodes per window of node selection (see ``_candidates``).
WINDOW = 32
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
class Demand:
    """What a request asks of a node beyond its model: the ``num_ctx`` and ``num_predict``
    options it set, 0 for one it did not set (or set to 0 or less: Ollama's "no limit", which a
    node with a cap replaces by its cap). A node whose caps (``register.limits``) are smaller
    is never sent the request."""

    num_ctx: int = 0
    num_predict: int = 0

    @classmethod
    def of(cls, options: Mapping[str, object] | None) -> Demand:
        """The demand of a request's Ollama ``options`` (already checked to be numbers)."""

        def wanted(key: str) -> int:
            value = (options or {}).get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                return 0
            # Bounded: above any cap, and within any database's integers.
            return min(math.ceil(value), MAX_DEMAND)

        return cls(num_ctx=wanted("num_ctx"), num_predict=wanted("num_predict"))

    def __bool__(self) -> bool:
        return bool(self.num_ctx or self.num_predict)


NO_DEMAND = Demand()
# More than any node's cap (nodes.protocol.MAX_LIMIT), less than a 32-bit integer column holds.
MAX_DEMAND = 2**31 - 1


@dataclass(frozen=True)
class OverLimit:
    """A request that asks more than every live node serving its model allows (their
    ``register.limits``): refused with a 400 at once. ``option`` is the one over the largest
    cap and ``limit`` that cap; ``option`` is empty when each alone fits some node but no node
    takes both."""

    model: str
    option: str
    limit: int | None = None


@dataclass(frozen=True)
class NoSlot:
    """Why no slot was taken: ``served`` is False when no live node has the model at all (or
    none takes the request's demand, which ``over`` then says); ``blocked`` when an older
    request for the model is still waiting."""

    served: bool
    blocked: bool = False
    over: OverLimit | None = None


class _Tables:
    """Table names for the hand-written SQL, read from the models."""

    inflight = InflightRequest._meta.db_table
    queued = QueuedRequest._meta.db_table
    stream = ConsumerStream._meta.db_table
    round = QueueRound._meta.db_table
    account = QueueAccount._meta.db_table
    session = NodeSession._meta.db_table
    model = NodeModel._meta.db_table
    worker = RouterWorker._meta.db_table
    contributor = Contributor._meta.db_table
    contributor_model = ContributorModel._meta.db_table
    contributor_hour = ContributorHour._meta.db_table


T = _Tables


def _sql(template: str) -> str:
    return template.format(T=T)


def _at(value: datetime | None) -> object:
    """A datetime as the database backend stores it."""
    return connection.ops.adapt_datetimefield_value(value)


def _run(sql: str, params: dict[str, object]) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _rows(sql: str, params: dict[str, object]) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


# Whether queued request ``o`` is ordered ahead of ``q`` in their model's queue: the lower turn
# (the earlier round of the round-robin across consumers), then the higher priority, then the
# earlier arrival, then the request id. The same order as ``QueuedRequest.Meta.ordering`` and
# ``_FAIR_ORDER``.
_AHEAD = """(o.turn < q.turn
      OR (o.turn = q.turn
          AND (o.priority > q.priority
               OR (o.priority = q.priority
                   AND (o.arrived_at < q.arrived_at
                        OR (o.arrived_at = q.arrived_at AND o.request_id < q.request_id))))))"""
_FAIR_ORDER = "q.turn, q.priority DESC, q.arrived_at, q.request_id"

# Whether node ``n`` could serve waiting request ``o``: its caps take the request's demand, it
# declared the extension the request needs (``NodeSession.features`` holds known names only, so
# a match on the quoted name is exact), and it has not failed the request already.
_NODE_SERVES_WAITING = """(o.num_ctx = 0 OR n.max_ctx IS NULL OR n.max_ctx >= o.num_ctx)
  AND (o.num_predict = 0 OR n.max_predict IS NULL OR n.max_predict >= o.num_predict)
  AND (o.feature = '' OR n.features LIKE '%%"' || o.feature || '"%%')
  AND o.tried NOT LIKE '%%,' || CAST(n.id AS TEXT) || ',%%'"""

# A request for the model ordered ahead of this one that still waits in the queue (``own`` is
# this request's own place in it, if any; one not queued comes after every queued one): while
# there is one, this request may not claim.
_OLDER_WAITING = (
    """
SELECT 1 FROM {T.queued} o
WHERE o.model = %(model)s AND o.request_id <> %(own)s
  AND """
    + _AHEAD.replace("q.priority", "%(priority)s")
    .replace("q.turn", "%(turn)s")
    .replace("q.arrived_at", "%(arrived_at)s")
    .replace("q.request_id", "%(own)s")
    + "\n"
)

# The turn of a request that has not joined the queue: after every queued one. Turns are 64-bit
# (the round moves forward by one at most per request served from the queue: about 3 billion
# years at 100 a second).
LAST_TURN = 2**63 - 1

# A node whose caps (``register.limits``) take the request's demand; a demand of 0 (the option
# not set) fits every node.
_FITS = """AND (s.max_ctx IS NULL OR s.max_ctx >= %(num_ctx)s)
      AND (s.max_predict IS NULL OR s.max_predict >= %(num_predict)s)"""

# A window of live nodes with a free slot, in id order from a random point of the model's rows
# (and from its first row, for a window that runs past the last one). Every predicate sits
# before the LIMIT, so busy, dead or cooling nodes never use up the window.
_WINDOW_SQL = """
SELECT * FROM (
    SELECT s.id AS id, s.channel_name AS channel_name, s.node_id AS node_id,
           s.max_concurrent AS max_concurrent, s.consecutive_failures AS failures,
           COALESCE(s.tokens_per_s, %(unmeasured)s) AS speed,
           s.max_ctx AS max_ctx, s.max_predict AS max_predict,
           CAST(s.features AS TEXT) AS features,
           (SELECT COUNT(*) FROM {T.inflight} i WHERE i.session_id = s.id) AS active,
           CASE WHEN m.loaded_until > %(loaded_after)s THEN 1 ELSE 0 END AS warm
    FROM {T.model} m
    JOIN {T.session} s ON s.id = m.session_id
    JOIN {T.worker} w ON w.worker_id = s.worker_id
    WHERE m.name = %(model)s AND m.id {bound} %(start)s
      AND NOT s.draining AND s.last_seen >= %(node_cutoff)s AND w.last_seen >= %(worker_cutoff)s
      {{feature}}
      {{pin}}
      {fits}
      AND (SELECT COUNT(*) FROM {T.inflight} i WHERE i.session_id = s.id) < s.max_concurrent
      AND (s.consecutive_failures < %(cooldown_after)s
           OR (s.cooldown_until <= %(now)s
               AND NOT EXISTS (SELECT 1 FROM {T.inflight} i WHERE i.session_id = s.id)))
    ORDER BY m.id
    LIMIT %(window)s
) {alias}
"""

_WINDOW_SQL = _WINDOW_SQL.replace("{fits}", _FITS)

_CANDIDATES_TEMPLATE = _sql(
    """
SELECT id, channel_name, node_id, max_concurrent,
       CAST(active AS REAL) / max_concurrent AS load, warm,
       CASE WHEN failures >= %(cooldown_after)s THEN 0 ELSE failures END AS penalty, speed
FROM ("""
    + _WINDOW_SQL.replace("{bound}", ">=").replace("{alias}", "ahead")
    + " UNION ALL "
    + _WINDOW_SQL.replace("{bound}", "<").replace("{alias}", "behind")
    + """) n
WHERE NOT EXISTS ("""
    + _OLDER_WAITING
    + "  AND "
    + _NODE_SERVES_WAITING
    + """)
ORDER BY load, penalty, warm DESC, speed DESC, max_concurrent DESC
LIMIT %(limit)s
"""
)

# Only sessions that declared an extension (``NodeSession.features``) in ``register``. The list
# holds known names only (nodes.protocol.NODE_FEATURES), so a match on the quoted name is exact;
# CAST makes it text on SQLite and PostgreSQL (jsonb) alike.
_FEATURE_PREDICATE = "AND CAST(s.features AS TEXT) LIKE %(feature)s"
# Consumer traffic goes only to nodes at or above the reputation floor (README "Reputation and
# probes"); a probe is pinned to the one session it was sent for, whatever its reputation, so
# that a node below the floor can pass probes again.
_FLOOR_PREDICATE = "AND s.reputation >= %(floor)s"
_PIN_PREDICATE = "AND s.id = %(session)s"


def _with_feature(template: str, feature: str | None) -> str:
    return template.replace("{feature}", _FEATURE_PREDICATE if feature else "")


def _with_pin(template: str, pinned: bool) -> str:
    return template.replace("{pin}", _PIN_PREDICATE if pinned else _FLOOR_PREDICATE)


_CANDIDATES_SQL = _with_pin(_with_feature(_CANDIDATES_TEMPLATE, None), False)
# Requests that need an extension of the node: embeddings.
_FEATURE_CANDIDATES_SQL = _with_pin(_with_feature(_CANDIDATES_TEMPLATE, "feature"), False)
# A probe (routing/probes.py): one given session.
_PINNED_CANDIDATES_SQL = _with_pin(_with_feature(_CANDIDATES_TEMPLATE, None), True)


def _feature_pattern(feature: str) -> str:
    return f'%"{feature}"%'


_ID_RANGE_SQL = _sql("SELECT MIN(id), MAX(id) FROM {T.model} WHERE name = %(model)s")


@dataclass(frozen=True)
class _Candidate:
    session_id: int
    channel_name: str
    node_id: str
    max_concurrent: int


def _candidates(
    model: str,
    exclude: Collection[int],
    now: datetime,
    *,
    own: str,
    arrived_at: datetime,
    priority: int = 0,
    turn: int = LAST_TURN,
    feature: str | None = None,
    demand: Demand = NO_DEMAND,
    session: int | None = None,
) -> list[_Candidate]:
    """Live nodes with a free slot whose caps take ``demand``, best first: the least loaded,
    then the most reliable, then those whose Ollama has the model loaded (the others would load
    it first, seconds before the first token; the node's heartbeats say,
    docs/node-protocol-extensions.md), then the fastest. A cooled-down node is skipped; once its
    cooldown is over it gets one trial request at a time until it succeeds, ranked like a fresh
    node so that the trial really happens.
    None that a request for the model ordered ahead of the caller and still waiting in the
    queue could use (``own`` is the caller's own place in it, if any, with its ``priority``,
    ``turn`` and ``arrived_at``): a waiting request whose demand or extension no free node
    takes does not hold back the requests behind it (red-team M2 of issue 20). With
    ``feature``, only nodes that declared that extension. A node below
    ``IDLECLAW_REPUTATION_FLOOR`` gets none, except a probe's: with ``session``, only that
    session is a candidate, whatever its reputation.

    The choice is among the free nodes of two windows of at most ``WINDOW`` rows each, read
    from a random point of the model's rows and from its first row, so it costs about the same
    with ten nodes or ten thousand: with up to ``WINDOW`` nodes free it is exact, beyond that it
    is the best of a sample of 32 to 64 free nodes, which balances load about as well (the
    "power of d choices").

    Hand-written SQL: this runs for every request, and the ORM's version (a GROUP BY over every
    column of the session) cost ten times as much (bench/RESULTS.md).
    """
    lowest, highest = _rows(_ID_RANGE_SQL, {"model": model})[0]
    if lowest is None:
        return []
    params = {
        "unmeasured": UNMEASURED_TOKENS_PER_S,
        "model": model,
        "start": random.randint(lowest, highest),
        "window": WINDOW + len(exclude),
        "node_cutoff": _at(live_cutoff(now)),
        "worker_cutoff": _at(worker_cutoff(now)),
        "cooldown_after": COOLDOWN_AFTER,
        "now": _at(now),
        # Switched off, no node counts as having the model loaded.
        "loaded_after": _at(now if settings.IDLECLAW_PREFER_LOADED_NODES else LOADED_FOREVER),
        "own": own,
        "arrived_at": _at(arrived_at),
        "priority": priority,
        "turn": turn,
        # Sessions this request already failed on are dropped here rather than in SQL.
        "limit": CANDIDATES + len(exclude),
        "num_ctx": demand.num_ctx,
        "num_predict": demand.num_predict,
        "floor": settings.IDLECLAW_REPUTATION_FLOOR,
    }
    sql = _CANDIDATES_SQL
    if session is not None:
        sql = _PINNED_CANDIDATES_SQL
        params["session"] = session
    elif feature is not None:
        sql = _FEATURE_CANDIDATES_SQL
        params["feature"] = _feature_pattern(feature)
    found = _rows(sql, params)
    rows = [row for row in found if row[0] not in exclude][:CANDIDATES]
    # Spread exact ties instead of always picking the oldest connection.
    if rows:
        best = rows[0][4:]
        ties = [row for row in rows if row[4:] == best]
        random.shuffle(ties)
        rows = ties + [row for row in rows if row[4:] != best]
    return [_Candidate(*row[:4]) for row in rows]


_OLDER_WAITING_SQL = _sql(_OLDER_WAITING + " LIMIT 1")

_LOCK_SESSION_SQL = _sql("""
SELECT max_concurrent FROM {T.session} WHERE id = %(session)s AND NOT draining FOR UPDATE
""")
# A claim that already holds a node's row never waits for another's: two claims each holding
# one node and waiting for the other's would deadlock. A node locked by another claim is
# skipped instead.
_LOCK_NEXT_SESSION_SQL = _LOCK_SESSION_SQL.rstrip() + " SKIP LOCKED\n"

# Inserts the slot only while the node has one free: the check and the insert are one statement.
_TAKE_SLOT_SQL = _sql("""
INSERT INTO {T.inflight} (request_id, session_id, worker_id, model, reply_channel, created_at)
SELECT %(request_id)s, %(session)s, %(worker)s, %(model)s, %(reply_channel)s, %(now)s
WHERE (SELECT COUNT(*) FROM {T.inflight} WHERE session_id = %(session)s) < %(max_concurrent)s
""")


def inflight_reserve(
    *,
    model: str,
    request_id: str,
    reply_channel: str,
    worker_id: str,
    session: int,
    demand: Demand = NO_DEMAND,
) -> Claim | None:
    """A probe's place on one session (routing/probes.py), ahead of the model's queue: a slot
    row taken even when the node's slots are all in use, one beyond them at most. While it is
    over, no consumer claims the node (its slots count as full), so the next slot that frees
    there is the probe's: ``inflight_ready`` says when. None when the session is not live,
    draining, does not serve the model, its caps do not take ``demand``, or already holds one
    such extra row. The reputation floor and cooldowns do not apply: a probe is how a node
    below the floor comes back."""
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        rows = NodeSession.objects.filter(
            pk=session,
            draining=False,
            last_seen__gte=live_cutoff(now),
            worker__last_seen__gte=worker_cutoff(now),
            models__name=model,
        )
        if connection.vendor == "postgresql":
            # Lock the node's row, then count its slots, as ``inflight_claim`` does.
            rows = rows.select_for_update(of=("self",))
        found = rows.values("channel_name", "node_id", "max_concurrent", "max_ctx", "max_predict")
        target = next(iter(found), None)
        if target is None:
            return None
        for cap, asked in (("max_ctx", demand.num_ctx), ("max_predict", demand.num_predict)):
            if asked and target[cap] is not None and target[cap] < asked:
                return None
        taken = _run(
            _TAKE_SLOT_SQL,
            {
                "request_id": request_id,
                "session": session,
                "worker": worker_id,
                "model": model,
                "reply_channel": reply_channel,
                "now": _at(now),
                "max_concurrent": target["max_concurrent"] + 1,
            },
        )
        if not taken:
            return None
    return Claim(
        request_id=request_id,
        session_id=session,
        node_channel=target["channel_name"],
        node_id=target["node_id"],
    )


def inflight_ready(*, request_id: str) -> bool | None:
    """Whether a reserved slot (``inflight_reserve``) is now within its node's slots, so the
    request may be sent; None when the row is gone (the node left)."""
    row = (
        InflightRequest.objects.filter(request_id=request_id)
        .values("session_id", "session__max_concurrent")
        .first()
    )
    if row is None:
        return None
    held = InflightRequest.objects.filter(session_id=row["session_id"]).count()
    return held <= row["session__max_concurrent"]


_SERVED_TEMPLATE = _sql("""
SELECT s.id FROM {T.session} s
JOIN {T.model} m ON m.session_id = s.id AND m.name = %(model)s
JOIN {T.worker} w ON w.worker_id = s.worker_id
WHERE s.last_seen >= %(node_cutoff)s AND w.last_seen >= %(worker_cutoff)s
  AND s.reputation >= %(floor)s
  {{feature}}
  {{fits}}
LIMIT %(limit)s
""").replace("{fits}", _FITS)

# The largest caps of the live nodes serving a model, and how many have none (NULL): read only
# for a request that no node's caps take, to say which limit it broke.
_LIMITS_SQL = _sql("""
SELECT COUNT(*), MAX(s.max_ctx), MAX(s.max_predict),
       SUM(CASE WHEN s.max_ctx IS NULL THEN 1 ELSE 0 END),
       SUM(CASE WHEN s.max_predict IS NULL THEN 1 ELSE 0 END)
FROM {T.session} s
JOIN {T.model} m ON m.session_id = s.id AND m.name = %(model)s
JOIN {T.worker} w ON w.worker_id = s.worker_id
WHERE s.last_seen >= %(node_cutoff)s AND w.last_seen >= %(worker_cutoff)s
  AND s.reputation >= %(floor)s
""")
_SERVED_SQL = _with_feature(_SERVED_TEMPLATE, None)
_FEATURE_SERVED_SQL = _with_feature(_SERVED_TEMPLATE, "feature")


def _served(
    model: str, now: datetime, demand: Demand, limit: int, feature: str | None = None
) -> list[int]:
    """Up to ``limit`` live sessions serving ``model`` whose caps take ``demand`` (and that
    declared ``feature``), busy, draining or cooling down alike; not those below the reputation
    floor, which serve no consumer."""
    params: dict[str, object] = {
        "model": model,
        "floor": settings.IDLECLAW_REPUTATION_FLOOR,
        "node_cutoff": _at(live_cutoff(now)),
        "worker_cutoff": _at(worker_cutoff(now)),
        "limit": limit,
        "num_ctx": demand.num_ctx,
        "num_predict": demand.num_predict,
    }
    if feature is not None:
        params["feature"] = _feature_pattern(feature)
    rows = _rows(_FEATURE_SERVED_SQL if feature else _SERVED_SQL, params)
    return [row[0] for row in rows]


def _over_limit(model: str, now: datetime, demand: Demand) -> OverLimit | None:
    """Why no live node serving ``model`` takes ``demand``, or None when one does (or when
    none serves the model at all: that is no limit's fault)."""
    if _served(model, now, demand, 1):
        return None
    params = {
        "model": model,
        "node_cutoff": _at(live_cutoff(now)),
        "worker_cutoff": _at(worker_cutoff(now)),
        "floor": settings.IDLECLAW_REPUTATION_FLOOR,
    }
    nodes, max_ctx, max_predict, unbounded_ctx, unbounded_predict = _rows(_LIMITS_SQL, params)[0]
    if not nodes:
        return None
    if not unbounded_ctx and demand.num_ctx > max_ctx:
        return OverLimit(model=model, option="num_ctx", limit=max_ctx)
    if not unbounded_predict and demand.num_predict > max_predict:
        return OverLimit(model=model, option="num_predict", limit=max_predict)
    return OverLimit(model=model, option="")


_SERVED_NAME_SQL = _sql("SELECT 1 FROM {T.model} WHERE name = %(model)s LIMIT 1")


def model_resolve(model: str) -> str:
    """The model a request for ``model`` goes to: a name without a tag is the ``:latest`` tag,
    as Ollama resolves it (``llama3.2`` is ``llama3.2:latest``), unless some node serves the
    bare name itself. A name with a tag is itself; no read for it."""
    if ":" in model:
        return model
    if _rows(_SERVED_NAME_SQL, {"model": model}):
        return model
    latest = f"{model}:latest"
    return latest if _rows(_SERVED_NAME_SQL, {"model": latest}) else model


def inflight_claim(
    *,
    model: str,
    request_id: str,
    reply_channel: str,
    worker_id: str,
    arrived_at: datetime,
    queued_as: str | None = None,
    priority: int = 0,
    turn: int = LAST_TURN,
    exclude: Collection[int] = (),
    feature: str | None = None,
    demand: Demand = NO_DEMAND,
    session: int | None = None,
) -> Claim | NoSlot:
    """Take a free slot on the best live node serving ``model`` whose caps take ``demand``
    (and, with ``feature``, that declared that extension: a node serving the model without it
    does not serve the request).

    ``arrived_at`` is when the consumer's request arrived, ``priority`` its consumer's priority
    and ``turn`` its turn in the queue (``LAST_TURN`` before it joined): a claim is refused on
    any node that a request for the model ordered ahead of it, still waiting in the queue,
    could use (``queued_as`` is the caller's own queue row).
    ``exclude`` lists sessions that already failed this request. On PostgreSQL the node's row
    is locked while its slots are counted, so two workers never both take the last slot;
    SQLite runs one writer at a time anyway. A request whose ``demand`` no live node serving
    the model takes gets ``NoSlot(served=False, over=...)`` at once, even while others wait.

    ``session`` pins the claim to that one session (a probe, routing/probes.py): the same
    checks (live, not draining, a free slot, no older request waiting for the model), but not
    the reputation floor. Without a slot there it is ``NoSlot(served=False)``: no other node
    will do.
    """
    now = timezone.now()
    with transaction.atomic(savepoint=False):
        own = queued_as or ""
        candidates = _candidates(
            model,
            exclude,
            now,
            own=own,
            arrived_at=arrived_at,
            priority=priority,
            turn=turn,
            feature=feature,
            demand=demand,
            session=session,
        )
        for tried, candidate in enumerate(candidates):
            max_concurrent = candidate.max_concurrent
            if connection.vendor == "postgresql":
                # Lock the node's row, then count its slots: two workers never both take the
                # last one. (SQLite runs one writer at a time anyway.)
                lock = _LOCK_NEXT_SESSION_SQL if tried else _LOCK_SESSION_SQL
                found = _rows(lock, {"session": candidate.session_id})
                if not found:
                    continue  # gone or draining since it was chosen
                max_concurrent = found[0][0]
            taken = _run(
                _TAKE_SLOT_SQL,
                {
                    "request_id": request_id,
                    "session": candidate.session_id,
                    "worker": worker_id,
                    "model": model,
                    "reply_channel": reply_channel,
                    "now": _at(now),
                    "max_concurrent": max_concurrent,
                },
            )
            if not taken:
                continue
            if queued_as is not None:
                left = _run(
                    _sql("DELETE FROM {T.queued} WHERE request_id = %(id)s"), {"id": queued_as}
                )
                if not left:
                    # A full queue gave its place away meanwhile (``queue_join``): it is told so
                    # and ends; the slot goes back.
                    _run(
                        _sql("DELETE FROM {T.inflight} WHERE request_id = %(id)s"),
                        {"id": request_id},
                    )
                    return NoSlot(served=True, blocked=True)
                _run(_ROUND_SQL, {"model": model, "turn": turn})
            return Claim(
                request_id=request_id,
                session_id=candidate.session_id,
                node_channel=candidate.channel_name,
                node_id=candidate.node_id,
            )
        if session is not None:
            return NoSlot(served=False)
        if demand:
            over = _over_limit(model, now, demand)
            if over is not None:
                return NoSlot(served=False, over=over)
        waiting = _rows(
            _OLDER_WAITING_SQL,
            {
                "model": model,
                "own": own,
                "arrived_at": _at(arrived_at),
                "priority": priority,
                "turn": turn,
            },
        )
        if waiting:
            return NoSlot(served=True, blocked=True)
        serving = _served(model, now, demand, len(exclude) + 1, feature)
    return NoSlot(served=any(session not in exclude for session in serving))


@dataclass(frozen=True)
class Outcome:
    """How a request ended on a node, for that node's measured quality."""

    kind: str  # completed, failed, timed_out, cancelled (by the consumer: not the node's fault)
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    # Tool calls the node made that the request never offered (or that broke a strict schema).
    dropped_tool_calls: int = 0
    # Tokens of the answer as the router counted them, for the contributor's record.
    tokens: int = 0
    # Who asked (``routing.identity.Consumer.id``) and from where: a contributor earns no
    # priority answering itself.
    consumer: str = ""
    consumer_ip: str | None = None


# One statement folds an outcome into the node's measurements. In an UPDATE every column on the
# right-hand side is the row's old value, in SQLite and PostgreSQL alike. The moving averages
# keep the old value when nothing was measured and start at the first measurement.
_RECORD_SQL = _sql("""
UPDATE {T.session} SET
    ttft_ms = CASE WHEN %(ttft)s IS NULL THEN ttft_ms WHEN ttft_ms IS NULL THEN %(ttft)s
                   ELSE ttft_ms + %(weight)s * (%(ttft)s - ttft_ms) END,
    tokens_per_s = CASE WHEN %(speed)s IS NULL THEN tokens_per_s
                        WHEN tokens_per_s IS NULL THEN %(speed)s
                        ELSE tokens_per_s + %(weight)s * (%(speed)s - tokens_per_s) END,
    completed = completed + %(completed)s,
    failed = failed + %(failed)s,
    timed_out = timed_out + %(timed_out)s,
    dropped_tool_calls = dropped_tool_calls + %(dropped)s,
    consecutive_failures = CASE WHEN %(completed)s = 1 THEN 0 ELSE consecutive_failures + 1 END,
    cooldown_until = CASE WHEN %(completed)s = 1 THEN NULL
                          WHEN consecutive_failures + 1 >= %(cooldown_after)s THEN %(cool_until)s
                          ELSE cooldown_until END
WHERE id = %(session)s
RETURNING contributor_id, client_ip
""")
# A node that proved a contributor key adds the outcome to the contributor's record, its
# figures for the model (moving averages as the session's) and its tokens of this hour (the
# contributor's priority; not for answers to itself): three statements more, only for such
# nodes. A timed-out request is a failure of the contributor's.
_CONTRIBUTOR_SQL = _sql("""
UPDATE {T.contributor} SET
    served = served + %(completed)s,
    failed = failed + %(failed)s,
    tokens = tokens + %(tokens)s,
    last_seen = %(now)s
WHERE id = %(contributor)s
""")
_CONTRIBUTOR_MODEL_SQL = _sql("""
INSERT INTO {T.contributor_model} (contributor_id, model, served, tokens, ttft_ms, tokens_per_s)
VALUES (%(contributor)s, %(model)s, %(completed)s, %(tokens)s, %(ttft)s, %(speed)s)
ON CONFLICT (contributor_id, model) DO UPDATE SET
    served = {T.contributor_model}.served + excluded.served,
    tokens = {T.contributor_model}.tokens + excluded.tokens,
    ttft_ms = CASE WHEN excluded.ttft_ms IS NULL THEN {T.contributor_model}.ttft_ms
                   WHEN {T.contributor_model}.ttft_ms IS NULL THEN excluded.ttft_ms
                   ELSE {T.contributor_model}.ttft_ms
                        + %(weight)s * (excluded.ttft_ms - {T.contributor_model}.ttft_ms) END,
    tokens_per_s = CASE WHEN excluded.tokens_per_s IS NULL THEN {T.contributor_model}.tokens_per_s
                        WHEN {T.contributor_model}.tokens_per_s IS NULL
                            THEN excluded.tokens_per_s
                        ELSE {T.contributor_model}.tokens_per_s + %(weight)s
                             * (excluded.tokens_per_s - {T.contributor_model}.tokens_per_s) END
""")
_CONTRIBUTOR_HOUR_SQL = _sql("""
INSERT INTO {T.contributor_hour} (contributor_id, hour, tokens)
VALUES (%(contributor)s, %(hour)s, %(tokens)s)
ON CONFLICT (contributor_id, hour) DO UPDATE SET
    tokens = {T.contributor_hour}.tokens + excluded.tokens
""")


def inflight_finish(*, request_id: str, outcome: Outcome | None = None) -> list[str]:
    """Free the request's slot (idempotent), fold the outcome into the node's measurements,
    and return the reply channels of queued requests that may now take a slot."""
    with transaction.atomic(savepoint=False):
        freed = _rows(
            _sql("DELETE FROM {T.inflight} WHERE request_id = %(id)s RETURNING session_id, model"),
            {"id": request_id},
        )
        if not freed:
            return []
        session_id, model = freed[0]
        if outcome is not None and outcome.kind != "cancelled":
            _record(session_id, model, outcome)
    return queue_heads(session_id=session_id)


def _record(session_id: int, model: str, outcome: Outcome) -> None:
    now = timezone.now()
    cool_until = now + timedelta(seconds=settings.IDLECLAW_NODE_COOLDOWN)
    # Typed for PostgreSQL, which cannot infer the type of a bare NULL parameter.
    ttft = None if outcome.ttft_ms is None else float(outcome.ttft_ms)
    speed = None if outcome.tokens_per_s is None else float(outcome.tokens_per_s)
    completed = int(outcome.kind == "completed")
    owners = _rows(
        _RECORD_SQL,
        {
            "session": session_id,
            "ttft": ttft,
            "speed": speed,
            "weight": EMA_WEIGHT,
            "completed": completed,
            "failed": int(outcome.kind not in ("completed", "timed_out")),
            "timed_out": int(outcome.kind == "timed_out"),
            "dropped": int(outcome.dropped_tool_calls),
            "cooldown_after": COOLDOWN_AFTER,
            "cool_until": _at(cool_until),
        },
    )
    if not owners or owners[0][0] is None:
        return  # an anonymous node, or one gone meanwhile
    contributor, node_ip = owners[0]
    tokens = max(0, int(outcome.tokens))
    _run(
        _CONTRIBUTOR_SQL,
        {
            "contributor": contributor,
            "completed": completed,
            "failed": 1 - completed,
            "tokens": tokens,
            "now": _at(now),
        },
    )
    _run(
        _CONTRIBUTOR_MODEL_SQL,
        {
            "contributor": contributor,
            "model": model,
            "completed": completed,
            "tokens": tokens,
            "ttft": ttft,
            "speed": speed,
            "weight": EMA_WEIGHT,
        },
    )
    if tokens and not _answers_itself(contributor, node_ip, outcome):
        _run(
            _CONTRIBUTOR_HOUR_SQL,
            {
                "contributor": contributor,
                "hour": _at(now.replace(minute=0, second=0, microsecond=0)),
                "tokens": tokens,
            },
        )


def _answers_itself(contributor: int, node_ip: str | None, outcome: Outcome) -> bool:
    """Whether the request came from the contributor whose node answered it: under its own
    token, or from the node's own address (red-team H1 of issue 20). Such answers count in the
    record but earn no priority, or a contributor could serve itself into the queue's front."""
    if outcome.consumer == f"contributor:{contributor}":
        return True
    if node_ip is None or outcome.consumer_ip is None:
        return False
    return consumer_address(outcome.consumer_ip) == consumer_address(str(node_ip))


_QUEUE_SQL = _sql("""
SELECT COUNT(*), SUM(CASE WHEN consumer = %(consumer)s THEN 1 ELSE 0 END)
FROM {T.queued} WHERE model = %(model)s
""")
# The consumer holding the most places in the model's queue, and how many.
_LONGEST_SQL = _sql("""
SELECT consumer, COUNT(*) AS held FROM {T.queued} WHERE model = %(model)s
GROUP BY consumer ORDER BY held DESC, MAX(arrived_at) DESC LIMIT 1
""")
# A consumer's last place in the model's queue, in fair order.
_LAST_PLACE_SQL = _sql("""
SELECT request_id, reply_channel FROM {T.queued}
WHERE model = %(model)s AND consumer = %(consumer)s
ORDER BY turn DESC, priority, arrived_at DESC, request_id DESC LIMIT 1
""")
_TURNS_SQL = _sql("""
SELECT (SELECT turn FROM {T.round} WHERE model = %(model)s), a.turn, a.used
FROM (SELECT 1) one
LEFT JOIN {T.account} a ON a.model = %(model)s AND a.consumer = %(consumer)s
""")
_ACCOUNT_SQL = _sql("""
INSERT INTO {T.account} (model, consumer, turn, used)
VALUES (%(model)s, %(consumer)s, %(turn)s, %(used)s)
ON CONFLICT (model, consumer) DO UPDATE SET turn = excluded.turn, used = excluded.used
""")
# A queued request took a slot in round ``turn``: the round being served moves toward it, one
# step a claim. A claim far ahead (a request no waiting one could have had the node for) does
# not carry everyone who joins next behind every backlog (red team 4 of issue 20).
_ROUND_SQL = _sql("""
INSERT INTO {T.round} (model, turn)
VALUES (%(model)s, CASE WHEN %(turn)s > 0 THEN 1 ELSE 0 END)
ON CONFLICT (model) DO UPDATE SET turn = {T.round}.turn + 1 WHERE {T.round}.turn < %(turn)s
""")


@dataclass(frozen=True)
class Joined:
    """A request's place in its model's queue: its ``turn``, and the reply channel of the
    request it pushed out of a full queue (``queue_join``), if any, to be told so."""

    turn: int
    pushed_out: str | None = None


def queue_join(
    *,
    request_id: str,
    model: str,
    reply_channel: str,
    worker_id: str,
    arrived_at: datetime,
    consumer: str = "",
    priority: int = 0,
    resume: bool = False,
    feature: str | None = None,
    demand: Demand = NO_DEMAND,
    tried: Collection[int] = (),
) -> Joined | None:
    """Put a request in its model's queue; None when the queue is full.

    Turns make the queue round-robin across consumers. The round being served
    (``QueueRound``) is the highest turn a queued request has taken a slot in; it only moves
    forward. A consumer of priority ``p`` has up to ``1 + p`` requests in each round, counted
    in its account (``QueueAccount``) whether they were served already or still wait; its
    requests come first within a round. A request's turn is the consumer's latest round while
    that has room and is not over, else the next one, and never an earlier round than the one
    being served. So a consumer arriving late neither waits behind all of another's backlog
    nor jumps ahead of it by more than a round, and priority is a larger share of each round,
    never an endless wait for the others, even for a consumer that always has one request
    answering and one waiting. ``resume``: the request already had a node that failed it
    (``tried``, which it holds back no longer); it takes the round being served, ahead of its
    consumer's later requests, and uses no share of it.

    A full queue (``IDLECLAW_MAX_QUEUE``) still takes a request whose consumer holds at least
    two places fewer than the consumer holding the most: that one's last place is given up
    (``Joined.pushed_out``), so no one consumer can keep the others out by filling it.
    ``feature`` and ``demand`` say what the request needs of a node (``inflight_claim``).
    """
    with transaction.atomic():
        serialize_on(f"queue:{model}")
        where = {"model": model, "consumer": consumer}
        total, held = _rows(_QUEUE_SQL, where)[0]
        held = held or 0
        pushed_out = None
        if total >= settings.IDLECLAW_MAX_QUEUE:
            longest = _rows(_LONGEST_SQL, {"model": model})
            if not longest or longest[0][1] < held + 2:
                return None
            victim, channel = _rows(_LAST_PLACE_SQL, {"model": model, "consumer": longest[0][0]})[0]
            # Taken by a claim meanwhile (only joins hold the model's lock): then there is room.
            if _run(_sql("DELETE FROM {T.queued} WHERE request_id = %(id)s"), {"id": victim}):
                pushed_out = channel
        served, last, used = _rows(_TURNS_SQL, where)[0]
        current = served or 0
        if last is not None and last > current + held:
            # Ahead of the rounds its waiting requests explain (it joined and left again and
            # again): its share of round ``current + held`` counts as used.
            last, used = current + held, 1 + max(priority, 0)
        if resume:
            turn = current
        else:
            if last is None or last < current:
                turn, used = current, 1
            elif used < 1 + max(priority, 0):
                turn, used = last, used + 1
            else:
                turn, used = last + 1, 1
            _run(_ACCOUNT_SQL, {**where, "turn": turn, "used": used})
        QueuedRequest.objects.create(
            request_id=request_id,
            model=model,
            reply_channel=reply_channel,
            worker_id=worker_id,
            arrived_at=arrived_at,
            consumer=consumer,
            priority=priority,
            turn=turn,
            feature=feature or "",
            num_ctx=demand.num_ctx,
            num_predict=demand.num_predict,
            tried="".join(f",{session}" for session in sorted(tried)) + "," if tried else "",
        )
    return Joined(turn=turn, pushed_out=pushed_out)


# The first waiting request of a model in fair order.
_HEAD_SQL = _sql(
    """
SELECT q.reply_channel FROM {T.queued} q WHERE q.model = %(model)s
ORDER BY """
    + _FAIR_ORDER
    + """
LIMIT 1
"""
)
# For each model a node serves, the first waiting request it could serve, in fair order.
_SESSION_HEADS_SQL = _sql(
    """
SELECT (SELECT o.reply_channel FROM {T.queued} o
        WHERE o.model = m.name AND """
    + _NODE_SERVES_WAITING
    + """
        ORDER BY """
    + _FAIR_ORDER.replace("q.", "o.")
    + """
        LIMIT 1)
FROM {T.model} m
JOIN (SELECT id, max_ctx, max_predict, CAST(features AS TEXT) AS features
      FROM {T.session}) n ON n.id = m.session_id
WHERE m.session_id = %(session)s
"""
)
_SESSION_MODEL_HEAD_SQL = _SESSION_HEADS_SQL.rstrip() + " AND m.name = %(model)s\n"


def queue_heads(*, models: Iterable[str] = (), session_id: int | None = None) -> list[str]:
    """Reply channels of the requests allowed to claim next: for each model given, its first
    waiting request in the queue's fair order; for each model the session serves, the first
    one that node could serve (with ``models`` too, only for those). One indexed read per
    model."""
    names = list(models)
    rows = [row for model in names for row in _rows(_HEAD_SQL, {"model": model})]
    if session_id is not None and names:
        for model in names:
            rows += _rows(_SESSION_MODEL_HEAD_SQL, {"session": session_id, "model": model})
    elif session_id is not None:
        rows += _rows(_SESSION_HEADS_SQL, {"session": session_id})
    return list(dict.fromkeys(row[0] for row in rows if row[0] is not None))


def serialize_on(key: str) -> None:
    """Serialise transactions that count rows before inserting one (per-address limits, queue
    length). SQLite already runs one writer at a time; PostgreSQL takes a transaction-scoped
    advisory lock on the key, since row locks cannot cover rows not yet inserted."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [key])


def consumer_stream_open(
    *,
    request_id: str,
    client_ip: str | None,
    worker_id: str,
    consumer: str | None = None,
    limit: int | None = None,
) -> bool:
    """Count a request against its consumer (``routing.identity``; by default its address);
    False when the consumer already has ``limit`` requests open (by default
    ``IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP``). A request whose consumer is unknown (no address)
    is not limited."""
    if consumer is None:
        consumer = f"ip:{client_ip}" if client_ip else ""
    if limit is None:
        limit = settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP
    with transaction.atomic(savepoint=False):
        if consumer:
            serialize_on(f"consumer:{consumer}")
            open_now = _rows(
                _sql("SELECT COUNT(*) FROM {T.stream} WHERE consumer = %(consumer)s"),
                {"consumer": consumer},
            )[0][0]
            if open_now >= limit:
                return False
        _run(
            _sql(
                "INSERT INTO {T.stream} (request_id, client_ip, consumer, worker_id, started_at)"
                " VALUES (%(id)s, %(ip)s, %(consumer)s, %(worker)s, %(now)s)"
            ),
            {
                "id": request_id,
                "ip": client_ip,
                "consumer": consumer,
                "worker": worker_id,
                "now": _at(timezone.now()),
            },
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
    consumer: str | None = None,
    max_concurrent: int | None = None,
    priority: int = 0,
    feature: str | None = None,
    demand: Demand = NO_DEMAND,
) -> Claim | NoSlot | None:
    """A consumer's request arrives: count it against its consumer (``consumer_stream_open``)
    and try for a slot, in one trip to the database thread. None when the consumer has too many
    requests open. ``priority``: its consumer's; ``feature``: the extension the node must have
    declared, ``demand``: what the request asks of a node's caps (``inflight_claim``)."""
    with transaction.atomic():
        if not consumer_stream_open(
            request_id=request_id,
            client_ip=client_ip,
            worker_id=worker_id,
            consumer=consumer,
            limit=max_concurrent,
        ):
            return None
        return inflight_claim(
            model=model,
            request_id=attempt_id,
            reply_channel=reply_channel,
            worker_id=worker_id,
            arrived_at=arrived_at,
            priority=priority,
            feature=feature,
            demand=demand,
        )


def request_end(
    *,
    request_id: str,
    attempt_id: str | None,
    outcome: Outcome | None,
    record: metrics.RequestRecord | None = None,
) -> list[str]:
    """A consumer's request is over: free its slot, its queue place and its count, and count it
    for the operator (``record``, routing/metrics.py), in one trip. Returns the reply channels
    of queued requests that may now take the slot."""
    with transaction.atomic():
        wake = inflight_finish(request_id=attempt_id, outcome=outcome) if attempt_id else []
        left = _rows(
            _sql("DELETE FROM {T.queued} WHERE request_id = %(id)s RETURNING model"),
            {"id": request_id},
        )
        if left:
            # It may have held a free node back for itself: whoever could use it is next.
            wake += [channel for channel in queue_heads(models=[left[0][0]]) if channel not in wake]
        _run(_sql("DELETE FROM {T.stream} WHERE request_id = %(id)s"), {"id": request_id})
        if record is not None:
            metrics.request_count(record=record)
    return wake


# Accounts of rounds already over (``queue_join``) mean nothing any more; nor do the rounds and
# accounts of a model whose queue is empty: its next request starts afresh, as no one waits.
_STALE_ACCOUNTS_SQL = _sql("""
DELETE FROM {T.account}
WHERE turn < (SELECT r.turn FROM {T.round} r WHERE r.model = {T.account}.model)
   OR NOT EXISTS (SELECT 1 FROM {T.queued} q WHERE q.model = {T.account}.model)
""")
_STALE_ROUNDS_SQL = _sql("""
DELETE FROM {T.round}
WHERE NOT EXISTS (SELECT 1 FROM {T.queued} q WHERE q.model = {T.round}.model)
""")


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
        _run(_STALE_ACCOUNTS_SQL, {})
        _run(_STALE_ROUNDS_SQL, {})
    return leftovers
