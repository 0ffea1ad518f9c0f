"""``python -m bench``: measure the router against the direct path (issue 7).

Starts the Ollama emulators, the router, simulated nodes and the consumers on loopback, runs
the same workloads direct and through the router, checks every token, prints a Markdown report
and optionally writes the results as JSON. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import report
from bench.harness import ROOT, BenchError, plan_for, run


def _counts(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers")
    return values


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="fewer phases, the same samples per phase: about 2 minutes on 2 cores",
    )
    mode.add_argument(
        "--smoke",
        dest="mode",
        action="store_const",
        const="smoke",
        help="a few requests and nodes, to check the harness itself works (tests)",
    )
    parser.set_defaults(mode="full")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="K",
        help="K router processes on PostgreSQL and Redis (default 1: embedded SQLite); "
        "K >= 2 also measures what crossing workers adds to TTFT (issue 3)",
    )
    parser.add_argument("--nodes", type=_counts, help="node counts of the node sweep, e.g. 10,1000")
    parser.add_argument(
        "--concurrency", type=_counts, help="concurrencies of the sweep, e.g. 1,10,50,200"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record the router with py-spy in the saturation (1 x 10), throughput and "
        "headline phases",
    )
    parser.add_argument(
        "--router-env",
        action="append",
        type=_env_pair,
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the router processes; repeatable",
    )
    parser.add_argument(
        "--router-tree",
        type=Path,
        default=ROOT,
        metavar="DIR",
        help="measure the router of this checkout (e.g. a git archive of a commit); "
        "default: this one",
    )
    parser.add_argument(
        "--keep-logs", type=Path, metavar="DIR", help="copy process logs and profiles here"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_for(args.mode)
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    plan.workers = args.workers
    plan.profile = args.profile
    if args.nodes:
        plan.node_counts = args.nodes
    if args.concurrency:
        plan.concurrencies = args.concurrency
        if plan.headline_concurrency not in plan.concurrencies:
            plan.headline_concurrency = max(plan.concurrencies)
    began = time.monotonic()

    def log(line: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - began:6.1f}s] {line}", file=sys.stderr, flush=True)

    try:
        results = asyncio.run(
            run(
                plan,
                router_env=dict(args.router_env),
                log=log,
                keep_dir=args.keep_logs,
                router_tree=args.router_tree.resolve(),
            )
        )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(report.markdown(results))
    return 0 if results["token_errors"] == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
