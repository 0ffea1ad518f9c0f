"""Two daphne workers on one Redis and one PostgreSQL: a node connected to worker A serves a
consumer on worker B, through the channel layer and the database only."""

from __future__ import annotations

import re
import time

import pytest
import requests

from tests import procs
from tests.scaleout import cluster
from tests.scaleout.cluster import MODEL

pytestmark = [pytest.mark.scaleout, pytest.mark.e2e]


def test_a_2000_token_answer_crosses_workers_complete_and_in_order(worker_env, long_emulator):
    # About 19,000 characters: above the default cut (IDLECLAW_MAX_RESPONSE_CHARS), which is
    # not what this test is about.
    a, b = cluster.start_workers(
        {**worker_env, "IDLECLAW_MAX_RESPONSE_CHARS": "100000"}, ["worker A", "worker B"]
    )
    node = None
    try:
        node = cluster.contributor_on(a, long_emulator)
        cluster.wait_for_nodes(b.url, 1)
        result = procs.run_script(
            "consume.py", "--model", MODEL, "--prompt", "tell me everything", server=b.url
        )
        assert result.returncode == 0, result.stderr
        expected = cluster.direct_answer(long_emulator.url, "tell me everything")
        # Every token carries its index, so a lost, doubled or swapped chunk would show.
        assert len(expected.split()) == 2000
        assert result.stdout.strip() == expected
        node.wait_for_line(r"finished: model=llama3\.2:3b tokens=2000")
    finally:
        if node is not None:
            node.stop()
        cluster.stop_all([a, b])


def test_consumer_hanging_up_on_b_stops_generation_behind_a(workers, slow_emulator):
    a, b = workers
    node = cluster.contributor_on(a, slow_emulator, "--max-concurrent", "1")
    try:
        cluster.wait_for_nodes(b.url, 1)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "long story"}]}
        reply = requests.post(f"{b.url}/api/chat", json=body, stream=True, timeout=10)
        assert reply.status_code == 200
        lines = reply.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line.startswith("data: {"))
        reply.close()
        procs.wait_until(
            lambda: cluster.emulator_stats(slow_emulator.url)["chat_cancelled"] == 1,
            timeout=15,
            what="the emulator behind A to see its stream closed",
        )
        assert cluster.emulator_stats(slow_emulator.url)["chat_completed"] == 0
        # The node's only slot is free again, as both workers see it.
        for worker in (a, b):
            procs.wait_until(
                lambda w=worker: cluster.get_json(f"{w.url}/health")["active_requests"] == 0,
                what=f"{worker.name} to see the slot freed",
            )
    finally:
        node.stop()


def test_node_leaving_a_ends_the_stream_on_b_with_an_error(workers, slow_emulator):
    a, b = workers
    node = cluster.contributor_on(a, slow_emulator)
    consumer = None
    try:
        cluster.wait_for_nodes(b.url, 1)
        consumer = procs.start_consumer(b.url, MODEL, "story")
        node.wait_for_line("request .* started")
        time.sleep(0.5)  # a few tokens are on their way
        node.kill()
        assert consumer.wait(15) == 1
        assert "error: the node serving this request disconnected" in consumer.output
        assert re.match(r"[a-z]+0 [a-z]+1 ", consumer.output)
        assert not re.search(r"[a-z]+199\b", consumer.output)
        for worker in (a, b):
            cluster.wait_for_nodes(worker.url, 0)
    finally:
        if consumer is not None:
            consumer.stop()
        node.stop()


def test_an_idle_node_stays_connected_to_a_redis_worker(workers, emulator):
    # Regression: channels-redis waits 5 s per BZPOPMIN and redis-py 8 timed the read out
    # after 5 s too, closing every node socket whose channel stayed quiet that long.
    a, b = workers
    node = cluster.contributor_on(a, emulator)
    try:
        time.sleep(7)
        assert "reconnecting" not in node.output, a.output
        result = procs.run_script(
            "consume.py", "--model", MODEL, "--prompt", "still there?", server=b.url
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == cluster.direct_answer(emulator.url, "still there?")
        assert "Timeout reading" not in a.output + b.output
    finally:
        node.stop()
