"""The slot and queue services are hand-written SQL: they must behave the same on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests import procs

pytestmark = pytest.mark.scaleout


def test_routing_services_pass_their_tests_on_postgresql(database_url):
    # The same test module, in a pytest of its own whose Django is configured for PostgreSQL
    # (pytest-django creates its test database next to this test's database).
    result = subprocess.run(
        [procs.PYTHON, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider",
         "tests/routing/test_services.py", "tests/routing/test_fair_queue.py",
         "tests/routing/test_probes.py"],
        cwd=procs.ROOT, env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "database: postgresql" in result.stdout
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_racing_claims_never_take_more_slots_than_a_node_has(database_url):
    result = subprocess.run(
        [procs.PYTHON, "-m", "tests.scaleout.claim_probe"],
        cwd=procs.ROOT, env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout)
    assert not [r for r in seen["results"] if r.startswith("error")], seen
    # Twelve claims at once for three slots: no node is ever over its slots and nothing
    # deadlocks. (A claim may find a free node locked by a rival and skip it; it then queues.)
    assert seen["held"]["small"] <= 2 and seen["held"]["tiny"] <= 1
    winners = [r for r in seen["results"] if r != "none"]
    assert len(winners) == sum(seen["held"].values()) >= 2


def test_contributor_records_pass_their_tests_on_postgresql(database_url):
    # The per-request upserts of a contributor's figures are hand-written SQL too (issue 20).
    result = subprocess.run(
        [procs.PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "tests/nodes/test_identity.py"],
        cwd=procs.ROOT, env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "database: postgresql" in result.stdout
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_a_prober_recording_results_never_deadlocks_with_finishing_requests(database_url):
    # Red team F1: the prober locked the contributor before its sessions, a finishing request
    # locks its session before the contributor; on PostgreSQL one of them died of a deadlock.
    result = subprocess.run(
        [procs.PYTHON, "-m", "tests.scaleout.probe_lock_race", "150"],
        cwd=procs.ROOT, env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout)
    assert seen["errors"] == []
    # Every request and every probe round counted: 2 nodes x 150 of each.
    assert (seen["served"], seen["probes_passed"], seen["left_inflight"]) == (300, 300, 0)
