"""What probe_nodes judges and writes (nodes/probes.py): the comparison of answers, the lease
that keeps two probers off one model, and the reputations a round records."""

from __future__ import annotations

import json
import random
from datetime import timedelta

import pytest
from django.utils import timezone

from bench.emulator import reply_for
from nodes.models import Contributor, NodeModel, NodeSession, ProbeLease, RouterWorker
from nodes.probes import (
    AGREE_AT,
    FAIL,
    MAX_NODES,
    MAX_TOKENS,
    PASS,
    PROMPTS,
    SEEDS,
    SPLIT,
    UNDECIDED,
    Tally,
    probe_lease_end,
    probe_lease_take,
    probe_results_record,
    probe_targets,
    similarity,
    text_probe,
    thinking_probe,
    tool_probe,
    tool_verdict,
    verdicts,
)
from routing.openai_api import parse_completion_request

PROMPT = [{"role": "user", "content": "Why is the sky blue?"}]


def text(model: str, **kwargs) -> str:
    return "".join(reply_for(model, messages=PROMPT, reply_tokens=60, **kwargs).content)


def test_answers_of_one_model_agree_and_of_another_model_or_random_words_do_not():
    honest = text("smollm2:135m")
    assert similarity(honest, text("smollm2:135m")) == 1.0
    assert similarity(honest, text("llama3.2:3b")) < 0.2
    assert similarity(honest, text("smollm2:135m", salt=b"random")) < 0.2


def test_an_answer_that_drifts_after_a_while_still_agrees():
    words = text("smollm2:135m").split()
    drifted = " ".join(words[:40] + text("llama3.2:3b").split()[40:])
    assert similarity(" ".join(words), drifted) >= AGREE_AT
    assert similarity("The Sky is BLUE.", "the sky is blue") == 1.0


def test_with_three_answers_the_one_off_the_majority_fails():
    honest = text("smollm2:135m")
    assert verdicts({1: honest, 2: honest, 3: text("llama3.2:3b")}) == {1: PASS, 2: PASS, 3: FAIL}


def test_an_error_fails_and_two_agreeing_answers_pass():
    honest = text("smollm2:135m")
    assert verdicts({1: honest, 2: honest, 3: None}) == {1: PASS, 2: PASS, 3: FAIL}


def test_one_contributors_two_lying_nodes_cannot_outvote_an_honest_node():
    # Red team F2a: three nodes, but two voices; who is wrong cannot be told.
    lie = text("llama3.2:3b")
    answers = {"honest": text("smollm2:135m"), "liar1": lie, "liar2": lie}
    voices = {"honest": "contributor:1", "liar1": "contributor:2", "liar2": "contributor:2"}
    assert verdicts(answers, voices) == dict.fromkeys(answers, SPLIT)
    # Anonymous nodes behind one address are one voice too.
    voices = {"honest": "address:10.0.0.1", "liar1": "address:10.0.0.2"}
    voices["liar2"] = voices["liar1"]
    assert verdicts(answers, voices) == dict.fromkeys(answers, SPLIT)


def test_one_contributors_nodes_cannot_vouch_for_each_other():
    lie = text("llama3.2:3b")
    assert verdicts({1: lie, 2: lie}, {1: "c", 2: "c"}) == {1: UNDECIDED, 2: UNDECIDED}


def test_a_contributors_lying_node_fails_beside_its_honest_sibling_and_two_other_voices():
    honest, lie = text("smollm2:135m"), text("llama3.2:3b")
    answers = {"a": honest, "b": honest, "sibling": honest, "liar": lie}
    voices = {"a": "A", "b": "B", "sibling": "C", "liar": "C"}
    assert verdicts(answers, voices) == {"a": PASS, "b": PASS, "sibling": PASS, "liar": FAIL}
    # Two voices that agree: the sibling that answered otherwise fails.
    answers = {"a": honest, "sibling": honest, "liar": lie}
    assert verdicts(answers, voices) == {"a": PASS, "sibling": PASS, "liar": FAIL}


def test_two_answers_that_disagree_judge_nobody():
    assert verdicts({1: text("smollm2:135m"), 2: text("llama3.2:3b")}) == {1: SPLIT, 2: SPLIT}


def test_no_majority_judges_nobody_and_a_lone_answer_has_nothing_to_agree_with():
    three = {i: text(model) for i, model in enumerate(("a:1b", "b:1b", "c:1b"))}
    assert set(verdicts(three).values()) == {UNDECIDED}
    assert verdicts({1: "alone"}) == {1: UNDECIDED}


