"""A rolling restart loses nothing (issue 14): SIGTERM to the worker that holds the node while
streams run through both workers lets every stream finish whole; the worker exits 0, leaves no
rows behind, and the node is back as soon as a worker listens at its address again."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time

import pytest
import requests

from tests import procs
from tests.scaleout import cluster
from tests.scaleout.cluster import MODEL

pytestmark = [pytest.mark.scaleout, pytest.mark.e2e]

NO_ROWS = {"workers": 0, "sessions": 0, "requests": 0}


@pytest.fixture
def worker_env(worker_env: dict[str, str]) -> dict[str, str]:
    return {**worker_env, "IDLECLAW_SHUTDOWN_GRACE": "30"}


def test_sigterm_to_the_node_worker_cuts_no_stream(
    workers, worker_env, five_second_emulator, database_url
):
    a, b = workers
    node = cluster.contributor_on(a, five_second_emulator, "--max-concurrent", "4")
    consumers: list[procs.Proc] = []
    restarted = None
    try:
        cluster.wait_for_nodes(b.url, 1)
        # Four streams: two from consumers on the node's worker, two crossing to the other.
        for i, worker in enumerate((a, a, b, b)):
            consumers.append(procs.start_consumer(worker.url, MODEL, f"story {i}"))
        procs.wait_until(lambda: node.output.count("started: model=") == 4,
                         what="all four streams to start")
        time.sleep(0.5)
        old_id = cluster.worker_id_of(database_url, a.popen.pid)
        port = int(a.url.rsplit(":", 1)[1])

        # A proxy's health checks keep arriving while the worker drains; none of them may bring
        # its liveness row back once it has left.
        polling = threading.Event()
        polling.set()

        def health_checks() -> None:
            while polling.is_set():
                with contextlib.suppress(requests.RequestException):
                    requests.get(f"{a.url}/health", timeout=2)
                time.sleep(0.02)

        poller = threading.Thread(target=health_checks, daemon=True)
        poller.start()
        a.signal(signal.SIGTERM)
        for consumer in consumers:
            assert consumer.popen.wait(timeout=30) == 0, consumer.output
            # Whole and in order: the emulator's tokens carry their index.
            assert re.findall(r"[a-z]+(\d+)", consumer.output) == [str(n) for n in range(100)]
        assert a.popen.wait(timeout=15) == 0
        polling.clear()
        poller.join(5)
        assert cluster.rows_of(database_url, old_id) == NO_ROWS
        node.wait_for_line("the router is restarting; reconnecting at once")

        restarted = cluster.spawn_worker("worker A, restarted", worker_env, port=port)
        assert cluster.wait_listening(restarted) == a.url
        started = time.monotonic()
        procs.wait_until(lambda: node.output.count("registered with") == 2, timeout=10,
                         what="the node to register with the restarted worker")
        assert time.monotonic() - started < 5
        assert MODEL in cluster.advertised_models(b.url)
    finally:
        for proc in (*consumers, node):
            proc.stop()
        if restarted is not None:
            restarted.stop()
