"""Fair queues and priority (issue 20) against the real database: turns, the order heads and
positions follow, who a token names, and limits per consumer. The end-to-end behaviour, through
daphne and a real node, is in tests/e2e/test_fairness.py."""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest
from django.utils import timezone

from nodes.models import Contributor, ContributorHour, RouterWorker
from routing import identity
from routing.identity import UnknownToken, consumer_resolve, token_hash
from routing.models import ConsumerKey, InflightRequest, QueuedRequest
from routing.selectors import queue_position
from routing.services import (
    Claim,
    Demand,
    Joined,
    consumer_stream_open,
    inflight_claim,
    queue_heads,
    queue_join,
)
from tests.routing.test_services import make_node

pytestmark = pytest.mark.django_db

MODEL = "llama3.2:3b"


@pytest.fixture
def router_worker() -> RouterWorker:
    now = timezone.now()
    return RouterWorker.objects.create(worker_id="w1", started_at=now, last_seen=now)


def claim(queued_as: str | None = None, **kwargs) -> Claim | None:
    """A claim as a relay makes it: a queued request with its own place's arrival and turn."""
    arrived_at = timezone.now()
    if queued_as is not None:
        arrived_at = QueuedRequest.objects.get(request_id=queued_as).arrived_at
    result = inflight_claim(
        model=MODEL,
        request_id=secrets.token_hex(8),
        reply_channel="reply",
        worker_id="w1",
        arrived_at=arrived_at,
        queued_as=queued_as,
        **kwargs,
    )
    return result if isinstance(result, Claim) else None


def joined(request_id: str, consumer: str, priority: int = 0, **kwargs) -> Joined | None:
    return queue_join(
        request_id=request_id,
        model=MODEL,
        reply_channel=f"reply.{request_id}",
        worker_id="w1",
        arrived_at=timezone.now(),
        consumer=consumer,
        priority=priority,
        **kwargs,
    )


def join(request_id: str, consumer: str, priority: int = 0, **kwargs) -> int | None:
    """The turn the request got, or None when the queue was full."""
    place = joined(request_id, consumer, priority, **kwargs)
    return None if place is None else place.turn


def order() -> list[str]:
    return list(QueuedRequest.objects.filter(model=MODEL).values_list("request_id", flat=True))


def test_a_consumer_with_many_waiting_requests_delays_another_by_one_turn(router_worker):
    turns = [join(f"x{i}", "ip:10.0.0.1") for i in range(8)]
    assert turns == list(range(8))
    assert join("y0", "ip:10.0.0.2") == 0
    assert order() == ["x0", "y0", "x1", "x2", "x3", "x4", "x5", "x6", "x7"]
    assert queue_heads(models=[MODEL]) == ["reply.x0"]
    assert [queue_position(request_id=rid) for rid in ("x0", "y0", "x1", "x7")] == [1, 2, 3, 9]


def test_a_late_consumer_joins_the_round_being_served_not_the_first(router_worker):
    make_node(router_worker, "three", max_concurrent=3)
    for i in range(6):
        join(f"x{i}", "ip:10.0.0.1")
    for i in range(3):  # served: rounds 0 to 2
        assert claim(queued_as=f"x{i}", turn=i) is not None
    assert join("y0", "ip:10.0.0.2") == 2
    assert join("y1", "ip:10.0.0.2") == 3
    assert order() == ["y0", "x3", "y1", "x4", "x5"]


def test_a_request_that_failed_over_goes_back_to_the_front_of_its_consumers_line(router_worker):
    for i in range(3):
        join(f"x{i}", "ip:10.0.0.1")
    assert join("x-retry", "ip:10.0.0.1", resume=True) == 0


