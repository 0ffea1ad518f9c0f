"""Writes for the router's tool rounds: the per-node tool-call allowance and handing a request's
slot on to its next round."""

from __future__ import annotations

from django.conf import settings
from django.core.cache import cache

from routing.models import InflightRequest

# A node's allowance is counted in windows of a minute, each starting at the first call it counts.
WINDOW_SECONDS = 60


def node_tool_calls_take(*, session_id: int, count: int) -> int:
    """Count ``count`` tool calls against the node session's allowance of
    ``IDLECLAW_TOOL_CALLS_PER_MINUTE`` and return how many of them are within it.

    The count lives in the cache, which is Redis when the router runs several workers, so every
    worker counts against the same number; ``incr`` is atomic there. A window lasts a minute
    from the first call it counts. Keyed on the session, not the node id: a node id is only
    what the node says it is.
    """
    if count <= 0:
        return 0
    key = f"idleclaw:tool-calls:{session_id}"
    cache.add(key, 0, timeout=WINDOW_SECONDS)
    try:
        used = cache.incr(key, count)
    except ValueError:  # the window ended (or the entry was evicted) in between
        cache.add(key, 0, timeout=WINDOW_SECONDS)
        used = cache.incr(key, count)
    if used == count:
        # The window's first calls: it lasts a minute from now. (An increment of an entry
        # that expired after the check would otherwise leave a count without expiry.)
        cache.touch(key, WINDOW_SECONDS)
    before = used - count
    return max(0, min(count, settings.IDLECLAW_TOOL_CALLS_PER_MINUTE - before))


def inflight_next_round(*, request_id: str, next_request_id: str) -> bool:
    """Hand a request's slot on the node to the request's next round, sent to the same node
    under ``next_request_id``: the node stays claimed and its load unchanged, and an orphan
    notice or a reaper finds the round in flight. False when the slot is gone (its node
    disconnected, or it was reaped): there is no node to continue on."""
    moved = InflightRequest.objects.filter(request_id=request_id).update(
        request_id=next_request_id
    )
    return moved == 1
