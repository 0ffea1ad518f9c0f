"""``GET /metrics``: the network in the Prometheus text format (issue 17), for the operator's
monitoring. Not part of PROTOCOL.md; guarded by ``IDLECLAW_METRICS_TOKEN`` (README, "Operate").

Built with ``prometheus-client`` from a ``routing.overview.Snapshot`` read from the database at
each scrape, never from this process's memory: two workers behind one proxy answer alike.
"""

from __future__ import annotations

import asyncio
import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from idleclaw_site.db import db
from nodes import worker
from routing import overview
from routing.limits import rate_limited
from routing.views import detail, not_found


class _SnapshotCollector:
    """A ``prometheus_client`` collector of one snapshot."""

    def __init__(self, snapshot: overview.Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> list[Metric]:
        s = self.snapshot
        families: list[Metric] = [
            GaugeMetricFamily(
                "idleclaw_nodes_connected", "Live contributor nodes.", value=s.nodes_connected
            ),
            GaugeMetricFamily(
                "idleclaw_workers_alive", "Router workers beating.", value=s.workers_alive
            ),
            GaugeMetricFamily(
                "idleclaw_requests_in_flight", "Requests on a node's slot.", value=s.in_flight
            ),
        ]
        per_model = {
            "idleclaw_model_nodes": ("Live nodes serving the model.", "nodes"),
            "idleclaw_model_free_slots": ("Free slots of nodes serving the model.", "free_slots"),
            "idleclaw_queue_length": ("Requests waiting for a slot.", "queue"),
        }
        for name, (doc, attribute) in per_model.items():
            family = GaugeMetricFamily(name, doc, labels=["model"])
            for gauge in s.models:
                family.add_metric([gauge.name], getattr(gauge, attribute))
            families.append(family)
        requests = CounterMetricFamily(
            "idleclaw_requests_total",
            "Consumer requests that ended, by model, front end and outcome.",
            labels=["model", "api", "outcome"],
        )
        for labels, count in sorted(s.requests.items()):
            requests.add_metric(list(labels), count)
        tokens = CounterMetricFamily(
            "idleclaw_tokens_total", "Tokens relayed to consumers.", labels=["model"]
        )
        for model, count in sorted(s.tokens.items()):
            tokens.add_metric([model], count)
        families += [requests, tokens]
        for name, doc, histograms in (
            (
                "idleclaw_time_to_first_token_seconds",
                "From a request's arrival (queueing included) to its first token.",
                s.ttft,
            ),
            (
                "idleclaw_request_duration_seconds",
                "From a request's arrival to its end (refused requests not included).",
                s.duration,
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=["model"])
            for model, histogram in sorted(histograms.items()):
                family.add_metric([model], histogram.cumulative(), histogram.total)
            families.append(family)
        for name, doc, label, counts in (
            ("idleclaw_node_errors_total", "Node failures and refusals.", "reason", s.node_errors),
            (
                "idleclaw_rate_limited_total",
                "Requests and nodes refused by a limit.",
                "limit",
                s.rate_limited,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=[label])
            for value, count in sorted(counts.items()):
                family.add_metric([value], count)
            families.append(family)
        return families


def render(snapshot: overview.Snapshot, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition of ``snapshot`` and its content type: the Prometheus text format, or
    OpenMetrics when the scraper asks for it (``Accept``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


def authorized(header: str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


@rate_limited("default")
async def metrics(request: HttpRequest) -> HttpResponse:
    """``GET /metrics``: 404 unless ``IDLECLAW_METRICS_TOKEN`` is set, 401 without it."""
    token = settings.IDLECLAW_METRICS_TOKEN
    if not token:
        return not_found(request)
    if not authorized(request.headers.get("Authorization"), token):
        response = detail(401, "a Bearer token is required (IDLECLAW_METRICS_TOKEN)")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    if request.method not in ("GET", "HEAD"):
        response = detail(405, "method not allowed; use GET")
        response["Allow"] = "GET"
        return response
    await worker.ensure_started()
    snapshot = await db(overview.metrics_snapshot)()
    # Off the event loop: a large registry takes a while to write out, and the relays of this
    # worker must not wait for it.
    body, content_type = await asyncio.to_thread(render, snapshot, request.headers.get("Accept"))
    response = HttpResponse(body, content_type=content_type)
    response["Cache-Control"] = "no-store"
    return response
