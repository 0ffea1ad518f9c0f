"""Fair queues and priority (issue 20) across two workers on one Redis and one PostgreSQL: the
queue is the database table, so its order holds whichever worker each consumer reached."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator

import pytest

from tests import procs
from tests.e2e.test_fairness import SLOW, Ask, address, bearer
from tests.scaleout import cluster
from tests.scaleout.cluster import MODEL

pytestmark = [pytest.mark.scaleout, pytest.mark.e2e]


# Both workers believe X-Forwarded-For from 127.0.0.1: it tells the test's consumers apart.
FAIR_ENV = {
    "IDLECLAW_TRUSTED_PROXIES": "127.0.0.1/32",
    "IDLECLAW_QUEUE_NOTICE_INTERVAL": "0.5",
    "IDLECLAW_QUEUE_TIMEOUT": "120",
}


@pytest.fixture
def router_env(router_env: dict[str, str]) -> dict[str, str]:
    return {**router_env, **FAIR_ENV}


@pytest.fixture
def one_slot(workers) -> Iterator[procs.Proc]:
    """A 1-slot contribute.py on worker A, answering in about a second."""
    emulator, url = procs.start_emulator(*SLOW)
    emulator.url = url
    node = cluster.contributor_on(workers[0], emulator, "--max-concurrent", "1")
    try:
        cluster.wait_for_nodes(workers[1].url, 1)
        yield node
    finally:
        node.stop()
        emulator.stop()


def queued(worker: procs.Proc) -> int:
    details = cluster.get_json(f"{worker.url}/api/models")["details"]
    return details.get(MODEL, {}).get("queued", 0)


def wait_queued(worker: procs.Proc, count: int) -> None:
    procs.wait_until(lambda: queued(worker) == count, timeout=30, what=f"{count} queued")


def test_x_queuing_eight_on_worker_a_delays_y_on_worker_b_by_at_most_two(workers, one_slot):
    a, b = workers
    served: list[str] = []
    xs = [Ask(a, f"x{i}", served, **address("10.30.0.1")) for i in range(8)]
    wait_queued(b, 7)
    y = Ask(b, "y", served, **address("10.30.0.2"))
    for ask in (*xs, y):
        ask.done()
    assert served.index("y") <= 2, served
    assert y.positions and max(y.positions) <= 2, y.positions


def test_a_contributor_on_worker_b_overtakes_anonymous_requests_queued_on_a(
    workers, one_slot, database_url
):
    a, b = workers
    token = "icc_" + secrets.token_hex(32)
    cluster.rows(
        database_url,
        "WITH c AS (INSERT INTO nodes_contributor (key_hash, token_hash, name, first_seen,"
        " last_seen, served, failed, tokens, probes_passed, probes_failed, reputation, notes)"
        " VALUES (%s, %s, 'calm-lynx-7', now(), now(), 0, 0, 5000, 0, 0, 0.5, '') RETURNING id)"
        " INSERT INTO nodes_contributorhour (contributor_id, hour, tokens)"
        " SELECT id, date_trunc('hour', now()), 5000 FROM c RETURNING id",
        [secrets.token_hex(32), hashlib.sha256(token.encode("ascii")).hexdigest()],
    )
    served: list[str] = []
    anonymous = [Ask(a, f"a{i}", served, **address(f"10.31.0.{i + 1}")) for i in range(4)]
    wait_queued(b, 3)
    giver = Ask(b, "giver", served, **bearer(token))
    for ask in (*anonymous, giver):
        ask.done()
    assert served.index("giver") == 1, served
