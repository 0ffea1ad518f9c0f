"""The reputation function (nodes/reputation.py): pure, so tested on numbers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from nodes.reputation import NEUTRAL, reputation_after

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def after(reputation: float = NEUTRAL, **kwargs) -> float:
    return reputation_after(reputation, probed_at=kwargs.pop("probed_at", NOW), now=NOW, **kwargs)


def test_a_passed_probe_raises_reputation_and_a_failed_one_lowers_it_more():
    assert after(passed=1) == pytest.approx(0.625)
    assert after(failed=1) == pytest.approx(0.3)
    assert after(failed=2) == pytest.approx(0.18)


def test_two_failures_take_a_neutral_node_below_the_default_floor_and_one_pass_brings_it_back():
    once = after(failed=1)
    twice = after(once, failed=1)
    assert once >= 0.25 > twice
    assert after(twice, passed=1) >= 0.25


def test_reputation_decays_toward_neutral_with_a_half_life():
    day_ago = NOW - timedelta(hours=24)
    assert after(0.9, probed_at=day_ago) == pytest.approx(0.7)
    assert after(0.1, probed_at=day_ago) == pytest.approx(0.3)
    assert after(0.9, probed_at=NOW - timedelta(hours=48)) == pytest.approx(0.6)
    assert after(0.9, probed_at=day_ago, half_life_hours=12) == pytest.approx(0.6)
    # Never judged before, or a clock that went back: no decay.
    assert after(0.9, probed_at=None) == pytest.approx(0.9)
    assert after(0.9, probed_at=NOW + timedelta(hours=1)) == pytest.approx(0.9)


def test_reputation_stays_within_zero_and_one():
    assert after(1.0, passed=1000) <= 1.0
    assert after(0.0, failed=1000) >= 0.0
    assert after(7.0) == 1.0
    assert after(-3.0) == 0.0
    assert after(float("nan")) == NEUTRAL
    assert 0.0 <= after(passed=-5, failed=-5, completed=-1, errors=-1) <= 1.0


def test_the_error_rate_of_real_traffic_costs_reputation():
    clean = after(passed=1, completed=100, errors=0)
    flaky = after(passed=1, completed=50, errors=50)
    broken = after(passed=1, completed=0, errors=100)
    assert clean == pytest.approx(after(passed=1))
    assert clean > flaky > broken
    assert broken == pytest.approx(after(passed=1) * 0.8)
    # Too few requests say nothing.
    assert after(passed=1, completed=0, errors=4) == pytest.approx(after(passed=1))


def test_a_node_cooling_down_loses_as_for_a_failed_probe():
    assert after(cooling=True) == pytest.approx(after(failed=1))
    assert after(passed=1, cooling=True) < after(passed=1)
