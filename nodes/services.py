"""Writes to the node tables. Plain synchronous functions; async callers wrap them with
``idleclaw_site.db.db`` at the boundary and send channel-layer events after they return
(that is, after commit)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import BigIntegerField, Case, DateTimeField, Q, QuerySet, Value, When
from django.utils import timezone
from django_ratelimit.core import get_usage

from idleclaw_site.net import consumer_address, normalized
from nodes import identity
from nodes.models import (
    Contributor,
    ContributorHour,
    NodeBan,
    NodeModel,
    NodeSession,
    RouterWorker,
)
from nodes.protocol import CloseReason, LoadedModel, ModelOffer, ProtocolError, Registration


@dataclass(frozen=True)
class Orphan:
    """A request whose node went away: its consumer must get an error event."""

    request_id: str
    reply_channel: str


@dataclass(frozen=True)
class Abandoned:
    """A request whose consumer's worker died: its node must be told to stop."""

    request_id: str
    node_channel: str


@dataclass
class Reaped:
    orphans: list[Orphan] = field(default_factory=list)
    abandoned: list[Abandoned] = field(default_factory=list)


@dataclass
class SessionOpened:
    session_id: int
    resume_token: str
    evicted_channel: str | None = None
    orphans: list[Orphan] = field(default_factory=list)
    # The name in effect when the node proved a contributor key (None: anonymous), and why it
    # is not the name the node asked for, if it is not.
    contributor_name: str | None = None
    contributor_note: str | None = None


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def live_cutoff(now: datetime | None = None) -> datetime:
    return (now or timezone.now()) - timedelta(seconds=settings.IDLECLAW_NODE_TIMEOUT)


def worker_cutoff(now: datetime | None = None) -> datetime:
    return (now or timezone.now()) - timedelta(seconds=settings.IDLECLAW_WORKER_TIMEOUT)


def router_worker_beat(
    *, worker_id: str, started_at: datetime, leaving: Callable[[], bool] = lambda: False
) -> None:
    """Create or refresh this process's liveness row; not create it again once the worker is
    ``leaving`` (a beat under way in a database thread while the worker shuts down)."""
    now = timezone.now()
    updated = RouterWorker.objects.filter(worker_id=worker_id).update(last_seen=now)
    if not updated and not leaving():
        RouterWorker.objects.create(
            worker_id=worker_id,
            hostname=socket.gethostname()[:255],
            pid=os.getpid(),
            started_at=started_at,
            last_seen=now,
        )


def _orphans_of_sessions(session_filter: Q) -> list[Orphan]:
    from routing.models import InflightRequest

    rows = InflightRequest.objects.filter(session_filter).values_list("request_id", "reply_channel")
    return [Orphan(request_id=rid, reply_channel=channel) for rid, channel in rows]


def router_worker_leave(*, worker_id: str) -> None:
    """A worker shutting down cleanly (idleclaw_site/shutdown.py) removes its own row; its
    nodes and streams are gone by then."""
    RouterWorker.objects.filter(worker_id=worker_id).delete()


