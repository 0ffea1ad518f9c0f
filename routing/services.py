"""Claiming and releasing node slots. A slot is an ``InflightRequest`` row; a node's load is the
count of its rows, so there is no counter to drift."""

from __future__ import annotations

import random
from dataclasses import dataclass

from django.db import transaction
from django.db.models import Count, F, FloatField
from django.db.models.functions import Cast
from django.utils import timezone

from nodes.models import NodeSession
from nodes.services import live_cutoff, worker_cutoff
from routing.models import InflightRequest

# How many of the least-loaded candidates a claim tries before giving up on a race.
CANDIDATES = 8


@dataclass(frozen=True)
class Claim:
    request_id: str
    node_channel: str
    node_id: str


def _candidates(model: str) -> list[tuple[int, float]]:
    now = timezone.now()
    rows = (
        NodeSession.objects.filter(
            models__name=model,
            draining=False,
            last_seen__gte=live_cutoff(now),
            worker__last_seen__gte=worker_cutoff(now),
        )
        .annotate(active=Count("inflight", distinct=True))
        .filter(active__lt=F("max_concurrent"))
        .annotate(load=Cast(F("active"), FloatField()) / F("max_concurrent"))
        .order_by("load", "-max_concurrent")
        .values_list("pk", "load")[:CANDIDATES]
    )
    candidates = list(rows)
    # Spread equal-load ties instead of always picking the oldest connection.
    if candidates:
        best = candidates[0][1]
        ties = [c for c in candidates if c[1] == best]
        random.shuffle(ties)
        candidates = ties + [c for c in candidates if c[1] != best]
    return candidates


def inflight_claim(
    *, model: str, request_id: str, reply_channel: str, worker_id: str
) -> Claim | None:
    """Take a free slot on the least-busy live node serving ``model``, or None if there is none.

    The node's row is locked while its slots are counted, so two workers can never both take
    the last slot.
    """
    for session_pk, _load in _candidates(model):
        with transaction.atomic():
            session = (
                NodeSession.objects.select_for_update()
                .filter(pk=session_pk, draining=False)
                .only("pk", "channel_name", "node_id", "max_concurrent")
                .first()
            )
            if session is None:
                continue
            if InflightRequest.objects.filter(session_id=session.pk).count() >= (
                session.max_concurrent
            ):
                continue
            InflightRequest.objects.create(
                request_id=request_id,
                session_id=session.pk,
                worker_id=worker_id,
                model=model,
                reply_channel=reply_channel,
                created_at=timezone.now(),
            )
            return Claim(
                request_id=request_id,
                node_channel=session.channel_name,
                node_id=session.node_id,
            )
    return None


def inflight_finish(*, request_id: str) -> None:
    """Free the request's slot (idempotent)."""
    InflightRequest.objects.filter(request_id=request_id).delete()

