"""Node selection and slot claiming against the real database."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from nodes.models import NodeModel, NodeSession, RouterWorker
from routing.models import InflightRequest, QueuedRequest
from routing.services import Claim, NoSlot, inflight_claim, inflight_finish

pytestmark = pytest.mark.django_db


@pytest.fixture
def router_worker() -> RouterWorker:
    now = timezone.now()
    return RouterWorker.objects.create(worker_id="w1", started_at=now, last_seen=now)


def make_node(
    worker: RouterWorker, name: str, *, models=("llama3.2:3b",), max_concurrent=2, **fields
) -> NodeSession:
    now = timezone.now()
    session = NodeSession.objects.create(
        node_id=name,
        channel_name=f"chan.{name}",
        worker=worker,
        max_concurrent=max_concurrent,
        connected_at=now,
        last_seen=now,
        **fields,
    )
    for model in models:
        NodeModel.objects.create(session=session, name=model, size=1)
    return session


def claim(model="llama3.2:3b", **kwargs):
    """A claim's node, or None when no slot was taken."""
    result = inflight_claim(
        model=model,
        request_id=uuid.uuid4().hex,
        reply_channel="reply",
        worker_id="w1",
        arrived_at=timezone.now(),
        **kwargs,
    )
    return result if isinstance(result, Claim) else None


def test_claim_takes_a_slot_on_a_node_serving_the_model(router_worker):
    make_node(router_worker, "other", models=("qwen3:0.6b",))
    make_node(router_worker, "serving")
    result = claim()
    assert result.node_id == "serving"
    assert result.node_channel == "chan.serving"
    assert InflightRequest.objects.get(request_id=result.request_id).session.node_id == "serving"


def test_claims_never_exceed_max_concurrent(router_worker):
    make_node(router_worker, "small", max_concurrent=2)
    assert claim() and claim()
    assert claim() is None
    assert InflightRequest.objects.count() == 2


def test_finishing_a_request_frees_its_slot(router_worker):
    make_node(router_worker, "one", max_concurrent=1)
    first = claim()
    assert claim() is None
    inflight_finish(request_id=first.request_id)
    assert claim() is not None


def test_least_busy_node_is_chosen(router_worker):
    busy = make_node(router_worker, "busy", max_concurrent=4)
    make_node(router_worker, "idle", max_concurrent=4)
    for i in range(2):
        InflightRequest.objects.create(
            request_id=f"x{i}",
            session=busy,
            worker=router_worker,
            model="llama3.2:3b",
            reply_channel="r",
            created_at=timezone.now(),
        )
    assert claim().node_id == "idle"
    assert claim().node_id == "idle"
    # Both now carry 2 of 4: the next two go one to each.
    assert {claim().node_id, claim().node_id} == {"busy", "idle"}


def test_load_is_a_ratio_of_max_concurrent(router_worker):
    big = make_node(router_worker, "big", max_concurrent=10)
    make_node(router_worker, "tiny", max_concurrent=1)
    InflightRequest.objects.create(
        request_id="b1",
        session=big,
        worker=router_worker,
        model="llama3.2:3b",
        reply_channel="r",
        created_at=timezone.now(),
    )
    # tiny is idle (0/1) and big is 1/10: tiny first, then big takes the rest.
    assert claim().node_id == "tiny"
    assert claim().node_id == "big"


def test_stale_draining_and_dead_worker_nodes_are_not_chosen(router_worker):
    old = timezone.now() - timedelta(seconds=120)
    stale = make_node(router_worker, "stale")
    NodeSession.objects.filter(pk=stale.pk).update(last_seen=old)
    make_node(router_worker, "draining", draining=True)
    dead = RouterWorker.objects.create(worker_id="w-dead", started_at=old, last_seen=old)
    make_node(dead, "on-dead-worker")
    assert claim() is None
    make_node(router_worker, "fresh")
    assert claim().node_id == "fresh"


def test_no_node_for_an_unknown_model(router_worker):
    make_node(router_worker, "n")
    assert claim(model="nonexistent:1b") is None


def test_a_claim_needing_a_feature_takes_only_nodes_that_declared_it(router_worker):
    # Hand-written SQL reads the JSON list: text on SQLite, jsonb on PostgreSQL.
    make_node(router_worker, "plain", max_concurrent=4)
    make_node(router_worker, "other-feature", max_concurrent=4, features=["embeddingsx"])
    make_node(router_worker, "embedder", max_concurrent=1, features=["embeddings"])
    assert claim(feature="embeddings").node_id == "embedder"
    # Its one slot is taken: the model is served with the feature, but busy.
    assert inflight_claim(model="llama3.2:3b", request_id="e2", reply_channel="r",
                          worker_id="w1", arrived_at=timezone.now(),
                          feature="embeddings") == NoSlot(served=True)
    assert inflight_claim(model="qwen3:0.6b", request_id="e3", reply_channel="r",
                          worker_id="w1", arrived_at=timezone.now(),
                          feature="embeddings") == NoSlot(served=False)
    assert {claim().node_id for _ in range(3)} <= {"plain", "other-feature"}


