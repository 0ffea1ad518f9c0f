"""``manage.py probe_nodes``: probe the live nodes of each model and update their reputation
(issue 20; README "Reputation and probes"; what is sent and how it is judged: nodes/probes.py).

Runs one round and prints a summary, or with ``--every SECONDS`` a round every so often until
SIGTERM or SIGINT. It reads the nodes from the router's database and sends each probe through
the router (``POST /api/internal/probe``, routing/probes.py), whose token it derives from the
same ``SECRET_KEY``. Several probers, on one host or many, may run at once: a model is probed by
one of them at a time (``nodes.probes.probe_lease_take``). Never prints a prompt or an answer.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import OperationalError, close_old_connections
from django.utils import timezone

from nodes import probes
from nodes.probes import BUSY, FAIL, PASS, SPLIT, UNDECIDED, Tally, Target
from routing.probes import ANSWERED, FAILED, SLOT_WAIT, probe_token

DEFAULT_ROUTER = "http://127.0.0.1:8000"
# The most of an answer read from the router: it caps answers far below this
# (IDLECLAW_MAX_RESPONSE_CHARS).
MAX_ANSWER_BYTES = 4 * 1024 * 1024
# A looping prober keeps each model it probed for this share of its interval.
KEEP_SHARE = 0.9


class RouterUnreachable(Exception):
    pass


class RouterClient:
    """``POST /api/internal/probe`` on one router."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        self.url = url.rstrip("/") + "/api/internal/probe"
        self.token = token
        self.timeout = timeout

    def probe(self, session_id: int, body: dict[str, Any]) -> dict[str, Any] | None:
        """The router's answer for one probe; None when it could not take it (a bad request,
        its own error). Raises ``RouterUnreachable``."""
        request = urllib.request.Request(
            f"{self.url}?{urllib.parse.urlencode({'session': session_id})}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read(MAX_ANSWER_BYTES))
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise RouterUnreachable(
                    f"{self.url} answered 404: not an IdleClaw router, or one with another "
                    "SECRET_KEY (the probe token derives from it)"
                ) from None
            return None
        except (urllib.error.URLError, OSError) as error:
            raise RouterUnreachable(f"{self.url}: {error}") from None
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None


class Command(BaseCommand):
    help = (
        "Send the live nodes of each model probes that look like ordinary requests, compare "
        "their answers and update their reputation. One round, or one every --every seconds."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--router",
            default=os.environ.get("IDLECLAW_ROUTER_URL") or DEFAULT_ROUTER,
            help="the router's base URL (default: $IDLECLAW_ROUTER_URL, else "
            f"{DEFAULT_ROUTER})",
        )
        parser.add_argument(
            "--every", type=float, default=None, metavar="SECONDS",
            help="run a round every SECONDS until SIGTERM or SIGINT",
        )
        parser.add_argument("--model", default=None, help="probe only this model")
        parser.add_argument(
            "--stagger", type=float, default=None, metavar="SECONDS",
            help="the most a model's probes are spread over, in random pauses between its "
            "nodes (default: $IDLECLAW_PROBE_STAGGER, 10)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        every = options["every"]
        if every is not None and not every > 0:
            raise CommandError("--every must be a positive number of seconds")
        self.stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop.set())
        self.rng = random.SystemRandom()
        self.holder = probes.lease_holder()
        # The router may wait up to SLOT_WAIT for the node's next free slot, then the answer.
        timeout = settings.IDLECLAW_RESPONSE_TIMEOUT + SLOT_WAIT + 30
        self.client = RouterClient(options["router"], probe_token(), timeout)
        self.every = every
        stagger = options["stagger"]
        self.stagger = settings.IDLECLAW_PROBE_STAGGER if stagger is None else stagger
        if not self.stagger >= 0:
            raise CommandError("--stagger must be zero or more seconds")
        self.spread = self.stagger
        while True:
            started = time.monotonic()
            try:
                self._round(options["model"])
            except RouterUnreachable as error:
                if every is None:
                    raise CommandError(f"the router could not be reached: {error}") from None
                self.stderr.write(f"the router could not be reached: {error}")
            except OperationalError as error:
                # A deadlock victim, a lost database connection: this round is lost, not the
                # prober. (The message is the database's, never a prompt or an answer.)
                if every is None:
                    raise
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                self.stderr.write(f"probe round failed on the database: {first_line}")
                close_old_connections()
            if every is None or self.stop.wait(max(0.0, every - (time.monotonic() - started))):
                break

    def _round(self, only: str | None) -> None:
        counts: Counter[str] = Counter()
        nodes: dict[int, Tally] = {}
        try:
            self._probe_models(only, counts, nodes)
        finally:
            # Recorded once for the whole round (also what was gathered before the router went
            # away): a contributor failing on one model gets no pass credit from another
            # (fails dominate, nodes.probes.probe_results_record).
            probes.probe_results_record(tallies=nodes)
        judged = [t for t in nodes.values() if t.passed or t.failed]
        self.stdout.write(
            f"probe round: {counts['models']} models probed"
            f" ({counts['held elsewhere']} held by another prober);"
            f" nodes passed {sum(1 for t in judged if not t.failed)},"
            f" failed {sum(1 for t in judged if t.failed)};"
            f" probes passed {counts[PASS]}, failed {counts[FAIL]}, split {counts[SPLIT]},"
            f" undecided {counts[UNDECIDED]}, busy {counts[BUSY]}"
        )

    def _probe_models(self, only: str | None, counts: Counter[str], nodes: dict[int, Tally]
                      ) -> None:
        for model in probes.probe_models(only=only):
            if self.stop.is_set():
                break
            # The lease outlives the longest round on a model: three probes in turn.
            seconds = 3 * self.client.timeout + self.stagger + 60
            if not probes.probe_lease_take(model=model, holder=self.holder, seconds=seconds):
                counts["held elsewhere"] += 1
                continue
            keep_until = None
            if self.every is not None:
                keep_until = timezone.now() + timedelta(seconds=KEEP_SHARE * self.every)
            try:
                tallies = self._probe_model(model, counts)
            finally:
                probes.probe_lease_end(model=model, holder=self.holder, keep_until=keep_until)
            counts["models"] += 1
            for session_id, tally in tallies.items():
                nodes.setdefault(session_id, Tally()).merge(tally)

    def _probe_model(self, model: str, counts: Counter[str]) -> dict[int, Tally]:
        targets = probes.probe_targets(model=model, rng=self.rng)
        tallies = {target.session_id: Tally() for target in targets}
        voices = {target.session_id: target.voice for target in targets}

        def judge(verdicts: dict[int, str]) -> None:
            for session_id, verdict in verdicts.items():
                counts[verdict] += 1
                tallies[session_id].add(verdict)

        thinkers = [t for t in targets if "thinking" in t.capabilities]
        tool_users = [t for t in targets if "tools" in t.capabilities]
        # The model's probes share the stagger: a round on it spreads over at most that long.
        sends = (len(targets) >= 2) + bool(thinkers) + bool(tool_users)
        self.spread = self.stagger / max(sends, 1)
        if len(targets) >= 2:
            answers = self._send(targets, probes.text_probe(model, self.rng))
            judge(
                probes.verdicts(
                    {sid: (a["content"] if a else None) for sid, a in answers.items()},
                    voices,
                )
            )
            counts[BUSY] += len(targets) - len(answers)
        if thinkers:
            answers = self._send(thinkers, probes.thinking_probe(model, self.rng))
            judge({sid: probes.thinking_verdict(a) for sid, a in answers.items()})
        if tool_users:
            body = probes.tool_probe(model, self.rng)
            offered = [tool["function"]["name"] for tool in body["tools"]]
            answers = self._send(tool_users, body)
            judge({sid: probes.tool_verdict(a, offered) for sid, a in answers.items()})
        return tallies

    def _send(self, targets: list[Target], body: dict[str, Any]) -> dict[int, dict | None]:
        """The same probe to each target: its answer, None when it failed; nodes that were busy
        (or gone, or the router could not take the probe) are left out. The targets get it in
        random order, each after a random pause, the pauses adding up to at most
        ``self.spread`` seconds (the model's share of ``--stagger``), so the same prompt does not
        reach every node at one moment."""
        order = list(targets)
        self.rng.shuffle(order)
        cuts = sorted(self.rng.uniform(0, self.spread) for _ in order)

        def send(index: int) -> dict[str, Any] | None:
            if self.stop.wait(cuts[index]):
                return None
            return self.client.probe(order[index].session_id, body)

        with ThreadPoolExecutor(len(order)) as pool:
            replies = list(pool.map(send, range(len(order))))
        answers: dict[int, dict | None] = {}
        for target, reply in zip(order, replies, strict=True):
            if reply is None:
                continue
            if reply.get("status") == ANSWERED:
                answers[target.session_id] = reply
            elif reply.get("status") == FAILED:
                answers[target.session_id] = None
        return answers
