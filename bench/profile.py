"""Summarize py-spy's raw (collapsed stack) profiles: where the router spends its CPU.

Shares are percent of busy samples (idle waits dropped, see ``IDLE_LEAVES``), all threads
together: the event loop and the thread that runs database work.

``python -m bench --profile`` records the router with ``py-spy record --format raw`` during the
throughput phase and the headline realistic phase; this module turns each file into shares of
samples: by function where the CPU is spent (self), by function including what it calls
(inclusive) and by package (self, grouped by the first directory of the file).

``python -m bench.profile FILE [--top N]`` prints the same as Markdown.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
# Leaf frames that mean "waiting", not "working": py-spy's --nonblocking mode (used so the
# profiler does not stall the router) cannot tell idle threads apart, so they are dropped here.
IDLE_LEAVES = {
    ("EpollSelector.select", "selectors.py"),
    ("_worker", "concurrent/futures/thread.py"),
    ("Condition.wait", "threading.py"),
    ("Thread._wait_for_tstate_lock", "threading.py"),
    ("Event.wait", "threading.py"),
    ("sleep", "asyncio/tasks.py"),
}


def _function(frame: str) -> tuple[str, str]:
    """``"JSONEncoder.encode (json/encoder.py:200)"`` → (``"JSONEncoder.encode"``, file)."""
    match = FRAME_RE.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    return match.group("func"), match.group("file")


def _package(file: str) -> str:
    if not file:
        return "(native)"
    parts = file.split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    return parts[0] if len(parts) > 1 else file


def summarize(path: Path, top: int = 25, thread: str = "all") -> dict[str, Any]:
    """Shares (percent of busy samples) of the hottest functions and packages in one profile.

    ``thread`` keeps only the event loop's samples (``"loop"``), only the thread pool's
    (``"pool"``: database work run through ``database_sync_to_async``), or all (``"all"``).
    Shares stay relative to all busy samples, so the loop's and the pool's add up to 100.
    ``loop_pct`` and ``pool_pct`` give the split.
    """
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    idle = 0
    pool = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {"samples": 0, "self": [], "inclusive": [], "packages": []}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";")]
        func, file = frames[-1]
        if (func, file) in IDLE_LEAVES:
            idle += count
            continue
        total += count
        in_pool = ("Thread._bootstrap", "threading.py") in frames
        pool += count if in_pool else 0
        if thread != "all" and in_pool != (thread == "pool"):
            continue
        self_time[f"{func} ({file})"] += count
        packages[_package(file)] += count
        for name in {f"{f} ({fl})" for f, fl in frames}:
            inclusive[name] += count

    def shares(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"name": name, "pct": round(100 * n / total, 1)} for name, n in counter.most_common(top)
        ]

    if total == 0:
        return {"samples": 0, "idle_samples": idle, "self": [], "inclusive": [], "packages": []}
    return {
        "samples": total,
        "idle_samples": idle,
        "thread": thread,
        "loop_pct": round(100 * (total - pool) / total, 1),
        "pool_pct": round(100 * pool / total, 1),
        "self": shares(self_time),
        "inclusive": shares(inclusive),
        "packages": shares(packages),
    }


def markdown(summary: dict[str, Any], title: str = "", top: int = 12) -> str:
    lines = [f"#### {title}" if title else ""]
    if summary["samples"]:
        lines += [
            "",
            f"{summary['samples']} busy samples: event loop {summary['loop_pct']} %, thread "
            f"pool (database) {summary['pool_pct']} %. Showing: {summary['thread']} threads.",
        ]
    for key, label in (
        ("packages", "self time by package"),
        ("self", "self time by function"),
        ("inclusive", "inclusive time by function"),
    ):
        lines += ["", f"| {label} | % |", "|---|---:|"]
        lines += [f"| `{row['name']}` | {row['pct']} |" for row in summary[key][:top]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--thread", choices=("all", "loop", "pool"), default="all")
    args = parser.parse_args(argv)
    for file in args.files:
        print(markdown(summarize(file, args.top, args.thread), str(file), args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
