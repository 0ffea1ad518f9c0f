"""Who a consumer is (issue 20): an operator's consumer key, a contributor, or an address.

A request's ``Authorization: Bearer …`` (or ``X-Api-Key``) names it:

- ``ick_…``: a consumer key issued in the admin (``ConsumerKey``), with its own limits;
- ``icc_…``: a contributor's consumer token (``contribute.py --print-token``), whose priority
  and limits grow with the tokens its nodes served others in the last 24 hours. A contributor
  that earned no priority (nothing served lately, or a reputation below the floor) is known by
  its address, like anyone: keys cost nothing to make, so a key alone must not make one
  address many consumers with limits and turns of their own (red-team H2 of issue 20);
- anything else, or nothing: anonymous, known by its address. Real SDKs send dummy keys
  (``sk-…``, ``ollama``), which must keep working.

A token with one of our prefixes that matches no active row is refused (401): a consumer who
meant to use a key learns at once that it is wrong or revoked instead of silently falling back
to the anonymous limits. The router stores only SHA-256 hashes of keys and tokens.

One indexed read per request that carries one of our tokens, and nothing cached in process
memory: a revoked key is refused by every worker from its next request on.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.http import HttpRequest
from django.utils import timezone

from idleclaw_site.net import consumer_address
from nodes.models import Contributor, ContributorHour
from routing.models import ConsumerKey

CONTRIBUTOR_PREFIX = "icc_"
KEY_PREFIX = "ick_"
# The exact shapes: anything else under our prefixes is refused without a database read.
_CONTRIBUTOR_TOKEN = re.compile(r"icc_[0-9a-f]{64}")
_KEY = re.compile(r"ick_[0-9a-f]{48}")
# ``last_used_at`` of a consumer key is written at most this often.
LAST_USED_EVERY = timedelta(minutes=1)
PRIORITY_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class Consumer:
    """Who sent a request, and what it may do. ``id`` keys its rate limit, its count of open
    requests and its turns in a model's queue: ``key:<id>``, ``contributor:<id>`` or
    ``ip:<address>`` (empty for a request whose address is unknown)."""

    id: str
    priority: int = 0
    rate: str = ""  # a django-ratelimit rate, ``count/period``
    max_concurrent: int = 0

    @property
    def anonymous(self) -> bool:
        return not self.id.startswith(("key:", "contributor:"))


class UnknownToken(Exception):
    """A token with one of our prefixes that names no active key or contributor (401)."""

    message = "unknown or revoked IdleClaw key"


def token_hash(token: str) -> str:
    """What the router stores of a key or token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def new_consumer_key() -> tuple[str, str, str]:
    """A fresh consumer key: (key, its prefix as the admin shows it, its hash)."""
    key = KEY_PREFIX + secrets.token_hex(24)
    return key, key[len(KEY_PREFIX) : len(KEY_PREFIX) + 8], token_hash(key)


def bearer_of(request: HttpRequest) -> str | None:
    """The IdleClaw token a request carries (``Authorization: Bearer``, else ``X-Api-Key``),
    or None when it carries none of ours."""
    values = []
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        values.append(value.strip())
    values.append(request.headers.get("X-Api-Key", "").strip())
    for value in values:
        if value.startswith((CONTRIBUTOR_PREFIX, KEY_PREFIX)):
            return value
    return None


def _scaled(rate: str, factor: float) -> str:
    count, _, period = rate.partition("/")
    return f"{int(int(count) * factor)}/{period}"


def anonymous(client_ip: str | None) -> Consumer:
    """An anonymous consumer, known by its address (an IPv6 address by its /64,
    ``idleclaw_site.net.consumer_address``), at the anonymous limits."""
    return Consumer(
        id=f"ip:{consumer_address(client_ip)}" if client_ip else "",
        rate=settings.IDLECLAW_RATE_CHAT,
        max_concurrent=settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP,
    )


def contributor_priority(tokens: int) -> int:
    """The priority tokens served in the last 24 hours earn: one step per
    ``IDLECLAW_PRIORITY_TOKENS``, at least 1 for any, at most ``IDLECLAW_PRIORITY_MAX``."""
    if tokens <= 0:
        return 0
    steps = max(1, tokens // settings.IDLECLAW_PRIORITY_TOKENS)
    return min(settings.IDLECLAW_PRIORITY_MAX, steps)


def contributor_consumer(contributor_id: int, tokens: int) -> Consumer:
    """A contributor as a consumer: priority from its recent tokens, and the anonymous rate and
    concurrent-request limit times (1 + priority / 2)."""
    priority = contributor_priority(tokens)
    factor = 1 + priority / 2
    return Consumer(
        id=f"contributor:{contributor_id}",
        priority=priority,
        rate=_scaled(settings.IDLECLAW_RATE_CHAT, factor),
        max_concurrent=int(settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP * factor),
    )


_CONTRIBUTOR_SQL = f"""
SELECT c.id, COALESCE(SUM(h.tokens), 0), c.reputation
FROM {Contributor._meta.db_table} c
LEFT JOIN {ContributorHour._meta.db_table} h ON h.contributor_id = c.id AND h.hour >= %(since)s
WHERE c.token_hash = %(hash)s
GROUP BY c.id, c.reputation
"""


def consumer_resolve(*, token: str, client_ip: str | None) -> Consumer:
    """The consumer a token names (one indexed read); raises ``UnknownToken`` when it names no
    active consumer key or contributor. Synchronous: call it through ``db``."""
    now = timezone.now()
    if _CONTRIBUTOR_TOKEN.fullmatch(token):
        with connection.cursor() as cursor:
            cursor.execute(
                _CONTRIBUTOR_SQL,
                {
                    "hash": token_hash(token),
                    # The hour rows start on the hour: the one that began within the window
                    # counts whole.
                    "since": connection.ops.adapt_datetimefield_value(
                        (now - PRIORITY_WINDOW).replace(minute=0, second=0, microsecond=0)
                    ),
                },
            )
            row = cursor.fetchone()
        if row is None:
            raise UnknownToken
        contributor_id, tokens, reputation = row
        if reputation < settings.IDLECLAW_REPUTATION_FLOOR or not contributor_priority(tokens):
            return anonymous(client_ip)
        return contributor_consumer(contributor_id, int(tokens))
    if _KEY.fullmatch(token):
        found = (
            ConsumerKey.objects.filter(key_hash=token_hash(token), active=True)
            .values_list("id", "rate_per_minute", "max_concurrent", "priority", "last_used_at")
            .first()
        )
        if found is None:
            raise UnknownToken
        key_id, rate_per_minute, max_concurrent, priority, last_used_at = found
        if last_used_at is None or last_used_at < now - LAST_USED_EVERY:
            # At most once a minute per key, whichever worker gets there first.
            stale = ConsumerKey.objects.filter(pk=key_id).exclude(
                last_used_at__gte=now - LAST_USED_EVERY
            )
            stale.update(last_used_at=now)
        base = anonymous(client_ip)
        return Consumer(
            id=f"key:{key_id}",
            priority=priority,
            rate=f"{rate_per_minute}/m" if rate_per_minute is not None else base.rate,
            max_concurrent=max_concurrent if max_concurrent is not None else base.max_concurrent,
        )
    raise UnknownToken
