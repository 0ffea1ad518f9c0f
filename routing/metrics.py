"""Counting for operators (issue 17): recorded where the router already writes, summed in the
database, so /metrics and the admin's overview show the same totals whichever worker answers.

What is written, and when (never per token or per frame):

- **A consumer request, once, when it ends.** ``request_count`` adds it to its ``RequestCount``
  row (minute, model, front end, outcome, histogram buckets) in the transaction that frees its
  slot (``routing.services.request_end``): one more statement per request.
- **Events that can come in floods** (rate-limit refusals, node errors) and requests refused
  before they had a row (a client over its limit of open requests) are counted in this
  process's memory and added to the database in one transaction about once a second
  (``flush``, from the worker's flush loop in ``nodes.worker``). A process killed outright loses
  at most that second; counts are never served from memory.
- **Requests in flight, for the admin** (the consumer's address, front end, first token, tokens
  so far): read from this process's live relays by the same flush and written to their
  ``InflightRequest`` rows when they changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db import connection, transaction

from idleclaw_site import shutdown
from idleclaw_site.db import db
from nodes.models import NodeModel
from routing.models import EventCount, InflightRequest, RequestCount

logger = logging.getLogger("idleclaw.metrics")

# Upper bounds in seconds of the histogram buckets; a last bucket, +Inf, follows each.
TTFT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# How a consumer request ended (the ``outcome`` label).
OK = "ok"
LENGTH = "length"  # cut for its length: the node's done_reason, or the router's character limit
ERROR = "error"
CANCELLED = "cancelled"  # the consumer hung up, or an operator cancelled it
QUEUE_TIMEOUT = "queue_timeout"
REFUSED = "refused"  # 429 or 503 before the answer started: no node, queue full, limits
OUTCOMES = (OK, LENGTH, ERROR, CANCELLED, QUEUE_TIMEOUT, REFUSED)

# The front ends (the ``api`` label).
API_CHAT = "chat"  # /api/chat
API_OPENAI = "openai"  # /v1
API_OLLAMA = "ollama"  # /ollama

# The model label of a request for a model no node served: a consumer may ask for any name, and
# each one would otherwise be a new series (and new rows) for as long as the router runs. Not a
# valid model name (PROTOCOL §4), so it never stands for a real one.
UNSERVED = "(unserved)"

# Kinds of ``EventCount``.
NODE_ERROR = "node_error"
RATE_LIMITED = "rate_limited"

# Minutes kept one by one, for the overview's window; older ones are folded into minute 0.
KEEP_MINUTES = 60
FOLD_INTERVAL = 60.0


def minute_of(epoch_seconds: float) -> int:
    return int(epoch_seconds // 60)


@dataclass(frozen=True)
class RequestRecord:
    """One consumer request as counted: its labels and what it measured (seconds)."""

    model: str
    api: str
    outcome: str
    tokens: int = 0
    ttft: float | None = None  # from arrival to the first token, queueing included
    duration: float | None = None  # from arrival to the end; None when refused


@dataclass(eq=False)
class RequestTally:
    """What one consumer request did so far; a ``routing.streaming.Relay`` keeps one and sets
    its fields on the event loop, once per request or per batch of chunks."""

    model: str
    api: str
    client_ip: str | None = None
    arrived: float = field(default_factory=time.time)
    first_token_at: float | None = None
    # Chunks the node sent that carried text, reasoning or a tool call: one per token
    # (PROTOCOL §1), as seen by the router, whatever the node claims in ``eval_count``.
    tokens: int = 0
    length: bool = False
    # Why the request ended, when not with its answer: the exception, or the refusal.
    ended: object = None
    # The progress last written to the request's row (``flush``).
    written: tuple[Any, ...] | None = None

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.time()

    def record(self, ended: object = None) -> RequestRecord:
        """The request as counted, now that it ended (``ended``: why, if not with its
        answer)."""
        outcome = outcome_of(ended, length=self.length)
        ttft = None
        if self.first_token_at is not None:
            ttft = max(0.0, self.first_token_at - self.arrived)
        return RequestRecord(
            model=UNSERVED if getattr(ended, "served", True) is False else self.model,
            api=self.api,
            outcome=outcome,
            tokens=self.tokens,
            ttft=ttft,
            duration=None if outcome == REFUSED else max(0.0, time.time() - self.arrived),
        )


def outcome_of(ended: object, *, length: bool = False) -> str:
    """The outcome label of a request that ended with ``ended`` (None: with its answer)."""
    from nodes.actions import OPERATOR_CANCELLED
    from routing.services import OverLimit
    from routing.streaming import RelayError, Unavailable

    if ended is None:
        return LENGTH if length else OK
    if isinstance(ended, asyncio.CancelledError | GeneratorExit):
        return CANCELLED
    if isinstance(ended, RelayError):
        if ended.code == "queue_timeout":
            return QUEUE_TIMEOUT
        if ended.code == "queue_full":
            return REFUSED  # a full queue gave its place to another consumer's request
        return CANCELLED if ended.code == OPERATOR_CANCELLED else ERROR
    if isinstance(ended, Unavailable):
        if ended.cancelled:
            return CANCELLED
        waited = ended.served and not ended.queue_full and not ended.restarting
        return QUEUE_TIMEOUT if waited else REFUSED
    if isinstance(ended, OverLimit):
        return REFUSED
    return ERROR


# --- writing ------------------------------------------------------------------------------------

_REQUESTS = RequestCount._meta.db_table
_EVENTS = EventCount._meta.db_table
_INFLIGHT = InflightRequest._meta.db_table
_KEY = "minute, model, api, outcome, ttft_bucket, duration_bucket"
_SUMS = "requests, tokens, ttft_seconds, duration_seconds"
_ADD_SUMS = ", ".join(f"{c} = {_REQUESTS}.{c} + excluded.{c}" for c in _SUMS.split(", "))

# Works on SQLite (3.24+) and PostgreSQL alike: the row of the request's key is created or has
# the request added to it, in one statement.
_COUNT_SQL = f"""
INSERT INTO {_REQUESTS} ({_KEY}, {_SUMS})
VALUES (%(minute)s, %(model)s, %(api)s, %(outcome)s, %(ttft_bucket)s, %(duration_bucket)s,
        %(requests)s, %(tokens)s, %(ttft)s, %(duration)s)
