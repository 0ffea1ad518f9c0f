"""Contributor identity (issue 20) on the router: the ``contributor`` object of ``register`` as
hostile nodes send it, the records registration makes and finds (by the key's hash only), the
figures each finished request adds, and pruning old records."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import IntegrityError, transaction
from django.utils import timezone

from nodes import identity, services
from nodes.models import Contributor, ContributorHour, ContributorModel, NodeSession, RouterWorker
from nodes.protocol import CloseReason, ProtocolError, parse_register
from nodes.services import node_session_close, node_session_open
from routing.services import Claim, Outcome, inflight_claim, inflight_finish
from tests.scripted_node import register_frame

KEY = "0123456789abcdef" * 4
OTHER_KEY = "fedcba9876543210" * 4


def test_a_register_without_contributor_is_anonymous():
    registration = parse_register(register_frame())
    assert registration.contributor_key is None
    assert registration.contributor_name is None


@pytest.mark.parametrize(
    "contributor",
    [
        "0123456789abcdef" * 4,  # the key alone, not an object
        [KEY],
        {},
        {"key": None},
        {"key": 12345},
        {"key": ["0123456789abcdef"] * 4},
        {"key": KEY[:-1]},  # 63 characters
        {"key": KEY + "0"},  # 65
        {"key": KEY.upper()},  # the definition is lowercase hex
        {"key": "g" * 64},
        {"key": " " + KEY[1:]},
        {"key": KEY[:-1] + "\n"},
        {"key": "é" * 64},
        {"key": "a" * 100_000},
        {"name": "amber-otter-417"},
        True,
        0,
    ],
)
def test_a_malformed_contributor_object_refuses_the_registration(contributor):
    with pytest.raises(ProtocolError) as refused:
        parse_register(register_frame(contributor=contributor))
    assert refused.value.reason == CloseReason.INVALID_CONTRIBUTOR == "invalid contributor"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * 65,
        "has space",
        "<b>bold</b>",
        "-leading-dash",
        "dots..dots",
        "аmber-otter",  # a Cyrillic а
        "anonymous",
        "Anonymous",
        42,
        ["amber"],
        {"name": "amber"},
        "a" * 100_000,
        # Red-team F9 of issue 20: nothing that reads as a model, a path, an address, a node
        # id or the network's own.
        "ada:latest",
        "ada/lovelace",
        "10.0.0.1",
        "127.1",
        "2130706433",
        "9e51bf4b-f26e-4328-a904-66f019b56d29",
        "9e51bf4bf26e4328a90466f019b56d29",
        "Admin",
        "admin-team",
        "IdleClaw",
        "idleclaw.official",
        "OPERATOR_1",
        "root",
        "System-Bot",
        "anonymous-2",
    ],
)
def test_a_bad_name_keeps_the_key_and_says_why(name):
    registration = parse_register(register_frame(contributor={"key": KEY, "name": name}))
    assert registration.contributor_key == KEY
    assert registration.contributor_name is None
    assert registration.name_problem.startswith("name not changed: ")


def test_the_key_never_shows_in_a_registration_printed():
    registration = parse_register(register_frame(contributor={"key": KEY, "name": "ok-name"}))
    assert KEY not in repr(registration)


def test_a_good_contributor_object_is_taken_and_extra_fields_ignored():
    registration = parse_register(
        register_frame(contributor={"key": KEY, "name": "Ada.Lovelace_1", "extra": [1] * 50})
    )
    assert (registration.contributor_key, registration.contributor_name) == (KEY, "Ada.Lovelace_1")
    assert registration.name_problem is None


def test_key_hash_and_token_follow_the_documented_definition():
    """What ``register`` carries is the node's router key (a per-router HMAC of the contributor
    key, red-team F6 of issue 20); to the router it is the key, hashed and turned into the
    token as documented."""
    assert identity.key_hash(KEY) == hashlib.sha256(KEY.encode("ascii")).hexdigest()
    expected = (
        "icc_"
        + hmac.new(bytes.fromhex(KEY), b"idleclaw consumer token", hashlib.sha256).hexdigest()
    )
    assert identity.token_of(KEY) == expected
    assert identity.token_hash(expected) == hashlib.sha256(expected.encode()).hexdigest()


def test_generated_names_are_adjective_animal_number_and_valid():
    for _ in range(200):
        name = identity.generated_name()
        adjective, animal, number = name.split("-")
        assert adjective in identity.ADJECTIVES and animal in identity.ANIMALS
        assert 100 <= int(number) <= 999
        assert identity.name_problem(name) is None
    # Every one the generator can make, under the stricter rule of red-team F9 of issue 20.
    for adjective in identity.ADJECTIVES:
        for animal in identity.ANIMALS:
            for number in ("100", "999"):
                assert identity.name_problem(f"{adjective}-{animal}-{number}") is None


@pytest.mark.parametrize("name", ["ada", "Ada.Lovelace_1", "r2-d2", "1st-place", "roo", "sys"])
def test_ordinary_names_are_taken(name):
    assert identity.name_problem(name) is None


# --- Records, against the real database ------------------------------------------------------


@pytest.fixture
def router_worker(db) -> RouterWorker:
    now = timezone.now()
    return RouterWorker.objects.create(worker_id="w1", started_at=now, last_seen=now)


def open_node(*, key=None, name=None, node_id=None, ip=None, resume_token=None):
    extra = {}
    if key is not None:
        extra["contributor"] = {"key": key, **({"name": name} if name is not None else {})}
    if resume_token is not None:
        extra["resume_token"] = resume_token
    registration = parse_register(register_frame(node_id, **extra))
    return node_session_open(
        registration=registration,
        channel_name=f"chan.{uuid.uuid4().hex}",
        # Each its own address unless said: the per-address cap is not under test.
        client_ip=ip or f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.1",
        worker_id="w1",
    )


def test_a_first_registration_makes_a_record_with_a_generated_name_and_only_hashes(router_worker):
    opened = open_node(key=KEY)
    record = Contributor.objects.get()
    assert opened.contributor_name == record.name
    assert identity.name_problem(record.name) is None and record.name.count("-") == 2
    assert record.key_hash == identity.key_hash(KEY)
    assert record.token_hash == identity.token_hash(identity.token_of(KEY))
    stored = [str(value) for value in Contributor.objects.values_list().get()]
    assert not any(KEY in value or identity.token_of(KEY) in value for value in stored)
    assert NodeSession.objects.get(pk=opened.session_id).contributor == record


def test_the_same_key_finds_its_record_from_several_nodes_and_addresses(router_worker):
    first = open_node(key=KEY, ip="10.0.0.1")
    second = open_node(key=KEY, ip="192.0.2.7")
    assert Contributor.objects.count() == 1
    assert first.contributor_name == second.contributor_name
    sessions = NodeSession.objects.filter(contributor__isnull=False)
    assert sessions.count() == 2


def test_anonymous_nodes_have_no_record(router_worker):
    opened = open_node()
    assert opened.contributor_name is None
    assert Contributor.objects.count() == 0
    assert NodeSession.objects.get(pk=opened.session_id).contributor is None


def test_the_session_copies_the_records_reputation(router_worker):
    open_node(key=KEY)
    Contributor.objects.update(reputation=0.9)
    opened = open_node(key=KEY)
    assert NodeSession.objects.get(pk=opened.session_id).reputation == 0.9


def test_a_name_is_set_and_changed_and_a_taken_one_refused(router_worker):
    assert open_node(key=KEY, name="ada").contributor_name == "ada"
    assert open_node(key=KEY, name="grace").contributor_name == "grace"
    taken = open_node(key=OTHER_KEY, name="GRACE")  # case does not make another name
    assert taken.contributor_name != "GRACE" and taken.contributor_name != "grace"
    assert "grace" in taken.contributor_note.lower() and "another" in taken.contributor_note
    renamed = open_node(key=OTHER_KEY, name="grace")
    assert renamed.contributor_name == taken.contributor_name
    assert "you stay" in renamed.contributor_note
    names = set(Contributor.objects.values_list("name", flat=True))
    assert names == {"grace", taken.contributor_name}


def test_the_database_refuses_a_name_that_differs_only_in_case(router_worker):
    """Red-team F9 of issue 20: uniqueness without case is the database's own, so two
    registrations that both passed the check cannot both have the name."""
    open_node(key=KEY, name="ada")
    with pytest.raises(IntegrityError), transaction.atomic():
        Contributor.objects.create(
            key_hash="1" * 64, token_hash="2" * 64, name="ADA",
            first_seen=timezone.now(), last_seen=timezone.now(),
        )  # fmt: skip


def test_a_name_lost_to_a_concurrent_registration_is_a_taken_name(router_worker, monkeypatch):
    """The registration that loses the race (its check saw the name free; the database refused
    the second) gets a generated name and is told the name is another's."""
    open_node(key=KEY, name="ada")
    # The window between the check and the write, where the other registration's row appears.
    monkeypatch.setattr(services, "_name_taken", lambda name, other_than=None: False)
    late = open_node(key=OTHER_KEY, name="Ada")
    assert late.contributor_name not in ("ada", "Ada")
    assert "Ada is another contributor's name" in late.contributor_note
    renamed = open_node(key=OTHER_KEY, name="ADA")
    assert renamed.contributor_name == late.contributor_name
    assert "you stay" in renamed.contributor_note
    assert Contributor.objects.filter(name__iexact="ada").count() == 1


