"""Probes that cannot be told from traffic (issue 20): what ``manage.py probe_nodes`` sends, how
it judges the answers, and what it writes.

**What is sent.** An ordinary request, as an OpenAI client sends it to ``/v1/chat/completions``:
one of ``PROMPTS`` (a few dozen everyday questions of varied length, no marker of any kind),
sometimes after a short system message as API users write them, with ``temperature: 0`` (greedy
decoding), a fixed ``seed`` drawn from ``SEEDS`` (the same for every node a probe is compared
across) and ``max_tokens`` drawn from ``MAX_TOKENS``. Real requests carry these fields too
(routing/openai_api.py maps them to Ollama's ``options`` the same way), and the router sends a
probe through the consumer's own relay (routing/probes.py), so the node sees nothing a
consumer's request of the same shape would not show it. The prober sends a probe to a model's
nodes in random order, after random pauses (``--stagger``), not to all at one moment. What
still sets probes apart is in SECURITY.md.

**How answers are judged.** Every live node of a model (at most ``MAX_NODES``, drawn at random
when there are more, one node of each voice before a second of any) gets the same probe. Two
answers agree when the similarity of their words (``similarity``: difflib's
``SequenceMatcher`` ratio over the lower-cased words, the first ``MAX_COMPARE_WORDS`` of each)
is at least ``AGREE_AT`` (0.5). Temperature 0 is deterministic on one machine, but different
hardware or quantization may drift after a while; a drift shares a long prefix and most of its
words, so it stays above 0.5, while an answer from another model, or random words, shares
almost none (well under 0.2).

Agreement is counted between **voices**, not nodes: a voice is a contributor (all the nodes
of one key), or for an anonymous node its address. A group of one contributor's nodes that
agree is one voice, so one key running several nodes can neither outvote an honest node nor
vouch for itself.

- With three or more voices, a node that disagrees with the majority fails (the majority is
  the largest set of voices that agree with one answer, if it holds more than half of them);
  with no majority nobody is judged.
- With two voices that agree, their nodes pass (a node disagreeing with that answer fails);
  two that disagree cannot tell who is wrong, so neither is judged (``SPLIT``, counted in the
  summary). With one voice there is nobody to compare with (``UNDECIDED``).
- A node that answers with an error, or not at all, fails. One whose slot does not come free
  in time is skipped this round (``BUSY``).

**Capabilities.** A node declaring ``thinking`` for the model is asked with
``reasoning_effort`` (Ollama's ``think: true``) and must think; one declaring ``tools`` is
offered a tool and asked to use it, and must answer with a call to it whose arguments are an
object.

Results go to ``nodes.reputation.reputation_after``, once per round: on the contributor's
record when the node has one (and copied to its live sessions), else on the session. A round in
which any of a contributor's nodes failed counts as a failure with no pass credit (fails
dominate), so lying on one model is not offset by answering well on another; and passes within
``IDLECLAW_REPUTATION_FAIL_HOLD`` (an hour) of a failed round earn nothing either, so several
probers each judging other models cannot soften a failure between them.
"""

from __future__ import annotations

import difflib
import os
import random
import re
import socket
import uuid
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from nodes.models import Contributor, NodeModel, NodeSession, ProbeLease
from nodes.reputation import decayed, reputation_after
from nodes.services import live_cutoff

MAX_NODES = 5
AGREE_AT = 0.5
MAX_COMPARE_WORDS = 2000
# Answer lengths as API clients ask for them: the round figures people pick, short to long.
MAX_TOKENS = (64, 100, 128, 150, 200, 250, 256, 300, 400, 500, 512, 600, 800, 1000, 1024)
# Seeds as API users fix them for answers they can reproduce. A probe draws one, and every node
# it is compared across gets the same (the fixed seed): no single value marks probes.
SEEDS = (0, 1, 7, 42, 123, 1234, 2024, 3407, 12345, 31337)

