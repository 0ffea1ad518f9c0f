"""Model details at registration and loaded models with heartbeats (issue 19,
docs/node-protocol-extensions.md), through the real ASGI application and out of the
compatible APIs."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async

from nodes import consumers, worker
from nodes.models import NodeModel
from nodes.protocol import LoadedModel, loaded_changed, parse_details, parse_loaded
from tests.routing.test_views import HttpClient
from tests.scripted_node import ScriptedNode

pytestmark = [pytest.mark.django_db(transaction=True)]

MODEL = "llama3.2:3b"
DETAILS = {
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "3.2B",
    "quantization_level": "Q4_K_M",
    "parent_model": "",
}


def in_minutes(minutes: float) -> str:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()


async def get_json(path: str, body: dict | None = None) -> dict:
    client = HttpClient("POST" if body is not None else "GET", path, body)
    status, _ = await client.start()
    assert status == 200, path
    return json.loads(await client.read_all())


async def registered(node_id: str, ip: str, models: list[dict]) -> ScriptedNode:
    node = ScriptedNode(ip=ip)
    reply = await node.register(node_id=node_id, models=models)
    assert "loaded_models" in reply["features"]
    return node


async def heartbeat(node: ScriptedNode, loaded: object) -> None:
    await node.send(
        {
            "type": "heartbeat",
            "node_id": "x",
            "active_requests": 0,
            "available": True,
            "loaded": loaded,
        }
    )
    assert await node.nothing_sent(0.05)  # the router answers a heartbeat with nothing
    await worker.flush_loaded_models()


@sync_to_async
def loaded_rows() -> dict[tuple[str, str], tuple[datetime | None, int]]:
    return {
        (node_id, name): (until, vram)
        for node_id, name, until, vram in NodeModel.objects.values_list(
            "session__node_id", "name", "loaded_until", "size_vram"
        )
    }


def test_details_keep_known_keys_with_short_plain_words_only():
    details = parse_details(
        {
            **DETAILS,
            "family": "<script>",
            "format": "g" * 33,
            "families": ["llama", "llama", "clip", 5, "a b", "x", "y", "z"],
            "parameter_size": ["3B"],
            "license": "MIT",
        },
        131072,
    )
    assert details == {
        "quantization_level": "Q4_K_M",
        "families": ["llama", "clip"],
        "context_length": 131072,
    }
    assert parse_details("gguf", 2**40) == {}
    assert parse_details({}, True) == {} and parse_details(None, -1) == {}


def test_loaded_reports_are_bounded_and_read_as_utc():
    now = datetime.now(UTC)
    report = parse_loaded(
        [
            {"name": MODEL, "expires_at": "2030-01-01T10:00:00.123456789+02:00", "size_vram": 7},
            {"name": MODEL, "expires_at": "2030-01-01T07:00:00Z"},  # the later expiry wins
            {"name": "old:1b", "expires_at": "2001-01-01T00:00:00Z"},  # expired: not loaded
            {"name": "forever:1b", "expires_at": "2318-03-30T10:00:00Z"},
            {"name": "far:1b", "expires_at": "9999-12-31T23:59:59-14:00"},
            {"name": "naive:1b", "expires_at": "2030-01-01T00:00:00"},
            {"name": "<b>x</b>", "expires_at": in_minutes(5)},
            {"name": "n:1b", "expires_at": 1893456000},
            "junk",
        ]
        + [{"name": f"m{i}:1b", "expires_at": in_minutes(5)} for i in range(40)],
        now,
    )
    by_name = {model.name: model for model in report}
    assert by_name[MODEL] == LoadedModel(
        name=MODEL, expires_at=datetime(2030, 1, 1, 8, 0, 0, 123456, tzinfo=UTC), size_vram=7
    )
    assert by_name["forever:1b"].expires_at.year == 2318
    assert not {"old:1b", "far:1b", "naive:1b", "<b>x</b>", "n:1b"} & set(by_name)
    assert len(report) <= 20  # only the first MAX_MODELS entries are looked at
    assert parse_loaded(None, now) is None and parse_loaded({"a": 1}, now) is None
    assert parse_loaded([], now) == ()


def test_an_expiry_moving_less_than_the_slack_is_no_change():
    at = datetime(2030, 1, 1, tzinfo=UTC)
    known = {MODEL: LoadedModel(MODEL, at, 5)}
    assert not loaded_changed(known, (LoadedModel(MODEL, at + timedelta(seconds=20), 5),), slack=30)
    assert loaded_changed(known, (LoadedModel(MODEL, at + timedelta(seconds=40), 5),), slack=30)
    assert loaded_changed(known, (LoadedModel(MODEL, at, 6),), slack=30)
    assert loaded_changed(known, (), slack=30)
    assert loaded_changed({}, (LoadedModel(MODEL, at, 5),), slack=30)


async def test_details_and_loaded_models_reach_tags_show_ps_and_v1_models(
    channel_layer, monkeypatch
):
    # Each node's reports follow each other here faster than the router writes them down.
    monkeypatch.setattr(consumers, "LOADED_MIN_INTERVAL_S", 0.0)
    first = await registered(
        "first",
        "10.0.0.1",
        [
            {"name": MODEL, "size": 2019393189, "details": DETAILS, "context_length": 131072},
            {"name": "qwen3:0.6b", "size": 5},
        ],
    )
    # A second node disagrees about the details; one node's word loses to two.
    second = await registered(
        "second",
        "10.0.0.2",
        [{"name": MODEL, "size": 1, "details": {**DETAILS, "quantization_level": "Q8_0"}}],
    )
    third = await registered(
        "third",
        "10.0.0.3",
        [{"name": MODEL, "size": 1, "details": DETAILS, "context_length": 131072}],
    )

    assert (await get_json("/ollama/api/ps"))["models"] == []
    soon, later = in_minutes(4), in_minutes(9)
    await heartbeat(
        first,
        [{"name": MODEL, "size": 3_000_000_000, "size_vram": 2_500_000_000, "expires_at": soon}],
    )
    await heartbeat(second, [{"name": MODEL, "size_vram": 1_000, "expires_at": later}])

    tags = {m["name"]: m for m in (await get_json("/ollama/api/tags"))["models"]}
    assert tags[MODEL]["details"] == {**DETAILS}
    assert tags["qwen3:0.6b"]["details"]["family"] == "qwen"  # guessed: nobody said
    shown = await get_json("/ollama/api/show", {"model": MODEL})
    assert shown["details"]["quantization_level"] == "Q4_K_M"
    assert shown["model_info"] == {"general.architecture": "llama", "llama.context_length": 131072}
    [running] = (await get_json("/ollama/api/ps"))["models"]
    assert running["name"] == running["model"] == MODEL
    assert running["size_vram"] == 2_500_000_000 and running["size"] == 2_500_000_000
    assert datetime.fromisoformat(running["expires_at"]) == datetime.fromisoformat(later)
    assert running["context_length"] == 131072 and running["details"] == DETAILS
    listed = {m["id"]: m for m in (await get_json("/v1/models"))["data"]}
    assert listed[MODEL]["context_length"] == 131072
    assert listed[MODEL]["details"]["parameter_size"] == "3.2B"

    # Unloaded everywhere (an empty report); a heartbeat without the field says nothing.
    await heartbeat(first, [])
    await heartbeat(second, [])
    await heartbeat(third, None)
    assert (await get_json("/ollama/api/ps"))["models"] == []
    for node in (first, second, third):
        await node.disconnect()


async def test_a_node_changing_its_report_with_every_heartbeat_is_written_once_an_interval(
    channel_layer, monkeypatch
):
    """Red-team M1 of issue 19: a node flipping its report with each heartbeat cost the
    database a write per heartbeat and model."""
    monkeypatch.setattr(consumers, "LOADED_MIN_INTERVAL_S", 0.5)
    node = await registered("flapper", "10.0.0.1", [{"name": MODEL}, {"name": "qwen3:0.6b"}])
    await heartbeat(node, [{"name": MODEL, "expires_at": in_minutes(5)}])  # written at once
    for report in ([], [{"name": "qwen3:0.6b", "expires_at": in_minutes(5)}], []):
        await heartbeat(node, report)  # within the interval: held back
        assert (await loaded_rows())[("flapper", MODEL)][0] is not None
    # When the interval is over, the node's latest word is written, without another heartbeat.
    await asyncio.sleep(0.6)
    await worker.flush_loaded_models()
    rows = await loaded_rows()
    assert rows[("flapper", MODEL)] == rows[("flapper", "qwen3:0.6b")] == (None, 0)
    await node.disconnect()


async def test_a_node_cannot_report_loaded_models_it_does_not_serve(channel_layer):
    honest = await registered("honest", "10.0.0.1", [{"name": MODEL}])
    hostile = await registered("hostile", "10.66.0.1", [{"name": "evil:1b"}])
    await heartbeat(
        hostile,
        [
            {"name": MODEL, "expires_at": in_minutes(5)},
            {"name": "evil:1b", "expires_at": in_minutes(5)},
        ],
    )
    rows = await loaded_rows()
    assert rows[("honest", MODEL)] == (None, 0)
    assert rows[("hostile", "evil:1b")][0] is not None
    assert [m["name"] for m in (await get_json("/ollama/api/ps"))["models"]] == ["evil:1b"]
    for node in (honest, hostile):
        await node.disconnect()


async def test_loaded_state_survives_a_models_update_for_the_models_still_served(channel_layer):
    node = await registered("n", "10.0.0.1", [{"name": MODEL}, {"name": "qwen3:0.6b"}])
    await heartbeat(node, [{"name": MODEL, "size_vram": 9, "expires_at": in_minutes(5)}])
    await node.send(
        {"type": "models_update", "models": [{"name": MODEL, "details": {"family": "llama"}}]}
    )
    assert await node.nothing_sent(0.2)
    rows = await loaded_rows()
    assert list(rows) == [("n", MODEL)]
    assert rows[("n", MODEL)][1] == 9
    assert (await get_json("/ollama/api/tags"))["models"][0]["details"]["family"] == "llama"
    await node.disconnect()
