"""A probe on the router's side (routing/probes.py) against a queue: through the real ASGI
application, a scripted node and the router's own ``probe_send``."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from asgiref.sync import sync_to_async

from nodes.models import NodeSession
from nodes.probes import text_probe
from routing import probes
from routing.openai_api import parse_completion_request
from tests.routing.test_views import MESSAGES, HttpClient
from tests.scripted_node import ScriptedNode

pytestmark = [pytest.mark.django_db(transaction=True)]

MODEL = "llama3.2:3b"


def probe_params() -> dict:
    body = text_probe(MODEL, random.Random(7))
    return parse_completion_request(json.dumps(body).encode()).ollama_params


async def test_a_queue_for_the_model_does_not_shield_a_node_from_a_probe(channel_layer):
    # Red team F4: consumers kept waiting for the model made every probe "busy". The probe now
    # takes the node's next free slot, ahead of the queued consumer.
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    session = await sync_to_async(lambda: NodeSession.objects.get().pk)()
    busy = HttpClient("POST", "/ollama/api/chat", {"model": MODEL, "messages": MESSAGES})
    await busy.start()
    busy_id = (await node.recv())["request_id"]
    waiting = HttpClient("POST", "/ollama/api/chat", {"model": MODEL, "messages": MESSAGES})
    await waiting.app.send_input({"type": "http.request", "body": waiting.body})
    assert await node.nothing_sent()  # the consumer waits in the queue

    params = probe_params()
    probe = asyncio.create_task(
        probes.probe_send(session_id=session, model=MODEL, ollama_params=params)
    )
    assert await node.nothing_sent()  # the probe waits for the slot too
    await node.chunk(busy_id, "done", done=True, done_reason="stop")

    # The slot that freed goes to the probe, not to the consumer queued before it.
    frame = await node.recv()
    assert frame["ollama_params"]["messages"][-1] == params["messages"][-1]
    assert await node.nothing_sent()
    await node.chunk(frame["request_id"], "an answer", done=True, done_reason="stop")
    answer = await asyncio.wait_for(probe, 5)
    assert (answer.status, answer.content) == (probes.ANSWERED, "an answer")

    # Then the consumer is served as before.
    served = await node.recv()
    assert served["ollama_params"]["messages"] == MESSAGES
    await node.chunk(served["request_id"], "ok", done=True, done_reason="stop")
    assert (await waiting.app.receive_output(5))["status"] == 200
    await node.disconnect()


async def test_a_probe_that_gets_no_slot_in_time_gives_up_as_busy(channel_layer, monkeypatch):
    monkeypatch.setattr(probes, "SLOT_WAIT", 0.5)
    node = ScriptedNode()
    await node.register(max_concurrent=1)
    session = await sync_to_async(lambda: NodeSession.objects.get().pk)()
    busy = HttpClient("POST", "/ollama/api/chat", {"model": MODEL, "messages": MESSAGES})
    await busy.start()
    busy_id = (await node.recv())["request_id"]
    answer = await probes.probe_send(session_id=session, model=MODEL, ollama_params=probe_params())
    assert answer.status == probes.BUSY
    # Its place was given back: once the consumer's request ends, the next one is served.
    await node.chunk(busy_id, "done", done=True, done_reason="stop")
    after = HttpClient("POST", "/ollama/api/chat", {"model": MODEL, "messages": MESSAGES})
    await after.app.send_input({"type": "http.request", "body": after.body})
    assert (await node.recv())["type"] == "inference_request"
    await node.disconnect()