def router_workers_reap(*, worker_id: str, everyone_else: bool = False) -> Reaped:
    """Remove workers that stopped beating, with their sessions and streams.

    Returns the requests that cross between a dead and a live worker: consumers on live workers
    whose node was on a dead one (they get an error event), and nodes on live workers serving a
    consumer whose worker died (they get a cancel). ``everyone_else`` removes all other workers
    at once: right for the in-memory channel layer, which no other process can share.

    Survivors reap concurrently: each dead worker is taken by exactly one of them (rows another
    survivor holds are skipped), so a consumer gets one error event, not one per survivor.
    """
    from routing.models import InflightRequest

    with transaction.atomic():
        dead = RouterWorker.objects.select_for_update(skip_locked=True).exclude(worker_id=worker_id)
        if not everyone_else:
            dead = dead.filter(last_seen__lt=worker_cutoff())
        dead_ids = list(dead.values_list("worker_id", flat=True))
        if not dead_ids:
            return Reaped()
        # A claim locks its session row before adding a request to it. Holding these locks
        # while the orphans are read means a claim racing with the reap either committed first
        # (its consumer is among the orphans) or finds the session gone afterwards.
        list(
            NodeSession.objects.select_for_update()
            .filter(worker_id__in=dead_ids)
            .values_list("pk", flat=True)
        )
        orphans = _orphans_of_sessions(
            Q(session__worker_id__in=dead_ids) & ~Q(worker_id__in=dead_ids)
        )
        abandoned = [
            Abandoned(request_id=rid, node_channel=channel)
            for rid, channel in InflightRequest.objects.filter(worker_id__in=dead_ids)
            .exclude(session__worker_id__in=dead_ids)
            .values_list("request_id", "session__channel_name")
        ]
        RouterWorker.objects.filter(worker_id__in=dead_ids).delete()
    return Reaped(orphans=orphans, abandoned=abandoned)


def node_sessions_reap() -> list[Orphan]:
    """Remove sessions not heard from within the node timeout (PROTOCOL §1 liveness).

    Like ``router_workers_reap``, each stale session is taken by one reaping worker only, and
    its row stays locked until its requests are read.
    """
    with transaction.atomic():
        stale = list(
            NodeSession.objects.select_for_update(skip_locked=True)
            .filter(last_seen__lt=live_cutoff())
            .values_list("pk", flat=True)
        )
        if not stale:
            return []
        orphans = _orphans_of_sessions(Q(session_id__in=stale))
        NodeSession.objects.filter(pk__in=stale).delete()
    return orphans


def node_registration_allowed(*, client_ip: str | None) -> bool:
    """Count a registration attempt against the IP's rate (shared cache); False when over."""
    usage = get_usage(
        None,
        group="node-register",
        key=lambda group, request: consumer_address(client_ip) if client_ip else "unknown",
        rate=settings.IDLECLAW_RATE_NODE_REGISTER,
        increment=True,
    )
    return usage is None or not usage["should_limit"]


def _active_bans() -> QuerySet[NodeBan]:
    """The bans that hold now: those without an expiry, and those not yet expired."""
    return NodeBan.objects.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))


def _active_ban(*, node_id: str, client_ip: str | None) -> NodeBan | None:
    """The ban that holds for this node id or its address's host (``NodeBan.host``), if any."""
    match = Q(kind=NodeBan.Kind.NODE_ID, value=node_id)
    host = None
    if client_ip:
        match |= Q(kind=NodeBan.Kind.IP, value=normalized(client_ip))
        host = consumer_address(client_ip)
        if ":" in host:
            # Any address of its IPv6 network: compared below, as text cannot be.
            match |= Q(kind=NodeBan.Kind.IP, value__contains=":")
    return next(
        (
            ban
            for ban in _active_bans().filter(match)
            if ban.kind == NodeBan.Kind.NODE_ID or ban.host == host
        ),
        None,
    )


def _create_models(
    session: NodeSession,
    offers: tuple[ModelOffer, ...],
    loaded: dict[str, tuple[datetime, int]] | None = None,
) -> None:
    loaded = loaded or {}
    NodeModel.objects.bulk_create(
        NodeModel(
            session=session,
            name=offer.name,
            size=offer.size,
            capabilities=list(offer.capabilities),
            details=dict(offer.details),
            loaded_until=loaded.get(offer.name, (None, 0))[0],
            size_vram=loaded.get(offer.name, (None, 0))[1],
        )
        for offer in offers
    )