def test_a_node_id_reused_without_the_key_gets_no_record(router_worker):
    keyed = open_node(key=KEY, node_id="node-a")
    # Live: the node id is refused outright.
    with pytest.raises(ProtocolError) as refused:
        open_node(node_id="node-a", ip="203.0.113.9")
    assert refused.value.reason == CloseReason.NODE_ID_IN_USE
    # Gone: the node id is free, but the record stays the key's.
    node_session_close(session_id=keyed.session_id)
    thief = open_node(node_id="node-a", ip="203.0.113.9")
    assert thief.contributor_name is None
    assert NodeSession.objects.get(pk=thief.session_id).contributor is None
    other = open_node(key=OTHER_KEY, node_id="node-b")
    node_session_close(session_id=other.session_id)
    with_other_key = open_node(key=OTHER_KEY, node_id="node-a-again")
    assert with_other_key.contributor_name != keyed.contributor_name


def claim_on(session_id: int, model: str = "llama3.2:3b") -> Claim:
    result = inflight_claim(
        model=model,
        request_id=uuid.uuid4().hex,
        reply_channel="reply",
        worker_id="w1",
        arrived_at=timezone.now(),
    )
    assert isinstance(result, Claim) and result.session_id == session_id
    return result


def test_finished_requests_add_to_the_record_its_model_and_its_hour(router_worker):
    opened = open_node(key=KEY)
    served = Outcome(kind="completed", ttft_ms=200.0, tokens_per_s=40.0, tokens=30)
    inflight_finish(request_id=claim_on(opened.session_id).request_id, outcome=served)
    served = Outcome(kind="completed", ttft_ms=100.0, tokens_per_s=50.0, tokens=12)
    inflight_finish(request_id=claim_on(opened.session_id).request_id, outcome=served)
    inflight_finish(
        request_id=claim_on(opened.session_id).request_id, outcome=Outcome(kind="timed_out")
    )
    inflight_finish(
        request_id=claim_on(opened.session_id).request_id, outcome=Outcome(kind="cancelled")
    )
    record = Contributor.objects.get()
    assert (record.served, record.failed, record.tokens) == (2, 1, 42)
    figures = ContributorModel.objects.get(contributor=record)
    assert (figures.model, figures.served, figures.tokens) == ("llama3.2:3b", 2, 42)
    # The session's moving average: the first value, then 30 % of the way to the next.
    assert figures.ttft_ms == pytest.approx(200 + 0.3 * (100 - 200))
    assert figures.tokens_per_s == pytest.approx(40 + 0.3 * (50 - 40))
    session = NodeSession.objects.get(pk=opened.session_id)
    assert (figures.ttft_ms, figures.tokens_per_s) == (session.ttft_ms, session.tokens_per_s)
    hour = ContributorHour.objects.get(contributor=record)
    assert hour.tokens == 42
    assert hour.hour == timezone.now().replace(minute=0, second=0, microsecond=0)


