"""The benchmark harness (``python -m bench``) must keep working: run its smoke mode end to end
(emulators, daphne, simulated nodes, consumers; with ``--workers 2`` also Redis and PostgreSQL)
and check what it reports."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.harness import CROSSING_CYCLE, Lanes
from bench.load import Consumers, LoadResult, Outcome, Workload, check_tokens

ROOT = Path(__file__).resolve().parents[2]
HEADLINE_KEYS = (
    "direct_ttft_ms_p50",
    "router_ttft_ms_p50",
    "router_ttft_ms_p99",
    "direct_tokens_per_s",
    "router_tokens_per_s",
    "router_rss_mb",
    "nodes_held",
)
CROSSING_KEYS = (
    "cross_worker_ttft_ms_p50",
    "cross_worker_ttft_ms_p99",
    "same_worker_ttft_ms_p50",
    "across_workers_ttft_ms_p50",
    "crossing_direct_ttft_ms_p50",
)


def run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--quiet", "--json", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result, json.loads(out.read_text())


@pytest.mark.e2e
def test_smoke_run_reports_every_headline_figure_without_token_errors(tmp_path: Path):
    result, figures = run_bench(tmp_path)
    for key in HEADLINE_KEYS:
        assert isinstance(figures[key], int | float), (key, figures[key])
    assert figures["token_errors"] == 0
    assert figures["errors"] == 0, [p["error_kinds"] for p in figures["phases"] if p.get("errors")]
    assert figures["nodes_held"] == figures["parameters"]["node_counts"][-1]
    assert figures["router_tokens_per_s"] > 0 and figures["direct_tokens_per_s"] > 0
    assert figures["parameters"]["mode"] == "smoke"
    assert "| target | goal | measured | met |" in result.stdout
    # One process: nothing crosses workers, so the crossing phase does not run.
    assert figures["cross_worker_ttft_ms_p50"] is None
    assert not [p for p in figures["phases"] if p["kind"] == "crossing"]
    assert "crossing workers" not in result.stdout


@pytest.mark.e2e
def test_smoke_run_with_two_workers_reports_what_crossing_workers_adds(tmp_path: Path):
    result, figures = run_bench(tmp_path, "--workers", "2")
    for key in (*HEADLINE_KEYS, *CROSSING_KEYS):
        assert isinstance(figures[key], int | float), (key, figures[key])
    assert figures["token_errors"] == 0
    assert figures["errors"] == 0, [p["error_kinds"] for p in figures["phases"] if p.get("errors")]
    crossing = [p for p in figures["phases"] if p["kind"] == "crossing"]
    concurrencies = figures["parameters"]["crossing_concurrencies"]
    assert sorted((p["concurrency"], p["path"]) for p in crossing) == sorted(
        (c, path) for c in concurrencies for path in ("direct", "router-same", "router-across")
    )
    assert all(p["ok"] == p["requests"] > 0 and p["token_errors"] == 0 for p in crossing)
    assert figures["cross_worker_ttft_ms_p50"] == round(
        figures["across_workers_ttft_ms_p50"] - figures["same_worker_ttft_ms_p50"], 2
    )
    assert "TTFT added by crossing workers (issue 3)" in result.stdout
    assert "| 1 | across workers |" in result.stdout


def _phase(kind: str, path: str, concurrency: int, ttft: float) -> dict:
    return {
        "kind": kind,
        "path": path,
        "concurrency": concurrency,
        "requests": 10,
        "errors": 0,
        "token_errors": 0,
        "ttft_ms_p50": ttft,
        "ttft_ms_p99": ttft + 5,
        "tokens": 100,
        "tokens_per_s": 30.0,
        "stream_tokens_per_s_p50": 30.0,
        "wall_s": 1.0,
        "cpu_s": {"router": 0.1},
    }


def test_crossing_phases_stay_out_of_the_headline_and_the_concurrency_sweep():
    plan = {
        "headline_concurrency": 1,
        "concurrencies": [1],
        "crossing_concurrencies": [1],
        "token_delay_s": 1 / 30,
    }
    phases = [
        _phase("crossing", "direct", 1, 30.0),
        _phase("crossing", "router-same", 1, 40.0),
        _phase("crossing", "router-across", 1, 41.5),
        _phase("realistic", "direct", 1, 35.0),
        _phase("realistic", "router", 1, 45.0),
    ]
    figures = report.results(
        plan=plan,
        machine={},
        phases=phases,
        node_sweep=[],
        baseline_rss_mb=0.0,
        router_peak_rss_mb=0.0,
        profiles={},
        duration_s=1.0,
    )
    assert (figures["direct_ttft_ms_p50"], figures["router_ttft_ms_p50"]) == (35.0, 45.0)
    assert figures["concurrency_sweep"][0]["overhead_ms_p50"] == 10.0
    assert figures["cross_worker_ttft_ms_p50"] == 1.5
    assert figures["crossing_direct_ttft_ms_p50"] == 30.0
    row = figures["targets"][-1]
    assert row["target"].startswith("TTFT added by crossing workers (issue 3)")
    assert (row["measured"], row["met"]) == (1.5, True)


class _Path(Consumers):
    """A path that answers at once and says each answer took ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(path="router", targets=["http://unused"], expected=lambda body: [])
        self.seconds = seconds
        self.numbers: list[int] = []

    async def one(self, http, workload, number):
        self.numbers.append(number)
        return Outcome(ok=True, error=None, ttft=0.01, duration=self.seconds, tokens=1)


def test_lanes_send_each_request_down_its_path_of_the_cycle_and_share_out_the_wall():
    paths = {"direct": _Path(1.0), "router-same": _Path(2.0), "router-across": _Path(2.0)}
    lanes = Lanes(paths, CROSSING_CYCLE)
    workload = Workload("w", "m", 1, 2 * len(CROSSING_CYCLE))
    whole = asyncio.run(lanes.run(workload))
    for name, path in paths.items():
        assert [CROSSING_CYCLE[n % len(CROSSING_CYCLE)] for n in path.numbers] == [name] * len(
            path.numbers
        )
    assert [len(p.numbers) for p in paths.values()] == [4, 8, 8]
    parts = lanes.split(LoadResult(workload, "router", 0.0, 36.0, whole.outcomes))
    # Busy time 4 x 1 s, 8 x 2 s, 8 x 2 s: the 36 s wall is shared 4 : 16 : 16.
    assert [round(part.wall, 6) for part in parts.values()] == [4.0, 16.0, 16.0]


EXPECTED = ["sky0", " lamp1", " river2", " stone3"]


@pytest.mark.parametrize(
    ("received", "verdict"),
    [
        (EXPECTED, None),
        (["sky0 lamp1", " river2 stone3"], None),  # a relay may batch tokens into one delta
        (["sky0", " river2", " stone3"], "lost"),
        (["sky0", " lamp1", " lamp1", " river2", " stone3"], "duplicated"),
        (["sky0", " river2", " lamp1", " stone3"], "reordered"),
        (["sky0", " lamp1", " cloud2", " stone3"], "foreign"),
        (["sky0", " lamp1", " riv", " stone3"], "garbled"),
    ],
)
def test_token_check_names_the_damage(received, verdict):
    assert check_tokens(received, EXPECTED) == verdict
