"""The router's event-loop lag probe (``idleclaw_site/loop_lag.py``) and the benchmark's reading
of its samples (``bench/lag.py``), issue 13. That daphne starts the probe is checked end to end
by the benchmark's smoke run (tests/bench/test_bench_smoke.py)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from bench import lag
from idleclaw_site import loop_lag


def _hold_the_loop(seconds: float) -> None:
    """A stretch of work that never yields, as a busy relay would run."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_probe_records_how_late_its_timer_fires_while_the_loop_is_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    prefix = tmp_path / "loop-lag"
    monkeypatch.setenv(loop_lag.ENV, str(prefix))

    async def scenario() -> tuple[float, float]:
        assert loop_lag.install() is True
        await asyncio.sleep(0.2)
        held_from = time.monotonic()
        _hold_the_loop(0.08)
        held_to = time.monotonic()
        await asyncio.sleep(0.2)
        await loop_lag.stop()
        return held_from, held_to

    held_from, held_to = asyncio.run(scenario())
    # One file per process, named by its pid, so several router workers never share one.
    assert [path.name for path in lag.files(prefix)] == [f"loop-lag.{os.getpid()}"]
    samples = lag.read(prefix)
    times = [t for t, _ in samples]
    assert times == sorted(times)
    # Timestamps on CLOCK_MONOTONIC, the clock the harness slices phases with.
    assert held_from - 1 < times[0] < held_from
    before = lag.within(samples, [(0.0, held_from)])
    assert len(before) >= 3  # a sample every 10 ms or so while the loop is free
    # The timer due during the 80 ms hold fires when it ends: at least 70 ms late.
    during = lag.stats(samples, [(held_from, held_to + 0.05)])
    assert during is not None and during["max"] >= 60


def test_probe_is_off_without_its_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(loop_lag.ENV, raising=False)

    async def scenario() -> tuple[bool, int]:
        started = loop_lag.install()
        await asyncio.sleep(0.05)
        return started, len(asyncio.all_tasks())

    assert asyncio.run(scenario()) == (False, 1)  # only the test's own task runs


def test_lag_figures_come_only_from_samples_inside_the_windows(tmp_path: Path):
    prefix = tmp_path / "loop-lag"
    # Two router processes; a line cut short by a write in progress is skipped.
    (tmp_path / "loop-lag.101").write_text("10.0 0.5\n11.0 40.0\n12.0 1.5\n")
    (tmp_path / "loop-lag.102").write_text("10.5 2.5\n12.5 3.0\n13.0 9")
    samples = lag.read(prefix)
    assert [t for t, _ in samples] == [10.0, 10.5, 11.0, 12.0, 12.5]
    figures = lag.stats(samples, [(9.9, 10.6), (11.9, 12.6)])
    assert figures == {"samples": 4, "p50": 2.0, "p99": pytest.approx(2.985, abs=0.006), "max": 3.0}
    assert lag.stats(samples, [(20.0, 30.0)]) is None
