"""Contributor records on two workers (issue 20), on Redis and PostgreSQL: two nodes started
together with one new key, on different workers, become one contributor, and every request
either serves counts once in the record both workers list."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests import procs
from tests.scaleout import cluster
from tests.scaleout.cluster import MODEL

pytestmark = [pytest.mark.scaleout, pytest.mark.e2e]


@pytest.fixture
def quick_emulator() -> Iterator[procs.Proc]:
    proc, url = procs.start_emulator("--reply-tokens", "5")
    proc.url = url
    yield proc
    proc.stop()


def _listed(worker_url: str) -> list[dict]:
    response = requests.get(f"{worker_url}/api/network/nodes", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()["nodes"]


def test_one_key_on_two_workers_is_one_record_counted_once_per_request(
    workers, quick_emulator, tmp_path, database_url
):
    a, b = workers
    key_file = str(tmp_path / "shared.key")
    # One public URL for both workers (a key is derived per router origin): each node's
    # connection goes to the next worker in turn, so the two land on different workers.
    balancer = cluster.Balancer([a, b])
    # Started together: the key file and the record are made once, whoever comes first.
    nodes = [
        procs.start_contributor(balancer.url, quick_emulator.url, "--key-file", key_file)
        for _ in range(2)
    ]
    try:
        names = {node.wait_for_line(r"contributing as (\S+) ").group(1) for node in nodes}
        assert len(names) == 1
        (name,) = names
        cluster.wait_for_nodes(a.url, 2)
        for worker in (b, a, b):
            reply = requests.post(
                f"{worker.url}/ollama/api/chat",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "stream": False},
                timeout=30,
            )  # fmt: skip
            assert reply.status_code == 200, reply.text
        for worker in (a, b):
            procs.wait_until(
                lambda w=worker: (
                    [(n["contributor"], n["served"]) for n in _listed(w.url)]
                    == [(name, 3), (name, 3)]
                ),
                what=f"{worker.name} to list both nodes with the record's three requests",
            )
        # One node on each worker: each worker holds one of the sessions.
        sessions = cluster.rows(database_url, "SELECT worker_id FROM nodes_nodesession")
        assert len({worker_id for (worker_id,) in sessions}) == 2
    finally:
        cluster.stop_all(nodes)
        balancer.close()