def test_higher_priority_is_served_first_within_the_round(router_worker):
    make_node(router_worker, "one", max_concurrent=1)
    join("anon0", "ip:10.0.0.1")
    join("anon1", "ip:10.0.0.2")
    assert join("giver", "contributor:1", priority=2) == 0
    assert order()[0] == "giver"
    assert queue_position(request_id="anon0") == 2
    assert queue_heads(models=[MODEL]) == ["reply.giver"]
    # A request not yet queued waits behind them all, whatever its priority: it joins the
    # queue, and then claims as its head.
    assert claim() is None
    assert claim(priority=3) is None
    assert claim(queued_as="anon0", turn=0) is None
    assert claim(queued_as="giver", turn=0, priority=2) is not None


def test_priority_is_a_larger_share_of_each_round_not_a_wait_without_end(router_worker):
    """Red-team M1 of issue 20: a contributor of priority 2 flooding the queue gets three
    requests a round; the anonymous consumer still gets one a round."""
    turns = [join(f"c{i}", "contributor:1", priority=2) for i in range(7)]
    assert turns == [0, 0, 0, 1, 1, 1, 2]
    assert [join(f"a{i}", "ip:10.0.0.1") for i in range(3)] == [0, 1, 2]
    assert order() == ["c0", "c1", "c2", "a0", "c3", "c4", "c5", "a1", "c6", "a2"]
    assert queue_position(request_id="a1") == 8


def serve_head(session_id: int) -> str:
    """Finish the node's one request, and let the queue's head (in fair order) claim the slot,
    as a woken relay does; the request id served."""
    InflightRequest.objects.filter(session_id=session_id).delete()
    head = QueuedRequest.objects.filter(model=MODEL).first()
    assert claim(queued_as=head.request_id, turn=head.turn, priority=head.priority) is not None
    return head.request_id


def test_a_priority_consumer_always_waiting_still_gets_only_its_share_of_each_round(
    router_worker,
):
    """Red team 3 of issue 20: a contributor of priority 1 with one request answering and one
    waiting at all times used to join the round being served again and again, ahead of an
    anonymous request, which then waited for ever."""
    node = make_node(router_worker, "one", max_concurrent=1)
    assert claim() is not None  # someone's request answering
    join("p0", "contributor:1", priority=1)
    join("b", "ip:10.0.0.2")
    served = []
    for i in range(1, 6):
        join(f"p{i}", "contributor:1", priority=1)  # P keeps one more waiting
        served.append(serve_head(node.pk))
        if "b" in served:
            break
    assert served.index("b") <= 2, served  # after at most 1 + 1 of P's


def test_a_request_pinned_at_an_old_turn_does_not_let_newcomers_jump_the_round(router_worker):
    """Red team 3 of issue 20: a request no free node fits may wait at an old turn; newcomers
    join the round being served, not that old one."""
    small = make_node(router_worker, "small", max_concurrent=1, max_ctx=4096)
    make_node(router_worker, "big", max_concurrent=1, max_ctx=65536)
    assert claim(demand=Demand(num_ctx=32768)) is not None  # the big node is busy
    for i in range(3):
        join(f"x{i}", "ip:10.0.0.1")
    join("pin", "ip:10.0.0.9", demand=Demand(num_ctx=32768))
    assert claim(queued_as="x0", turn=0) is not None
    InflightRequest.objects.filter(session=small).delete()
    assert claim(queued_as="x1", turn=1) is not None  # round 1 now
    # Y's requests, one at a time, take the rounds' turns from 1 on, not the pin's 0.
    assert join("y0", "ip:10.0.0.2") == 1
    InflightRequest.objects.filter(session=small).delete()
    assert claim(queued_as="x2", turn=2) is None  # y0 goes first in round 1
    assert claim(queued_as="y0", turn=1) is not None
    InflightRequest.objects.filter(session=small).delete()
    assert join("y1", "ip:10.0.0.2") == 2
    assert order() == ["pin", "x2", "y1"]


def test_a_request_holds_back_no_node_that_already_failed_it(router_worker):
    """Red team 3 of issue 20: a request that failed over on node N and waits for another
    leaves N to the requests behind it."""
    failed = make_node(router_worker, "failed", max_concurrent=1)
    busy = make_node(router_worker, "busy", max_concurrent=1)
    assert claim(exclude={failed.pk}) is not None  # takes the busy node's slot
    joined("r", "ip:10.0.0.1", resume=True, tried={failed.pk})
    joined("s", "ip:10.0.0.2")
    assert queue_heads(session_id=failed.pk) == ["reply.s"]
    assert queue_heads(session_id=busy.pk) == ["reply.r"]
    assert claim(queued_as="s", turn=0) is not None