def test_answers_to_the_contributor_itself_count_in_the_record_but_earn_no_priority(
    router_worker,
):
    """Red-team H1 of issue 20: a contributor answering its own requests (under its token, or
    from its node's own address) must not serve itself into the queue's front."""
    opened = open_node(key=KEY, ip="10.9.9.9")
    record = Contributor.objects.get()
    for consumer, consumer_ip in (
        (f"contributor:{record.pk}", "10.1.1.1"),
        ("ip:10.9.9.9", "10.9.9.9"),
        ("key:7", "10.9.9.9"),
    ):
        served = Outcome(kind="completed", tokens=30, consumer=consumer, consumer_ip=consumer_ip)
        inflight_finish(request_id=claim_on(opened.session_id).request_id, outcome=served)
    record.refresh_from_db()
    assert (record.served, record.tokens) == (3, 90)
    assert not ContributorHour.objects.exists()
    someone = Outcome(kind="completed", tokens=30, consumer="ip:10.1.1.1", consumer_ip="10.1.1.1")
    inflight_finish(request_id=claim_on(opened.session_id).request_id, outcome=someone)
    assert ContributorHour.objects.get(contributor=record).tokens == 30
    # The same address however it is spelt, and one IPv6 /64, are the node's own.
    for node_ip, consumer_ip in (("::ffff:10.8.8.8", "10.8.8.8"), ("2001:db8::1", "2001:db8::2")):
        NodeSession.objects.all().delete()  # one node at a time: the claim goes to it
        other = open_node(key=KEY, ip=node_ip)
        itself = Outcome(kind="completed", tokens=5, consumer="ip:x", consumer_ip=consumer_ip)
        inflight_finish(request_id=claim_on(other.session_id).request_id, outcome=itself)
    assert ContributorHour.objects.get(contributor=record).tokens == 30


