"""An operator's actions on live nodes and requests (the admin, issue 17), on any worker.

The admin page runs on whichever worker the operator reached; a node's socket lives on the
worker that accepted it. So an action first changes what every worker must know at once (a
ban, a drain) in the database, then sends an event through the channel layer to the node's
consumer (``NodeSession.channel_name``), which acts on its own socket (``nodes.consumers``):

- ``node.disconnect``: the socket is closed with 1008 and ``CLOSE_REASON``, which the node logs;
  its requests in flight end as when any node leaves (another node takes those that had no
  token yet).
- ``node.drain``: the node already gets no new request (``draining``); its worker logs it, and
  the requests it is serving finish.
- ``node.banned``: as for a ban added by hand, the socket is closed with 1008 ``banned``.
- ``node.operator_cancel``: the node gets ``cancel_request`` and the consumer, on whichever
  worker, the error event ``OPERATOR_CANCELLED``; its relay frees the slot.

These are plain synchronous functions for the admin's views (which run in a thread); the
events are sent on the server's event loop (``async_to_sync``), after the writes committed.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime

from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.db import transaction
from django.db.models import Q

from nodes.models import NodeBan, NodeSession

logger = logging.getLogger("idleclaw.nodes")

DISCONNECT = "node.disconnect"
DRAIN = "node.drain"
BANNED = "node.banned"
CANCEL = "node.operator_cancel"
# The close reason (with code 1008) of a node an operator disconnected
# (docs/node-protocol-extensions.md).
CLOSE_REASON = "disconnected by an operator"
# The error a cancelled request's consumer gets (``routing.streaming.ERROR_MESSAGES``).
OPERATOR_CANCELLED = "operator_cancelled"
# To a queued request's relay, on its reply channel: end it with ``code`` (routing/streaming.py).
ABORT = "relay.abort"


def _send(messages: Iterable[tuple[str, dict[str, str]]]) -> int:
    """Send each (channel, event); returns how many the layer took."""
    messages = list(messages)
    if not messages:
        return 0
    layer = get_channel_layer()

    async def send_all() -> int:
        sent = 0
        for channel, event in messages:
            try:
                await layer.send(channel, event)
                sent += 1
            except ChannelFull:
                # The node's worker is far behind; the operator sees the node still there.
                logger.warning("operator's %s not delivered: %s is full", event["type"], channel)
        return sent

    return async_to_sync(send_all)()


def nodes_disconnect(*, session_ids: Collection[int]) -> int:
    """Close these nodes' sockets; returns how many were told."""
    channels = NodeSession.objects.filter(pk__in=session_ids).values_list("channel_name", flat=True)
    return _send((channel, {"type": DISCONNECT}) for channel in channels)


def nodes_drain(*, session_ids: Collection[int]) -> int:
    """Route no new request to these nodes; the ones they serve finish. Returns how many."""
    with transaction.atomic():
        sessions = NodeSession.objects.filter(pk__in=session_ids)
        channels = list(sessions.values_list("channel_name", flat=True))
        sessions.update(draining=True)
    _send((channel, {"type": DRAIN}) for channel in channels)
    return len(channels)


@dataclass(frozen=True)
class Banned:
    bans: list[NodeBan]
    disconnected: int


def nodes_ban(
    *, node_ids: Collection[str], ips: Collection[str], expires_at: datetime | None, reason: str
) -> Banned:
    """Ban these node ids and IP addresses until ``expires_at`` (None: for good), then close
    every live session they cover, on every worker. Values are checked by the caller
    (``NodeBan.clean``)."""
    with transaction.atomic():
        bans = [
            NodeBan.objects.create(kind=kind, value=value, reason=reason, expires_at=expires_at)
            for kind, values in ((NodeBan.Kind.NODE_ID, node_ids), (NodeBan.Kind.IP, ips))
            for value in sorted(set(values))
        ]
    hosts = [ban.host for ban in bans if ban.host is not None]  # an IPv6 address's network
    covered = NodeSession.objects.filter(
        Q(node_id__in=list(node_ids)) | Q(client_ip__in=list(ips)) | Q(client_net__in=hosts)
    )
    channels = covered.values_list("channel_name", flat=True)
    return Banned(bans=bans, disconnected=_send((c, {"type": BANNED}) for c in channels))


def queued_cancel(*, request_ids: Collection[str]) -> int:
    """End these requests still waiting in the router's queue, on whichever worker holds them:
    their consumers are told an operator ended them. Returns how many relays were told."""
    from routing.models import QueuedRequest

    rows = QueuedRequest.objects.filter(pk__in=request_ids).values_list("reply_channel", flat=True)
    return _send((channel, {"type": ABORT, "code": OPERATOR_CANCELLED}) for channel in rows)


def requests_cancel(*, request_ids: Collection[str]) -> int:
    """End these requests in flight: their nodes stop, their consumers are told an operator
    ended them. Returns how many nodes were told."""
    from routing.models import InflightRequest

    rows = InflightRequest.objects.filter(pk__in=request_ids).values_list(
        "request_id", "session__channel_name"
    )
    return _send(
        (channel, {"type": CANCEL, "request_id": request_id}) for request_id, channel in rows
    )
