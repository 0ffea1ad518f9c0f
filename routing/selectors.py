"""Reads of the network's live state for the consumer APIs."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from nodes.models import NodeModel, NodeSession
from nodes.services import live_cutoff, worker_cutoff


@dataclass
class ModelInfo:
    name: str
    size: int = 0
    nodes: int = 0
    free_slots: int = 0
    active: int = 0
    capabilities: set[str] = field(default_factory=set)


def live_sessions() -> QuerySet[NodeSession]:
    """Sessions that may be routed to: heard from recently, on a live worker."""
    now = timezone.now()
    return NodeSession.objects.filter(
        last_seen__gte=live_cutoff(now), worker__last_seen__gte=worker_cutoff(now)
    )


def network_models() -> list[ModelInfo]:
    """Models that at least one live node serves, largest first."""
    sessions = {
        pk: (max_concurrent, active, draining)
        for pk, max_concurrent, active, draining in live_sessions()
        .annotate(active=Count("inflight"))
        .values_list("pk", "max_concurrent", "active", "draining")
    }
    models: dict[str, ModelInfo] = defaultdict(lambda: ModelInfo(name=""))
    rows = NodeModel.objects.filter(session_id__in=list(sessions)).values_list(
        "session_id", "name", "size", "capabilities"
    )
    for session_id, name, size, capabilities in rows:
        info = models[name]
        info.name = name
        info.size = max(info.size, size)
        info.nodes += 1
        max_concurrent, active, draining = sessions[session_id]
        if not draining:
            info.free_slots += max(0, max_concurrent - active)
        info.capabilities.update(capabilities or ())
    from routing.models import InflightRequest

    for model, count in (
        InflightRequest.objects.filter(session_id__in=list(sessions))
        .values("model")
        .annotate(count=Count("pk"))
        .values_list("model", "count")
    ):
        if model in models:
            models[model].active = count
    return sorted(models.values(), key=lambda m: (-m.size, m.name))


def model_info(*, model: str) -> ModelInfo | None:
    return next((info for info in network_models() if info.name == model), None)


def network_health() -> dict[str, int]:
    from routing.models import InflightRequest

    live = live_sessions()
    from routing.models import QueuedRequest

    return {
        "node_count": live.count(),
        "active_requests": InflightRequest.objects.filter(session__in=live).count(),
        "queued_requests": QueuedRequest.objects.count(),
    }


def queue_position(*, request_id: str) -> int:
    """1 for the next request to be served; 0 when the request is no longer queued."""
    from routing.models import QueuedRequest

    row = QueuedRequest.objects.filter(request_id=request_id).values("model", "arrived_at").first()
    if row is None:
        return 0
    ahead = QueuedRequest.objects.filter(model=row["model"]).filter(
        Q(arrived_at__lt=row["arrived_at"])
        | Q(arrived_at=row["arrived_at"], request_id__lt=request_id)
    )
    return ahead.count() + 1


def queue_lengths() -> dict[str, int]:
    from routing.models import QueuedRequest

    return dict(
        QueuedRequest.objects.values("model").annotate(n=Count("pk")).values_list("model", "n")
    )


def embeddings_served(*, model: str) -> bool:
    """Whether a live node that declared the ``embeddings`` extension serves ``model``."""
    from nodes.protocol import Feature

    # Features are a short list of known names (nodes.protocol.NODE_FEATURES): read in Python,
    # as JSON lookups differ between SQLite and PostgreSQL.
    features = live_sessions().filter(models__name=model).values_list("features", flat=True)
    return any(Feature.EMBEDDINGS in (names or ()) for names in features)
