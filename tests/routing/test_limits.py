"""Per-address limits on consumers, and who the address is behind a proxy."""

from __future__ import annotations

import json

import pytest

from idleclaw_site.net import client_ip
from routing import metrics
from tests.routing.test_views import HttpClient
from tests.scripted_node import ScriptedNode

pytestmark = [pytest.mark.django_db(transaction=True)]

MODEL = "llama3.2:3b"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def client(path: str, body=BODY, ip: str = "10.2.0.1", method: str = "POST",
           forwarded: str | None = None) -> HttpClient:
    exchange = HttpClient(method, path, body if method == "POST" else None)
    exchange.app.scope["client"] = (ip, 5000)
    if forwarded:
        exchange.app.scope["headers"].append((b"x-forwarded-for", forwarded.encode()))
    return exchange


@pytest.mark.parametrize(
    "path, shape",
    [
        ("/api/chat", "detail"),
        ("/v1/chat/completions", "error.message"),
        ("/ollama/api/chat", "error"),
        ("/ollama/api/generate", "error"),
    ],
)
async def test_chat_over_the_rate_gets_429_with_retry_after(channel_layer, settings, path, shape):
    settings.IDLECLAW_RATE_CHAT = "2/h"
    body = {**BODY, "prompt": "hi"}
    for _ in range(2):
        status, _ = await client(path, body).start()
        assert status in (404, 503)  # no node serves it (Ollama's API says 404); still counted
    status, headers = await (exchange := client(path, body)).start()
    assert status == 429
    assert 1 <= int(headers["retry-after"]) <= 3600
    answer = json.loads(await exchange.read_all())
    for key in shape.split("."):
        answer = answer[key]
    assert "rate limit" in answer
    # Another address is not affected.
    assert (await client(path, body, ip="10.2.0.2").start())[0] in (404, 503)