def test_a_model_served_only_without_the_feature_is_not_served_for_it(router_worker):
    make_node(router_worker, "plain")
    result = inflight_claim(model="llama3.2:3b", request_id="e1", reply_channel="r",
                            worker_id="w1", arrived_at=timezone.now(), feature="embeddings")
    assert result == NoSlot(served=False)


def test_rows_left_by_a_response_that_never_started_are_reaped(router_worker, settings):
    from routing.models import ConsumerStream
    from routing.services import consumer_stream_open, stale_requests_reap

    node = make_node(router_worker, "n", max_concurrent=1)
    claimed = claim()
    consumer_stream_open(request_id="stream-1", client_ip="10.0.0.1", worker_id="w1")
    assert claim() is None  # the only slot is held
    assert stale_requests_reap(worker_id="w1") == []  # young rows are left alone
    long_ago = timezone.now() - timedelta(hours=1)
    InflightRequest.objects.update(created_at=long_ago)
    ConsumerStream.objects.update(started_at=long_ago)
    [leftover] = stale_requests_reap(worker_id="w1")
    assert leftover.request_id == claimed.request_id
    assert leftover.node_channel == node.channel_name
    assert ConsumerStream.objects.count() == 0
    assert claim() is not None  # the slot serves again


def finish(claimed, kind, *, ttft_ms=None, tokens_per_s=None):
    from routing.services import Outcome

    return inflight_finish(
        request_id=claimed.request_id,
        outcome=Outcome(kind=kind, ttft_ms=ttft_ms, tokens_per_s=tokens_per_s),
    )


def test_outcomes_become_moving_averages_and_counts(router_worker):
    node = make_node(router_worker, "n")
    finish(claim(), "completed", ttft_ms=100.0, tokens_per_s=20.0)
    node.refresh_from_db()
    assert (node.ttft_ms, node.tokens_per_s, node.completed) == (100.0, 20.0, 1)
    # Later measurements move the averages by 0.3 of the difference; a missing one keeps it.
    finish(claim(), "completed", ttft_ms=200.0, tokens_per_s=None)
    node.refresh_from_db()
    assert node.ttft_ms == pytest.approx(130.0)
    assert node.tokens_per_s == pytest.approx(20.0)
    finish(claim(), "timed_out")
    finish(claim(), "failed")
    finish(claim(), "cancelled")  # the consumer's doing: not counted against the node
    node.refresh_from_db()
    assert (node.completed, node.timed_out, node.failed) == (2, 1, 1)
    assert node.consecutive_failures == 2
    assert node.cooldown_until is None


def test_three_failures_in_a_row_cool_a_node_down_until_it_succeeds(router_worker, settings):
    settings.IDLECLAW_NODE_COOLDOWN = 60
    node = make_node(router_worker, "flaky", max_concurrent=1)
    for _ in range(3):
        finish(claim(), "failed")
    node.refresh_from_db()
    assert node.consecutive_failures == 3
    assert node.cooldown_until > timezone.now() + timedelta(seconds=50)
    assert claim() is None  # skipped while cooling down
    NodeSession.objects.filter(pk=node.pk).update(cooldown_until=timezone.now())
    trial = claim()  # the cooldown is over: one trial request
    assert trial is not None
    finish(trial, "completed", ttft_ms=5.0)
    node.refresh_from_db()
    assert (node.consecutive_failures, node.cooldown_until) == (0, None)


def test_finishing_twice_frees_one_slot_and_records_once(router_worker):
    node = make_node(router_worker, "n")
    claimed = claim()
    finish(claimed, "completed")
    assert finish(claimed, "completed") == []
    node.refresh_from_db()
    assert node.completed == 1


def test_queue_heads_are_the_oldest_waiting_request_of_each_model(router_worker):
    from routing.models import QueuedRequest
    from routing.services import queue_heads

    node = make_node(router_worker, "n", models=("a:1b", "b:1b"))
    start = timezone.now()
    for rid, model in [("a2", "a:1b"), ("a1", "a:1b"), ("b1", "b:1b"), ("c1", "c:1b")]:
        arrived = start + timedelta(seconds=1 if rid == "a2" else 0)
        QueuedRequest.objects.create(
            request_id=rid,
            model=model,
            worker=router_worker,
            reply_channel=f"reply.{rid}",
            arrived_at=arrived,
        )
    assert sorted(queue_heads(session_id=node.pk)) == ["reply.a1", "reply.b1"]
    assert queue_heads(models=["c:1b"]) == ["reply.c1"]
    assert queue_heads(models=[]) == []
    # A claim is refused while an older request for the model waits.
    assert claim(model="a:1b") is None
    assert claim(model="a:1b", queued_as="a1", turn=0) is not None
    assert not QueuedRequest.objects.filter(request_id="a1").exists()