def node_session_open(
    *,
    registration: Registration,
    channel_name: str,
    client_ip: str | None,
    worker_id: str,
) -> SessionOpened:
    """Register a node's connection, enforcing bans, the per-IP cap and node-id ownership.

    Raises ``ProtocolError`` with the close reason when the registration is refused. A live
    session with the same ``node_id`` is replaced only when the registration presents that
    session's resume token.
    """
    now = timezone.now()
    with transaction.atomic():
        if _active_ban(node_id=registration.node_id, client_ip=client_ip):
            raise ProtocolError(CloseReason.BANNED)
        evicted_channel = None
        orphans: list[Orphan] = []
        existing = (
            NodeSession.objects.select_for_update().filter(node_id=registration.node_id).first()
        )
        if existing is not None:
            alive = (
                existing.last_seen >= live_cutoff(now)
                and RouterWorker.objects.filter(
                    pk=existing.worker_id, last_seen__gte=worker_cutoff(now)
                ).exists()
            )
            token_ok = bool(registration.resume_token) and hmac.compare_digest(
                existing.resume_token_hash, _token_hash(registration.resume_token)
            )
            if alive and not token_ok:
                raise ProtocolError(CloseReason.NODE_ID_IN_USE)
            if alive:
                evicted_channel = existing.channel_name
            orphans = _orphans_of_sessions(Q(session_id=existing.pk))
            existing.delete()
        client_net = consumer_address(client_ip) if client_ip else ""
        if client_ip:
            from routing.services import serialize_on

            # One host: an IPv4 address, or an IPv6 /64 (IDLECLAW_IPV6_CONSUMER_PREFIX).
            serialize_on(f"node-ip:{client_net}")
            same_ip = NodeSession.objects.filter(
                client_net=client_net, last_seen__gte=live_cutoff(now)
            ).count()
            if same_ip >= settings.IDLECLAW_MAX_NODES_PER_IP:
                raise ProtocolError(CloseReason.TOO_MANY_NODES)
        contributor, note = None, None
        if registration.contributor_key is not None:
            contributor, note = _contributor_proven(registration=registration, now=now)
        token = secrets.token_urlsafe(32)
        session = NodeSession.objects.create(
            node_id=registration.node_id,
            channel_name=channel_name,
            worker_id=worker_id,
            max_concurrent=registration.max_concurrent,
            client_ip=client_ip,
            client_net=client_net,
            ollama_version=registration.ollama_version,
            client=registration.client,
            protocol=registration.protocol,
            resume_token_hash=_token_hash(token),
            features=list(registration.features),
            max_ctx=registration.max_ctx,
            max_predict=registration.max_predict,
            draining=registration.draining,
            contributor=contributor,
            reputation=contributor.reputation if contributor is not None else 0.5,
            connected_at=now,
            last_seen=now,
        )
        _create_models(session, registration.models)
    return SessionOpened(
        session_id=session.pk,
        resume_token=token,
        evicted_channel=evicted_channel,
        orphans=orphans,
        contributor_name=contributor.name if contributor is not None else None,
        contributor_note=note,
    )


# Tries at a free generated name before giving up on a registration (with 3.7 million names,
# reaching the last one means something else is wrong).
NAME_TRIES = 20


def _name_taken(name: str, *, other_than: int | None = None) -> bool:
    # Case-insensitive: "Amber-Otter-417" must not pass for "amber-otter-417".
    taken = Contributor.objects.filter(name__iexact=name)
    if other_than is not None:
        taken = taken.exclude(pk=other_than)
    return taken.exists()


def _contributor_proven(
    *, registration: Registration, now: datetime
) -> tuple[Contributor, str | None]:
    """The record of the key a registering node proved, made at its first registration, with
    the name the node asked for when it is free. Found by the key's hash only: neither a node id
    nor an address leads to a record. Returns the record and, when the name in effect is not
    the one asked for, why."""
    key = registration.contributor_key
    assert key is not None
    hashed = identity.key_hash(key)
    wanted = registration.contributor_name
    note = registration.name_problem
    contributor = Contributor.objects.select_for_update().filter(key_hash=hashed).first()
    if contributor is None:
        contributor, note = _contributor_create(
            key=key, key_hash=hashed, wanted=wanted, note=note, now=now
        )
    elif wanted is not None and wanted != contributor.name:
        if _name_taken(wanted, other_than=contributor.pk):
            note = _taken(wanted, contributor.name)
        else:
            try:
                with transaction.atomic():
                    Contributor.objects.filter(pk=contributor.pk).update(name=wanted)
                contributor.name = wanted
            except IntegrityError:  # another contributor took it a moment ago
                note = _taken(wanted, contributor.name)
    Contributor.objects.filter(pk=contributor.pk).update(last_seen=now)
    return contributor, note


