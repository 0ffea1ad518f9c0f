"""Fair queues and priority (issue 20), as consumers see them: a real daphne router, a real
contribute.py with one slot in front of a slow emulator, and consumers told apart by their
address (the router trusts 127.0.0.1 as its proxy, so X-Forwarded-For names them), by consumer
keys and by contributor tokens. Rows an operator or another part of the router would write (a
key issued in the admin, a contributor's hours of service) go straight into the router's
database."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest
import requests

from tests import procs
from tests.conftest import ROOMY_ENV

pytestmark = pytest.mark.e2e

MODEL = "llama3.2:3b"
# An answer takes about a second: 20 tokens, 50 ms each.
SLOW = ("--token-delay", "0.05", "--reply-tokens", "20")


class Network:
    def __init__(self, url: str, db_path: Path) -> None:
        self.url = url
        self.db_path = db_path

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=10)) as db, db:
            db.execute(statement, params)

    def queued(self) -> int:
        details = requests.get(f"{self.url}/api/models", timeout=5).json()["details"]
        return details.get(MODEL, {}).get("queued", 0)

    def wait_queued(self, count: int) -> None:
        procs.wait_until(
            lambda: self.queued() == count, timeout=30, what=f"{count} queued", every=0.02
        )

    def consumer_key(self, **fields: Any) -> str:
        """A key as the admin issues it: only its hash is stored."""
        key = "ick_" + secrets.token_hex(24)
        row = {
            "name": "tests", "prefix": key[4:12], "rate_per_minute": None,
            "max_concurrent": None, "priority": 0, "active": True, **fields,
        }  # fmt: skip
        self.sql(
            "INSERT INTO routing_consumerkey (name, prefix, key_hash, rate_per_minute,"
            " max_concurrent, priority, active, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row["name"], row["prefix"], _hash(key), row["rate_per_minute"],
             row["max_concurrent"], row["priority"], row["active"], _stamp(_now())),
        )  # fmt: skip
        return key

    def contributor(self, tokens: int, hours_ago: int) -> str:
        """A contributor whose nodes served ``tokens`` in the hour ``hours_ago`` hours back, as
        its record holds it; returns its consumer token."""
        token = "icc_" + secrets.token_hex(32)
        now = _now()
        name = f"tidy-heron-{secrets.randbelow(10**6)}"
        self.sql(
            "INSERT INTO nodes_contributor (key_hash, token_hash, name, first_seen, last_seen,"
            " served, failed, tokens, probes_passed, probes_failed, reputation, notes)"
            " VALUES (?, ?, ?, ?, ?, 0, 0, ?, 0, 0, 0.5, '')",
            (secrets.token_hex(32), _hash(token), name, _stamp(now), _stamp(now), tokens),
        )
        hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours_ago)
        self.sql(
            "INSERT INTO nodes_contributorhour (contributor_id, hour, tokens)"
            " SELECT id, ?, ? FROM nodes_contributor WHERE name = ?",
            (_stamp(hour), tokens, name),
        )
        return token


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _stamp(moment: datetime) -> str:
    """A UTC datetime as Django writes it to SQLite."""
    return moment.isoformat(sep=" ")


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """A router that believes X-Forwarded-For from 127.0.0.1, and one 1-slot node."""
    db_path = tmp_path_factory.mktemp("fairness") / "router.sqlite3"
    env = {
        **ROOMY_ENV,
        "IDLECLAW_TRUSTED_PROXIES": "127.0.0.1/32",
        "IDLECLAW_QUEUE_NOTICE_INTERVAL": "0.5",
        "IDLECLAW_QUEUE_TIMEOUT": "120",
    }
    router, url = procs.start_router(db_path, env)
    emulator, emulator_url = procs.start_emulator(*SLOW, "--embedding-models")
    node = procs.start_contributor(url, emulator_url, "--max-concurrent", "1")
    try:
        node.wait_for_line("registered")
        procs.wait_until(
            lambda: MODEL in requests.get(f"{url}/api/models", timeout=5).json()["models"],
            what="the node's models",
        )
        yield Network(url, db_path)
    finally:
        node.stop()
        emulator.stop()
        router.stop()


class Ask(threading.Thread):
    """One streamed /api/chat as a consumer makes it, to ``router`` (anything with the router's
    ``url``); the label goes on ``served`` when its first token arrives (one slot: the order of
    first tokens is the order of service)."""

    def __init__(self, router: Any, label: str, served: list[str], **headers: str) -> None:
        super().__init__(daemon=True)
        self.router, self.label, self.served = router, label, served
        self.headers = headers
        self.status: int | None = None
        self.positions: list[int] = []
        self.text = ""
        self.start()

    def run(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": self.label}]}
        with requests.post(
            f"{self.router.url}/api/chat",
            json=body,
            headers=self.headers,
            stream=True,
            timeout=(5, 120),
        ) as reply:
            self.status = reply.status_code
            for line in reply.iter_lines(decode_unicode=True):
                if line.startswith(": queued position="):
                    self.positions.append(int(line.split("=", 1)[1]))
                elif line.startswith("data: {") and not self.text:
                    self.served.append(self.label)
                    self.text = line

    def done(self) -> None:
        self.join(120)
        assert not self.is_alive() and self.status == 200, (self.label, self.status)


def address(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- fairness -------------------------------------------------------------------------------


def test_a_consumer_queuing_eight_delays_another_by_at_most_two_answers(network):
    served: list[str] = []
    xs = [Ask(network, f"x{i}", served, **address("10.20.0.1")) for i in range(8)]
    network.wait_queued(7)  # one answering, seven waiting
    y = Ask(network, "y", served, **address("10.20.0.2"))
    for ask in (*xs, y):
        ask.done()
    assert len(served) == 9
    assert served.index("y") <= 2, served
    # The notices Y saw counted only what it could not overtake: never X's whole backlog.
    assert y.positions and max(y.positions) <= 2, y.positions


def test_queue_notices_count_only_the_requests_ordered_ahead(network):
    served: list[str] = []
    # X's requests arrive one after another (threads started together may arrive in any
    # order): the first is answered, each later one has joined the queue before the next comes
    # (all within the first answer's second).
    xs = [Ask(network, "x0", served, **address("10.21.0.1"))]
    procs.wait_until(lambda: served == ["x0"], timeout=30, what="x0's first token")
    for i in range(1, 5):
        xs.append(Ask(network, f"x{i}", served, **address("10.21.0.1")))
        network.wait_queued(i)
    y = Ask(network, "y", served, **address("10.21.0.2"))
    network.wait_queued(5)
    for ask in (*xs, y):
        ask.done()
    # Arrival order would have put Y fifth; it was at most second.
    assert y.positions[0] <= 2, y.positions
    # X's last request waited behind its own earlier ones and Y's.
    assert xs[-1].positions[0] >= 4, xs[-1].positions


# --- priority -------------------------------------------------------------------------------


def test_a_contributors_request_overtakes_queued_anonymous_ones(network):
    token = network.contributor(tokens=5000, hours_ago=1)
    served: list[str] = []
    anonymous = [Ask(network, f"a{i}", served, **address(f"10.22.0.{i + 1}")) for i in range(4)]
    network.wait_queued(3)
    giver = Ask(network, "giver", served, **bearer(token))
    for ask in (*anonymous, giver):
        ask.done()
    # The one already answering finishes; the contributor goes next.
    assert served.index("giver") == 1, served
    # While it waited, nothing was ahead of it.
    assert set(giver.positions) <= {1}, giver.positions


def test_a_contributor_who_served_nothing_lately_waits_like_anyone(network):
    token = network.contributor(tokens=90_000, hours_ago=30)  # more than a day ago
    served: list[str] = []
    anonymous = [Ask(network, f"a{i}", served, **address(f"10.23.0.{i + 1}")) for i in range(4)]
    network.wait_queued(3)
    idle = Ask(network, "idle", served, **bearer(token))
    for ask in (*anonymous, idle):
        ask.done()
    assert served[-1] == "idle", served


# --- who the consumer is --------------------------------------------------------------------


def chat_body(prompt: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **extra}


@pytest.mark.parametrize(
    "path, body, shape",
    [
        ("/api/chat", chat_body(), "detail"),
        ("/v1/chat/completions", chat_body(), "error.message"),
        ("/ollama/api/chat", chat_body(stream=False), "error"),
        ("/ollama/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}, "error"),
        ("/v1/embeddings", {"model": "all-minilm:latest", "input": "hi"}, "error.message"),
        ("/ollama/api/embed", {"model": "all-minilm:latest", "input": "hi"}, "error"),
    ],
)
def test_an_unknown_idleclaw_token_is_refused_in_each_apis_own_shape(network, path, body, shape):
    for token in ("icc_" + "ab" * 32, "ick_" + "cd" * 24, "ick_not-even-hex"):
        reply = requests.post(f"{network.url}{path}", json=body, headers=bearer(token), timeout=10)
        assert reply.status_code == 401, reply.text
        answer = reply.json()
        for key in shape.split("."):
            answer = answer[key]
        assert answer == "unknown or revoked IdleClaw key"


def test_any_other_bearer_value_stays_anonymous(network):
    for dummy in ("sk-whatever", "ollama", "x"):
        reply = requests.post(
            f"{network.url}/ollama/api/chat",
            json=chat_body(stream=False),
            headers=bearer(dummy),
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["message"]["content"]


def test_the_official_clients_work_with_a_dummy_key_and_with_a_consumer_key(network):
    key = network.consumer_key()
    for api_key in ("sk-dummy", key):
        client = openai.OpenAI(base_url=f"{network.url}/v1", api_key=api_key, max_retries=0)
        with contextlib.closing(client):
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello"}]
            )
        assert answer.choices[0].message.content
    with contextlib.closing(
        ollama.Client(host=f"{network.url}/ollama", headers=bearer(key))
    ) as client:
        assert client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}]).message
    unknown = openai.OpenAI(base_url=f"{network.url}/v1", api_key="ick_" + "0" * 48, max_retries=0)
    with contextlib.closing(unknown), pytest.raises(openai.AuthenticationError):
        unknown.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])


def test_a_consumer_keys_own_rate_applies_and_a_revoked_key_is_refused(network):
    key = network.consumer_key(name="two a minute", rate_per_minute=2)
    # The three are sent back to back (streams, read once all have been answered): the rate's
    # window is a fixed minute, and a boundary crossed between them would start a new count.
    replies = [
        requests.post(
            f"{network.url}/api/chat",
            json=chat_body(),
            headers=bearer(key),
            stream=True,
            timeout=30,
        )
        for _ in range(3)
    ]
    for reply in replies:
        assert reply.content  # the whole answer, or the refusal
    assert [reply.status_code for reply in replies] == [200, 200, 429]
    assert "rate limit exceeded (2/m)" in replies[-1].json()["detail"]
    # The same address without the key is another consumer, at the anonymous rate.
    assert requests.post(f"{network.url}/api/chat", json=chat_body(), timeout=30).ok
    network.sql("UPDATE routing_consumerkey SET active = 0 WHERE key_hash = ?", (_hash(key),))
    reply = requests.post(
        f"{network.url}/api/chat", json=chat_body(), headers=bearer(key), timeout=30
    )
    assert reply.status_code == 401
    assert reply.json() == {"detail": "unknown or revoked IdleClaw key"}