PASS = "pass"
FAIL = "fail"
SPLIT = "split"  # two answers that disagree: neither is judged
UNDECIDED = "undecided"  # nothing to compare with, or no majority
BUSY = "busy"  # not sent: no slot came free on the node in time

PROMPTS = (
    "What is the capital of Australia?",
    "Give me three tips for sleeping better.",
    "How do I boil an egg so the yolk stays soft?",
    "Explain what a prime number is to a ten-year-old.",
    "Write a short haiku about autumn rain.",
    "What's the difference between weather and climate?",
    "Can you suggest a name for a small bakery in a seaside town?",
    "How many minutes are there in a week?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the main ingredients of a classic pancake batter?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Why is the sky blue?",
    "What is a good way to start learning to play the guitar?",
    "Write a polite email declining a meeting invitation for Friday.",
    "List five fruits that are high in vitamin C.",
    "How does a refrigerator keep food cold?",
    "What does HTTP stand for, and what is it used for?",
    "Give me a simple recipe for tomato soup.",
    "What is the difference between a list and a tuple in Python?",
    "How far is the Moon from the Earth, roughly?",
    "Suggest a weekend itinerary for two days in Lisbon.",
    "What are some easy houseplants for beginners?",
    "Explain compound interest with a small example.",
    "Write a limerick about a cat who loves boxes.",
    "How can I make my morning routine more productive?",
    "What causes the seasons on Earth?",
    "Describe the water cycle in a few sentences.",
    "What should I pack for a three-day hiking trip?",
    "I have eggs, spinach and cheese. What can I cook for dinner?",
    "Explain the rules of chess for the knight piece.",
    "What is photosynthesis?",
    "How do vaccines help the immune system?",
    "Write a two-line birthday message for a coworker.",
    "What are the pros and cons of working from home?",
    "My tomato plants have yellow leaves at the bottom. What could be wrong, and what can I "
    "do about it this week? They get about six hours of sun and I water them every evening.",
    "I'm writing a short story about a lighthouse keeper who finds a message in a bottle. "
    "Can you suggest how the story could open, in one paragraph?",
    "We are planning a team lunch for twelve people with two vegetarians and one person who "
    "cannot eat gluten. What kind of food could we order so everyone is happy?",
    "Compare trains and planes for a 600 km trip in Europe, considering time, cost and "
    "comfort.",
)

SYSTEM_MESSAGES = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are a friendly assistant that answers clearly.",
)

TOOL_PROBES = (
    (
        "What's the weather like in Oslo right now?",
        {
            "name": "get_weather",
            "description": "Get the current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city name"}},
                "required": ["city"],
            },
        },
    ),
    (
        "How much is 250 euros in US dollars today?",
        {
            "name": "convert_currency",
            "description": "Convert an amount between two currencies at today's rate",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "source": {"type": "string", "description": "ISO code, e.g. EUR"},
                    "target": {"type": "string", "description": "ISO code, e.g. USD"},
                },
                "required": ["amount", "source", "target"],
            },
        },
    ),
    (
        "What time is it in Tokyo?",
        {
            "name": "get_local_time",
            "description": "Get the current local time in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"timezone": {"type": "string", "description": "IANA name"}},
                "required": ["timezone"],
            },
        },
    ),
)

THINKING_PROMPTS = (
    "A train leaves at 9:40 and the trip takes 2 hours 35 minutes. When does it arrive?",
    "If I have 3 boxes with 7 apples each and give away 5 apples, how many are left?",
    "Which is larger, 0.7 or 0.65? Explain briefly.",
)


# --- What is sent ---------------------------------------------------------------------------


def text_probe(model: str, rng: random.Random) -> dict[str, Any]:
    """An OpenAI ``chat/completions`` body: an ordinary prompt, temperature 0, a fixed seed."""
    messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_MESSAGES)})
    return _body(model, messages, rng)


def thinking_probe(model: str, rng: random.Random) -> dict[str, Any]:
    body = _body(model, [{"role": "user", "content": rng.choice(THINKING_PROMPTS)}], rng)
    body["reasoning_effort"] = "medium"  # as the chat page asks a thinking model
    return body


