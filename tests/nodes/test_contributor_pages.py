"""Contributors as operators and the public see them (issue 20): the admin's records (viewers
look, operators edit name, reputation and notes), the node list naming the contributor, the
``registered`` reply and a bad ``contributor`` object through the real ASGI application, and
``GET /api/network/nodes`` (bands, cap, rate limit, nothing that identifies a node)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from nodes.models import Contributor, ContributorModel, NodeSession
from nodes.probes import Tally, probe_results_record
from routing import selectors
from tests.ops import NODES, get, staff_client
from tests.scripted_node import ScriptedNode, register_frame

pytestmark = [pytest.mark.django_db(transaction=True)]

KEY = "5a" * 32
OTHER_KEY = "a5" * 32
CONTRIBUTORS = "/admin/nodes/contributor/"


async def keyed_node(
    key: str = KEY, name: str | None = None, **overrides
) -> tuple[ScriptedNode, dict]:
    node = ScriptedNode(ip=overrides.pop("ip", "10.0.0.1"))
    contributor = {"key": key, **({"name": name} if name else {})}
    reply = await node.register(contributor=contributor, **overrides)
    return node, reply


async def test_registered_tells_the_node_its_name_and_why_a_name_was_refused(channel_layer):
    _, reply = await keyed_node(name="ada", node_id="node-ada")
    assert reply["contributor"] == {"name": "ada"}
    _, reply = await keyed_node(OTHER_KEY, name="Ada", node_id="node-other", ip="10.0.0.2")
    assert reply["contributor"]["name"] != "Ada"
    assert reply["contributor"]["note"].startswith("name not changed: Ada is another")
    anonymous = ScriptedNode(ip="10.0.0.3")
    assert "contributor" not in await anonymous.register(node_id="node-anon")


async def test_a_malformed_contributor_object_closes_with_invalid_contributor(channel_layer):
    node = ScriptedNode()
    await node.open()
    await node.send(register_frame(contributor={"key": "not hex"}))
    assert await node.closed() == (1008, "invalid contributor")
    assert not await sync_to_async(NodeSession.objects.exists)()


async def test_the_admin_lists_records_and_operators_edit_them(channel_layer):
    await keyed_node(name="ada", node_id="node-ada")
    await keyed_node(name="ada", node_id="node-ada-2", ip="10.0.0.2")
    record = await sync_to_async(Contributor.objects.get)()
    await sync_to_async(ContributorModel.objects.create)(
        contributor=record, model="llama3.2:3b", served=3, tokens=99, ttft_ms=120.0
    )
    viewer = await staff_client("viewer")
    page = await viewer.get(CONTRIBUTORS)
    assert page.status_code == 200
    text = page.content.decode()
    assert "ada" in text and KEY not in text and record.key_hash not in text
    assert '<td class="field-live_nodes">2</td>' in text
    assert (await viewer.get(CONTRIBUTORS + "?q=ad")).status_code == 200
    detail = await viewer.get(f"{CONTRIBUTORS}{record.pk}/change/")
    assert detail.status_code == 200
    assert "llama3.2:3b" in detail.content.decode()  # the per-model row
    assert record.token_hash not in detail.content.decode()
    refused = await viewer.post(
        f"{CONTRIBUTORS}{record.pk}/change/", {"name": "x", "reputation": "0.1", "notes": ""}
    )
    assert refused.status_code == 403

    nodes = (await viewer.get(NODES)).content.decode()
    assert "ada" in nodes

    operator = await staff_client("operator")
    form = {
        "name": "ada-lovelace",
        "reputation": "0.2",
        "notes": "answers checked by hand",
        "models-TOTAL_FORMS": "1",
        "models-INITIAL_FORMS": "1",
        "models-MIN_NUM_FORMS": "0",
        "models-MAX_NUM_FORMS": "1000",
    }
    model_row = await sync_to_async(ContributorModel.objects.get)()
    form["models-0-id"] = str(model_row.pk)
    form["models-0-contributor"] = str(record.pk)
    saved = await operator.post(f"{CONTRIBUTORS}{record.pk}/change/", form)
    assert saved.status_code == 302, saved.content.decode()[:3000]
    record = await sync_to_async(Contributor.objects.get)()
    assert (record.name, record.reputation, record.notes) == (
        "ada-lovelace",
        0.2,
        "answers checked by hand",
    )
    # The live nodes are routed by the new reputation at once.
    reputations = await sync_to_async(
        lambda: sorted(NodeSession.objects.values_list("reputation", flat=True))
    )()
    assert reputations == [0.2, 0.2]

    await keyed_node(OTHER_KEY, node_id="node-other", ip="10.0.0.3")
    for bad, says in (
        ({"name": "ADA-LOVELACE"}, "Another contributor has this name."),
        ({"name": "has space"}, "A name is ASCII letters"),
        ({"name": "anonymous"}, "what nodes without a key are called"),
        ({"reputation": "1.5"}, "Reputation is from 0 to 1."),
    ):
        other = await sync_to_async(Contributor.objects.exclude(pk=record.pk).get)()
        page = await operator.post(
            f"{CONTRIBUTORS}{other.pk}/change/",
            {"name": other.name, "reputation": "0.5", "notes": "", **bad,
             "models-TOTAL_FORMS": "0", "models-INITIAL_FORMS": "0"},
        )  # fmt: skip
        assert page.status_code == 200 and says in page.content.decode(), bad


async def test_an_operators_reputation_edit_is_not_undone_by_the_next_probe_round(channel_layer):
    # Red team F7: the edit kept the old probed_at, so the next round decayed the operator's
    # value toward neutral as if it were a day old.
    await keyed_node(name="ada", node_id="node-ada")
    day_ago = timezone.now() - timedelta(hours=24)
    await sync_to_async(Contributor.objects.update)(reputation=0.9, probed_at=day_ago)
    record = await sync_to_async(Contributor.objects.get)()
    operator = await staff_client("operator")
    saved = await operator.post(
        f"{CONTRIBUTORS}{record.pk}/change/",
        {"name": "ada", "reputation": "0.1", "notes": "caught lying by hand",
         "models-TOTAL_FORMS": "0", "models-INITIAL_FORMS": "0"},
    )  # fmt: skip
    assert saved.status_code == 302, saved.content.decode()[:2000]
    session = await sync_to_async(NodeSession.objects.get)()
    # A round that probes the node without a verdict (alone with its model) only decays it.
    await sync_to_async(probe_results_record)(tallies={session.pk: Tally()})
    record = await sync_to_async(Contributor.objects.get)()
    assert record.reputation == pytest.approx(0.1, abs=0.01)
    assert record.notes == "caught lying by hand"
    assert await sync_to_async(lambda: NodeSession.objects.get().reputation)() == pytest.approx(
        0.1, abs=0.01
    )


async def test_the_public_list_shows_names_bands_and_counts_never_ids_or_addresses(
    channel_layer,
):
    await keyed_node(name="ada", node_id="secret-node-id-1", ip="198.51.100.7")
    anonymous = ScriptedNode(ip="198.51.100.8")
    await anonymous.register(node_id="secret-node-id-2")
    await sync_to_async(Contributor.objects.update)(served=25, reputation=0.8)
    await sync_to_async(ContributorModel.objects.create)(
        contributor=await sync_to_async(Contributor.objects.get)(),
        model="llama3.2:3b", served=25, tokens=500, ttft_ms=123.456, tokens_per_s=42.04,
    )  # fmt: skip
    status, headers, body = await get("/api/network/nodes")
    assert status == 200
    text = body.decode()
    for secret in ("secret-node-id", "198.51.100", KEY, "10.3.0.1"):
        assert secret not in text
    listing = json.loads(body)
    assert listing["count"] == 2 and listing["limit"] == selectors.MAX_LISTED_NODES
    ada, anon = listing["nodes"]  # those that served most first
    assert ada == {
        "contributor": "ada",
        "models": [{"name": "llama3.2:3b", "ttft_ms": 123.5, "tokens_per_s": 42.0}],
        "reputation": "good",
        "served": 25,
        "draining": False,
    }
    assert anon["contributor"] == "anonymous" and anon["reputation"] == "new"
    assert anon["models"] == [{"name": "llama3.2:3b", "ttft_ms": None, "tokens_per_s": None}]


def test_reputation_bands():
    assert selectors.reputation_band(0.5, 0) == "new"
    assert selectors.reputation_band(0.9, 9) == "new"
    assert selectors.reputation_band(0.39, 0) == "poor"
    assert selectors.reputation_band(0.39, 1000) == "poor"
    assert selectors.reputation_band(0.5, 10) == "fair"
    assert selectors.reputation_band(0.2, 0) == "excluded"  # below IDLECLAW_REPUTATION_FLOOR
    assert selectors.reputation_band(0.2, 1000) == "excluded"
    assert selectors.reputation_band(0.6, 10) == "good"


async def test_the_public_list_is_capped(channel_layer, settings, monkeypatch):
    monkeypatch.setattr(selectors, "MAX_LISTED_NODES", 2)
    for number in range(3):
        node = ScriptedNode(ip=f"10.0.1.{number}")
        await node.register(node_id=f"n{number}")
    status, _, body = await get("/api/network/nodes")
    listing = json.loads(body)
    assert status == 200 and listing["count"] == 3 and len(listing["nodes"]) == 2


async def test_the_public_list_has_the_default_rate(channel_layer, settings):
    settings.IDLECLAW_RATE_DEFAULT = "2/h"
    statuses = [(await get("/api/network/nodes"))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
