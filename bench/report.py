"""The benchmark's results: the JSON document and its Markdown rendering.

Headline figures (the flat keys issue 7 asks for):

* ``direct_ttft_ms_p50``, ``router_ttft_ms_p50``, ``router_ttft_ms_p99``: time to first token
  at the headline concurrency (50) on the 30 tokens/s model, direct and through the router;
* ``direct_tokens_per_s``, ``router_tokens_per_s``: tokens delivered per second, all streams
  together, in the throughput phase (zero-delay model): the relay's ceiling on this machine;
* ``router_rss_mb``: the router's peak resident memory over the whole run (kernel VmHWM);
* ``nodes_held``: the most nodes the router reported live at once in the node sweep;
* ``cross_worker_ttft_ms_p50``, ``cross_worker_ttft_ms_p99`` (``--workers K``, K >= 2, issue
  3): what a request served by another worker than its node's adds to TTFT, across workers
  minus same worker, at the crossing phase's lowest concurrency.

Issue 13 adds (``goals`` holds them against its goals):

* ``loop_lag_ms_p99``: how late the router's 10 ms timer fired, p99, in the worst phase
  (router side: the router rounds, idle windows, crossing); ``loop_lag`` has every phase;
* ``saturation_ttft_ms_p50``, ``saturation_ttft_ms_p99``: TTFT through the router with 1 node
  x 10 slots and 10 consumers of instant 200-token answers, one frame per token;
  ``saturation_wide_*`` the same for 10 nodes x 10 slots and 50 consumers, ``idle_*`` for one
  slot and one consumer; ``saturation`` has each case in full;
* ``router_tokens_per_cpu_s_single_frames``: tokens per router CPU-second in the two
  saturation loads (one frame per token), next to ``router_tokens_per_cpu_s`` (the throughput
  phase, nodes batching with ``inference_chunks``).

Issue 14 adds, with ``--workers K`` (K >= 2; ``scale_out_goals`` holds them against its goals),
from phases where the scale-out stack and one embedded router started beside it alternate
rounds of the same load:

* ``scaleout_tokens_per_cpu_s`` and ``scaleout_tokens_per_cpu_s_single_frames``: tokens relayed
  per CPU-second of every worker, Redis and PostgreSQL, with batching nodes and with nodes
  sending one frame per token; in such a run ``router_tokens_per_cpu_s`` and
  ``router_tokens_per_cpu_s_single_frames`` are the embedded router's on the same loads, and
  ``scaleout_cpu_ratio`` and ``scaleout_cpu_ratio_single_frames`` the scale-out CPU per token
  over the embedded one (the workers alone, as the throughput and saturation phases measure
  them, stay in ``workers_tokens_per_cpu_s`` and ``workers_tokens_per_cpu_s_single_frames``);
* ``scaleout_router_cpu_ms_per_request`` (the workers) and ``scaleout_cpu_ms_per_request``
  (with Redis and PostgreSQL), one-token answers; ``router_cpu_ms_per_request`` the embedded;
* ``scaleout_lost_streams`` and ``scaleout_queue_timeouts``: streams cut or missing tokens, and
  queue timeouts, with the nodes on worker 0 and the consumers on worker 1;
  ``scaleout_loss_error_kinds`` has every failure by kind;
* ``scaleout_token_errors``: token errors on the scale-out stack, every phase.
"""

from __future__ import annotations

from typing import Any

from bench import profile

TARGET_OVERHEAD_P50_MS = 2.0
TARGET_OVERHEAD_P99_MS = 10.0
TARGET_TOKENS_PER_S = 50_000
TARGET_RATIO = 0.9
TARGET_IDLE_NODES = 1000
TARGET_IDLE_RSS_MB = 300
# "Flat" selection: TTFT p50 at the most nodes within this much of the fewest nodes.
FLAT_SELECTION_MS = 2.0
TARGET_CROSSING_P50_MS = 3.0  # issue 3
# Issue 13's goals.
GOAL_LOOP_LAG_P99_MS = 5.0
GOAL_SATURATION_P50_MS = 30.0
GOAL_SATURATION_P99_MS = 100.0
GOAL_WIDE_P50_MS = 60.0
GOAL_STARVATION_RATIO = 0.5  # per-stream tokens/s p10 >= this x p50
GOAL_OVERHEAD_P50_MS = 3.0
GOAL_OVERHEAD_P99_MS = 10.0
GOAL_OVERHEAD_200_P50_MS = 10.0
GOAL_SINGLE_FRAME_CAPACITY = 30_000
GOAL_BATCHING_CAPACITY = 80_000
GOAL_KB_PER_NODE = 37.0  # "no regression of memory per idle node (37 KB now)"
# Issue 14's goals.
GOAL_SCALEOUT_CPU_RATIO = 1.5  # scale-out CPU per token / one embedded router's
GOAL_REQUEST_CPU_MS = 5.0  # the workers' CPU per request
GOAL_CROSSING_P50_MS = 3.0
EMBEDDED = "embedded"
SCALE_OUT = "scale-out"
FRAMES = {"single": "one frame per token", "batched": "batching nodes"}
SATURATION_CASES = ("idle", "saturation", "wide")
CROSSING_PATHS = {
    "direct": "direct",
    "router-same": "same worker",
    "router-across": "across workers",
}


def _find(phases: list[dict[str, Any]], kind: str, path: str, concurrency: int | None = None):
    for phase in phases:
        if phase["kind"] == kind and phase["path"] == path:
            if concurrency is None or phase["concurrency"] == concurrency:
                return phase
    return None


def _case(phases: list[dict[str, Any]], case: str, path: str) -> dict[str, Any] | None:
    for phase in phases:
        if phase["kind"] == "saturation" and phase.get("case") == case and phase["path"] == path:
            return phase
    return None


def _lag(phase: dict[str, Any], key: str) -> float | None:
    return (phase.get("loop_lag_ms") or {}).get(key)


def _per_cpu(tokens: float, cpu: float | None) -> float | None:
    return round(tokens / cpu, 1) if cpu else None