def tool_probe(model: str, rng: random.Random) -> dict[str, Any]:
    prompt, function = rng.choice(TOOL_PROBES)
    body = _body(model, [{"role": "user", "content": prompt}], rng)
    body["tools"] = [{"type": "function", "function": function}]
    return body


def _body(model: str, messages: list[dict[str, str]], rng: random.Random) -> dict[str, Any]:
    return {
        "model": model,
        "messages": messages,
        "max_tokens": rng.choice(MAX_TOKENS),
        # Greedy decoding with a fixed seed: the same model gives the same answer.
        "temperature": 0,
        "seed": rng.choice(SEEDS),
        "stream": True,
    }


# --- How answers are judged -----------------------------------------------------------------

_WORD = re.compile(r"\w+")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())[:MAX_COMPARE_WORDS]


def similarity(first: str, second: str) -> float:
    """How alike two answers are, 0 to 1: difflib's ratio over their lower-cased words (the
    first ``MAX_COMPARE_WORDS``; quadratic at worst, so bounded). Two empty answers are alike."""
    a, b = words_of(first), words_of(second)
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


K = TypeVar("K", bound=Hashable)


def verdicts(
    answers: Mapping[K, str | None], voices: Mapping[K, Hashable] | None = None
) -> dict[K, str]:
    """Each node's verdict on one probe, from what it answered (None: an error or nothing);
    see the module docstring. ``voices`` says who stands behind each node (its contributor,
    or for an anonymous node its address; by default each node is its own): agreement counts
    between voices, not nodes, so one contributor's nodes never outvote or vouch for anyone."""
    voice_of = {key: (voices[key] if voices is not None else key) for key in answers}
    result: dict[K, str] = {key: FAIL for key, text in answers.items() if text is None}
    given = [(key, text) for key, text in answers.items() if text is not None]
    heard = {voice_of[key] for key, _ in given}
    if len(heard) < 2:
        result.update((key, UNDECIDED) for key, _ in given)
        return result
    agree = {
        (i, j): similarity(given[i][1], given[j][1]) >= AGREE_AT
        for i in range(len(given))
        for j in range(i + 1, len(given))
    }

    def agrees(i: int, j: int) -> bool:
        return i == j or agree[(min(i, j), max(i, j))]

    # The voices that agree with each answer: a voice counts once however many nodes it has.
    support = [
        {voice_of[given[j][0]] for j in range(len(given)) if agrees(i, j)}
        for i in range(len(given))
    ]
    anchor = max(range(len(given)), key=lambda i: len(support[i]))
    if len(support[anchor]) * 2 <= len(heard):
        # Two voices that disagree cannot tell who is wrong; more with no majority neither.
        verdict = SPLIT if len(heard) == 2 else UNDECIDED
        result.update((key, verdict) for key, _ in given)
        return result
    for i, (key, _) in enumerate(given):
        result[key] = PASS if agrees(i, anchor) else FAIL
    return result


def thinking_verdict(answer: Mapping[str, Any] | None) -> str:
    """A node declaring ``thinking``, asked to think, must think."""
    if answer is None:
        return FAIL
    return PASS if str(answer.get("thinking") or "").strip() else FAIL


def tool_verdict(answer: Mapping[str, Any] | None, offered: Sequence[str]) -> str:
    """A node declaring ``tools``, offered one and asked to use it, must call it well-formed."""
    if answer is None:
        return FAIL
    calls = answer.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        return FAIL
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or function.get("name") not in offered:
            return FAIL
        if not isinstance(function.get("arguments"), dict):
            return FAIL
    return PASS


# --- What is read and written ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A live node serving the model under probe."""

    session_id: int
    capabilities: tuple[str, ...]
    # Who stands behind the node: its contributor, or an anonymous node's address.
    voice: str = ""


