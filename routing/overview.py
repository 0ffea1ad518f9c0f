"""What operators see of the network (issue 17): /metrics and the admin's overview.

Everything here is read from the database when it is asked for, so every worker answers alike:
gauges from the live tables (sessions, requests in flight, the queue, workers), counters and
histograms summed from ``RequestCount`` and ``EventCount`` (written by ``routing.metrics``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from django.db.models import Sum
from django.utils import timezone

from nodes.models import RouterWorker
from nodes.services import worker_cutoff
from routing import metrics, selectors
from routing.models import EventCount, InflightRequest, RequestCount

# The window of the overview's rates.
RECENT_MINUTES = 15


@dataclass
class Histogram:
    """Counts per bucket (not cumulative; the last is +Inf) and the sum of the values."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def add(self, bucket: int, count: int, total: float) -> None:
        self.counts[bucket] += count
        self.total += total

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound, count of values at or below it)."""
        running, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out

    def quantile(self, q: float) -> float | None:
        """Estimated like Prometheus's ``histogram_quantile``: linear within the bucket; the
        highest finite bound when the quantile falls in +Inf. None without values."""
        count = self.count
        if not count:
            return None
        rank = q * count
        below = 0
        for index, in_bucket in enumerate(self.counts):
            if below + in_bucket >= rank and in_bucket:
                if index == len(self.bounds):
                    return self.bounds[-1]
                lower = self.bounds[index - 1] if index else 0.0
                upper = self.bounds[index]
                return lower + (upper - lower) * (rank - below) / in_bucket
            below += in_bucket
        return self.bounds[-1]


@dataclass
class ModelGauge:
    name: str
    nodes: int = 0
    free_slots: int = 0
    queue: int = 0
    in_flight: int = 0


@dataclass
class Snapshot:
    """Everything /metrics exports, read at one moment."""

    nodes_connected: int
    workers_alive: int
    in_flight: int
    models: list[ModelGauge]
    requests: dict[tuple[str, str, str], int]  # (model, api, outcome) -> requests
    tokens: dict[str, int]
    ttft: dict[str, Histogram]
    duration: dict[str, Histogram]
    node_errors: dict[str, int]
    rate_limited: dict[str, int]


def model_gauges() -> list[ModelGauge]:
    """Models live nodes serve (and any with requests waiting): nodes, free slots, queue."""
    gauges = {
        info.name: ModelGauge(
            name=info.name, nodes=info.nodes, free_slots=info.free_slots, in_flight=info.active
        )
        for info in selectors.network_models()
    }
    for name, waiting in selectors.queue_lengths().items():
        gauges.setdefault(name, ModelGauge(name=name)).queue = waiting
    return sorted(gauges.values(), key=lambda gauge: gauge.name)


def workers_alive() -> int:
    return RouterWorker.objects.filter(last_seen__gte=worker_cutoff()).count()


def _request_rows(minute_from: int | None = None):
    rows = RequestCount.objects.all()
    if minute_from is not None:
        rows = rows.filter(minute__gte=minute_from)
    return rows.values_list("model", "api", "outcome", "ttft_bucket", "duration_bucket").annotate(
        Sum("requests"), Sum("tokens"), Sum("ttft_seconds"), Sum("duration_seconds")
    )


# Models named in /metrics' labels: the most requested ones. Nodes choose model names, so a
# node and a consumer together could otherwise add series without end, and each scrape would
# grow with them (red-team H2 of issue 17); the rest are summed under one label.
MAX_MODEL_SERIES = 100
OTHER_MODELS = "(other)"


def _named_models(rows: list[tuple]) -> set[str]:
    totals: dict[str, int] = defaultdict(int)
    for row in rows:
        totals[row[0]] += row[5]
    ranked = sorted(totals, key=lambda model: (-totals[model], model))
    return set(ranked[:MAX_MODEL_SERIES])


def metrics_snapshot() -> Snapshot:
    """Gauges now and counters since the first request (``GET /metrics``)."""
    requests: dict[tuple[str, str, str], int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    ttft: dict[str, Histogram] = {}
    duration: dict[str, Histogram] = {}
    rows = list(_request_rows())
    named = _named_models(rows)
    for (
        model,
        api,
        outcome,
        ttft_bucket,
        duration_bucket,
        n,
        toks,
        ttft_s,
        dur_s,
    ) in rows:
        if model not in named:
            model = OTHER_MODELS
        requests[model, api, outcome] += n
        if outcome != metrics.REFUSED:
            tokens[model] += toks
        if ttft_bucket >= 0:
            ttft.setdefault(model, Histogram(metrics.TTFT_BUCKETS)).add(ttft_bucket, n, ttft_s)
        if duration_bucket >= 0:
            duration.setdefault(model, Histogram(metrics.DURATION_BUCKETS)).add(
                duration_bucket, n, dur_s
            )
    events: dict[str, dict[str, int]] = defaultdict(dict)
    for kind, label, count in EventCount.objects.values_list("kind", "label", "count"):
        events[kind][label] = count
    live = selectors.live_sessions()
    return Snapshot(
        nodes_connected=live.count(),
        workers_alive=workers_alive(),
        in_flight=InflightRequest.objects.filter(session__in=live).count(),
        models=model_gauges(),
        requests=dict(requests),
        tokens=dict(tokens),
        ttft=ttft,
        duration=duration,
        node_errors=events[metrics.NODE_ERROR],
        rate_limited=events[metrics.RATE_LIMITED],
    )


@dataclass
class Recent:
    """Traffic of the last ``minutes`` (the current minute so far included)."""

    minutes: int
    seconds: float
    requests: int
    tokens: int
    outcomes: dict[str, int]
    ttft: Histogram

    @property
    def requests_per_minute(self) -> float:
        return self.requests * 60 / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def error_rate(self) -> float | None:
        """Requests that failed (``error``) among those that ended, refusals included."""
        return self.outcomes.get(metrics.ERROR, 0) / self.requests if self.requests else None


def recent_traffic(*, minutes: int = RECENT_MINUTES, now: float | None = None) -> Recent:
    now = time.time() if now is None else now
    first = metrics.minute_of(now) - (minutes - 1)
    outcomes: dict[str, int] = defaultdict(int)
    ttft = Histogram(metrics.TTFT_BUCKETS)
    total = toks_total = 0
    for _model, _api, outcome, ttft_bucket, _db, n, toks, ttft_s, _ds in _request_rows(first):
        outcomes[outcome] += n
        total += n
        toks_total += toks
        if ttft_bucket >= 0:
            ttft.add(ttft_bucket, n, ttft_s)
    return Recent(
        minutes=minutes,
        seconds=max(1.0, now - first * 60),
        requests=total,
        tokens=toks_total,
        outcomes={outcome: outcomes[outcome] for outcome in metrics.OUTCOMES if outcomes[outcome]},
        ttft=ttft,
    )


def network_overview() -> dict[str, object]:
    """The admin index's overview: the live network now, and the last 15 minutes' traffic."""
    live = selectors.live_sessions()
    recent = recent_traffic()
    p50 = recent.ttft.quantile(0.5)
    return {
        "nodes_online": live.count(),
        "workers_alive": workers_alive(),
        "in_flight": InflightRequest.objects.filter(session__in=live).count(),
        "models": model_gauges(),
        "recent": recent,
        "requests_per_minute": round(recent.requests_per_minute, 1),
        "tokens_per_second": round(recent.tokens_per_second, 1),
        "error_rate": None if recent.error_rate is None else round(100 * recent.error_rate, 1),
        "ttft_p50": None if p50 is None else round(p50, 2),
        "at": timezone.now(),
    }
