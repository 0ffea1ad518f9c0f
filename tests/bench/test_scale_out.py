"""Issue 14's figures in the benchmark: the scale-out stack against an embedded router of the
same run, CPU per request, the loss phase, and the CPU accounting they rest on. The phases
themselves run end to end in tests/bench/test_bench_smoke.py (``--smoke --workers 2``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg
import pytest

from bench import load, report, servers
from bench.harness import Cluster, Meter, plan_for
from idleclaw_site import shutdown
from routing.streaming import ERROR_MESSAGES, Unavailable

ROOT = Path(__file__).resolve().parents[2]


def _phase(kind: str, path: str, *, tokens: int, cpu: dict[str, float], **extra) -> dict:
    return {
        "name": f"{kind} {extra.get('frames', '')}".strip(),
        "kind": kind,
        "path": path,
        "model": "m",
        "concurrency": 10,
        "nodes": 2,
        "requests": 100,
        "ok": 100,
        "errors": 0,
        "error_kinds": {},
        "stream_errors": {},
        "token_errors": 0,
        "tokens": tokens,
        "tokens_per_s": 1000.0,
        "ttft_ms_p50": 10.0,
        "ttft_ms_p95": 15.0,
        "ttft_ms_p99": 20.0,
        "requests_per_s": 100.0,
        "router_rss_mb_peak": 100.0,
        "router_threads_peak": 10,
        "stream_tokens_per_s_p10": 30.0,
        "stream_tokens_per_s_p50": 30.0,
        "wall_s": 1.0,
        "cpu_s": cpu,
        "other_cpu_s": 0.0,
        **extra,
    }


def _rounds(tokens: int, cpu: dict[str, float]) -> list[dict]:
    return [{"tokens": tokens // 2, "cpu_s": {k: v / 2 for k, v in cpu.items()}}] * 2


def _stack(router: float, redis: float, postgres: float) -> dict[str, float]:
    return {
        "router-0": router / 2,
        "router-1": router / 2,
        "router": router,
        "redis": redis,
        "postgres": postgres,
        "redis+postgres": redis + postgres,
    }


def _scaled_results(loss: dict | None = None) -> dict:
    embedded = {"embedded": 1.0}
    phases = [
        # The workers alone in the throughput phase: 10,000 tokens per workers' CPU-second.
        _phase("throughput", "direct", tokens=50_000, cpu={}),
        _phase("throughput", "router", tokens=50_000, cpu=_stack(5.0, 1.0, 1.0)),
        _phase(
            "capacity",
            "embedded",
            tokens=40_000,
            cpu=embedded,
            frames="single",
            rounds=_rounds(40_000, embedded),
        ),
        _phase(
            "capacity",
            "scale-out",
            tokens=40_000,
            cpu=_stack(2.0, 0.5, 0.5),
            frames="single",
            rounds=_rounds(40_000, _stack(2.0, 0.5, 0.5)),
        ),
        _phase(
            "capacity",
            "embedded",
            tokens=80_000,
            cpu=embedded,
            frames="batched",
            rounds=_rounds(80_000, embedded),
        ),
        _phase(
            "capacity",
            "scale-out",
            tokens=80_000,
            cpu=_stack(1.0, 0.1, 0.1),
            frames="batched",
            rounds=_rounds(80_000, _stack(1.0, 0.1, 0.1)),
        ),
        _phase("per-request", "embedded", tokens=100, cpu={"embedded": 0.2}),
        _phase("per-request", "scale-out", tokens=100, cpu=_stack(0.4, 0.05, 0.15)),
    ]
    if loss is not None:
        phases.append(_phase("loss", "scale-out", tokens=30_000, cpu=_stack(6.0, 1.0, 1.0), **loss))
    return report.results(
        plan={
            "workers": 2,
            "headline_concurrency": 10,
            "concurrencies": [10],
            "token_delay_s": 1 / 30,
            "pool_max_concurrent": 10,
            "rounds": 2,
            "mode": "smoke",
            "node_sweep_concurrency": 10,
        },
        machine={
            "cores": 2,
            "cpu": "x",
            "memory_gb": 1,
            "python": "3",
            "commit": "c",
            "loadavg_start": [0, 0, 0],
        },
        phases=phases,
        node_sweep=[],
        baseline_rss_mb=0.0,
        router_peak_rss_mb=0.0,
        profiles={},
        duration_s=1.0,
    )


def test_scale_out_cpu_per_token_counts_workers_redis_and_postgres_against_the_embedded_router():
    figures = _scaled_results()
    # Single frames: 40,000 tokens over 2 + 0.5 + 0.5 s of the stack, 1 s of the embedded.
    assert figures["scaleout_tokens_per_cpu_s_single_frames"] == 13_333.3
    assert figures["router_tokens_per_cpu_s_single_frames"] == 40_000.0
    assert figures["scaleout_cpu_ratio_single_frames"] == 3.0
    # Batching: 80,000 tokens over 1.2 s against 1 s.
    assert figures["scaleout_tokens_per_cpu_s"] == 66_666.7
    assert figures["router_tokens_per_cpu_s"] == 80_000.0
    assert figures["scaleout_cpu_ratio"] == 1.2
    single = next(e for e in figures["scale_out"]["capacity"] if e["frames"] == "single")
    assert single["cpu_ratio_rounds"] == {"min": 3.0, "median": 3.0, "max": 3.0}
    # The workers alone in the throughput phase keep a key of their own.
    assert figures["workers_tokens_per_cpu_s"] == 10_000.0
    # 100 requests: 0.4 s of the workers, 0.6 s with Redis and PostgreSQL, 0.2 s embedded.
    assert figures["scaleout_router_cpu_ms_per_request"] == 4.0
    assert figures["scaleout_cpu_ms_per_request"] == 6.0
    assert figures["router_cpu_ms_per_request"] == 2.0
    goals = {g["goal"]: g for g in figures["scale_out_goals"]}
    batched = goals[
        "scale-out CPU per token / embedded, batching nodes (workers + Redis + PostgreSQL)"
    ]
    assert (batched["target"], batched["measured"], batched["met"]) == ("<= 1.5", 1.2, True)
    single_goal = goals["scale-out CPU per token / embedded, one frame per token"]
    assert (single_goal["measured"], single_goal["met"]) == (3.0, False)


def test_loss_phase_counts_cut_streams_apart_from_queue_timeouts_and_refusals():
    figures = _scaled_results(
        loss={
            "concurrency": 200,
            "requests": 400,
            "ok": 380,
            "errors": 20,
            "token_errors": 2,
            "error_kinds": {
                "stream_error": 12,
                "lost": 2,
                "unterminated": 1,
                "http_503_busy": 5,
            },
            "stream_errors": {"queue_timeout": 9, "lost_chunks": 3},
            "node_stats": {"lost": {"1008 too many frames for unknown requests": 4}},
        }
    )
    # 3 lost chunks + 2 token losses + 1 unterminated; 9 queue timeouts and 5 refusals apart.
    assert figures["scaleout_lost_streams"] == 6
    assert figures["scaleout_queue_timeouts"] == 9
    assert figures["scaleout_loss_streams"] == 400
    assert figures["scaleout_loss_error_kinds"]["http_503_busy"] == 5
    assert figures["scale_out"]["loss"]["nodes_dropped"] == 4
    lost = next(g for g in figures["scale_out_goals"] if g["goal"].startswith("streams cut"))
    assert (lost["measured"], lost["met"]) == (6, False)
    text = report.markdown(figures)
    assert "### Goals of issue 14 (scale-out)" in text
    assert "| 400 | 380 | 6 | 9 | 5 |" in text
    assert "stream_error:lost_chunks 3, stream_error:queue_timeout 9" in text


def test_an_embedded_run_has_no_scale_out_figures_and_keeps_its_capacity_keys():
    figures = report.results(
        plan={"headline_concurrency": 10, "concurrencies": [10], "token_delay_s": 1 / 30},
        machine={},
        phases=[
            _phase("throughput", "direct", tokens=50_000, cpu={}),
            _phase("throughput", "router", tokens=50_000, cpu={"router": 1.0}),
        ],
        node_sweep=[],
        baseline_rss_mb=0.0,
        router_peak_rss_mb=0.0,
        profiles={},
        duration_s=1.0,
    )
    assert figures["router_tokens_per_cpu_s"] == 50_000.0
    assert figures["scaleout_tokens_per_cpu_s"] is None
    assert figures["workers_tokens_per_cpu_s"] is None
    assert figures["scale_out_goals"] == []


@pytest.mark.parametrize("code", sorted(ERROR_MESSAGES))
def test_an_error_event_is_counted_by_the_router_reason_it_names(code: str):
    """Every message the router can end a stream with, as it sends it (PROTOCOL §2)."""
    event = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "choices": [
            {
                "index": 0,
                "delta": {"content": f"\n\n[Error: {ERROR_MESSAGES[code]}]"},
                "finish_reason": "error",
            }
        ],
    }
    line = b"data: " + json.dumps(event).encode()
    expected = "restarting" if code == shutdown.RESTARTING else code
    assert load._sse(line) == ("stream_error", expected)


@pytest.mark.parametrize(
    ("unavailable", "kind"),
    [
        (Unavailable(model="m", served=True), "http_503_busy"),
        (Unavailable(model="m", served=False), "http_503_no_node"),
        (Unavailable(model="m", served=True, queue_full=True), "http_503_queue_full"),
        (Unavailable(model="m", served=True, restarting=True), "http_503_restarting"),
    ],
)
def test_a_refusal_is_counted_by_the_reason_the_router_gives(unavailable, kind: str):
    """A 503 before the stream (the loss phase counts these apart from lost streams)."""
    body = json.dumps({"detail": unavailable.message}).encode()
    assert load._http_error(503, body) == kind


@pytest.mark.e2e
@pytest.mark.scaleout
def test_meter_counts_the_cpu_of_postgres_backends_that_came_and_went(tmp_path: Path):
    """The router opens a PostgreSQL connection per request, so most backends exit between two
    readings of the meter; their CPU is PostgreSQL's all the same."""
    plan = plan_for("smoke")
    plan.workers = 2
    cluster = Cluster(plan, tmp_path, {}, ROOT)
    env = servers.start_for_bench(tmp_path)
    cluster.servers = servers
    try:

        def queries() -> None:
            for _ in range(40):
                with psycopg.connect(env["DATABASE_URL"]) as conn:
                    conn.execute("SELECT sum(i) FROM generate_series(1, 300000) AS i").fetchall()

        _, usage = asyncio.run(Meter(cluster).measure(asyncio.to_thread(queries)))
    finally:
        servers.stop_for_bench()
    # 40 sums of 300,000 rows take well over half a second of a backend's CPU on any machine
    # this runs on; none of those backends is alive when the meter reads.
    assert usage.cpu_s["postgres"] > 0.3
    assert usage.cpu_s["redis+postgres"] == usage.cpu_s["redis"] + usage.cpu_s["postgres"]