def probe_models(*, only: str | None = None) -> list[str]:
    """The models live nodes serve (or just ``only``), in name order."""
    rows = NodeModel.objects.filter(
        session__last_seen__gte=live_cutoff(), session__draining=False
    )
    if only is not None:
        rows = rows.filter(name=only)
    return sorted(set(rows.values_list("name", flat=True)))


def probe_targets(*, model: str, rng: random.Random) -> list[Target]:
    """Up to ``MAX_NODES`` live sessions serving ``model``, drawn at random."""
    rows = list(
        NodeModel.objects.filter(
            name=model, session__last_seen__gte=live_cutoff(), session__draining=False
        ).values_list(
            "session_id", "capabilities", "session__contributor_id", "session__client_ip"
        )
    )
    rng.shuffle(rows)
    # One node of each voice first: a contributor with many nodes cannot crowd others out.
    seen: set[str] = set()
    firsts = []
    for row in rows:
        voice = _voice(row[0], row[2], row[3])
        firsts.append(voice in seen)
        seen.add(voice)
    rows = [row for _, row in sorted(zip(firsts, rows, strict=True), key=lambda pair: pair[0])]
    return [
        Target(
            session_id=session,
            capabilities=tuple(caps if isinstance(caps, list) else ()),
            voice=_voice(session, contributor, address),
        )
        for session, caps, contributor, address in rows[:MAX_NODES]
    ]


def _voice(session: int, contributor: int | None, address: str | None) -> str:
    if contributor is not None:
        return f"contributor:{contributor}"
    if address:
        return f"address:{address}"
    return f"session:{session}"


def lease_holder() -> str:
    """This prober's name on the leases it takes."""
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def probe_lease_take(*, model: str, holder: str, seconds: float) -> bool:
    """Take the model's probe lease for ``seconds``; False while another prober holds it."""
    now = timezone.now()
    with transaction.atomic():
        ProbeLease.objects.filter(model=model, expires_at__lt=now).delete()
        try:
            with transaction.atomic():
                ProbeLease.objects.create(
                    model=model, holder=holder, expires_at=now + timedelta(seconds=seconds)
                )
        except IntegrityError:
            return False
    return True


def probe_lease_end(*, model: str, holder: str, keep_until: datetime | None = None) -> None:
    """Give the lease back, or with ``keep_until`` keep it until then (a looping prober keeps
    a model for most of its interval, so another prober does not probe it again meanwhile)."""
    leases = ProbeLease.objects.filter(model=model, holder=holder)
    if keep_until is not None and keep_until > timezone.now():
        leases.update(expires_at=keep_until)
    else:
        leases.delete()


@dataclass
class Tally:
    """A node's verdicts in one round."""

    passed: int = 0
    failed: int = 0

    def merge(self, other: Tally) -> None:
        self.passed += other.passed
        self.failed += other.failed

    def add(self, verdict: str) -> None:
        if verdict == PASS:
            self.passed += 1
        elif verdict == FAIL:
            self.failed += 1


@dataclass
class Recorded:
    """What a round wrote: the new reputation of each session probed."""

    reputations: dict[int, float] = field(default_factory=dict)


