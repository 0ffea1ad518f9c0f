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
from bench.harness import CROSSING_CYCLE, Lanes, plan_for
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
    "router_tokens_per_cpu_s",
)
# Issue 13: the router's event-loop lag, the saturation phase, capacity with single frames.
ISSUE_13_KEYS = (
    "loop_lag_ms_p99",
    "saturation_ttft_ms_p50",
    "saturation_ttft_ms_p99",
    "saturation_direct_ttft_ms_p50",
    "saturation_stream_tokens_per_s_p10",
    "saturation_stream_tokens_per_s_p50",
    "saturation_wide_ttft_ms_p50",
    "saturation_wide_ttft_ms_p99",
    "idle_ttft_ms_p50",
    "router_tokens_per_cpu_s_single_frames",
)
COMPARED = ("nodes", "saturation", "throughput", "realistic")
CROSSING_KEYS = (
    "cross_worker_ttft_ms_p50",
    "cross_worker_ttft_ms_p99",
    "same_worker_ttft_ms_p50",
    "across_workers_ttft_ms_p50",
    "crossing_direct_ttft_ms_p50",
)
# Issue 14: the scale-out stack against an embedded router of the same run.
SCALE_OUT_KEYS = (
    "scaleout_tokens_per_cpu_s",
    "scaleout_tokens_per_cpu_s_single_frames",
    "router_tokens_per_cpu_s",
    "router_tokens_per_cpu_s_single_frames",
    "scaleout_cpu_ratio",
    "scaleout_cpu_ratio_single_frames",
    "scaleout_token_errors",
    "scaleout_router_cpu_ms_per_request",
    "scaleout_cpu_ms_per_request",
    "router_cpu_ms_per_request",
    "scaleout_lost_streams",
    "scaleout_queue_timeouts",
    "workers_tokens_per_cpu_s",
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


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory):
    """One smoke run of one router process, shared by the tests that read it."""
    return run_bench(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def workers_run(tmp_path_factory: pytest.TempPathFactory):
    """One smoke run of two workers on Redis and PostgreSQL, shared by the tests that read it."""
    return run_bench(tmp_path_factory.mktemp("bench-workers"), "--workers", "2")


@pytest.mark.e2e
def test_smoke_run_reports_every_headline_figure_without_token_errors(smoke_run):
    result, figures = smoke_run
    for key in (*HEADLINE_KEYS, *ISSUE_13_KEYS):
        assert isinstance(figures[key], int | float), (key, figures[key])
    assert figures["token_errors"] == 0
    assert figures["errors"] == 0, [p["error_kinds"] for p in figures["phases"] if p.get("errors")]
    assert figures["nodes_held"] == figures["parameters"]["node_counts"][-1]
    assert figures["router_tokens_per_s"] > 0 and figures["direct_tokens_per_s"] > 0
    assert figures["parameters"]["mode"] == "smoke"
    assert "| target | goal | measured | met |" in result.stdout
    assert "### Goals of issue 13" in result.stdout
    # One process: nothing crosses workers, so the crossing phase does not run.
    assert figures["cross_worker_ttft_ms_p50"] is None
    assert not [p for p in figures["phases"] if p["kind"] == "crossing"]
    assert "crossing workers" not in result.stdout
    # Nor do issue 14's phases: there is no scale-out stack to compare.
    assert figures["scaleout_tokens_per_cpu_s"] is None
    assert figures["scaleout_lost_streams"] is None
    assert not [p for p in figures["phases"] if p["kind"] in ("capacity", "per-request", "loss")]
    assert "Goals of issue 14" not in result.stdout


@pytest.mark.e2e
def test_smoke_run_alternates_direct_and_router_rounds_and_probes_the_router_loop(smoke_run):
    _, figures = smoke_run
    rounds = figures["parameters"]["rounds"]
    compared = [p for p in figures["phases"] if p["kind"] in COMPARED]
    names = {p["name"] for p in compared}
    assert {p["kind"] for p in compared} == set(COMPARED)
    for name in names:
        direct, router = (
            next(p for p in compared if p["name"] == name and p["path"] == path)
            for path in ("direct", "router")
        )
        assert len(direct["rounds"]) == len(router["rounds"]) == rounds, name
        # direct, router, direct, router, ...: each round ends before the next begins.
        spans = [
            span for pair in zip(direct["rounds"], router["rounds"], strict=True) for span in pair
        ]
        edges = [edge for span in spans for edge in (span["began_s"], span["ended_s"])]
        assert edges == sorted(edges), name
        for phase in (direct, router):
            assert phase["requests"] == sum(r["requests"] for r in phase["rounds"]) > 0
            spread = phase["ttft_ms_p50_rounds"]
            assert spread["min"] <= spread["median"] <= spread["max"]
            assert isinstance(phase["stream_tokens_per_s_p10"], int | float)
        # The router's own loop was probed through its rounds.
        assert router["loop_lag_ms"]["samples"] > 0, name
    # Saturation nodes send one frame per token, as the network's existing nodes do.
    saturation = [p for p in compared if p["kind"] == "saturation"]
    assert {p["case"] for p in saturation} == {"idle", "saturation", "wide"}
    assert all(p["chunks_per_frame"] == 1.0 for p in saturation)
    p50_goals = [g for g in figures["goals"] if g["goal"].startswith("saturation TTFT p50")]
    assert [g["measured"] for g in p50_goals] == [
        figures["saturation_ttft_ms_p50"],
        figures["saturation_wide_ttft_ms_p50"],
    ]
    assert figures["loop_lag_ms_p99"] == max(
        e["p99"] for e in figures["loop_lag"] if e["path"] != "direct"
    )


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_every_compared_phase_measures_at_least_200_requests_per_path(mode: str):
    plan = plan_for(mode)
    per_round = {
        "node sweep": plan.round_requests(plan.node_sweep_concurrency),
        "throughput": plan.round_requests(plan.throughput_concurrency, plan.throughput_samples),
        **{
            f"saturation {case}": plan.round_requests(case[2], plan.saturation_samples)
            for case in (plan.idle_case, plan.saturation_case, plan.wide_case)
        },
        **{f"realistic C={c}": plan.realistic_requests(c) for c in plan.concurrencies},
        "capacity, one frame per token": plan.round_requests(
            plan.capacity_single_case[2], plan.capacity_samples
        ),
        "capacity, batching nodes": plan.round_requests(
            plan.throughput_concurrency, plan.capacity_samples
        ),
        "CPU per request": plan.round_requests(
            plan.request_cost_concurrency, plan.request_cost_samples
        ),
    }
    assert plan.rounds >= 3  # a spread needs a median apart from the extremes
    for phase, requests in per_round.items():
        assert requests * plan.rounds >= 200, phase
    assert plan.saturation_case == (1, 10, 10) and plan.wide_case == (10, 10, 50)
    assert plan.saturation_tokens == 200
    # Issue 14's loss scenario: 200 streams of ~100 tokens at 30 tokens/s, a slot for each.
    assert (plan.loss_concurrency, plan.loss_tokens, round(1 / plan.token_delay_s)) == (
        200,
        100,
        30,
    )
    assert plan.loss_nodes * plan.pool_max_concurrent >= plan.loss_concurrency


@pytest.mark.e2e
def test_smoke_run_with_two_workers_reports_what_crossing_workers_adds(workers_run):
    result, figures = workers_run
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


@pytest.mark.e2e
def test_smoke_run_with_two_workers_measures_the_stack_against_an_embedded_router(workers_run):
    result, figures = workers_run
    for key in SCALE_OUT_KEYS:
        assert isinstance(figures[key], int | float), (key, figures[key])
    assert figures["scaleout_token_errors"] == 0
    assert figures["scaleout_lost_streams"] == figures["scaleout_queue_timeouts"] == 0
    # Embedded and scale-out rounds alternate on each load: embedded, scale-out, embedded, ...
    compared = [p for p in figures["phases"] if p["kind"] in ("capacity", "per-request")]
    loads = {(p["kind"], p.get("frames")) for p in compared}
    assert loads == {("capacity", "single"), ("capacity", "batched"), ("per-request", None)}
    for kind, frames in loads:
        embedded, scale_out = (
            next(
                p
                for p in compared
                if (p["kind"], p.get("frames"), p["path"]) == (kind, frames, path)
            )
            for path in ("embedded", "scale-out")
        )
        assert embedded["ok"] == embedded["requests"] > 0, kind
        assert scale_out["ok"] == scale_out["requests"] > 0, kind
        assert (
            len(embedded["rounds"]) == len(scale_out["rounds"]) == figures["parameters"]["rounds"]
        )
        spans = [
            span
            for pair in zip(embedded["rounds"], scale_out["rounds"], strict=True)
            for span in pair
        ]
        edges = [edge for span in spans for edge in (span["began_s"], span["ended_s"])]
        assert edges == sorted(edges), kind
        # Each path's CPU is its own stack's: the embedded router relays in its rounds, the
        # workers and PostgreSQL in theirs.
        assert embedded["cpu_s"]["embedded"] > 0, kind
        assert scale_out["cpu_s"]["router"] > 0 and scale_out["cpu_s"]["postgres"] > 0, kind
        assert scale_out["cpu_s"]["router"] == pytest.approx(
            scale_out["cpu_s"]["router-0"] + scale_out["cpu_s"]["router-1"], abs=0.002
        )
    single = next(e for e in figures["scale_out"]["capacity"] if e["frames"] == "single")
    assert figures["router_tokens_per_cpu_s_single_frames"] == single["embedded_tokens_per_cpu_s"]
    assert figures["scaleout_cpu_ratio_single_frames"] == single["cpu_ratio"]
    (loss,) = [p for p in figures["phases"] if p["kind"] == "loss"]
    plan = figures["parameters"]
    assert (loss["concurrency"], loss["requests"]) == (
        plan["loss_concurrency"],
        plan["loss_concurrency"] * plan["loss_waves"],
    )
    assert loss["ok"] == loss["requests"] and loss["token_errors"] == 0
    # Nodes on worker 0, consumers on worker 1: both workers relay.
    assert loss["cpu_s"]["router-0"] > 0 and loss["cpu_s"]["router-1"] > 0
    assert "### Goals of issue 14 (scale-out)" in result.stdout
    assert "against one embedded router, same run (issue 14)" in result.stdout


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


def _saturation_phase(case: str, path: str, tokens: int, router_cpu: float, lag_p99: float):
    return {
        **_phase("saturation", path, 10, 50.0),
        "name": f"saturation {case}",
        "case": case,
        "tokens": tokens,
        "stream_tokens_per_s_p10": 400.0,
        "stream_tokens_per_s_p50": 1000.0,
        "cpu_s": {"router": router_cpu},
        "loop_lag_ms": {"samples": 100, "p50": 1.0, "p99": lag_p99, "max": lag_p99 + 1},
    }


def test_issue_13_figures_count_the_router_side_of_the_saturation_loads():
    plan = {
        "headline_concurrency": 1,
        "concurrencies": [1],
        "token_delay_s": 1 / 30,
        "idle_case": [1, 1, 1],
        "saturation_case": [1, 10, 10],
        "wide_case": [10, 10, 50],
    }
    phases = [
        _saturation_phase("idle", "direct", 40_000, 0.0, 90.0),
        _saturation_phase("idle", "router", 40_000, 4.0, 3.0),
        _saturation_phase("saturation", "direct", 40_000, 0.0, 80.0),
        _saturation_phase("saturation", "router", 40_000, 2.0, 7.0),
        _saturation_phase("wide", "direct", 60_000, 0.0, 70.0),
        _saturation_phase("wide", "router", 60_000, 3.0, 6.0),
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
    # The two saturation loads' router rounds together; the idle reference stays out.
    assert figures["router_tokens_per_cpu_s_single_frames"] == 20_000.0
    # Direct rounds show the machine's load on an idle router, not the router's own lag.
    assert figures["loop_lag_ms_p99"] == 7.0
    assert figures["loop_lag_worst_phase"] == "saturation saturation (router)"
    starving = next(g for g in figures["goals"] if g["goal"].startswith("no stream starves"))
    assert (starving["measured"], starving["met"]) == (0.4, False)


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