def _taken(wanted: str, name: str) -> str:
    return f"name not changed: {wanted} is another contributor's name; you stay {name}"


def _contributor_create(
    *, key: str, key_hash: str, wanted: str | None, note: str | None, now: datetime
) -> tuple[Contributor, str | None]:
    token_hash = identity.token_hash(identity.token_of(key))
    for attempt in range(NAME_TRIES):
        name = wanted if attempt == 0 and wanted is not None else identity.generated_name()
        if _name_taken(name):
            if name == wanted:
                note = f"name not changed: {wanted} is another contributor's name"
            continue
        try:
            # A savepoint: on PostgreSQL a failed INSERT would end the whole transaction.
            with transaction.atomic():
                created = Contributor.objects.create(
                    key_hash=key_hash,
                    token_hash=token_hash,
                    name=name,
                    first_seen=now,
                    last_seen=now,
                )
            if name != wanted and wanted is not None and note is None:
                note = f"name not changed: {wanted} is another contributor's name"
            return created, note
        except IntegrityError:
            # The same key registering on another connection at this moment made the record
            # first, or another contributor took the name: look again.
            existing = Contributor.objects.select_for_update().filter(key_hash=key_hash).first()
            if existing is not None:
                return existing, note
    raise ProtocolError(CloseReason.INVALID_CONTRIBUTOR)


# Ids per UPDATE statement: well under SQLite's 999 bound parameters of old builds.
TOUCH_BATCH = 500


def node_sessions_touch(*, session_ids: Collection[int]) -> set[int]:
    """Mark these sessions as heard from now, with one ``UPDATE`` per ``TOUCH_BATCH`` ids in one
    transaction; return the ids that matched no row (sessions reaped or closed meanwhile)."""
    ids = sorted(set(session_ids))
    if not ids:
        return set()
    now = timezone.now()
    gone: set[int] = set()
    with transaction.atomic():
        for start in range(0, len(ids), TOUCH_BATCH):
            batch = ids[start : start + TOUCH_BATCH]
            updated = NodeSession.objects.filter(pk__in=batch).update(last_seen=now)
            if updated < len(batch):
                present = set(NodeSession.objects.filter(pk__in=batch).values_list("pk", flat=True))
                gone.update(pk for pk in batch if pk not in present)
    return gone


def node_session_drain(*, session_id: int) -> None:
    NodeSession.objects.filter(pk=session_id).update(draining=True, last_seen=timezone.now())


def node_session_undrain(*, session_id: int) -> None:
    """A node that drained takes new requests again (``undrain``,
    docs/node-protocol-extensions.md)."""
    NodeSession.objects.filter(pk=session_id).update(draining=False, last_seen=timezone.now())


def node_models_replace(*, session_id: int, offers: tuple[ModelOffer, ...]) -> None:
    """A node's new model list (``models_update``); what it said of the models it still
    serves being loaded stays true."""
    with transaction.atomic():
        session = NodeSession.objects.select_for_update().filter(pk=session_id).first()
        if session is None:
            return
        loaded = {
            name: (until, size_vram)
            for name, until, size_vram in session.models.filter(
                loaded_until__isnull=False
            ).values_list("name", "loaded_until", "size_vram")
        }
        session.models.all().delete()
        _create_models(session, offers, loaded)