def probe_results_record(*, tallies: Mapping[int, Tally], now: datetime | None = None) -> Recorded:
    """Fold a round's verdicts (by session id) into reputations: a contributor's record when
    the session has one (all its sessions probed in the round together, and the result copied
    to its live sessions), else the session's own. A session probed without a verdict (busy,
    split, undecided, alone with its model) only decays toward neutral, so that a node left
    below the floor with nobody to compare it to comes back in time. A round in which any of a
    contributor's nodes failed is a failure for it, with no pass credit (``_reputation``).
    Counters move by ``F()``; each reputation is read and written under a row lock, so two
    probers judging the same contributor on two models never lose an update."""
    now = now or timezone.now()
    recorded = Recorded()
    if not tallies:
        return recorded
    with transaction.atomic():
        # Sessions first, then contributors, each in id order: the order every other writer
        # takes them in (a finishing request, a node registering or leaving, the admin), so
        # nobody deadlocks with a prober. Every session of each contributor judged is locked,
        # as the contributor's reputation is copied to all of them.
        owners = sorted(
            set(
                NodeSession.objects.filter(pk__in=tallies, contributor__isnull=False)
                .values_list("contributor_id", flat=True)
            )
        )
        locked = list(
            NodeSession.objects.select_for_update()
            .filter(Q(pk__in=tallies) | Q(contributor_id__in=owners))
            .order_by("pk")
        )
        contributors = {
            c.pk: c
            for c in Contributor.objects.select_for_update().filter(pk__in=owners).order_by("pk")
        }
        by_contributor: dict[int, list[NodeSession]] = {}
        copies: dict[int, list[int]] = {}
        for session in locked:
            if session.contributor_id is not None:
                copies.setdefault(session.contributor_id, []).append(session.pk)
            if session.pk not in tallies:
                continue
            if session.contributor_id is None:
                value = _reputation(
                    session.reputation,
                    session.probed_at,
                    [session],
                    tallies,
                    now,
                    failed_at=session.failed_probe_at,
                )
                NodeSession.objects.filter(pk=session.pk).update(
                    reputation=value,
                    probed_at=now,
                    failed_probe_at=now if tallies[session.pk].failed else session.failed_probe_at,
                )
                recorded.reputations[session.pk] = value
            else:
                by_contributor.setdefault(session.contributor_id, []).append(session)
        for contributor_id in sorted(by_contributor):
            contributor = contributors.get(contributor_id)
            if contributor is None:
                continue  # pruned meanwhile
            own = by_contributor[contributor_id]
            value = _reputation(
                contributor.reputation,
                contributor.probed_at,
                own,
                tallies,
                now,
                failed_at=contributor.failed_probe_at,
            )
            failed = any(tallies[s.pk].failed for s in own)
            Contributor.objects.filter(pk=contributor_id).update(
                reputation=value,
                probed_at=now,
                failed_probe_at=now if failed else contributor.failed_probe_at,
                probes_passed=F("probes_passed") + sum(tallies[s.pk].passed for s in own),
                probes_failed=F("probes_failed") + sum(tallies[s.pk].failed for s in own),
            )
            # Only the sessions locked above: one registering meanwhile copies the record
            # itself, after this commits.
            NodeSession.objects.filter(pk__in=copies[contributor_id]).update(
                reputation=value, probed_at=now
            )
            for session in own:
                recorded.reputations[session.pk] = value
    return recorded


def _reputation(
    value: float,
    probed_at: datetime | None,
    sessions: Sequence[NodeSession],
    tallies: Mapping[int, Tally],
    now: datetime,
    *,
    failed_at: datetime | None = None,
) -> float:
    """The next reputation of one node (or contributor, over its ``sessions``), whose last
    failed round was at ``failed_at``."""
    half_life = settings.IDLECLAW_REPUTATION_HALF_LIFE_HOURS
    passed = sum(tallies[s.pk].passed for s in sessions)
    failed = sum(tallies[s.pk].failed for s in sessions)
    hold = timedelta(seconds=settings.IDLECLAW_REPUTATION_FAIL_HOLD)
    if failed or (failed_at is not None and now - failed_at < hold):
        # Fails dominate: lying on one model is not offset by passing on another, in this round
        # or in another prober's soon after.
        passed = 0
    if not passed and not failed:
        return decayed(value, since=probed_at, now=now, half_life_hours=half_life)
    return reputation_after(
        value,
        probed_at=probed_at,
        now=now,
        passed=passed,
        failed=failed,
        completed=sum(s.completed for s in sessions),
        errors=sum(s.failed + s.timed_out for s in sessions),
        cooling=any(_cooling(s, now) for s in sessions),
        half_life_hours=half_life,
    )


def _cooling(session: NodeSession, now: datetime) -> bool:
    return session.cooldown_until is not None and session.cooldown_until > now
