"""/metrics and the admin's overview count what really happened (issue 17): known traffic
through the real ASGI application, scraped and parsed with ``prometheus_client``'s parser."""

from __future__ import annotations

import hmac
import time

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.test import AsyncClient

from routing import metrics, overview
from routing.models import RequestCount
from tests.ops import TOKEN, get, sample, samples
from tests.routing.test_relay import answer, chat
from tests.routing.test_views import HttpClient, sse_events
from tests.scripted_node import ScriptedNode

pytestmark = [pytest.mark.django_db(transaction=True)]

MODEL = "llama3.2:3b"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def scrape() -> dict:
    status, headers, body = await get("/metrics", BEARER)
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(body.decode())


async def test_metrics_and_the_overview_count_known_traffic(channel_layer, settings):
    settings.IDLECLAW_METRICS_TOKEN = TOKEN
    node = ScriptedNode()
    await node.register(max_concurrent=2)
    for words in (["a", "b", "c"], ["d", "e"]):  # two answers on /api/chat
        consumer = chat()
        await consumer.start()
        await answer(node, await node.recv(), words, eval_count=len(words))
        await consumer.read_all()
    openai = HttpClient("POST", "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
    })  # fmt: skip
    await openai.start()
    cut = (await node.recv())["request_id"]
    await node.chunk(cut, "cut")
    await node.chunk(cut, "", done=True, done_reason="length")  # it reached max_tokens
    await openai.read_all()
    failing = chat()
    await failing.start()
    request = await node.recv()
    await node.chunk(request["request_id"], "half")
    await node.send({"type": "inference_error", "request_id": request["request_id"],
                     "error": "ollama_error"})  # fmt: skip
    assert "[Error:" in str(sse_events(await failing.read_all()))
    unknown = HttpClient("POST", "/api/chat", {
        "model": "nobody-serves-this", "messages": [{"role": "user", "content": "hi"}],
    })  # fmt: skip
    assert (await unknown.start())[0] == 503
    await metrics.flush()  # the node error, counted in memory until the next flush

    found = await scrape()
    requests = {
        dict(labels)["outcome"] + "/" + dict(labels)["api"] + "/" + dict(labels)["model"]: value
        for (name, labels), value in found.items()
        if name == "idleclaw_requests_total"
    }
    assert requests == {
        f"ok/chat/{MODEL}": 2, f"length/openai/{MODEL}": 1, f"error/chat/{MODEL}": 1,
        "refused/chat/(unserved)": 1,
    }  # fmt: skip
    assert sample(found, "idleclaw_tokens_total", model=MODEL) == 3 + 2 + 1 + 1
    assert sample(found, "idleclaw_time_to_first_token_seconds_count", model=MODEL) == 4
    assert sample(found, "idleclaw_time_to_first_token_seconds_bucket", model=MODEL,
                   le="+Inf") == 4  # fmt: skip
    assert sample(found, "idleclaw_request_duration_seconds_count", model=MODEL) == 4
    assert sample(found, "idleclaw_node_errors_total", reason="ollama_error") == 1
    assert sample(found, "idleclaw_nodes_connected") == 1
    assert sample(found, "idleclaw_model_nodes", model=MODEL) == 1
    assert sample(found, "idleclaw_model_free_slots", model=MODEL) == 2
    assert sample(found, "idleclaw_requests_in_flight") == 0
    assert sample(found, "idleclaw_workers_alive") == 1

    superuser = await sync_to_async(User.objects.create_superuser)("root", password="unused")
    admin = AsyncClient()
    await admin.aforce_login(superuser)
    index = await admin.get("/admin/")
    shown = index.context["overview"]
    assert (shown["nodes_online"], shown["workers_alive"], shown["in_flight"]) == (1, 1, 0)
    assert [(m.name, m.nodes, m.free_slots, m.queue) for m in shown["models"]] == [(MODEL, 1, 2, 0)]
    recent = shown["recent"]
    assert (recent.requests, recent.tokens) == (5, 7)
    assert recent.outcomes == {"ok": 2, "length": 1, "error": 1, "refused": 1}
    assert shown["error_rate"] == 20.0
    assert 0 < shown["ttft_p50"] <= metrics.TTFT_BUCKETS[0]  # in-process: well under 0.1 s
    assert shown["requests_per_minute"] == round(5 * 60 / recent.seconds, 1)
    page = index.content.decode()
    assert 'id="overview-errors">20.0 %' in page
    assert "ok 2, length 1, error 1, refused 1" in page