def node_models_loaded(*, reports: dict[int, tuple[LoadedModel, ...]]) -> None:
    """Record what each session's Ollama has loaded, as its heartbeats said (the models of
    ``protocol.parse_loaded``); models a node does not serve are ignored, and its models not
    in the report are not loaded. The writes of many sessions go in one transaction (the
    worker batches them, like ``last_seen``), and only reports that changed come here
    (``protocol.loaded_changed``)."""
    with transaction.atomic():
        for session_id, loaded in reports.items():
            # One statement per session however many models it names: a node may report up to
            # MAX_MODELS of them, and statements per report were what a flapping node cost.
            NodeModel.objects.filter(session_id=session_id).update(
                loaded_until=Case(
                    *(When(name=m.name, then=Value(m.expires_at)) for m in loaded),
                    default=Value(None),
                    output_field=DateTimeField(null=True),
                ),
                size_vram=Case(
                    *(When(name=m.name, then=Value(m.size_vram)) for m in loaded),
                    default=Value(0),
                    output_field=BigIntegerField(),
                ),
            )


def node_session_close(*, session_id: int) -> list[Orphan]:
    """Remove a closed connection's session and return the requests it was serving."""
    with transaction.atomic():
        orphans = _orphans_of_sessions(Q(session_id=session_id))
        closing = NodeSession.objects.filter(pk=session_id)
        contributor_id = closing.values_list("contributor_id", flat=True).first()
        closing.delete()
        # After the session: rows are locked session first, then contributor, everywhere
        # (a finishing request does the same), so two transactions never wait on each other.
        if contributor_id is not None:
            Contributor.objects.filter(pk=contributor_id).update(last_seen=timezone.now())
    return orphans


def banned_sessions(*, worker_id: str) -> list[str]:
    """Channels of this worker's live sessions that an operator's ban now covers, so that a
    ban added in the admin also cuts a node already connected."""
    bans = list(_active_bans())
    if not bans:
        return []
    # Plain lists, not subqueries: on PostgreSQL client_ip is inet and a ban's value is text.
    ip_bans = [ban for ban in bans if ban.host is not None]
    banned_ips = [normalized(ban.value) for ban in ip_bans]
    banned_hosts = [ban.host for ban in ip_bans]
    banned_ids = [ban.value for ban in bans if ban.kind == NodeBan.Kind.NODE_ID]
    return list(
        NodeSession.objects.filter(worker_id=worker_id)
        .filter(
            Q(client_ip__in=banned_ips) | Q(client_net__in=banned_hosts) | Q(node_id__in=banned_ids)
        )
        .values_list("channel_name", flat=True)
    )


def contributors_prune(*, days: int, dry_run: bool = False) -> int:
    """Remove the records of contributors not seen for ``days`` days that have no live node
    (``manage.py contributors_prune``), with their per-model and per-hour rows; return how many
    records were (or, ``dry_run``, would be) removed."""
    cutoff = timezone.now() - timedelta(days=days)
    old = Contributor.objects.filter(last_seen__lt=cutoff).exclude(
        sessions__last_seen__gte=live_cutoff()
    )
    if dry_run:
        return old.count()
    with transaction.atomic():
        _, removed = old.delete()
    return removed.get(Contributor._meta.label, 0)


# Hourly token counts older than this feed nothing (priority looks back 24 hours,
# routing.identity.PRIORITY_WINDOW); the margin keeps a day's worth for an operator to look at.
CONTRIBUTOR_HOURS_KEPT = timedelta(hours=48)


def contributor_hours_prune(*, dry_run: bool = False) -> int:
    """Remove contributors' per-hour token counts older than ``CONTRIBUTOR_HOURS_KEPT``
    (``manage.py contributors_prune``; red-team F10 of issue 20: they grew for ever); return
    how many rows were (or, ``dry_run``, would be) removed."""
    old = ContributorHour.objects.filter(hour__lt=timezone.now() - CONTRIBUTOR_HOURS_KEPT)
    if dry_run:
        return old.count()
    removed, _ = old.delete()
    return removed
