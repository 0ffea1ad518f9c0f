"""Probes across workers (issue 20): ``manage.py probe_nodes`` talks to worker A while the nodes
are connected to worker B, on the shared Redis and PostgreSQL."""

from __future__ import annotations

import os
import subprocess

import pytest
import requests

from tests import procs
from tests.scaleout import cluster

pytestmark = [pytest.mark.scaleout, pytest.mark.e2e]

MODEL = "smollm2:135m"


def probe_nodes(worker_env: dict[str, str], router_url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [procs.PYTHON, "manage.py", "probe_nodes", "--router", router_url],
        cwd=procs.ROOT,
        env={**os.environ, **worker_env, "IDLECLAW_PROBE_STAGGER": "0"},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_prober_on_worker_a_catches_a_mislabelled_node_on_worker_b(workers, worker_env):
    worker_a, worker_b = workers
    database = worker_env["DATABASE_URL"]
    started: list[procs.Proc] = []
    try:
        emulators = []
        for lie in ((), (), ("--answer-as", "llama3.2:3b")):
            proc, url = procs.start_emulator("--model", MODEL, *lie)
            proc.url = url
            started.append(proc)
            emulators.append(proc)
        nodes = [cluster.contributor_on(worker_b, emulator) for emulator in emulators]
        started.extend(nodes)
        node_ids = [
            node.wait_for_line(r"registered with \S+ as node (\S+):").group(1) for node in nodes
        ]
        cluster.wait_for_nodes(worker_a.url, 3)

        for _ in range(2):
            result = probe_nodes(worker_env, worker_a.url)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "nodes passed 2, failed 1" in result.stdout

        reputation = dict(
            cluster.rows(database, "SELECT node_id, reputation FROM nodes_nodesession")
        )
        assert reputation[node_ids[2]] < 0.25
        assert reputation[node_ids[0]] > 0.5 and reputation[node_ids[1]] > 0.5
        # No consumer request reaches the liar any more, on either worker.
        liar_before = cluster.emulator_stats(emulators[2].url)["chat_started"]
        for i in range(6):
            response = requests.post(
                f"{(worker_a, worker_b)[i % 2].url}/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}]},
                timeout=30,
            )
            assert response.status_code == 200, response.text
        assert cluster.emulator_stats(emulators[2].url)["chat_started"] == liar_before
        # The probes were counted for no consumer.
        counted = "SELECT COALESCE(SUM(requests), 0) FROM routing_requestcount"
        assert cluster.rows(database, counted) == [(6,)]
    finally:
        cluster.stop_all(reversed(started))
