"""Reads for the network page: aggregates over live nodes, never a node id, an address or
anything a request said."""

from __future__ import annotations

from typing import Any

from django.db.models import Avg, Count

from nodes.models import NodeModel
from routing import selectors


def network_overview() -> dict[str, Any]:
    """Nodes, slots, requests in flight and waiting, and measured speed: network-wide and per
    model. Speeds are the moving averages the router measures from real traffic
    (``NodeSession.tokens_per_s``), averaged over the nodes that have one."""
    live = selectors.live_sessions()
    sessions = list(
        live.annotate(active=Count("inflight")).values(
            "max_concurrent", "active", "draining", "tokens_per_s", "completed", "failed"
        )
    )
    speeds = dict(
        NodeModel.objects.filter(session__in=live, session__tokens_per_s__isnull=False)
        .values("name")
        .annotate(speed=Avg("session__tokens_per_s"))
        .values_list("name", "speed")
    )
    queues = selectors.queue_lengths()
    measured = [row["tokens_per_s"] for row in sessions if row["tokens_per_s"] is not None]
    models = [
        {
            "name": info.name,
            "size": info.size,
            "nodes": info.nodes,
            "free_slots": info.free_slots,
            "active": info.active,
            "queued": queues.get(info.name, 0),
            "tokens_per_s": _rounded(speeds.get(info.name)),
            "thinking": "thinking" in info.capabilities,
            "tools": "tools" in info.capabilities,
        }
        for info in selectors.network_models()
    ]
    return {
        "nodes_online": len(sessions),
        "slots": sum(row["max_concurrent"] for row in sessions),
        "free_slots": sum(
            max(0, row["max_concurrent"] - row["active"]) for row in sessions if not row["draining"]
        ),
        "active_requests": sum(row["active"] for row in sessions),
        "queued_requests": sum(queues.values()),
        "tokens_per_s": _rounded(sum(measured) / len(measured)) if measured else None,
        "answers_completed": sum(row["completed"] for row in sessions),
        "answers_failed": sum(row["failed"] for row in sessions),
        "models": models,
    }


def _rounded(speed: float | None) -> float | None:
    return None if speed is None else round(speed, 1)
