"""Rate and address limits that ``tests/routing/test_limits.py`` and
``tests/nodes/test_consumers.py`` do not already cover: rates shared across front ends, the
node-side address behind proxies, and the operator's login."""

from __future__ import annotations

import json

import pytest

from nodes.protocol import CloseReason
from tests.routing.test_views import HttpClient
from tests.scripted_node import ScriptedNode, register_frame
from tests.security.hostile import MODEL, chat_body

pytestmark = [pytest.mark.django_db(transaction=True)]


def from_ip(method: str, path: str, body=None, ip: str = "10.3.0.1") -> HttpClient:
    client = HttpClient(method, path, body)
    client.app.scope["client"] = (ip, 5000)
    return client


async def status_and_message(client: HttpClient) -> tuple[int, str, dict[str, str]]:
    status, headers = await client.start()
    answer = json.loads(await client.read_all())
    if isinstance(answer.get("error"), dict):
        return status, answer["error"]["message"], headers
    return status, answer.get("error") or answer.get("detail") or "", headers


async def test_chat_rate_is_one_budget_across_every_chat_front_end(channel_layer, settings):
    """Switching API does not buy a client more requests."""
    settings.IDLECLAW_RATE_CHAT = "3/h"
    generate = {"model": MODEL, "prompt": "hi"}
    for path, body in (("/api/chat", chat_body()), ("/v1/chat/completions", chat_body()),
                       ("/ollama/api/chat", chat_body())):
        assert (await status_and_message(from_ip("POST", path, body)))[0] in (404, 503)
    status, message, headers = await status_and_message(
        from_ip("POST", "/ollama/api/generate", generate))
    assert status == 429 and "rate limit" in message and int(headers["retry-after"]) >= 1
    status, message, _ = await status_and_message(from_ip("POST", "/api/chat", chat_body()))
    assert status == 429 and "rate limit" in message
    # The read endpoints have their own budget.
    assert (await status_and_message(from_ip("GET", "/health")))[0] == 200


async def test_default_rate_is_one_budget_across_every_read_endpoint(channel_layer, settings):
    settings.IDLECLAW_RATE_DEFAULT = "4/h"
    for path in ("/health", "/api/models", "/v1/models", "/ollama/api/tags"):
        assert (await status_and_message(from_ip("GET", path)))[0] == 200
    for path in ("/ollama/api/version", "/v1/models/x", "/ollama/api/ps"):
        status, message, headers = await status_and_message(from_ip("GET", path))
        assert status == 429 and "rate limit" in message and headers["retry-after"]
    status, message, _ = await status_and_message(
        from_ip("POST", "/ollama/api/show", {"model": MODEL}))
    assert status == 429 and "rate limit" in message
    assert (await status_and_message(from_ip("GET", "/health", ip="10.3.0.2")))[0] == 200


def node_via(peer: str, forwarded: str | None = None) -> ScriptedNode:
    node = ScriptedNode(ip=peer)
    if forwarded:
        node.communicator.scope["headers"] = [(b"x-forwarded-for", forwarded.encode())]
    return node


async def refused(node: ScriptedNode) -> tuple[int, str]:
    await node.open()
    await node.send(register_frame())
    result = await node.closed()
    await node.disconnect()
    return result


async def test_forged_forwarded_for_does_not_lift_the_per_ip_node_cap(channel_layer, settings):
    settings.IDLECLAW_MAX_NODES_PER_IP = 1
    first = node_via("10.7.0.1")
    await first.register()
    assert await refused(node_via("10.7.0.1", forwarded="198.51.100.7")) == (
        1008, CloseReason.TOO_MANY_NODES)
    await first.disconnect()


async def test_nodes_behind_a_trusted_proxy_are_capped_by_their_own_address(
    channel_layer, settings
):
    settings.IDLECLAW_MAX_NODES_PER_IP = 1
    settings.IDLECLAW_TRUSTED_PROXIES = ["10.7.0.0/24"]
    first = node_via("10.7.0.1", forwarded="198.51.100.7")
    second = node_via("10.7.0.1", forwarded="198.51.100.8")
    await first.register()
    await second.register()
    # The client may prepend anything; only the hop the proxy appended counts.
    assert await refused(node_via("10.7.0.1", forwarded="1.1.1.1, 198.51.100.7")) == (
        1008, CloseReason.TOO_MANY_NODES)
    await first.disconnect()
    await second.disconnect()


async def test_registration_rate_counts_refused_attempts_too(channel_layer, settings):
    """A node cannot probe for a free node id (or a ban's end) faster than the rate."""
    settings.IDLECLAW_RATE_NODE_REGISTER = "3/h"
    owner = ScriptedNode(ip="10.8.0.1")
    await owner.register(node_id="taken")
    for _ in range(3):
        thief = ScriptedNode(ip="10.8.0.2")
        await thief.open()
        await thief.send(register_frame(node_id="taken"))
        assert await thief.closed() == (1008, CloseReason.NODE_ID_IN_USE)
        await thief.disconnect()
    late = ScriptedNode(ip="10.8.0.2")
    await late.open()
    assert await late.closed() == (1008, CloseReason.RATE_LIMITED)
    await late.disconnect()
    await owner.disconnect()


def test_admin_login_attempts_are_rate_limited(client, settings):
    settings.IDLECLAW_RATE_DEFAULT = "3/h"
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # speed
    statuses = [
        client.post("/admin/login/", {"username": "operator", "password": f"guess{i}"},
                    REMOTE_ADDR="10.9.0.1").status_code
        for i in range(5)
    ]
    assert 429 in statuses