def test_a_full_queue_takes_a_newcomer_in_place_of_the_largest_consumers_last(
    router_worker, settings
):
    """Red-team M1 of issue 20: one consumer filling the queue cannot keep others out."""
    settings.IDLECLAW_MAX_QUEUE = 4
    for i in range(4):
        assert joined(f"x{i}", "ip:10.0.0.1") is not None
    assert joined("x4", "ip:10.0.0.1") is None  # full, and X holds the most
    assert joined("y0", "ip:10.0.0.2") == Joined(turn=0, pushed_out="reply.x3")
    assert joined("z0", "ip:10.0.0.3").pushed_out == "reply.x2"
    assert joined("w0", "ip:10.0.0.4").pushed_out == "reply.x1"
    assert order() == ["x0", "y0", "z0", "w0"]
    # One place each: a fifth consumer waits for one to free.
    assert joined("v0", "ip:10.0.0.5") is None
    assert joined("y1", "ip:10.0.0.2") is None


def test_a_waiting_request_no_free_node_takes_does_not_hold_back_others(router_worker):
    """Red-team M2 of issue 20: the head wants a larger context than the free node allows, or
    an extension it lacks; the requests behind it may still use that node."""
    small = make_node(router_worker, "small", max_concurrent=1, max_ctx=4096)
    joined("big", "ip:10.0.0.1", demand=Demand(num_ctx=32768))
    joined("embed", "ip:10.0.0.2", feature="embed")
    joined("chat", "ip:10.0.0.3")
    assert queue_heads(models=[MODEL]) == ["reply.big"]
    assert queue_heads(session_id=small.pk) == ["reply.chat"]
    assert claim(queued_as="chat", turn=0) is not None
    # A node that takes the big one is held for it.
    make_node(router_worker, "large", max_concurrent=1, max_ctx=65536, features=["embed"])
    assert claim() is None
    assert claim(queued_as="embed", turn=0, feature="embed") is None
    assert claim(queued_as="big", turn=0, demand=Demand(num_ctx=32768)) is not None
    assert claim(queued_as="embed", turn=0, feature="embed") is None  # every slot is taken


def test_only_the_head_in_fair_order_may_claim(router_worker):
    make_node(router_worker, "one", max_concurrent=1)
    join("x0", "ip:10.0.0.1")
    join("x1", "ip:10.0.0.1")
    join("y0", "ip:10.0.0.2")
    assert claim(queued_as="x1", turn=1) is None
    assert claim(queued_as="y0", turn=0) is None  # x0 arrived first in turn 0
    assert claim(queued_as="x0", turn=0) is not None


def test_open_requests_are_counted_per_consumer_against_its_own_limit(router_worker):
    opened = [
        consumer_stream_open(
            request_id=f"k{i}", client_ip="10.0.0.9", worker_id="w1", consumer="key:1", limit=3
        )
        for i in range(4)
    ]
    assert opened == [True, True, True, False]
    # The same address without the key is another consumer.
    assert consumer_stream_open(request_id="anon", client_ip="10.0.0.9", worker_id="w1")


# --- who a token names ----------------------------------------------------------------------


def contributor(tokens_by_hours_ago: dict[int, int]) -> tuple[Contributor, str]:
    token = "icc_" + secrets.token_hex(32)
    now = timezone.now()
    person = Contributor.objects.create(
        key_hash=secrets.token_hex(32),
        token_hash=token_hash(token),
        name=f"brave-otter-{secrets.randbelow(1000)}",
        first_seen=now,
        last_seen=now,
    )
    hour = now.replace(minute=0, second=0, microsecond=0)
    for ago, tokens in tokens_by_hours_ago.items():
        ContributorHour.objects.create(
            contributor=person, hour=hour - timedelta(hours=ago), tokens=tokens
        )
    return person, token