def test_a_tool_probe_wants_a_call_to_the_offered_tool_with_object_arguments():
    call = {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    assert tool_verdict({"tool_calls": [call]}, ["get_weather"]) == PASS
    assert tool_verdict({"tool_calls": []}, ["get_weather"]) == FAIL
    assert tool_verdict(None, ["get_weather"]) == FAIL
    other = {"function": {"name": "rm_rf", "arguments": {}}}
    assert tool_verdict({"tool_calls": [other]}, ["get_weather"]) == FAIL
    text_args = {"function": {"name": "get_weather", "arguments": "Oslo"}}
    assert tool_verdict({"tool_calls": [text_args]}, ["get_weather"]) == FAIL


def test_every_probe_is_an_ordinary_openai_request_with_temperature_zero_and_a_fixed_seed():
    rng = random.Random(1)
    lengths, seeds = set(), set()
    for build in (text_probe, thinking_probe, tool_probe):
        for _ in range(40):
            body = build("qwen3:0.6b", rng)
            params = parse_completion_request(_json(body)).ollama_params
            assert params["options"]["temperature"] == 0
            assert params["options"]["seed"] == body["seed"]
            assert params["options"]["num_predict"] in MAX_TOKENS
            lengths.add(params["options"]["num_predict"])
            seeds.add(body["seed"])
    assert len(lengths) >= 10 and min(lengths) <= 64 and max(lengths) >= 1000
    # A seed as API users pick one, not one value on every probe (red team F5: that would
    # mark them).
    assert seeds == set(SEEDS)
    # No marker: the same prompts appear, nothing else added.
    seen = {text_probe("m:1b", rng)["messages"][-1]["content"] for _ in range(300)}
    assert seen <= set(PROMPTS) and len(seen) > len(PROMPTS) // 2


def _json(body) -> bytes:
    return json.dumps(body).encode()


# --- The database side ---------------------------------------------------------------------


@pytest.fixture
def router_worker() -> RouterWorker:
    now = timezone.now()
    return RouterWorker.objects.create(worker_id="w1", started_at=now, last_seen=now)


def session(worker: RouterWorker, name: str, **fields) -> NodeSession:
    now = timezone.now()
    return NodeSession.objects.create(
        node_id=name,
        channel_name=f"chan.{name}",
        worker=worker,
        connected_at=now,
        last_seen=now,
        **fields,
    )


def contributor(name: str) -> Contributor:
    now = timezone.now()
    return Contributor.objects.create(
        key_hash=name * 8, token_hash=name * 9, name=name, first_seen=now, last_seen=now
    )


@pytest.mark.django_db
def test_two_probers_never_hold_one_model_at_once():
    assert probe_lease_take(model="m:1b", holder="a", seconds=60)
    assert not probe_lease_take(model="m:1b", holder="b", seconds=60)
    assert probe_lease_take(model="other:1b", holder="b", seconds=60)
    # Only its holder gives it back.
    probe_lease_end(model="m:1b", holder="b")
    assert not probe_lease_take(model="m:1b", holder="b", seconds=60)
    probe_lease_end(model="m:1b", holder="a")
    assert probe_lease_take(model="m:1b", holder="b", seconds=60)


@pytest.mark.django_db
def test_an_expired_lease_is_taken_over_and_a_kept_one_holds_until_its_time():
    ProbeLease.objects.create(
        model="m:1b", holder="crashed", expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert probe_lease_take(model="m:1b", holder="a", seconds=60)
    probe_lease_end(model="m:1b", holder="a", keep_until=timezone.now() + timedelta(minutes=5))
    assert not probe_lease_take(model="m:1b", holder="b", seconds=60)


@pytest.mark.django_db
def test_an_anonymous_session_keeps_its_own_reputation(router_worker):
    node = session(router_worker, "anonymous")
    recorded = probe_results_record(tallies={node.pk: Tally(failed=1)})
    node.refresh_from_db()
    assert node.reputation == pytest.approx(0.3) == recorded.reputations[node.pk]
    assert node.probed_at is not None


@pytest.mark.django_db
def test_a_node_probed_without_a_verdict_only_decays_toward_neutral(router_worker):
    day_ago = timezone.now() - timedelta(hours=24)
    alone = session(router_worker, "alone", reputation=0.1, probed_at=day_ago, failed=50)
    untouched = session(router_worker, "untouched", reputation=0.1, probed_at=day_ago)
    probe_results_record(tallies={alone.pk: Tally()})
    alone.refresh_from_db()
    untouched.refresh_from_db()
    assert alone.reputation == pytest.approx(0.3, abs=1e-3)
    assert untouched.reputation == 0.1


@pytest.mark.django_db
def test_a_contributor_record_takes_the_results_of_all_its_nodes_and_its_sessions_copy_it(
    router_worker,
):
    owner = contributor("owner")
    first = session(router_worker, "first", contributor=owner)
    second = session(router_worker, "second", contributor=owner)
    probe_results_record(tallies={first.pk: Tally(passed=1), second.pk: Tally(passed=1)})
    probe_results_record(tallies={first.pk: Tally(failed=1)})
    owner.refresh_from_db()
    assert (owner.probes_passed, owner.probes_failed) == (2, 1)
    assert owner.reputation == pytest.approx((1 - 0.5 * 0.75 * 0.75) * 0.6, abs=1e-3)
    copies = list(NodeSession.objects.values_list("reputation", flat=True))
    assert copies == [pytest.approx(owner.reputation)] * 2


@pytest.mark.django_db
def test_a_round_where_one_of_a_contributors_nodes_fails_gives_it_no_pass_credit(router_worker):
    # Red team F2b: lying on one model was offset by a sibling node passing on another.
    owner = contributor("owner")
    liar = session(router_worker, "liar", contributor=owner)
    honest = session(router_worker, "honest", contributor=owner)
    for _ in range(2):
        probe_results_record(tallies={liar.pk: Tally(failed=1), honest.pk: Tally(passed=1)})
    owner.refresh_from_db()
    assert owner.reputation == pytest.approx(0.5 * 0.6 * 0.6, abs=1e-3)
    assert owner.reputation < 0.25  # below the default floor: no traffic to either node
    assert (owner.probes_passed, owner.probes_failed) == (2, 2)


@pytest.mark.django_db
def test_passes_another_prober_records_soon_after_a_failure_earn_nothing(router_worker, settings):
    """Red team 2 of issue 20: two probers, one judging the model a contributor lies about and
    one a model it serves honestly, alternating, used to hold it above the floor for ever
    (fixed point about 0.45); passes within the hold after a failure now earn nothing."""
    settings.IDLECLAW_REPUTATION_FAIL_HOLD = 3600
    owner = contributor("owner")
    liar = session(router_worker, "liar", contributor=owner)
    honest = session(router_worker, "honest", contributor=owner)
    anonymous = session(router_worker, "anonymous")
    start = timezone.now()
    for minute in range(0, 60, 10):
        at = start + timedelta(minutes=minute)
        probe_results_record(
            tallies={liar.pk: Tally(failed=1), anonymous.pk: Tally(failed=1)}, now=at
        )
        at += timedelta(minutes=5)
        probe_results_record(
            tallies={honest.pk: Tally(passed=1), anonymous.pk: Tally(passed=1)}, now=at
        )
    owner.refresh_from_db()
    anonymous.refresh_from_db()
    assert owner.reputation < 0.25 and anonymous.reputation < 0.25
    assert (owner.probes_passed, owner.probes_failed) == (6, 6)
    # An hour after its last failure, a pass counts again.
    later = start + timedelta(minutes=50, hours=1, seconds=1)
    before = owner.reputation
    probe_results_record(tallies={honest.pk: Tally(passed=1)}, now=later)
    owner.refresh_from_db()
    assert owner.reputation > before + 0.1


@pytest.mark.django_db
def test_a_contributors_reputation_reaches_all_its_sessions_even_those_not_probed(router_worker):
    owner = contributor("owner")
    probed = session(router_worker, "probed", contributor=owner)
    other = session(router_worker, "other", contributor=owner)
    probe_results_record(tallies={probed.pk: Tally(failed=1)})
    other.refresh_from_db()
    assert other.reputation == pytest.approx(0.3)


@pytest.mark.django_db
def test_targets_take_one_node_of_each_voice_before_a_second_of_any(router_worker):
    many = contributor("many")
    for index in range(MAX_NODES + 2):
        node = session(router_worker, f"many{index}", contributor=many)
        NodeModel.objects.create(session=node, name="m:1b")
    for name in ("lone", "anon"):
        fields = {"contributor": contributor(name)} if name == "lone" else {"client_ip": "10.0.0.9"}
        NodeModel.objects.create(session=session(router_worker, name, **fields), name="m:1b")
    for seed in range(5):
        targets = probe_targets(model="m:1b", rng=random.Random(seed))
        voices = [target.voice for target in targets]
        assert len(targets) == MAX_NODES
        assert {"address:10.0.0.9", f"contributor:{many.pk}"} <= set(voices)
        assert len(set(voices)) == 3
