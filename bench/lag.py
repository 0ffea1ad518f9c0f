"""The router's event-loop lag, as its in-process probe wrote it (``idleclaw_site/loop_lag.py``).

The harness starts every router with ``IDLECLAW_LOOP_LAG_FILE=<work dir>/loop-lag``; each
router process appends ``<CLOCK_MONOTONIC seconds> <lag ms>`` lines to ``loop-lag.<pid>``. The
harness notes the CLOCK_MONOTONIC start and end of each stretch it measures (``time.monotonic``
here is the same clock) and keeps the samples that fall inside. This module only reads the
files: the benchmark can measure a router tree of another commit, so it does not import the
router's code.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.load import percentile

ENV = "IDLECLAW_LOOP_LAG_FILE"

Sample = tuple[float, float]  # (CLOCK_MONOTONIC seconds, lag in ms)
Window = tuple[float, float]  # (start, end), CLOCK_MONOTONIC seconds


def files(prefix: Path) -> list[Path]:
    """The probe's files: one per router process."""
    return sorted(prefix.parent.glob(prefix.name + ".*"))


def read(prefix: Path) -> list[Sample]:
    """Every sample of every router process, in time order. A line that has no end yet (a
    write in progress) is left for the next read."""
    samples: list[Sample] = []
    for path in files(prefix):
        for line in path.read_text(encoding="ascii", errors="replace").split("\n")[:-1]:
            parts = line.split()
            if len(parts) != 2:
                continue
            try:
                samples.append((float(parts[0]), float(parts[1])))
            except ValueError:
                continue
    samples.sort()
    return samples


def within(samples: Sequence[Sample], windows: Sequence[Window]) -> list[float]:
    """The lags of the samples taken inside any of ``windows``."""
    times = [t for t, _ in samples]
    lags: list[float] = []
    for start, end in windows:
        low = bisect.bisect_left(times, start)
        high = bisect.bisect_right(times, end)
        lags.extend(lag for _, lag in samples[low:high])
    return lags


def stats(samples: Sequence[Sample], windows: Sequence[Window]) -> dict[str, Any] | None:
    """p50, p99 and the worst lag (ms) inside ``windows``; None when no sample fell there (a
    router without the probe)."""
    lags = sorted(within(samples, windows))
    if not lags:
        return None
    return {
        "samples": len(lags),
        "p50": round(percentile(lags, 50) or 0.0, 2),
        "p99": round(percentile(lags, 99) or 0.0, 2),
        "max": round(lags[-1], 2),
    }