def test_a_contributors_priority_grows_with_tokens_served_in_the_last_day(settings):
    settings.IDLECLAW_PRIORITY_TOKENS = 1000
    settings.IDLECLAW_PRIORITY_MAX = 10
    settings.IDLECLAW_RATE_CHAT = "20/m"
    settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP = 3
    person, token = contributor({0: 2500, 5: 1600, 30: 90_000})  # 30 h ago: too old
    found = consumer_resolve(token=token, client_ip="10.0.0.1")
    assert found.id == f"contributor:{person.pk}"
    assert found.priority == 4  # 4,100 tokens // 1,000
    assert (found.rate, found.max_concurrent) == ("60/m", 9)  # times 1 + 4/2


def test_priority_is_capped_and_any_recent_tokens_earn_at_least_one(settings):
    settings.IDLECLAW_PRIORITY_TOKENS = 1000
    settings.IDLECLAW_PRIORITY_MAX = 5
    _, rich = contributor({1: 10**9})
    _, modest = contributor({2: 3})
    assert consumer_resolve(token=rich, client_ip=None).priority == 5
    assert consumer_resolve(token=modest, client_ip=None).priority == 1


def test_a_contributor_with_no_recent_tokens_is_known_by_its_address(settings):
    """Red-team H2 of issue 20: keys cost nothing, so a token alone must not make one address
    many consumers with limits and turns of their own."""
    settings.IDLECLAW_RATE_CHAT = "20/m"
    settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP = 3
    _, token = contributor({25: 50_000})
    found = consumer_resolve(token=token, client_ip="10.0.0.7")
    assert found == identity.anonymous("10.0.0.7")
    assert (found.id, found.priority, found.rate, found.max_concurrent) == (
        "ip:10.0.0.7",
        0,
        "20/m",
        3,
    )


def test_a_contributor_below_the_reputation_floor_earns_no_priority(settings):
    settings.IDLECLAW_REPUTATION_FLOOR = 0.25
    person, token = contributor({1: 50_000})
    assert consumer_resolve(token=token, client_ip="10.0.0.7").priority > 0
    Contributor.objects.filter(pk=person.pk).update(reputation=0.1)
    assert consumer_resolve(token=token, client_ip="10.0.0.7").id == "ip:10.0.0.7"


def consumer_key(**fields) -> tuple[ConsumerKey, str]:
    key, prefix, hashed = identity.new_consumer_key()
    return ConsumerKey.objects.create(name="lab", prefix=prefix, key_hash=hashed, **fields), key


def test_a_consumer_key_has_its_own_limits_and_priority(settings):
    settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP = 3
    row, key = consumer_key(rate_per_minute=7, priority=2)
    found = consumer_resolve(token=key, client_ip="10.0.0.1")
    assert (found.id, found.rate, found.max_concurrent, found.priority) == (
        f"key:{row.pk}",
        "7/m",
        3,
        2,
    )


def test_a_revoked_or_unknown_token_names_nobody():
    row, key = consumer_key(active=False)
    for token in (key, "ick_" + "0" * 48, "icc_" + "0" * 64, "ick_short", "icc_NOTHEX"):
        with pytest.raises(UnknownToken):
            consumer_resolve(token=token, client_ip=None)


def test_a_keys_last_use_is_written_at_most_once_a_minute():
    row, key = consumer_key()
    consumer_resolve(token=key, client_ip=None)
    row.refresh_from_db()
    first = row.last_used_at
    assert first is not None
    consumer_resolve(token=key, client_ip=None)
    row.refresh_from_db()
    assert row.last_used_at == first
    ConsumerKey.objects.filter(pk=row.pk).update(last_used_at=first - timedelta(minutes=2))
    consumer_resolve(token=key, client_ip=None)
    row.refresh_from_db()
    assert row.last_used_at > first - timedelta(minutes=2)