def _saturation(phases: list[dict[str, Any]], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's saturation phase, one entry per case (idle, saturation, wide)."""
    out = []
    for case in SATURATION_CASES:
        direct = _case(phases, case, "direct")
        router = _case(phases, case, "router")
        if direct is None or router is None:
            continue
        nodes, slots, consumers = plan.get(f"{case}_case") or (None, None, None)
        p10 = router.get("stream_tokens_per_s_p10")
        p50 = router.get("stream_tokens_per_s_p50")
        cpu = (router.get("cpu_s") or {}).get("router")
        out.append(
            {
                "case": case,
                "nodes": nodes,
                "slots": slots,
                "consumers": consumers,
                "requests": router.get("requests"),
                "direct_ttft_ms_p50": direct.get("ttft_ms_p50"),
                "direct_ttft_ms_p99": direct.get("ttft_ms_p99"),
                "router_ttft_ms_p50": router.get("ttft_ms_p50"),
                "router_ttft_ms_p99": router.get("ttft_ms_p99"),
                "direct_ttft_ms_p50_rounds": direct.get("ttft_ms_p50_rounds"),
                "router_ttft_ms_p50_rounds": router.get("ttft_ms_p50_rounds"),
                "stream_tokens_per_s_p10": p10,
                "stream_tokens_per_s_p50": p50,
                "starvation_ratio": _ratio(p10, p50),
                "direct_stream_tokens_per_s_p50": direct.get("stream_tokens_per_s_p50"),
                "direct_tokens_per_s": direct.get("tokens_per_s"),
                "router_tokens_per_s": router.get("tokens_per_s"),
                "router_tokens": router.get("tokens"),
                "router_cpu_s": cpu,
                "router_tokens_per_cpu_s": _per_cpu(router.get("tokens") or 0, cpu),
                "chunks_per_frame": router.get("chunks_per_frame"),
                "loop_lag_ms": router.get("loop_lag_ms"),
                "errors": (router.get("errors") or 0) + (direct.get("errors") or 0),
            }
        )
    return out


def _loop_lag(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The router's event-loop lag in each measured phase that has samples."""
    return [
        {
            "phase": p["name"],
            "kind": p["kind"],
            "path": p["path"],
            **p["loop_lag_ms"],
        }
        for p in phases
        if p["kind"] != "warmup" and p.get("loop_lag_ms")
    ]


def _stack_cpu(phase: dict[str, Any]) -> float:
    """CPU of what relays in an issue 14 phase: the embedded router alone, or every worker
    with Redis and PostgreSQL."""
    cpu = phase.get("cpu_s") or {}
    if phase["path"] == EMBEDDED:
        return cpu.get("embedded", 0.0)
    return cpu.get("router", 0.0) + cpu.get("redis+postgres", 0.0)


def _round_cpu_ratio(embedded: dict[str, Any], scale_out: dict[str, Any]) -> float | None:
    """Scale-out CPU per token over the embedded router's, in one pair of rounds."""
    per_token = []
    for phase, entry in ((embedded, EMBEDDED), (scale_out, SCALE_OUT)):
        cpu = _stack_cpu({"path": entry, "cpu_s": phase.get("cpu_s")})
        if not phase.get("tokens") or not cpu:
            return None
        per_token.append(cpu / phase["tokens"])
    return round(per_token[1] / per_token[0], 3)


def _scale_out(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 14's phases: capacity per kind of node, CPU per request, the loss phase."""
    capacity = []
    for frames in FRAMES:
        pair = [p for p in phases if p["kind"] == "capacity" and p.get("frames") == frames]
        embedded = next((p for p in pair if p["path"] == EMBEDDED), None)
        scale_out = next((p for p in pair if p["path"] == SCALE_OUT), None)
        if embedded is None or scale_out is None:
            continue
        per_cpu = {
            path: _per_cpu(phase["tokens"], _stack_cpu(phase))
            for path, phase in ((EMBEDDED, embedded), (SCALE_OUT, scale_out))
        }
        rounds = [
            _round_cpu_ratio(a, b)
            for a, b in zip(embedded.get("rounds", []), scale_out.get("rounds", []), strict=False)
        ]
        capacity.append(
            {
                "frames": frames,
                "name": scale_out["name"],
                "model": scale_out["model"],
                "concurrency": scale_out["concurrency"],
                "nodes": scale_out["nodes"],
                "embedded_tokens_per_cpu_s": per_cpu[EMBEDDED],
                "scaleout_tokens_per_cpu_s": per_cpu[SCALE_OUT],
                "scaleout_workers_tokens_per_cpu_s": _per_cpu(
                    scale_out["tokens"], (scale_out.get("cpu_s") or {}).get("router")
                ),
                "cpu_ratio": _ratio(per_cpu[EMBEDDED], per_cpu[SCALE_OUT]),
                "cpu_ratio_rounds": _spread(rounds),
                "paths": {
                    path: _path_figures(phase)
                    for path, phase in ((EMBEDDED, embedded), (SCALE_OUT, scale_out))
                },
                "errors": embedded["errors"] + scale_out["errors"],
                "token_errors": embedded["token_errors"] + scale_out["token_errors"],
            }
        )
    per_request = None
    embedded = _find(phases, "per-request", EMBEDDED)
    scale_out = _find(phases, "per-request", SCALE_OUT)
    if embedded is not None and scale_out is not None:
        cpu = scale_out.get("cpu_s") or {}
        count = max(1, scale_out["requests"])

        def ms(seconds: float | None, requests: int = count) -> float | None:
            return None if seconds is None else round(1000 * seconds / requests, 3)

        per_request = {
            "concurrency": scale_out["concurrency"],
            "model": scale_out["model"],
            "router_cpu_ms_per_request": ms(
                (embedded.get("cpu_s") or {}).get("embedded"), max(1, embedded["requests"])
            ),
            "scaleout_router_cpu_ms_per_request": ms(cpu.get("router")),
            "scaleout_cpu_ms_per_request": ms(_stack_cpu(scale_out)),
            "redis_cpu_ms_per_request": ms(cpu.get("redis")),
            "postgres_cpu_ms_per_request": ms(cpu.get("postgres")),
            "paths": {
                path: _path_figures(phase)
                for path, phase in ((EMBEDDED, embedded), (SCALE_OUT, scale_out))
            },
            "errors": embedded["errors"] + scale_out["errors"],
        }
    loss = None
    phase = _find(phases, "loss", SCALE_OUT)
    if phase is not None:
        kinds = phase.get("error_kinds") or {}
        reasons = phase.get("stream_errors") or {}
        refused = sum(n for kind, n in kinds.items() if kind.startswith("http_"))
        queue_timeouts = reasons.get("queue_timeout", 0)
        loss = {
            "concurrency": phase["concurrency"],
            "model": phase["model"],
            "nodes": phase["nodes"],
            "streams": phase["requests"],
            "ok": phase["ok"],
            # Accepted streams that did not deliver their whole answer and [DONE]; a queue
            # timeout promised no token, and a refusal (429, 503) was never a stream.
            "lost": phase["errors"] - refused - queue_timeouts,
            "queue_timeouts": queue_timeouts,
            "refused": refused,
            "error_kinds": kinds,
            "stream_errors": reasons,
            "token_errors": phase["token_errors"],
            # Node sockets the router closed during the phase, by its reason.
            "nodes_dropped": sum(((phase.get("node_stats") or {}).get("lost") or {}).values()),
            "ttft_ms_p50": phase["ttft_ms_p50"],
            "ttft_ms_p99": phase["ttft_ms_p99"],
            "stream_tokens_per_s_p10": phase.get("stream_tokens_per_s_p10"),
            "stream_tokens_per_s_p50": phase.get("stream_tokens_per_s_p50"),
            "wall_s": phase["wall_s"],
            "cpu_s": phase.get("cpu_s"),
            "other_cpu_s": phase.get("other_cpu_s"),
            "loop_lag_ms": phase.get("loop_lag_ms"),
        }
    return {"capacity": capacity, "per_request": per_request, "loss": loss}


def _path_figures(phase: dict[str, Any]) -> dict[str, Any]:
    """One path of an issue 14 phase: its load's figures and the CPU of every component."""
    return {
        "requests": phase["requests"],
        "ok": phase["ok"],
        "errors": phase["errors"],
        "tokens": phase["tokens"],
        "tokens_per_s": phase["tokens_per_s"],
        "ttft_ms_p50": phase["ttft_ms_p50"],
        "wall_s": phase["wall_s"],
        "stack_cpu_s": round(_stack_cpu(phase), 3),
        "cpu_s": phase.get("cpu_s"),
        "other_cpu_s": phase.get("other_cpu_s"),
    }


def _spread(values: list[float | None]) -> dict[str, float] | None:
    """min / median / max, as the harness gives the rounds' figures."""
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    middle = len(present) // 2
    median = (
        present[middle]
        if len(present) % 2
        else round((present[middle - 1] + present[middle]) / 2, 3)
    )
    return {"min": present[0], "median": median, "max": present[-1]}


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


def results(
    *,
    plan: dict[str, Any],
    machine: dict[str, Any],
    phases: list[dict[str, Any]],
    node_sweep: list[dict[str, Any]],
    baseline_rss_mb: float,
    router_peak_rss_mb: float,
    profiles: dict[str, Any],
    duration_s: float,
) -> dict[str, Any]:
    headline = plan["headline_concurrency"]
    direct_h = _find(phases, "realistic", "direct", headline) or {}
    router_h = _find(phases, "realistic", "router", headline) or {}
    direct_t = _find(phases, "throughput", "direct") or {}
    router_t = _find(phases, "throughput", "router") or {}
    router_cpu_t = (router_t.get("cpu_s") or {}).get("router")

    concurrency_sweep = []
    for concurrency in plan["concurrencies"]:
        direct = _find(phases, "realistic", "direct", concurrency) or {}
        router = _find(phases, "realistic", "router", concurrency) or {}
        router_cpu = (router.get("cpu_s") or {}).get("router", 0.0)
        concurrency_sweep.append(
            {
                "concurrency": concurrency,
                "requests": router.get("requests"),
                "direct_ttft_ms_p50": direct.get("ttft_ms_p50"),
                "router_ttft_ms_p50": router.get("ttft_ms_p50"),
                "overhead_ms_p50": _sub(router.get("ttft_ms_p50"), direct.get("ttft_ms_p50")),
                "direct_ttft_ms_p99": direct.get("ttft_ms_p99"),
                "router_ttft_ms_p99": router.get("ttft_ms_p99"),
                "overhead_ms_p99": _sub(router.get("ttft_ms_p99"), direct.get("ttft_ms_p99")),
                "direct_tokens_per_s": direct.get("tokens_per_s"),
                "router_tokens_per_s": router.get("tokens_per_s"),
                "tokens_ratio": _ratio(router.get("tokens_per_s"), direct.get("tokens_per_s")),
                "stream_ratio": _ratio(
                    router.get("stream_tokens_per_s_p50"), direct.get("stream_tokens_per_s_p50")
                ),
                "router_cpu_pct": round(100 * router_cpu / router["wall_s"], 1)
                if router.get("wall_s")
                else None,
                "router_ttft_ms_p50_rounds": router.get("ttft_ms_p50_rounds"),
                "direct_ttft_ms_p50_rounds": direct.get("ttft_ms_p50_rounds"),
                "loop_lag_ms_p99": _lag(router, "p99"),
                "errors": (router.get("errors") or 0) + (direct.get("errors") or 0),
            }
        )

    held = max((entry["held"] for entry in node_sweep), default=0)
    largest = max(node_sweep, key=lambda e: e["nodes"], default=None)
    at_target = next((e for e in node_sweep if e["nodes"] == TARGET_IDLE_NODES), None)
    with_ttft = [e for e in node_sweep if e.get("router_ttft_ms_p50") is not None]
    growth = (
        _sub(with_ttft[-1]["router_ttft_ms_p50"], with_ttft[0]["router_ttft_ms_p50"])
        if len(with_ttft) >= 2
        else None
    )
    crossing = _crossing(phases, plan.get("crossing_concurrencies") or [])
    first = min(crossing, key=lambda c: c["concurrency"], default={})
    measured = [p for p in phases if p["kind"] not in ("warmup", "idle")]
    errors = sum(p.get("errors", 0) for p in measured)
    token_errors = sum(p.get("token_errors", 0) for p in measured)
    saturation = _saturation(phases, plan)
    by_case = {entry["case"]: entry for entry in saturation}
    loaded = [by_case[c] for c in ("saturation", "wide") if c in by_case]
    single_cpu = sum(entry["router_cpu_s"] or 0.0 for entry in loaded)
    single_tokens = sum(entry["router_tokens"] or 0 for entry in loaded)
    loop_lag = _loop_lag(phases)
    # The router's side: its rounds, idle windows and the crossing phase; in direct rounds
    # the router only waits (its lag there is the machine's, kept in loop_lag).
    router_side = [entry for entry in loop_lag if entry["path"] != "direct"]
    worst_lag = max(router_side, key=lambda entry: entry["p99"], default=None)
    sweep_200 = next((c for c in concurrency_sweep if c["concurrency"] == 200), {})
    workers_per_cpu = round(router_t["tokens"] / router_cpu_t, 1) if router_cpu_t else None
    workers_single = _per_cpu(single_tokens, single_cpu)
    scale_out = _scale_out(phases)
    scaled = (plan.get("workers") or 1) > 1
    capacity = {entry["frames"]: entry for entry in scale_out["capacity"]}
    batched = capacity.get("batched") or {}
    single = capacity.get("single") or {}
    per_request = scale_out["per_request"] or {}
    loss = scale_out["loss"] or {}

    out: dict[str, Any] = {
        "direct_ttft_ms_p50": direct_h.get("ttft_ms_p50"),
        "direct_ttft_ms_p99": direct_h.get("ttft_ms_p99"),
        "router_ttft_ms_p50": router_h.get("ttft_ms_p50"),
        "router_ttft_ms_p95": router_h.get("ttft_ms_p95"),
        "router_ttft_ms_p99": router_h.get("ttft_ms_p99"),
        "ttft_overhead_ms_p50": _sub(router_h.get("ttft_ms_p50"), direct_h.get("ttft_ms_p50")),
        "ttft_overhead_ms_p99": _sub(router_h.get("ttft_ms_p99"), direct_h.get("ttft_ms_p99")),
        "direct_tokens_per_s": direct_t.get("tokens_per_s"),
        "router_tokens_per_s": router_t.get("tokens_per_s"),
        # With several workers: the embedded router of issue 14's phases (same run, same load).
        "router_tokens_per_cpu_s": batched.get("embedded_tokens_per_cpu_s")
        if scaled
        else workers_per_cpu,
        "direct_requests_per_s": direct_t.get("requests_per_s"),
        "router_requests_per_s": router_t.get("requests_per_s"),
        "realistic_direct_tokens_per_s": direct_h.get("tokens_per_s"),
        "realistic_router_tokens_per_s": router_h.get("tokens_per_s"),
        "realistic_tokens_ratio": _ratio(
            router_h.get("tokens_per_s"), direct_h.get("tokens_per_s")
        ),
        "router_rss_mb": round(router_peak_rss_mb, 1),
        "router_rss_mb_baseline": round(baseline_rss_mb, 1),
        "router_rss_mb_idle_1000": at_target["rss_mb_idle"] if at_target else None,
        "rss_kb_per_node": largest["rss_kb_per_node"] if largest else None,
        "nodes_held": held,
        "selection_ttft_growth_ms": growth,
        "cross_worker_ttft_ms_p50": first.get("added_ms_p50"),
        "cross_worker_ttft_ms_p99": first.get("added_ms_p99"),
        "same_worker_ttft_ms_p50": first.get("same_ttft_ms_p50"),
        "across_workers_ttft_ms_p50": first.get("across_ttft_ms_p50"),
        "crossing_direct_ttft_ms_p50": first.get("direct_ttft_ms_p50"),
        "crossing_concurrency": first.get("concurrency"),
        "loop_lag_ms_p99": worst_lag["p99"] if worst_lag else None,
        "loop_lag_ms_p50_worst_phase": worst_lag["p50"] if worst_lag else None,
        "loop_lag_ms_max": max((e["max"] for e in router_side), default=None),
        "loop_lag_worst_phase": f"{worst_lag['phase']} ({worst_lag['path']})"
        if worst_lag
        else None,
        **_case_keys("saturation", by_case.get("saturation")),
        **_case_keys("saturation_wide", by_case.get("wide")),
        **_case_keys("idle", by_case.get("idle")),
        "router_tokens_per_cpu_s_single_frames": single.get("embedded_tokens_per_cpu_s")
        if scaled
        else workers_single,
        "workers_tokens_per_cpu_s": workers_per_cpu if scaled else None,
        "workers_tokens_per_cpu_s_single_frames": workers_single if scaled else None,
        "scaleout_tokens_per_cpu_s": batched.get("scaleout_tokens_per_cpu_s"),
        "scaleout_tokens_per_cpu_s_single_frames": single.get("scaleout_tokens_per_cpu_s"),
        "scaleout_cpu_ratio": batched.get("cpu_ratio"),
        "scaleout_cpu_ratio_single_frames": single.get("cpu_ratio"),
        "scaleout_token_errors": sum(
            p.get("token_errors", 0) for p in measured if p["path"] not in ("direct", EMBEDDED)
        )
        if scaled
        else None,
        "scaleout_router_cpu_ms_per_request": per_request.get("scaleout_router_cpu_ms_per_request"),
        "scaleout_cpu_ms_per_request": per_request.get("scaleout_cpu_ms_per_request"),
        "router_cpu_ms_per_request": per_request.get("router_cpu_ms_per_request"),
        "scaleout_lost_streams": loss.get("lost"),
        "scaleout_queue_timeouts": loss.get("queue_timeouts"),
        "scaleout_loss_streams": loss.get("streams"),
        "scaleout_loss_error_kinds": loss.get("error_kinds"),
        "ttft_overhead_ms_p50_200": sweep_200.get("overhead_ms_p50"),
        "ttft_overhead_ms_p99_200": sweep_200.get("overhead_ms_p99"),
        "errors": errors,
        "token_errors": token_errors,
        "duration_s": round(duration_s, 1),
        "parameters": plan,
        "machine": machine,
        "node_sweep": node_sweep,
        "concurrency_sweep": concurrency_sweep,
        "crossing": crossing,
        "saturation": saturation,
        "scale_out": scale_out,
        "loop_lag": loop_lag,
        "phases": phases,
        "profiles": profiles,
    }
    out["targets"] = targets(out, headline, round(1 / plan["token_delay_s"]))
    out["goals"] = goals(out, headline)
    out["scale_out_goals"] = scale_out_goals(out) if scaled else []
    return out


def _case_keys(prefix: str, entry: dict[str, Any] | None) -> dict[str, Any]:
    """The flat keys of one saturation case (None when the case did not run)."""
    entry = entry or {}
    return {
        f"{prefix}_ttft_ms_p50": entry.get("router_ttft_ms_p50"),
        f"{prefix}_ttft_ms_p99": entry.get("router_ttft_ms_p99"),
        f"{prefix}_direct_ttft_ms_p50": entry.get("direct_ttft_ms_p50"),
        f"{prefix}_direct_ttft_ms_p99": entry.get("direct_ttft_ms_p99"),
        f"{prefix}_stream_tokens_per_s_p10": entry.get("stream_tokens_per_s_p10"),
        f"{prefix}_stream_tokens_per_s_p50": entry.get("stream_tokens_per_s_p50"),
    }


def _case_label(entry: dict[str, Any]) -> str:
    nodes, slots, consumers = entry["nodes"], entry["slots"], entry["consumers"]
    return (
        f"{nodes} node{'s' if nodes != 1 else ''} x {slots} slot{'s' if slots != 1 else ''}, "
        f"{consumers} consumer{'s' if consumers != 1 else ''}"
    )


def goals(r: dict[str, Any], headline: int) -> list[dict[str, Any]]:
    """Issue 13's goals, each with what this run measured and whether it is met."""

    def row(name: str, goal: str, value: Any, met: bool | None) -> dict[str, Any]:
        return {"goal": name, "target": goal, "measured": value, "met": met}

    def at_most(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    def at_least(value: float | None, limit: float) -> bool | None:
        return None if value is None else value >= limit

    by_case = {entry["case"]: entry for entry in r["saturation"]}
    narrow = by_case.get("saturation")
    wide = by_case.get("wide")
    rows = [
        row(
            f"event-loop lag p99, worst phase ({r['loop_lag_worst_phase'] or '–'})",
            f"<= {GOAL_LOOP_LAG_P99_MS:g} ms",
            r["loop_lag_ms_p99"],
            at_most(r["loop_lag_ms_p99"], GOAL_LOOP_LAG_P99_MS),
        ),
    ]
    if narrow:
        label = _case_label(narrow)
        rows += [
            row(
                f"saturation TTFT p50 ({label})",
                f"<= {GOAL_SATURATION_P50_MS:g} ms",
                narrow["router_ttft_ms_p50"],
                at_most(narrow["router_ttft_ms_p50"], GOAL_SATURATION_P50_MS),
            ),
            row(
                f"saturation TTFT p99 ({label})",
                f"<= {GOAL_SATURATION_P99_MS:g} ms",
                narrow["router_ttft_ms_p99"],
                at_most(narrow["router_ttft_ms_p99"], GOAL_SATURATION_P99_MS),
            ),
        ]
    if wide:
        rows.append(
            row(
                f"saturation TTFT p50 ({_case_label(wide)})",
                f"<= {GOAL_WIDE_P50_MS:g} ms",
                wide["router_ttft_ms_p50"],
                at_most(wide["router_ttft_ms_p50"], GOAL_WIDE_P50_MS),
            )
        )
    ratios = [e["starvation_ratio"] for e in (narrow, wide) if e and e["starvation_ratio"]]
    rows += [
        row(
            "no stream starves: per-stream tokens/s p10 / p50 (worse saturation load)",
            f">= {GOAL_STARVATION_RATIO:g}",
            min(ratios) if ratios else None,
            at_least(min(ratios) if ratios else None, GOAL_STARVATION_RATIO),
        ),
        row(
            f"TTFT overhead p50 at {headline} streams (realistic)",
            f"<= {GOAL_OVERHEAD_P50_MS:g} ms",
            r["ttft_overhead_ms_p50"],
            at_most(r["ttft_overhead_ms_p50"], GOAL_OVERHEAD_P50_MS),
        ),
        row(
            f"TTFT overhead p99 at {headline} streams (realistic)",
            f"<= {GOAL_OVERHEAD_P99_MS:g} ms",
            r["ttft_overhead_ms_p99"],
            at_most(r["ttft_overhead_ms_p99"], GOAL_OVERHEAD_P99_MS),
        ),
        row(
            "TTFT overhead p50 at 200 streams (realistic)",
            f"<= {GOAL_OVERHEAD_200_P50_MS:g} ms",
            r["ttft_overhead_ms_p50_200"],
            at_most(r["ttft_overhead_ms_p50_200"], GOAL_OVERHEAD_200_P50_MS),
        ),
        row(
            "capacity, one frame per token (tokens per router CPU-second)",
            f">= {GOAL_SINGLE_FRAME_CAPACITY:,}",
            r["router_tokens_per_cpu_s_single_frames"],
            at_least(r["router_tokens_per_cpu_s_single_frames"], GOAL_SINGLE_FRAME_CAPACITY),
        ),
        row(
            "capacity, batching nodes (tokens per router CPU-second)",
            f">= {GOAL_BATCHING_CAPACITY:,}",
            r["router_tokens_per_cpu_s"],
            at_least(r["router_tokens_per_cpu_s"], GOAL_BATCHING_CAPACITY),
        ),
        row("token errors", "0", r["token_errors"], r["token_errors"] == 0),
        row(
            "memory per idle node (no regression)",
            f"<= {GOAL_KB_PER_NODE:g} KB",
            r["rss_kb_per_node"],
            at_most(r["rss_kb_per_node"], GOAL_KB_PER_NODE),
        ),
    ]
    return rows


def scale_out_goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's goals that the benchmark measures, with this run's figures (``--workers``)."""

    def row(name: str, goal: str, value: Any, met: bool | None) -> dict[str, Any]:
        return {"goal": name, "target": goal, "measured": value, "met": met}

    def at_most(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    loss = r["scale_out"]["loss"] or {}
    per_request = r["scale_out"]["per_request"] or {}
    streams = loss.get("concurrency")
    crossing = r["crossing_concurrency"]
    return [
        row(
            "scale-out CPU per token / embedded, batching nodes (workers + Redis + PostgreSQL)",
            f"<= {GOAL_SCALEOUT_CPU_RATIO:g}",
            r["scaleout_cpu_ratio"],
            at_most(r["scaleout_cpu_ratio"], GOAL_SCALEOUT_CPU_RATIO),
        ),
        row(
            "scale-out CPU per token / embedded, one frame per token",
            f"<= {GOAL_SCALEOUT_CPU_RATIO:g}",
            r["scaleout_cpu_ratio_single_frames"],
            at_most(r["scaleout_cpu_ratio_single_frames"], GOAL_SCALEOUT_CPU_RATIO),
        ),
        row(
            f"router CPU per request, scale-out workers ({per_request.get('concurrency', '–')} "
            "streams of one-token answers)",
            f"<= {GOAL_REQUEST_CPU_MS:g} ms",
            r["scaleout_router_cpu_ms_per_request"],
            at_most(r["scaleout_router_cpu_ms_per_request"], GOAL_REQUEST_CPU_MS),
        ),
        row(
            "the same with Redis and PostgreSQL",
            "reported",
            r["scaleout_cpu_ms_per_request"],
            None,
        ),
        row(
            f"streams cut or missing tokens, {streams or '–'} streams, nodes on worker 0, "
            "consumers on worker 1",
            "0",
            r["scaleout_lost_streams"],
            None if r["scaleout_lost_streams"] is None else r["scaleout_lost_streams"] == 0,
        ),
        row(
            "queue timeouts in the same phase (not a loss)",
            "reported",
            r["scaleout_queue_timeouts"],
            None,
        ),
        row(
            "token errors on the scale-out stack, every phase",
            "0",
            r["scaleout_token_errors"],
            None if r["scaleout_token_errors"] is None else r["scaleout_token_errors"] == 0,
        ),
        row(
            f"TTFT added by crossing workers, p50 at {crossing or '–'} "
            f"stream{'s' if crossing and crossing > 1 else ''}",
            f"<= {GOAL_CROSSING_P50_MS:g} ms",
            r["cross_worker_ttft_ms_p50"],
            at_most(r["cross_worker_ttft_ms_p50"], GOAL_CROSSING_P50_MS),
        ),
    ]


def _crossing(phases: list[dict[str, Any]], concurrencies: list[int]) -> list[dict[str, Any]]:
    """Per concurrency of the crossing phase: each path's TTFT and what crossing adds."""
    out = []
    for concurrency in concurrencies:
        direct = _find(phases, "crossing", "direct", concurrency) or {}
        same = _find(phases, "crossing", "router-same", concurrency)
        across = _find(phases, "crossing", "router-across", concurrency)
        if same is None or across is None:
            continue
        out.append(
            {
                "concurrency": concurrency,
                "direct_ttft_ms_p50": direct.get("ttft_ms_p50"),
                "same_ttft_ms_p50": same.get("ttft_ms_p50"),
                "across_ttft_ms_p50": across.get("ttft_ms_p50"),
                "added_ms_p50": _sub(across.get("ttft_ms_p50"), same.get("ttft_ms_p50")),
                "direct_ttft_ms_p99": direct.get("ttft_ms_p99"),
                "same_ttft_ms_p99": same.get("ttft_ms_p99"),
                "across_ttft_ms_p99": across.get("ttft_ms_p99"),
                "added_ms_p99": _sub(across.get("ttft_ms_p99"), same.get("ttft_ms_p99")),
                "same_overhead_ms_p50": _sub(same.get("ttft_ms_p50"), direct.get("ttft_ms_p50")),
                "errors": sum(p.get("errors", 0) for p in (direct, same, across)),
            }
        )
    return out


def targets(r: dict[str, Any], headline: int, rate: int) -> list[dict[str, Any]]:
    def row(name: str, goal: str, value: Any, met: bool | None) -> dict[str, Any]:
        return {"target": name, "goal": goal, "measured": value, "met": met}

    def at_most(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    def at_least(value: float | None, limit: float) -> bool | None:
        return None if value is None else value >= limit

    idle = r["router_rss_mb_idle_1000"]
    crossing = []
    if r["crossing_concurrency"] is not None:
        crossing.append(
            row(
                f"TTFT added by crossing workers (issue 3), p50 at {r['crossing_concurrency']} "
                f"stream{'s' if r['crossing_concurrency'] > 1 else ''}",
                f"<= {TARGET_CROSSING_P50_MS:g} ms",
                r["cross_worker_ttft_ms_p50"],
                at_most(r["cross_worker_ttft_ms_p50"], TARGET_CROSSING_P50_MS),
            )
        )
    return [
        row(
            f"TTFT overhead p50 at {headline} streams",
            f"<= {TARGET_OVERHEAD_P50_MS} ms",
            r["ttft_overhead_ms_p50"],
            at_most(r["ttft_overhead_ms_p50"], TARGET_OVERHEAD_P50_MS),
        ),
        row(
            f"TTFT overhead p99 at {headline} streams",
            f"<= {TARGET_OVERHEAD_P99_MS} ms",
            r["ttft_overhead_ms_p99"],
            at_most(r["ttft_overhead_ms_p99"], TARGET_OVERHEAD_P99_MS),
        ),
        row(
            "relay throughput (tokens/s delivered)",
            f">= {TARGET_TOKENS_PER_S:,}",
            r["router_tokens_per_s"],
            at_least(r["router_tokens_per_s"], TARGET_TOKENS_PER_S),
        ),
        row(
            "relay capacity (tokens per router CPU-second)",
            f">= {TARGET_TOKENS_PER_S:,}",
            r["router_tokens_per_cpu_s"],
            at_least(r["router_tokens_per_cpu_s"], TARGET_TOKENS_PER_S),
        ),
        row(
            "no token lost, duplicated or reordered",
            "0 token errors",
            r["token_errors"],
            r["token_errors"] == 0,
        ),
        row(
            f"router / direct tokens/s at {headline} streams of {rate} tokens/s",
            f">= {TARGET_RATIO}",
            r["realistic_tokens_ratio"],
            at_least(r["realistic_tokens_ratio"], TARGET_RATIO),
        ),
        row(
            f"RSS with {TARGET_IDLE_NODES} idle nodes",
            f"<= {TARGET_IDLE_RSS_MB} MB",
            idle,
            at_most(idle, TARGET_IDLE_RSS_MB),
        ),
        row(
            "node selection flat (TTFT p50 growth, fewest to most nodes)",
            f"<= {FLAT_SELECTION_MS} ms",
            r["selection_ttft_growth_ms"],
            at_most(r["selection_ttft_growth_ms"], FLAT_SELECTION_MS),
        ),
        *crossing,
    ]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _digits(value: Any) -> int:
    """Ratios need three decimals to be compared with 0.9; milliseconds and rates one."""
    return 3 if isinstance(value, float) and abs(value) < 10 else 1


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines[1] = "|---|" + "|".join("---:" for _ in header[1:]) + "|"
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return lines


def markdown(r: dict[str, Any]) -> str:
    plan = r["parameters"]
    machine = r["machine"]
    lines = [
        f"## IdleClaw router benchmark ({plan['mode']}, {plan['workers']} router process"
        f"{'es' if plan['workers'] > 1 else ''})",
        "",
        f"{machine['cores']} cores ({machine['cpu']}), {machine['memory_gb']} GB, Python "
        f"{machine['python']}, commit {machine['commit']}; load average "
        f"{machine['loadavg_start']} at start, {machine.get('loadavg_end')} at end; "
        f"{r['duration_s']} s. Direct and router rounds alternate in every phase "
        f"({plan['rounds']} of each); p50 rounds: min / median / max of the rounds' TTFT p50.",
        "",
        "### Goals of issue 13",
        "",
    ]
    lines += _table(
        ["goal", "target", "measured", "met"],
        [
            [g["goal"], g["target"], _fmt(g["measured"], _digits(g["measured"])), g["met"]]
            for g in r["goals"]
        ],
    )
    if r.get("scale_out_goals"):
        lines += ["", "### Goals of issue 14 (scale-out)", ""]
        lines += _table(
            ["goal", "target", "measured", "met"],
            [
                [g["goal"], g["target"], _fmt(g["measured"], _digits(g["measured"])), g["met"]]
                for g in r["scale_out_goals"]
            ],
        )
    lines += ["", "### Targets (issue 7; issue 3 with several workers)", ""]
    lines += _table(
        ["target", "goal", "measured", "met"],
        [
            [t["target"], t["goal"], _fmt(t["measured"], _digits(t["measured"])), t["met"]]
            for t in r["targets"]
        ],
    )
    lines += _saturation_markdown(r)
    lines += ["", "### Direct vs router, same workload", ""]
    rows = []
    for p in r["phases"]:
        if p["kind"] not in ("throughput", "realistic"):
            continue
        cpu = p["cpu_s"]
        rows.append(
            [
                p["name"],
                p["path"],
                p["requests"],
                p["errors"],
                p["ttft_ms_p50"],
                p["ttft_ms_p95"],
                p["ttft_ms_p99"],
                _spread_cell(p.get("ttft_ms_p50_rounds")),
                p["tokens_per_s"],
                p["requests_per_s"],
                p["stream_tokens_per_s_p50"],
                cpu.get("router"),
                p["router_rss_mb_peak"],
                p["router_threads_peak"],
                cpu.get("nodes"),
                cpu.get("emulators"),
                cpu.get("consumers"),
                *([cpu.get("redis+postgres")] if plan["workers"] > 1 else []),
                p["other_cpu_s"],
            ]
        )
    lines += _table(
        [
            "workload",
            "path",
            "requests",
            "errors",
            "TTFT p50 ms",
            "p95 ms",
            "p99 ms",
            "p50 rounds",
            "tokens/s",
            "req/s",
            "stream tok/s p50",
            "router CPU s",
            "router RSS MB",
            "router threads",
            "nodes CPU s",
            "emulator CPU s",
            "consumers CPU s",
            *(["redis+pg CPU s"] if plan["workers"] > 1 else []),
            "other CPU s",
        ],
        rows,
    )
    rate = round(1 / plan["token_delay_s"])
    lines += ["", f"### TTFT vs concurrency ({rate} tokens/s model)", ""]
    lines += _table(
        [
            "streams",
            "direct p50",
            "router p50",
            "overhead p50",
            "direct p99",
            "router p99",
            "overhead p99",
            "router/direct tokens/s",
            "router/direct per stream",
            "router CPU %",
            "errors",
        ],
        [
            [
                c["concurrency"],
                c["direct_ttft_ms_p50"],
                c["router_ttft_ms_p50"],
                c["overhead_ms_p50"],
                c["direct_ttft_ms_p99"],
                c["router_ttft_ms_p99"],
                c["overhead_ms_p99"],
                _fmt(c["tokens_ratio"], 3),
                _fmt(c["stream_ratio"], 3),
                c["router_cpu_pct"],
                c["errors"],
            ]
            for c in r["concurrency_sweep"]
        ],
    )
    lines += [
        "",
        f"### Nodes: memory, idle cost and TTFT (router, {plan['node_sweep_concurrency']} "
        f"streams, {rate} tokens/s model)",
        "",
    ]
    lines += _table(
        [
            "nodes",
            "held",
            "register s",
            "register CPU ms/node",
            "RSS MB idle",
            "KB/node",
            "idle router CPU %",
            "direct TTFT p50",
            "router TTFT p50",
            "p95",
            "p99",
            "errors",
        ],
        [
            [
                e["nodes"],
                e["held"],
                e["register_s"],
                round(1000 * e["register_router_cpu_s"] / max(1, e["registered"]), 2),
                e["rss_mb_idle"],
                e["rss_kb_per_node"],
                e["idle_router_cpu_pct"],
                e["direct_ttft_ms_p50"],
                e["router_ttft_ms_p50"],
                e["router_ttft_ms_p95"],
                e["router_ttft_ms_p99"],
                e["errors"],
            ]
            for e in r["node_sweep"]
        ],
    )
    lines += _loop_lag_markdown(r)
    lines += _crossing_markdown(r, rate)
    lines += _scale_out_markdown(r)
    lines += [
        "",
        f"Router RSS: {_fmt(r['router_rss_mb_baseline'])} MB after warm-up, peak "
        f"{_fmt(r['router_rss_mb'])} MB. Relay capacity: "
        f"{_fmt(r['router_tokens_per_cpu_s'])} tokens per router CPU-second with batching "
        f"nodes, {_fmt(r['router_tokens_per_cpu_s_single_frames'])} with one frame per token"
        + (" (the embedded router beside the workers)" if plan["workers"] > 1 else "")
        + ". Errors: "
        f"{r['errors']} ({r['token_errors']} token errors).",
    ]
    for name, summaries in (r.get("profiles") or {}).items():
        for index, summary in enumerate(summaries):
            lines += ["", profile.markdown(summary, f"profile: router {index}, {name} phase")]
    return "\n".join(lines) + "\n"


def _spread_cell(spread: dict[str, float] | None) -> str:
    if not spread:
        return "–"
    return " / ".join(_fmt(spread[key]) for key in ("min", "median", "max"))


def _saturation_markdown(r: dict[str, Any]) -> list[str]:
    if not r.get("saturation"):
        return []
    plan = r["parameters"]
    lines = [
        "",
        f"### Saturation (issue 13): instant {plan['saturation_tokens']}-token answers, one "
        "frame per token, every slot busy",
        "",
    ]
    rows = []
    for e in r["saturation"]:
        lag = e["loop_lag_ms"] or {}
        rows.append(
            [
                _case_label(e) + (" (idle reference)" if e["case"] == "idle" else ""),
                e["requests"],
                e["errors"],
                e["direct_ttft_ms_p50"],
                e["direct_ttft_ms_p99"],
                e["router_ttft_ms_p50"],
                e["router_ttft_ms_p99"],
                _spread_cell(e["router_ttft_ms_p50_rounds"]),
                e["stream_tokens_per_s_p10"],
                e["stream_tokens_per_s_p50"],
                _fmt(e["starvation_ratio"], 3),
                e["router_tokens_per_s"],
                e["router_tokens_per_cpu_s"],
                e["chunks_per_frame"],
                lag.get("p50"),
                lag.get("p99"),
                lag.get("max"),
            ]
        )
    lines += _table(
        [
            "load",
            "requests",
            "errors",
            "direct TTFT p50",
            "direct p99",
            "router TTFT p50",
            "router p99",
            "router p50 rounds",
            "stream tok/s p10",
            "p50",
            "p10/p50",
            "router tokens/s",
            "tokens per router CPU-s",
            "chunks per frame",
            "loop lag p50",
            "p99",
            "max",
        ],
        rows,
    )
    return lines


def _loop_lag_markdown(r: dict[str, Any]) -> list[str]:
    lines = ["", "### Event-loop lag inside the router (a 10 ms timer, how late it fired, ms)", ""]
    if not r.get("loop_lag"):
        return [
            *lines,
            "No samples: the probe was off (`IDLECLAW_LOOP_LAG_FILE=`) or the measured router "
            "has no idleclaw_site/loop_lag.py.",
        ]
    lines += _table(
        ["phase", "path", "samples", "p50", "p99", "max"],
        [
            [e["phase"], e["path"], e["samples"], e["p50"], e["p99"], e["max"]]
            for e in r["loop_lag"]
        ],
    )
    lines += [
        "",
        "In direct rounds the router has nothing to do: its lag there is what the rest of the "
        "run (emulators, nodes, consumers) and other processes cost it in CPU time.",
    ]
    return lines


def _crossing_markdown(r: dict[str, Any], rate: int) -> list[str]:
    if not r.get("crossing"):
        return []
    lines = [
        "",
        f"### Crossing workers (issue 3): nodes on worker 0, {rate} tokens/s model, the paths "
        "interleaved",
        "",
    ]
    rows = [
        [
            p["concurrency"],
            CROSSING_PATHS[p["path"]],
            p["requests"],
            p["errors"],
            p["ttft_ms_p50"],
            p["ttft_ms_p95"],
            p["ttft_ms_p99"],
            p["tokens_per_s"],
            p["stream_tokens_per_s_p50"],
        ]
        for p in r["phases"]
        if p["kind"] == "crossing"
    ]
    lines += _table(
        [
            "streams",
            "path",
            "requests",
            "errors",
            "TTFT p50 ms",
            "p95 ms",
            "p99 ms",
            "tokens/s",
            "stream tok/s p50",
        ],
        rows,
    )
    lines.append("")
    lines += _table(
        [
            "streams",
            "same worker − direct p50",
            "added by crossing p50",
            "added by crossing p99",
            "errors",
        ],
        [
            [
                c["concurrency"],
                c["same_overhead_ms_p50"],
                _fmt(c["added_ms_p50"], 2),
                _fmt(c["added_ms_p99"], 2),
                c["errors"],
            ]
            for c in r["crossing"]
        ],
    )
    return lines


def _scale_out_markdown(r: dict[str, Any]) -> list[str]:
    scale_out = r.get("scale_out") or {}
    if not (scale_out.get("capacity") or scale_out.get("per_request") or scale_out.get("loss")):
        return []
    workers = r["parameters"]["workers"]
    lines = [
        "",
        f"### Scale-out ({workers} workers + Redis + PostgreSQL) against one embedded router, "
        "same run (issue 14)",
        "",
        "The two paths alternate rounds of the same load (embedded, scale-out, embedded, ...); "
        "each has a node pool of its own. CPU seconds per component over the path's rounds; "
        "*stack* is what relays: the embedded router, or every worker with Redis and "
        "PostgreSQL.",
        "",
    ]
    worker_roles = [f"router-{index}" for index in range(workers)]
    rows = []
    entries = [(e["name"], e["paths"], e) for e in scale_out.get("capacity") or []]
    if scale_out.get("per_request"):
        entries.append(("CPU per request", scale_out["per_request"]["paths"], None))
    for name, paths, entry in entries:
        for path, figures in paths.items():
            cpu = figures["cpu_s"] or {}
            scaled = path == SCALE_OUT
            per_cpu = None
            if entry is not None:
                per_cpu = entry[
                    "scaleout_tokens_per_cpu_s" if scaled else "embedded_tokens_per_cpu_s"
                ]
            rows.append(
                [
                    name,
                    path,
                    figures["requests"],
                    figures["errors"],
                    figures["tokens"],
                    figures["tokens_per_s"],
                    _fmt(None if scaled else cpu.get("embedded"), 2),
                    " / ".join(_fmt(cpu.get(role), 2) for role in worker_roles) if scaled else "–",
                    _fmt(cpu.get("redis") if scaled else None, 2),
                    _fmt(cpu.get("postgres") if scaled else None, 2),
                    _fmt(figures["stack_cpu_s"], 2),
                    _fmt(cpu.get("nodes"), 2),
                    _fmt(cpu.get("emulators"), 2),
                    _fmt(cpu.get("consumers"), 2),
                    _fmt(figures["other_cpu_s"], 2),
                    per_cpu,
                    _fmt(1000 * figures["stack_cpu_s"] / max(1, figures["requests"]), 2),
                ]
            )
    lines += _table(
        [
            "load",
            "path",
            "requests",
            "errors",
            "tokens",
            "tokens/s",
            "embedded CPU s",
            "workers CPU s (each)",
            "redis CPU s",
            "postgres CPU s",
            "stack CPU s",
            "nodes CPU s",
            "emulator CPU s",
            "consumers CPU s",
            "other CPU s",
            "tokens per stack CPU-s",
            "stack CPU ms/request",
        ],
        rows,
    )
    if scale_out.get("capacity"):
        lines.append("")
        lines += _table(
            ["nodes", "scale-out / embedded CPU per token", "rounds (min / median / max)"],
            [
                [
                    FRAMES[e["frames"]],
                    _fmt(e["cpu_ratio"], 3),
                    " / ".join(_fmt(e["cpu_ratio_rounds"][k], 3) for k in ("min", "median", "max"))
                    if e["cpu_ratio_rounds"]
                    else "–",
                ]
                for e in scale_out["capacity"]
            ],
        )
    per_request = scale_out.get("per_request")
    if per_request:
        lines += [
            "",
            f"CPU per request ({per_request['concurrency']} streams of one-token answers): "
            f"embedded router {_fmt(per_request['router_cpu_ms_per_request'], 2)} ms; scale-out "
            f"workers {_fmt(per_request['scaleout_router_cpu_ms_per_request'], 2)} ms, Redis "
            f"{_fmt(per_request['redis_cpu_ms_per_request'], 2)} ms, PostgreSQL "
            f"{_fmt(per_request['postgres_cpu_ms_per_request'], 2)} ms, together "
            f"{_fmt(per_request['scaleout_cpu_ms_per_request'], 2)} ms.",
        ]
    loss = scale_out.get("loss")
    if loss:
        cpu = loss["cpu_s"] or {}
        lag = loss["loop_lag_ms"] or {}
        lines += [
            "",
            f"Loss: {loss['concurrency']} streams of {loss['model']}, nodes on worker 0 "
            f"({loss['nodes']} x {r['parameters']['pool_max_concurrent']} slots), consumers on "
            "worker 1.",
            "",
        ]
        lines += _table(
            [
                "requests",
                "whole",
                "cut or missing tokens",
                "queue timeouts",
                "refused (HTTP)",
                "failures by kind",
                "nodes dropped",
                "TTFT p50",
                "p99",
                "stream tok/s p10",
                "workers CPU s (each)",
                "redis+pg CPU s",
                "wall s",
                "loop lag p99",
            ],
            [
                [
                    loss["streams"],
                    loss["ok"],
                    loss["lost"],
                    loss["queue_timeouts"],
                    loss["refused"],
                    _kinds(loss["error_kinds"], loss["stream_errors"]),
                    loss["nodes_dropped"],
                    loss["ttft_ms_p50"],
                    loss["ttft_ms_p99"],
                    loss["stream_tokens_per_s_p10"],
                    " / ".join(_fmt(cpu.get(role), 2) for role in worker_roles),
                    _fmt(cpu.get("redis+postgres"), 2),
                    loss["wall_s"],
                    lag.get("p99"),
                ]
            ],
        )
    return lines


def _kinds(kinds: dict[str, int], reasons: dict[str, int]) -> str:
    """Failures by kind, a stream error by the router's reason: ``stream_error:lost_chunks 3``."""
    parts = [f"{kind} {n}" for kind, n in sorted(kinds.items()) if kind != "stream_error"]
    parts += [f"stream_error:{reason} {n}" for reason, n in sorted(reasons.items())]
    return ", ".join(parts) or "none"
