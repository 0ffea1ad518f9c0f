"""The reaping services on PostgreSQL, where several survivors reap at the same time."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests import procs

pytestmark = pytest.mark.scaleout


def test_each_dead_worker_and_stale_session_is_reaped_by_one_survivor_only(database_url):
    result = subprocess.run(
        [procs.PYTHON, "-m", "tests.scaleout.reap_probe"],
        cwd=procs.ROOT, env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    # While another survivor holds the dead worker, this one skips it instead of waiting to
    # report the same requests a second time.
    assert seen["while_held"] == [0, 0]
    # Then it reaps: the consumer on a live worker whose node was on the dead one gets an
    # error event; the node on a live worker serving the dead worker's consumer is cancelled.
    assert seen["orphans"] == [["to-dead-node", "reply.to-dead-node"]]
    assert seen["abandoned"] == [["from-dead-consumer", "chan.node-on-live"]]
    assert seen["workers_left"] == ["live"]
    # The same for a node silent beyond the node timeout.
    assert seen["sessions_while_held"] == []
    assert seen["sessions_reaped"] == ["to-stale-node"]
    assert seen["sessions_left"] == ["node-on-live"]
    assert seen["requests_left"] == []