def test_an_anonymous_nodes_requests_touch_no_record(router_worker):
    opened = open_node()
    served = Outcome(kind="completed", ttft_ms=200.0, tokens_per_s=40.0, tokens=30)
    inflight_finish(request_id=claim_on(opened.session_id).request_id, outcome=served)
    assert NodeSession.objects.get(pk=opened.session_id).completed == 1
    assert not ContributorModel.objects.exists() and not ContributorHour.objects.exists()


def test_prune_removes_hourly_token_counts_older_than_48_hours(router_worker, capsys):
    """Red-team F10 of issue 20: the per-hour counts behind priority no longer grow for ever;
    the live contributor's record and its recent hours stay."""
    opened = open_node(key=KEY, name="busy-bee")
    record = Contributor.objects.get()
    this_hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    for hours_ago in (0, 23, 47, 49, 24 * 30):
        ContributorHour.objects.create(
            contributor=record, hour=this_hour - timedelta(hours=hours_ago), tokens=hours_ago + 1
        )
    call_command("contributors_prune", "--dry-run")
    assert "would remove 2 hourly token count(s) older than 48 hours" in capsys.readouterr().out
    assert ContributorHour.objects.count() == 5
    call_command("contributors_prune")
    assert "removed 2 hourly token count(s) older than 48 hours" in capsys.readouterr().out
    kept = sorted(ContributorHour.objects.values_list("tokens", flat=True))
    assert kept == [1, 24, 48]
    assert Contributor.objects.get().name == "busy-bee"
    assert NodeSession.objects.filter(pk=opened.session_id).exists()


def test_prune_removes_old_records_without_live_nodes(router_worker, capsys):
    live = open_node(key=KEY, name="still-here")
    gone = open_node(key=OTHER_KEY, name="long-gone")
    node_session_close(session_id=gone.session_id)
    recent = open_node(key="ab" * 32, name="recent")
    node_session_close(session_id=recent.session_id)
    long_ago = timezone.now() - timedelta(days=200)
    Contributor.objects.exclude(name="recent").update(last_seen=long_ago)
    assert NodeSession.objects.filter(pk=live.session_id).exists()

    call_command("contributors_prune", "--days", "180", "--dry-run")
    assert "would remove 1 " in capsys.readouterr().out
    assert Contributor.objects.count() == 3
    call_command("contributors_prune", "--days", "180")
    assert "removed 1 " in capsys.readouterr().out
    assert set(Contributor.objects.values_list("name", flat=True)) == {"still-here", "recent"}
    call_command("contributors_prune", "--days", "1")
    assert "removed 0 " in capsys.readouterr().out
