"""A full queue across two workers (red-team M1 of issue 20): a newcomer on worker B takes the
last place of the consumer filling the queue from worker A, whose request is told so through
the channel layer (Redis), and the newcomer is served."""

from __future__ import annotations

import pytest

from tests.e2e.test_fairness import Ask, address
from tests.scaleout.test_fair_queue import FAIR_ENV, one_slot, wait_queued  # noqa: F401

pytestmark = [pytest.mark.scaleout, pytest.mark.e2e]


@pytest.fixture
def router_env(router_env: dict[str, str]) -> dict[str, str]:
    return {**router_env, **FAIR_ENV, "IDLECLAW_MAX_QUEUE": "2"}


def test_a_newcomer_on_worker_b_takes_the_last_place_of_the_consumer_filling_the_queue(
    workers,
    one_slot,  # noqa: F811
):
    a, b = workers
    served: list[str] = []
    # X: one answering, two waiting (in an order of their own: three threads at once).
    xs = [Ask(a, f"x{i}", served, **address("10.40.0.1")) for i in range(3)]
    wait_queued(b, 2)
    y = Ask(b, "y", served, **address("10.40.0.2"))
    y.done()
    for ask in xs:
        ask.join(120)
    # The one that gave its place up: a 503 when it was still waiting for its stream to open,
    # else the error on its open stream.
    pushed_out = [
        ask for ask in xs if ask.status == 503 or "too many requests are waiting" in ask.text
    ]
    assert len(pushed_out) == 1, [(ask.status, ask.text) for ask in xs]
    kept = [ask for ask in xs if ask not in pushed_out]
    assert all(ask.status == 200 and ask.label in served for ask in kept)
    assert served.index("y") <= 2, served
