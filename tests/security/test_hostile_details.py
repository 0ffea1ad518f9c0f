"""Hostile model details and loaded-model reports (issue 19, docs/node-protocol-extensions.md):
whatever a node says about its models is dropped or bounded, never an error, never shown
unchecked, and never about another node's models. Each hostile act happens while an honest
node streams an answer, which must arrive complete and unaltered."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async

from nodes import worker
from nodes.models import NodeModel
from tests.routing.test_views import HttpClient
from tests.scripted_node import ScriptedNode
from tests.security.hostile import EVIL_MODEL, MODEL, HonestStream, honest_node, hostile_node

pytestmark = [pytest.mark.django_db(transaction=True)]

# What a shown detail may look like: a short word of a plain charset.
SAFE_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")
HOSTILE_DETAILS = {
    "format": "<img src=x onerror=alert(1)>",
    "family": "llama\u202e",
    "families": ["ok", {"nested": ["deep"] * 50}, "x" * 33, *(["spam"] * 500)],
    "parameter_size": "3B" * 100,
    "quantization_level": None,
    "parent_model": "../../etc/passwd",
    "license": "a" * 2_000,
}


def soon() -> str:
    return (datetime.now(UTC) + timedelta(minutes=5)).isoformat()


async def get_json(path: str, body: dict | None = None) -> dict:
    client = HttpClient("POST" if body is not None else "GET", path, body)
    status, _ = await client.start()
    assert status == 200, path
    return json.loads(await client.read_all())


@sync_to_async
def loaded_until(node_id: str, model: str) -> datetime | None:
    return NodeModel.objects.get(session__node_id=node_id, name=model).loaded_until


def shown_words(details: dict) -> list[str]:
    words = [
        details[key]
        for key in ("format", "family", "parameter_size", "quantization_level")
        if details.get(key)
    ]
    return words + list(details.get("families", []))


CONTEXT_LENGTHS = [1e308, 2**63, "131072", True, -5, [131072]]
HOSTILE_REPORTS = [
    [{"name": MODEL, "expires_at": "2030-01-01T00:00:00Z", "size_vram": 1}],  # not its own
    [{"name": EVIL_MODEL, "expires_at": "9999-12-31T23:59:59-14:00"}],  # overflows in UTC
    [{"name": EVIL_MODEL, "expires_at": "2030-01-01T00:00:00Z", "size_vram": 2**64}],
    [{"name": EVIL_MODEL, "expires_at": "x" * 10_000}],
    [{"name": [EVIL_MODEL], "expires_at": {"$gt": ""}}] * 1_000,
    [{"name": EVIL_MODEL, "expires_at": "2030-01-01T00:00:00Z"}] * 1_000,
    "all of them",
    {"name": EVIL_MODEL},
]


async def test_hostile_details_are_dropped_and_the_rest_is_shown_checked(channel_layer):
    honest = await honest_node()
    stream = await HonestStream.begin(honest)
    hostile = ScriptedNode(ip="10.66.0.1")
    names = [f"evil{i}:1b" for i in range(len(CONTEXT_LENGTHS))]
    await hostile.register(
        node_id="hostile-node",
        models=[
            {"name": name, "size": 1, "details": HOSTILE_DETAILS, "context_length": length}
            for name, length in zip(names, CONTEXT_LENGTHS, strict=True)
        ],
    )
    assert await hostile.nothing_sent(0.1)  # registered and kept, not closed

    tags = {m["name"]: m for m in (await get_json("/ollama/api/tags"))["models"]}
    listed = {m["id"]: m for m in (await get_json("/v1/models"))["data"]}
    for name in names:
        shown = await get_json("/ollama/api/show", {"model": name})
        for details in (tags[name]["details"], shown["details"]):
            assert details["families"] == ["ok", "spam"]  # the plain words of the first four
            assert details["parent_model"] == "" and "license" not in details
            assert all(SAFE_WORD.fullmatch(word) for word in shown_words(details))
        assert shown["model_info"] == {}  # no architecture known, so no numbers under its name
        assert listed[name]["details"] == {"families": ["ok", "spam"]}
        assert "context_length" not in listed[name]

    await stream.finish()
    await hostile.disconnect()
    await honest.disconnect()


async def test_hostile_loaded_reports_touch_nothing_but_the_senders_own_models(channel_layer):
    honest = await honest_node()
    stream = await HonestStream.begin(honest)
    hostile = await hostile_node()

    for loaded in HOSTILE_REPORTS:
        await hostile.send(
            {
                "type": "heartbeat",
                "node_id": "honest-node",
                "active_requests": 0,
                "available": True,
                "loaded": loaded,
            }
        )
        assert await hostile.nothing_sent(0.02)
        await worker.flush_loaded_models()

        assert await loaded_until("honest-node", MODEL) is None
        running = (await get_json("/ollama/api/ps"))["models"]
        # The honest node's model shows as loaded only because it is generating right now.
        assert {m["name"] for m in running} <= {MODEL, EVIL_MODEL}
        for model in running:
            assert model["size_vram"] <= 2**53
            assert datetime.fromisoformat(model["expires_at"]).year < 3000
        evil = await loaded_until("hostile-node", EVIL_MODEL)
        assert evil is None or evil.year == 2030

    await stream.finish()
    await hostile.disconnect()
    await honest.disconnect()