async def test_refusals_by_a_rate_limit_are_counted(channel_layer, settings):
    settings.IDLECLAW_METRICS_TOKEN = TOKEN
    settings.IDLECLAW_RATE_CHAT = "1/m"
    statuses = [(await chat().start())[0] for _ in range(3)]
    assert statuses == [503, 429, 429]  # no node; then the chat rate of the address
    await metrics.flush()
    assert sample(await scrape(), "idleclaw_rate_limited_total", limit="chat") == 2


async def test_metrics_are_404_until_a_token_is_set_and_401_without_it(
    channel_layer, settings, monkeypatch
):
    settings.IDLECLAW_METRICS_TOKEN = ""
    assert (await get("/metrics", BEARER))[0] == 404
    settings.IDLECLAW_METRICS_TOKEN = TOKEN
    status, headers, _ = await get("/metrics")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    for wrong in ("Bearer " + TOKEN[:-1] + "x", "Basic " + TOKEN, TOKEN):
        assert (await get("/metrics", {"Authorization": wrong}))[0] == 401
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(b) or real(a, b))
    assert (await get("/metrics", {"Authorization": "Bearer guess"}))[0] == 401
    assert compared == [TOKEN.encode()]  # the token is compared in constant time
    assert (await get("/metrics", BEARER))[0] == 200


@pytest.mark.django_db
def test_folding_old_minutes_keeps_every_total():
    now = time.time()
    record = metrics.RequestRecord(model=MODEL, api="chat", outcome="ok", tokens=10, ttft=0.3,
                                   duration=2.0)  # fmt: skip
    minute = 60
    for ago in (300, 120, 61, 5, 0):
        for _ in range(2):  # the second adds itself to the first's row
            metrics.request_count(record=record, at=now - ago * minute)
    assert RequestCount.objects.count() == 5
    before = overview.metrics_snapshot()
    assert before.requests == {(MODEL, "chat", "ok"): 10}
    metrics.request_counts_fold(now=now)
    metrics.request_counts_fold(now=now)  # nothing more to fold: the same totals
    after = overview.metrics_snapshot()
    assert after.requests == before.requests
    assert after.tokens == before.tokens == {MODEL: 100}
    assert after.ttft[MODEL].counts == before.ttft[MODEL].counts
    assert after.ttft[MODEL].cumulative()[2] == ("0.5", 10)  # 0.3 s: at or below 0.5 s
    assert after.duration[MODEL].total == pytest.approx(20.0)
    current = metrics.minute_of(now)
    minutes = sorted(RequestCount.objects.values_list("minute", flat=True))
    assert minutes == [0, current - 5, current]
    recent = overview.recent_traffic(now=now)
    assert (recent.requests, recent.tokens) == (4, 40)  # the last 15 minutes only
    assert recent.ttft.quantile(0.5) == pytest.approx(0.25 + 0.25 * 2 / 4)


def test_models_beyond_the_most_requested_share_one_label(settings):
    """Red-team H2 of issue 17: a node and a consumer together named a new model with every
    request, and each became a series of /metrics for good."""
    now = time.time()
    for index in range(overview.MAX_MODEL_SERIES + 20):
        record = metrics.RequestRecord(model=f"m{index:03}", api="chat", outcome="ok", tokens=1,
                                       ttft=0.1, duration=0.2)  # fmt: skip
        for _ in range(2 if index < overview.MAX_MODEL_SERIES else 1):
            metrics.request_count(record=record, at=now)
    snapshot = overview.metrics_snapshot()
    models = {model for model, _, _ in snapshot.requests}
    assert len(models) == overview.MAX_MODEL_SERIES + 1
    assert "m000" in models and "m120" not in models
    assert snapshot.requests[overview.OTHER_MODELS, "chat", "ok"] == 20
    assert sum(snapshot.requests.values()) == 2 * overview.MAX_MODEL_SERIES + 20
    assert set(snapshot.ttft) == models


async def test_a_request_over_every_nodes_caps_is_counted_refused(channel_layer):
    """Red-team M2 of issue 17: the 400 for a request over the nodes' caps counted as ok."""
    node = ScriptedNode()
    await node.register(limits={"num_ctx": 1024})
    client = chat("too long", path="/ollama/api/chat", options={"num_ctx": 4096})
    assert (await client.start())[0] == 400
    await client.read_all()
    assert await node.nothing_sent()
    snapshot = await sync_to_async(overview.metrics_snapshot)()
    assert snapshot.requests == {(MODEL, "ollama", "refused"): 1}
    await node.disconnect()
