"""Reads of the network's live state for the consumer APIs."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db.models import BigIntegerField, Count, F, Q, QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from nodes.identity import ANONYMOUS
from nodes.models import ContributorModel, NodeModel, NodeSession
from nodes.services import live_cutoff, worker_cutoff


@dataclass
class ModelInfo:
    name: str
    size: int = 0
    nodes: int = 0
    free_slots: int = 0
    active: int = 0
    capabilities: set[str] = field(default_factory=set)
    # What the nodes' Ollama says of the model (``protocol.parse_details``); where nodes
    # disagree, what most of them say.
    details: dict[str, Any] = field(default_factory=dict)
    # Loaded on at least one live node until then (the latest expiry), and its largest memory
    # use there; None when no node has it loaded.
    loaded_until: datetime | None = None
    size_vram: int = 0


def live_sessions() -> QuerySet[NodeSession]:
    """Sessions that may be routed to: heard from recently, on a live worker."""
    now = timezone.now()
    return NodeSession.objects.filter(
        last_seen__gte=live_cutoff(now), worker__last_seen__gte=worker_cutoff(now)
    )


def network_models() -> list[ModelInfo]:
    """Models that at least one live node at or above ``IDLECLAW_REPUTATION_FLOOR`` serves,
    largest first: a node below the floor gets no consumer traffic, so neither its models nor
    its slots are offered."""
    sessions = {
        pk: (max_concurrent, active, draining)
        for pk, max_concurrent, active, draining in live_sessions()
        .filter(reputation__gte=settings.IDLECLAW_REPUTATION_FLOOR)
        .annotate(active=Count("inflight"))
        .values_list("pk", "max_concurrent", "active", "draining")
    }
    models: dict[str, ModelInfo] = defaultdict(lambda: ModelInfo(name=""))
    rows = NodeModel.objects.filter(session_id__in=list(sessions)).values_list(
        "session_id", "name", "size", "capabilities", "details", "loaded_until", "size_vram"
    )
    now = timezone.now()
    details_votes: dict[str, Counter[str]] = defaultdict(Counter)
    for session_id, name, size, capabilities, details, loaded_until, size_vram in rows:
        info = models[name]
        info.name = name
        info.size = max(info.size, size)
        info.nodes += 1
        max_concurrent, active, draining = sessions[session_id]
        if not draining:
            info.free_slots += max(0, max_concurrent - active)
        info.capabilities.update(capabilities or ())
        if details:
            details_votes[name][json.dumps(details, sort_keys=True)] += 1
        if loaded_until is not None and loaded_until > now:
            info.loaded_until = max(loaded_until, info.loaded_until or loaded_until)
            info.size_vram = max(info.size_vram, size_vram)
    for name, votes in details_votes.items():
        # The most nodes win; a tie goes the same way every time.
        models[name].details = json.loads(min(votes, key=lambda text: (-votes[text], text)))
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
    """1 for the next request to be served; 0 when the request is no longer queued. Counts the
    requests ordered ahead of this one in the queue's fair order (``QueuedRequest.Meta``):
    what the consumer cannot overtake, not everything that arrived before it."""
    from routing.models import QueuedRequest

    row = (
        QueuedRequest.objects.filter(request_id=request_id)
        .values("model", "priority", "turn", "arrived_at")
        .first()
    )
    if row is None:
        return 0
    same_priority = Q(priority=row["priority"]) & (
        Q(arrived_at__lt=row["arrived_at"])
        | Q(arrived_at=row["arrived_at"], request_id__lt=request_id)
    )
    same_turn = Q(turn=row["turn"]) & (Q(priority__gt=row["priority"]) | same_priority)
    ahead = QueuedRequest.objects.filter(model=row["model"]).filter(
        Q(turn__lt=row["turn"]) | same_turn
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


# Most nodes ``GET /api/network/nodes`` lists (those that served most first); ``count`` says how
# many are live in all.
MAX_LISTED_NODES = 500
# Reputation bands of the public node list (README "Contributor names and records"): below
# IDLECLAW_REPUTATION_FLOOR a node is "excluded" (no consumer traffic until it passes probes
# again); below POOR_BELOW it is "poor" whatever it served; otherwise "new" until it has
# served NEW_UNTIL requests, then "good" from GOOD_FROM and "fair" between.
POOR_BELOW = 0.4
GOOD_FROM = 0.6
NEW_UNTIL = 10


def reputation_band(reputation: float, served: int) -> str:
    """The public word for a node's reputation (0 to 1) and requests served."""
    if reputation < settings.IDLECLAW_REPUTATION_FLOOR:
        return "excluded"
    if reputation < POOR_BELOW:
        return "poor"
    if served < NEW_UNTIL:
        return "new"
    return "good" if reputation >= GOOD_FROM else "fair"


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def network_nodes() -> dict[str, Any]:
    """The live nodes as the public sees them (``GET /api/network/nodes``): the contributor's
    name ("anonymous" without a key), the models with their measured speed (the contributor's
    figures for the model when it has a record, else this connection's), the reputation band
    (of the record's reputation, else the session's),
    the requests served (the record's, across restarts) and whether it is draining. Never an
    address, a node id, a key or a hash. At most MAX_LISTED_NODES, those that served most
    first."""
    live = live_sessions()
    count = live.count()
    sessions = list(
        live.annotate(
            served=Coalesce(
                F("contributor__served"), F("completed"), output_field=BigIntegerField()
            ),
            standing=Coalesce(F("contributor__reputation"), F("reputation")),
        )
        .order_by("-served", "pk")
        .values_list(
            "pk",
            "contributor_id",
            "contributor__name",
            "served",
            "standing",
            "draining",
            "ttft_ms",
            "tokens_per_s",
        )[:MAX_LISTED_NODES]
    )
    ids = [row[0] for row in sessions]
    models: dict[int, list[str]] = defaultdict(list)
    for session_id, name in (
        NodeModel.objects.filter(session_id__in=ids)
        .order_by("name")
        .values_list("session_id", "name")
    ):
        models[session_id].append(name)
    contributors = {row[1] for row in sessions if row[1] is not None}
    names = {name for listed in models.values() for name in listed}
    figures = {
        (contributor, model): (ttft, speed)
        for contributor, model, ttft, speed in ContributorModel.objects.filter(
            contributor_id__in=contributors, model__in=names
        ).values_list("contributor_id", "model", "ttft_ms", "tokens_per_s")
    }
    nodes = []
    for pk, contributor, name, served, reputation, draining, ttft, speed in sessions:
        listed = []
        for model in models[pk]:
            model_ttft, model_speed = figures.get((contributor, model), (ttft, speed))
            listed.append(
                {
                    "name": model,
                    "ttft_ms": _rounded(model_ttft, 1),
                    "tokens_per_s": _rounded(model_speed, 1),
                }
            )
        nodes.append(
            {
                "contributor": name or ANONYMOUS,
                "models": listed,
                "reputation": reputation_band(reputation, served),
                "served": served,
                "draining": draining,
            }
        )
    return {"nodes": nodes, "count": count, "limit": MAX_LISTED_NODES}