ON CONFLICT ({_KEY}) DO UPDATE SET {_ADD_SUMS}
"""

_EVENT_SQL = f"""
INSERT INTO {_EVENTS} (kind, label, count) VALUES (%s, %s, %s)
ON CONFLICT (kind, label) DO UPDATE SET count = {_EVENTS}.count + excluded.count
"""

_PROGRESS_SQL = f"""
UPDATE {_INFLIGHT} SET client_ip = %s, api = %s, first_token_at = %s, tokens = %s
WHERE request_id = %s
"""

# ``WHERE`` before ``GROUP BY`` also keeps SQLite from reading ``ON CONFLICT`` as a join's ``ON``.
_FOLD_SQL = f"""
INSERT INTO {_REQUESTS} ({_KEY}, {_SUMS})
SELECT 0, model, api, outcome, ttft_bucket, duration_bucket,
       SUM(requests), SUM(tokens), SUM(ttft_seconds), SUM(duration_seconds)
FROM {_REQUESTS} WHERE minute > 0 AND minute < %(cutoff)s
GROUP BY model, api, outcome, ttft_bucket, duration_bucket
ON CONFLICT ({_KEY}) DO UPDATE SET {_ADD_SUMS}
"""


def _count_params(record: RequestRecord, *, minute: int, requests: int = 1) -> dict[str, Any]:
    return {
        "minute": minute,
        "model": record.model,
        "api": record.api,
        "outcome": record.outcome,
        "ttft_bucket": -1 if record.ttft is None else bisect_left(TTFT_BUCKETS, record.ttft),
        "duration_bucket": (
            -1 if record.duration is None else bisect_left(DURATION_BUCKETS, record.duration)
        ),
        "requests": requests,
        "tokens": record.tokens,
        "ttft": float(record.ttft or 0.0),
        "duration": float(record.duration or 0.0),
    }


def request_count(*, record: RequestRecord, at: float | None = None) -> None:
    """Count a request that ended (``at``, epoch seconds: now). Runs inside the caller's
    transaction (``request_end``)."""
    minute = minute_of(time.time() if at is None else at)
    with connection.cursor() as cursor:
        cursor.execute(_COUNT_SQL, _count_params(record, minute=minute))


# Counted in this process since the last flush: (kind, label) and (model, api) of refused
# requests. Only this process's own code adds to them, on its event loop.
_events: Counter[tuple[str, str]] = Counter()
_refused: Counter[tuple[str, str]] = Counter()


def node_error(reason: str) -> None:
    """A node did something wrong (``reason``: a close reason or an error code, from a fixed
    set). A dictionary update; written at the next flush."""
    _events[NODE_ERROR, reason[:64]] += 1


def rate_limited(limit: str) -> None:
    """A limit refused a request or a node (``limit``: which one)."""
    _events[RATE_LIMITED, limit[:64]] += 1


def request_refused(*, model: str, api: str) -> None:
    """A consumer request refused before it had a row of its own (a 429 for too many open
    requests, a 503 while the router shuts down)."""
    _refused[model, api] += 1


# Requests in flight younger than this are not written yet: most answers are over before an
# operator could look at them, and a busy router would otherwise write every request's row.
PROGRESS_AFTER = 1.0


def _progress() -> list[tuple[RequestTally, tuple[Any, ...]]]:
    """This process's requests in flight (of at least ``PROGRESS_AFTER`` seconds) whose
    progress changed since it was last written."""
    changed = []
    young = time.time() - PROGRESS_AFTER
    for relay in list(shutdown.state.relays):
        claim = relay.claim
        tally = getattr(relay, "tally", None)
        if claim is None or tally is None or tally.arrived > young:
            continue
        values = (claim.request_id, tally.first_token_at, tally.tokens)
        if values != tally.written:
            changed.append((tally, values))
    return changed


async def flush(*, progress: bool = True) -> None:
    """Add what this process counted since the last flush to the database, and write the
    progress of its requests in flight (unless ``progress`` is False: a worker leaving); one
    trip to a database thread, none when idle."""
    global _events, _refused
    changed = _progress() if progress else []
    if not _events and not _refused and not changed:
        return
    events, refused = _events, _refused
    _events, _refused = Counter(), Counter()
    try:
        await db(_write)(events=events, refused=refused, progress=changed)
    except BaseException:
        _events.update(events)  # counted at the next flush instead
        _refused.update(refused)
        raise
    for tally, values in changed:
        tally.written = values


def _at(epoch_seconds: float | None) -> object:
    if epoch_seconds is None:
        return None
    value = datetime.fromtimestamp(epoch_seconds, tz=UTC)
    return connection.ops.adapt_datetimefield_value(value)


def _write(
    *,
    events: Counter[tuple[str, str]],
    refused: Counter[tuple[str, str]],
    progress: list[tuple[RequestTally, tuple[Any, ...]]],
) -> None:
    minute = minute_of(time.time())
    with transaction.atomic(), connection.cursor() as cursor:
        if events:
            cursor.executemany(_EVENT_SQL, [(k, label, n) for (k, label), n in events.items()])
        if refused:
            names = {model for model, _ in refused}
            served = set(
                NodeModel.objects.filter(name__in=names).values_list("name", flat=True).distinct()
            )
            merged: Counter[tuple[str, str]] = Counter()
            for (model, api), n in refused.items():
                merged[model if model in served else UNSERVED, api] += n
            cursor.executemany(
                _COUNT_SQL,
                [
                    _count_params(
                        RequestRecord(model=model, api=api, outcome=REFUSED),
                        minute=minute,
                        requests=n,
                    )
                    for (model, api), n in merged.items()
                ],
            )
        if progress:
            cursor.executemany(
                _PROGRESS_SQL,
                [
                    (tally.client_ip, tally.api, _at(first_token_at), tokens, request_id)
                    for tally, (request_id, first_token_at, tokens) in progress
                ],
            )


def request_counts_fold(*, now: float | None = None) -> None:
    """Fold the minutes older than ``KEEP_MINUTES`` into minute 0: every sum stays the same, in
    one transaction, and the table keeps about an hour of rows per series."""
    cutoff = minute_of(time.time() if now is None else now) - KEEP_MINUTES
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # Workers fold one at a time; each sees the rows the one before it removed.
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext('idleclaw-metrics-fold'))")
        cursor.execute(_FOLD_SQL, {"cutoff": cutoff})
        cursor.execute(
            f"DELETE FROM {_REQUESTS} WHERE minute > 0 AND minute < %(cutoff)s",
            {"cutoff": cutoff},
        )


_next_fold = 0.0


async def fold_when_due() -> None:
    """``request_counts_fold`` at most once a minute per worker (the worker's housekeeping)."""
    global _next_fold
    now = time.monotonic()
    if now < _next_fold:
        return
    _next_fold = now + FOLD_INTERVAL
    await db(request_counts_fold)()