def test_accounts_of_rounds_already_over_are_pruned(router_worker):
    from routing.models import QueueAccount, QueueRound
    from routing.services import stale_requests_reap

    make_node(router_worker, "three", max_concurrent=4)
    join("x0", "ip:10.0.0.1")
    join("z0", "ip:10.0.0.3")
    join("z1", "ip:10.0.0.3")
    join("w0", "ip:10.0.0.4")
    join("w1", "ip:10.0.0.4")
    for request_id, turn in (("x0", 0), ("z0", 0), ("w0", 0), ("z1", 1)):
        assert claim(queued_as=request_id, turn=turn) is not None
    assert QueueAccount.objects.count() == 3
    stale_requests_reap(worker_id="w1")
    accounts = sorted(QueueAccount.objects.values_list("consumer", "turn"))
    assert accounts == [("ip:10.0.0.3", 1), ("ip:10.0.0.4", 1)]
    # X's next request joins the round being served, as anyone's would.
    assert join("x1", "ip:10.0.0.1") == 1
    # A model whose queue is empty starts afresh: no rounds, no accounts.
    InflightRequest.objects.all().delete()
    for request_id, turn in (("w1", 1), ("x1", 1)):
        assert claim(queued_as=request_id, turn=turn) is not None
    stale_requests_reap(worker_id="w1")
    assert not QueueAccount.objects.exists() and not QueueRound.objects.exists()
    assert join("z2", "ip:10.0.0.3") == 0


def test_a_claim_far_ahead_moves_the_round_one_step_and_pumped_accounts_count_as_used(
    router_worker,
):
    """Red team 4 of issue 20: a consumer that joins and leaves again and again pushes its
    account far ahead; one claim of it on a node nobody waiting fits used to carry the round
    there, and every newcomer behind every backlog."""
    from routing.models import QueueRound

    small = make_node(router_worker, "small", max_concurrent=1, max_ctx=4096)
    make_node(router_worker, "big", max_concurrent=1, max_ctx=65536)
    assert claim(demand=Demand(num_ctx=32768)) is not None  # the big node is busy
    for i in range(6):
        join(f"w{i}", "ip:10.0.0.1", demand=Demand(num_ctx=32768))
    for i in range(40):  # join and hang up, 40 times
        join(f"p{i}", "ip:10.0.0.6")
        QueuedRequest.objects.filter(request_id=f"p{i}").delete()
    turn = join("pumped", "ip:10.0.0.6")
    assert turn <= 6  # no further ahead than the rounds anyone's waiting requests explain
    assert claim(queued_as="pumped", turn=turn) is not None  # the small node: nobody fits it
    assert QueueRound.objects.get(model=MODEL).turn == 1
    InflightRequest.objects.filter(session=small).delete()
    # A newcomer needing the big node waits behind W's first two, not all six.
    join("y", "ip:10.0.0.2", demand=Demand(num_ctx=32768))
    assert order().index("y") <= 2, order()


def test_a_request_pushed_out_while_it_claims_gives_the_slot_back(router_worker, settings):
    settings.IDLECLAW_MAX_QUEUE = 2
    make_node(router_worker, "one", max_concurrent=1, max_ctx=4096)
    join("x0", "ip:10.0.0.1")
    join("x1", "ip:10.0.0.1")
    # Y's request needs a node larger than this one: x1 would be the node's next.
    assert joined("y0", "ip:10.0.0.2", demand=Demand(num_ctx=32768)).pushed_out == "reply.x1"
    QueuedRequest.objects.filter(request_id="x0").delete()  # answered meanwhile elsewhere
    # x1's relay has not read its message yet and claims under its old place: refused.
    result = inflight_claim(
        model=MODEL,
        request_id="x1-claim",
        reply_channel="reply.x1",
        worker_id="w1",
        arrived_at=timezone.now(),
        queued_as="x1",
        turn=1,
    )
    assert not isinstance(result, Claim)
    assert not InflightRequest.objects.exists()
    assert claim() is not None  # the slot is free for whoever comes next