async def test_other_endpoints_have_the_default_rate(channel_layer, settings):
    settings.IDLECLAW_RATE_DEFAULT = "3/h"
    statuses = [(await client("/health", method="GET").start())[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


async def test_concurrent_chats_per_address_are_capped(channel_layer, settings):
    settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP = 2
    node = ScriptedNode()
    await node.register(max_concurrent=10)
    first, second = client("/api/chat"), client("/v1/chat/completions", {**BODY, "stream": True})
    assert (await first.start())[0] == 200
    assert (await second.start())[0] == 200
    third = client("/ollama/api/chat")
    status, headers = await third.start()
    assert status == 429 and headers["retry-after"]
    assert "at most 2 requests at once" in json.loads(await third.read_all())["error"]
    assert (await client("/api/chat", ip="10.2.0.9").start())[0] == 200
    # When one finishes, the address may start another.
    request = await node.recv()
    await node.chunk(request["request_id"], "", done=True)
    await first.read_all()
    assert (await client("/api/chat").start())[0] == 200
    await node.disconnect()


async def test_forged_forwarded_for_from_an_untrusted_peer_changes_nothing(
    channel_layer, settings
):
    settings.IDLECLAW_RATE_CHAT = "1/h"
    assert (await client("/api/chat", forwarded="1.1.1.1").start())[0] == 503
    assert (await client("/api/chat", forwarded="2.2.2.2").start())[0] == 429


async def test_trusted_proxy_passes_the_client_address(channel_layer, settings):
    settings.IDLECLAW_RATE_CHAT = "1/h"
    settings.IDLECLAW_TRUSTED_PROXIES = ["10.2.0.0/24"]
    assert (await client("/api/chat", forwarded="1.1.1.1").start())[0] == 503
    assert (await client("/api/chat", forwarded="2.2.2.2").start())[0] == 503
    assert (await client("/api/chat", forwarded="2.2.2.2").start())[0] == 429


@pytest.mark.parametrize(
    "peer, header, trusted, expected",
    [
        ("203.0.113.5", "1.2.3.4", [], "203.0.113.5"),
        ("10.0.0.2", "1.2.3.4", ["10.0.0.0/8"], "1.2.3.4"),
        ("10.0.0.2", "6.6.6.6, 1.2.3.4", ["10.0.0.0/8"], "1.2.3.4"),
        ("10.0.0.2", "1.2.3.4, 10.0.0.7", ["10.0.0.0/8"], "1.2.3.4"),
        ("10.0.0.2", "not-an-ip", ["10.0.0.0/8"], "10.0.0.2"),
        ("10.0.0.2", None, ["10.0.0.0/8"], "10.0.0.2"),
        ("203.0.113.5", "1.2.3.4", ["10.0.0.0/8"], "203.0.113.5"),
        # One spelling: IPv4 mapped into IPv6 (a dual-stack socket, or a proxy's) is IPv4.
        ("::ffff:203.0.113.5", None, [], "203.0.113.5"),
        ("::1", "::ffff:1.2.3.4", ["::1/128"], "1.2.3.4"),
        ("::1", "2001:DB8:0:0::7", ["::1/128"], "2001:db8::7"),
        # A proxy at 127.0.0.1 reaching a dual-stack socket is still the trusted proxy.
        ("::ffff:127.0.0.1", "203.0.113.9", ["127.0.0.1/32"], "203.0.113.9"),
        ("10.0.0.2", "203.0.113.9, ::ffff:10.0.0.7", ["10.0.0.0/8"], "203.0.113.9"),
        # No zone (no database column takes one); NAT64's IPv4 clients are their IPv4 address.
        ("fe80::1%eth0", None, [], "fe80::1"),
        ("10.0.0.2", "64:ff9b::192.0.2.9", ["10.0.0.0/8"], "192.0.2.9"),
    ],
)
def test_client_ip_is_the_rightmost_untrusted_hop(settings, peer, header, trusted, expected):
    settings.IDLECLAW_TRUSTED_PROXIES = trusted
    assert client_ip(peer, header) == expected


def test_an_anonymous_consumer_on_ipv6_is_its_64_not_each_address(settings):
    """Red team 3 of issue 20: one host with a /64 must not be 2**64 consumers, each with its
    own limits and turns."""
    from routing import identity

    settings.IDLECLAW_IPV6_CONSUMER_PREFIX = 64
    first = identity.anonymous("2001:db8:1:2::1")
    assert first.id == "ip:2001:db8:1:2::/64"
    assert identity.anonymous("2001:db8:1:2:ffff::9").id == first.id
    assert identity.anonymous("2001:db8:1:3::1").id != first.id
    assert identity.anonymous("203.0.113.5").id == "ip:203.0.113.5"
    settings.IDLECLAW_IPV6_CONSUMER_PREFIX = 128
    assert identity.anonymous("2001:db8:1:2::1").id == "ip:2001:db8:1:2::1/128"


async def test_one_ipv6_64_shares_one_open_requests_limit(channel_layer, settings):
    settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP = 1
    node = ScriptedNode()
    await node.register(max_concurrent=10)
    assert (await client("/api/chat", ip="2001:db8:5:5::1").start())[0] == 200
    assert (await client("/api/chat", ip="2001:db8:5:5::2").start())[0] == 429
    assert (await client("/api/chat", ip="2001:db8:5:6::1").start())[0] == 200
    await node.disconnect()
    await metrics.flush()  # the refusal, counted in memory: into this test's database


# --- limits per consumer (issue 20) ---------------------------------------------------------


def _contributor_token(tokens: int) -> str:
    import secrets

    from django.utils import timezone

    from nodes.models import Contributor, ContributorHour
    from routing.identity import token_hash

    token = "icc_" + secrets.token_hex(32)
    now = timezone.now()
    person = Contributor.objects.create(
        key_hash=secrets.token_hex(32), token_hash=token_hash(token), name="quiet-wren-3",
        first_seen=now, last_seen=now,
    )  # fmt: skip
    ContributorHour.objects.create(
        contributor=person, hour=now.replace(minute=0, second=0, microsecond=0), tokens=tokens
    )
    return token


def _key(**fields) -> str:
    from routing import identity
    from routing.models import ConsumerKey

    key, prefix, hashed = identity.new_consumer_key()
    ConsumerKey.objects.create(name="t", prefix=prefix, key_hash=hashed, **fields)
    return key


def with_token(path: str, token: str) -> HttpClient:
    exchange = client(path)
    exchange.app.scope["headers"].append((b"authorization", f"Bearer {token}".encode()))
    return exchange


async def test_a_contributors_open_requests_limit_grows_with_its_priority(channel_layer, settings):
    from asgiref.sync import sync_to_async

    settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP = 1
    settings.IDLECLAW_PRIORITY_TOKENS = 1000
    token = await sync_to_async(_contributor_token)(2000)  # priority 2: limits times 2
    node = ScriptedNode()
    await node.register(max_concurrent=10)
    statuses = [(await with_token("/api/chat", token).start())[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    # The address without the token is another consumer, at the anonymous limit.
    assert (await client("/api/chat").start())[0] == 200
    assert (await client("/api/chat").start())[0] == 429
    await node.disconnect()
    await metrics.flush()  # the refusals, counted in memory: into this test's database


async def test_a_consumer_keys_own_open_requests_limit_applies(channel_layer, settings):
    from asgiref.sync import sync_to_async

    settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP = 3
    key = await sync_to_async(_key)(max_concurrent=1)
    node = ScriptedNode()
    await node.register(max_concurrent=10)
    assert (await with_token("/api/chat", key).start())[0] == 200
    refused = with_token("/ollama/api/chat", key)
    assert (await refused.start())[0] == 429
    assert "at most 1 requests at once" in json.loads(await refused.read_all())["error"]
    await node.disconnect()
    await metrics.flush()  # the refusal, counted in memory: into this test's database


async def test_guessing_tokens_gets_a_429_before_any_lookup(channel_layer, settings):
    """Red-team low of issue 20: an address's unknown tokens are counted; past the chat rate
    its next token is refused with a 429 before it is looked up, even a real one."""
    from asgiref.sync import sync_to_async

    settings.IDLECLAW_RATE_CHAT = "3/h"
    key = await sync_to_async(_key)()
    guesses = ["ick_" + f"{i:048x}" for i in range(4)]
    statuses = [(await with_token("/api/chat", guess).start())[0] for guess in guesses]
    assert statuses == [401, 401, 401, 429]
    assert (await with_token("/api/chat", key).start())[0] == 429
    # Anonymous use of the address is its own count; another address's key is looked up.
    assert (await client("/api/chat").start())[0] == 503
    other = with_token("/api/chat", key)
    other.app.scope["client"] = ("10.2.0.9", 5000)
    assert (await other.start())[0] == 503
    await metrics.flush()  # the refusals, counted in memory: into this test's database
