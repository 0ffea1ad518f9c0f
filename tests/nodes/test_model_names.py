"""Node model names follow the consumer model-name rule (issue 12, defect 9): what a node
registers is listed to every consumer, so markup, look-alike letters and stray spaces never
get that far."""

from __future__ import annotations

import json

import pytest

from nodes.protocol import CloseReason
from tests.routing.test_views import HttpClient
from tests.scripted_node import ScriptedNode, register_frame

pytestmark = [pytest.mark.django_db(transaction=True)]

BAD_NAMES = [
    "<img src=x onerror=alert(1)>",
    "ll\u0430ma3.2:3b",  # a Cyrillic а
    "llama3.2:3b ",
    " llama3.2:3b",
    "llama3.2:3b\n",
    "../../etc/passwd",
    "m" * 65,
    "",
    "\u202ellama",
]


async def listed_names() -> dict[str, list[str]]:
    names = {}
    for path, pick in (
        ("/api/models", lambda body: body["models"]),
        ("/v1/models", lambda body: [m["id"] for m in body["data"]]),
        ("/ollama/api/tags", lambda body: [m["name"] for m in body["models"]]),
    ):
        client = HttpClient("GET", path)
        status, _ = await client.start()
        assert status == 200
        names[path] = sorted(pick(json.loads(await client.read_all())))
    return names


async def test_invalid_model_names_are_dropped_with_a_warning_and_never_listed(channel_layer):
    node = ScriptedNode()
    models = [{"name": name, "size": 1} for name in BAD_NAMES] + [{"name": "llama3.2:3b"}]
    reply = await node.register(models=models[-20:])
    warnings = reply["warnings"]
    assert len(warnings) == len(BAD_NAMES)
    assert all("dropped" in warning for warning in warnings)
    assert await listed_names() == {path: ["llama3.2:3b"] for path in
                                    ("/api/models", "/v1/models", "/ollama/api/tags")}
    await node.disconnect()


async def test_a_clean_registration_has_no_warnings(channel_layer):
    node = ScriptedNode()
    reply = await node.register(models=[{"name": "qwen3:0.6b"}, {"name": "org/model-v1.5_q4"}])
    assert "warnings" not in reply
    assert (await listed_names())["/api/models"] == ["org/model-v1.5_q4", "qwen3:0.6b"]
    await node.disconnect()


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_a_registration_left_without_a_model_is_refused(channel_layer, name):
    node = ScriptedNode()
    await node.open()
    await node.send(register_frame(models=[{"name": name}]))
    assert await node.closed() == (1008, CloseReason.INVALID_MODEL_NAME)
    await node.disconnect()


async def test_models_update_drops_invalid_names_too(channel_layer, monkeypatch):
    from nodes import consumers

    # Two updates in a row here; a node may send one a second.
    monkeypatch.setattr(consumers, "MODELS_UPDATE_MIN_INTERVAL_S", 0.0)
    node = ScriptedNode()
    await node.register()
    await node.send({"type": "models_update",
                     "models": [{"name": "qwen3:0.6b"}, {"name": "<b>bold</b>"}]})
    assert await node.nothing_sent(0.2)
    assert (await listed_names())["/api/models"] == ["qwen3:0.6b"]
    await node.send({"type": "models_update", "models": [{"name": "<b>bold</b>"}]})
    assert await node.closed() == (1008, CloseReason.INVALID_MODEL_NAME)
    await node.disconnect()