def test_an_address_has_a_bounded_number_of_open_requests(router_worker, settings):
    from routing.services import consumer_stream_open

    settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP = 2
    opened = [
        consumer_stream_open(request_id=f"s{i}", client_ip="10.0.0.9", worker_id="w1")
        for i in range(3)
    ]
    assert opened == [True, True, False]
    assert consumer_stream_open(request_id="other", client_ip="10.0.0.10", worker_id="w1")
    assert consumer_stream_open(request_id="unknown", client_ip=None, worker_id="w1")


def test_a_pool_larger_than_the_selection_window_still_finds_its_one_free_node(router_worker):
    from routing.services import WINDOW

    nodes = [make_node(router_worker, f"n{i}", max_concurrent=1) for i in range(3 * WINDOW)]
    free = nodes[len(nodes) // 2]
    for node in nodes:
        if node is not free:
            InflightRequest.objects.create(
                request_id=f"busy-{node.pk}",
                session=node,
                worker=router_worker,
                model="llama3.2:3b",
                reply_channel="r",
                created_at=timezone.now(),
            )
    for _ in range(5):  # wherever the window starts
        claimed = claim()
        assert claimed.node_id == free.node_id
        inflight_finish(request_id=claimed.request_id)


def test_a_large_pool_spreads_requests_evenly(router_worker):
    from collections import Counter

    from routing.services import WINDOW

    size = 4 * WINDOW
    for i in range(size):
        make_node(router_worker, f"n{i}", max_concurrent=10)
    per_node = Counter(claim().node_id for _ in range(size))
    # Selection compares a random sample of the free nodes, not all of them: as many requests
    # as nodes leave almost every node with one, and none with more than two.
    assert max(per_node.values()) <= 2
    assert len(per_node) >= 0.75 * size


def _loaded(session: NodeSession, *, until: timedelta, model: str = "llama3.2:3b") -> None:
    NodeModel.objects.filter(session=session, name=model).update(
        loaded_until=timezone.now() + until, size_vram=1
    )


def test_among_equally_loaded_nodes_the_one_with_the_model_loaded_is_chosen(router_worker):
    make_node(router_worker, "cold-1")
    _loaded(make_node(router_worker, "warm"), until=timedelta(minutes=5))
    make_node(router_worker, "cold-2")
    for _ in range(6):  # the tie between equally loaded nodes is broken at random otherwise
        claimed = claim()
        assert claimed.node_id == "warm"
        inflight_finish(request_id=claimed.request_id)


def test_a_loaded_model_does_not_outweigh_a_lighter_load(router_worker):
    warm = make_node(router_worker, "warm", max_concurrent=2)
    _loaded(warm, until=timedelta(minutes=5))
    make_node(router_worker, "cold", max_concurrent=2)
    assert claim().node_id == "warm"
    # warm now carries 1 of 2, cold none: cold takes the next one, then both are even again.
    assert claim().node_id == "cold"
    assert claim().node_id == "warm"


def test_an_expired_load_or_the_switched_off_preference_counts_as_not_loaded(
    router_worker, settings
):
    from collections import Counter

    _loaded(make_node(router_worker, "expired"), until=timedelta(seconds=-1))
    make_node(router_worker, "other")
    _loaded(
        make_node(router_worker, "warm", models=("qwen3:0.6b",)),
        until=timedelta(minutes=5),
        model="qwen3:0.6b",
    )
    make_node(router_worker, "cold", models=("qwen3:0.6b",))
    settings.IDLECLAW_PREFER_LOADED_NODES = False
    chosen: Counter[str] = Counter()
    for _ in range(24):
        for model in ("llama3.2:3b", "qwen3:0.6b"):
            claimed = claim(model=model)
            chosen[claimed.node_id] += 1
            inflight_finish(request_id=claimed.request_id)
    # Ties go either way at random: each node is chosen about half the time.
    assert min(chosen.values()) >= 3 and set(chosen) == {"expired", "other", "warm", "cold"}


# --- caps a node set in register.limits (docs/node-protocol-extensions.md) -------------------


def demand(num_ctx=0, num_predict=0):
    from routing.services import Demand

    return Demand(num_ctx=num_ctx, num_predict=num_predict)


def refusal(**kwargs):
    result = inflight_claim(
        model="llama3.2:3b",
        request_id=uuid.uuid4().hex,
        reply_channel="reply",
        worker_id="w1",
        arrived_at=timezone.now(),
        **kwargs,
    )
    assert not isinstance(result, Claim), result
    return result


def test_a_request_goes_only_to_nodes_whose_caps_take_it(router_worker):
    make_node(router_worker, "small", max_ctx=2048, max_predict=128, max_concurrent=10)
    make_node(router_worker, "open")  # no caps: takes anything
    # "small" is idle and the lighter loaded, but its caps are lower than asked.
    assert claim(demand=demand(num_ctx=4096)).node_id == "open"
    assert claim(demand=demand(num_ctx=4096)).node_id == "open"
    # "open" is full (2 of 2): a request over small's caps waits rather than going there.
    over = refusal(demand=demand(num_ctx=4096))
    assert (over.served, over.over) == (True, None)
    assert claim(demand=demand(num_ctx=2048, num_predict=128)).node_id == "small"
    assert claim().node_id == "small"


def test_a_request_over_every_live_nodes_caps_is_refused_naming_the_largest_cap(router_worker):
    from routing.services import OverLimit

    make_node(router_worker, "a", max_ctx=2048, max_predict=128)
    make_node(router_worker, "b", max_ctx=8192, max_predict=64, draining=True)
    stale = make_node(router_worker, "stale", max_ctx=65536)
    NodeSession.objects.filter(pk=stale.pk).update(last_seen=timezone.now() - timedelta(hours=1))
    # Even while others wait in the model's queue: nothing will ever take it.
    QueuedRequest.objects.create(
        request_id="older",
        model="llama3.2:3b",
        reply_channel="r",
        worker_id="w1",
        arrived_at=timezone.now() - timedelta(seconds=5),
    )
    assert refusal(demand=demand(num_ctx=9000)).over == OverLimit(
        model="llama3.2:3b", option="num_ctx", limit=8192
    )
    assert refusal(demand=demand(num_predict=129)).over == OverLimit(
        model="llama3.2:3b", option="num_predict", limit=128
    )
    # Each fits a node alone, but no node takes both.
    both = refusal(demand=demand(num_ctx=4096, num_predict=100))
    assert both.over == OverLimit(model="llama3.2:3b", option="")
    assert not both.served
    # Within a cap it is no refusal: it waits its turn (b drains, a waits for "older").
    assert refusal(demand=demand(num_ctx=8192)).over is None


def test_a_node_without_caps_or_a_request_without_demand_is_never_over_a_limit(router_worker):
    make_node(router_worker, "capped", max_ctx=2048, max_predict=128, max_concurrent=1)
    assert claim().node_id == "capped"
    assert refusal().over is None  # busy, not over anything
    make_node(router_worker, "open", max_concurrent=1)
    assert claim(demand=demand(num_ctx=10**6, num_predict=10**6)).node_id == "open"


def test_demand_is_read_from_positive_number_options_only():
    from routing.services import MAX_DEMAND, Demand

    assert Demand.of(None) == Demand() and not Demand()
    assert Demand.of({"num_ctx": 4096.2, "num_predict": -1}) == Demand(num_ctx=4097)
    assert Demand.of({"num_predict": True, "num_ctx": "8192"}) == Demand()
    assert Demand.of({"num_ctx": 1e300}).num_ctx == MAX_DEMAND


def test_a_node_below_the_reputation_floor_gets_no_consumer_request(router_worker, settings):
    settings.IDLECLAW_REPUTATION_FLOOR = 0.25
    make_node(router_worker, "distrusted", reputation=0.2)
    make_node(router_worker, "trusted", reputation=0.25)
    assert {claim().node_id for _ in range(2)} == {"trusted"}
    assert claim() is None


def test_a_model_served_only_below_the_floor_counts_as_not_served(router_worker, settings):
    settings.IDLECLAW_REPUTATION_FLOOR = 0.25
    make_node(router_worker, "distrusted", reputation=0.1)
    result = inflight_claim(
        model="llama3.2:3b",
        request_id=uuid.uuid4().hex,
        reply_channel="reply",
        worker_id="w1",
        arrived_at=timezone.now(),
    )
    assert result == NoSlot(served=False)


def test_a_pinned_claim_takes_that_session_only_whatever_its_reputation(router_worker):
    distrusted = make_node(router_worker, "distrusted", reputation=0.0, max_concurrent=1)
    make_node(router_worker, "free")
    assert claim(session=distrusted.pk).node_id == "distrusted"
    # No free slot there: no other node will do.
    assert claim(session=distrusted.pk) is None
    assert InflightRequest.objects.filter(session__node_id="free").count() == 0


def test_a_pinned_claim_does_not_overtake_waiting_consumers(router_worker):
    node = make_node(router_worker, "node")
    QueuedRequest.objects.create(
        request_id="waiting", model="llama3.2:3b", reply_channel="r", worker_id="w1",
        arrived_at=timezone.now() - timedelta(seconds=1),
    )
    assert claim(session=node.pk) is None
