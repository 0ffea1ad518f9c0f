"""The per-node allowance of tool calls (issue 15) holds across router workers: a node's
searches are counted once, whichever worker runs them."""

from __future__ import annotations

import pytest

from tests import procs
from tests.scaleout import cluster
from tests.tools.searxng import FakeSearxng

pytestmark = [pytest.mark.scaleout, pytest.mark.e2e]

SEARCHER = "searcher:1b"
PROMPT = "search the tallest tree"
REFUSED = ("From the web: search failed: this node made too many tool calls in the last "
           "minute; answer without it")


@pytest.fixture
def searching_emulator():
    proc, url = procs.start_emulator("--model", f"{SEARCHER},caps=completion+tools,searches=yes")
    proc.url = url
    yield proc
    proc.stop()


def ask(worker: procs.Proc) -> str:
    result = procs.run_script("consume.py", "--model", SEARCHER, "--prompt", PROMPT,
                              server=worker.url)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_nodes_tool_calls_are_counted_across_workers(worker_env, searching_emulator):
    with FakeSearxng().in_thread() as searx:
        env = {**worker_env, "IDLECLAW_SEARXNG_URL": searx.url,
               "IDLECLAW_TOOL_CALLS_PER_MINUTE": "2"}
        a, b = cluster.start_workers(env, ["worker A", "worker B"])
        node = None
        try:
            node = cluster.contributor_on(a, searching_emulator)
            cluster.wait_for_nodes(b.url, 1)
            # Two searches through A use the node's allowance; B must know.
            assert ask(a) == "From the web: 1. Hyperion (tree)"
            assert ask(a) == "From the web: 1. Hyperion (tree)"
            assert ask(b) == REFUSED
            assert searx.queries == ["the tallest tree", "the tallest tree"]
        finally:
            if node is not None:
                node.stop()
            cluster.stop_all([a, b])
