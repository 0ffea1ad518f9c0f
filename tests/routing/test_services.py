"""Node selection and slot claiming against the real database."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from nodes.models import NodeModel, NodeSession, RouterWorker
from routing.models import InflightRequest
from routing.services import Claim, inflight_claim, inflight_finish

pytestmark = pytest.mark.django_db


@pytest.fixture
def router_worker() -> RouterWorker:
    now = timezone.now()
    return RouterWorker.objects.create(worker_id="w1", started_at=now, last_seen=now)


def make_node(worker: RouterWorker, name: str, *, models=("llama3.2:3b",), max_concurrent=2,
              **fields) -> NodeSession:
    now = timezone.now()
    session = NodeSession.objects.create(
        node_id=name, channel_name=f"chan.{name}", worker=worker,
        max_concurrent=max_concurrent, connected_at=now, last_seen=now, **fields,
    )
    for model in models:
        NodeModel.objects.create(session=session, name=model, size=1)
    return session


def claim(model="llama3.2:3b", **kwargs):
    """A claim's node, or None when no slot was taken."""
    result = inflight_claim(model=model, request_id=uuid.uuid4().hex, reply_channel="reply",
                            worker_id="w1", arrived_at=timezone.now(), **kwargs)
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
        InflightRequest.objects.create(request_id=f"x{i}", session=busy, worker=router_worker,
                                       model="llama3.2:3b", reply_channel="r",
                                       created_at=timezone.now())
    assert claim().node_id == "idle"
    assert claim().node_id == "idle"
    # Both now carry 2 of 4: the next two go one to each.
    assert {claim().node_id, claim().node_id} == {"busy", "idle"}


def test_load_is_a_ratio_of_max_concurrent(router_worker):
    big = make_node(router_worker, "big", max_concurrent=10)
    make_node(router_worker, "tiny", max_concurrent=1)
    InflightRequest.objects.create(request_id="b1", session=big, worker=router_worker,
                                   model="llama3.2:3b", reply_channel="r",
                                   created_at=timezone.now())
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
