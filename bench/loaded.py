"""``python -m bench.loaded``: what routing to a node that has the model loaded saves (issue 19).

Two emulated Ollamas (``bench/emulator.py`` with ``--load-delay``) serve the same model, each
shared by a real ``skill_scripts/contribute.py`` with one router. Before each request, exactly
one of them has the model loaded (the other unloaded it), alternately the one and the other,
and both nodes have reported that. Then one streamed request goes through the router's
``/ollama/api/chat``; its time to first token and the node that served it are recorded. The
whole thing runs twice: with the router's preference for loaded nodes, and without it
(``IDLECLAW_PREFER_LOADED_NODES=false``, the selection as it was before issue 19).

Prints a Markdown table; nothing is asserted (timing belongs here, not in the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from bench.harness import PYTHON, ROOT, Service

MODEL = "bench-loaded:1b"
# Loose limits: everything runs from 127.0.0.1.
ROUTER_ENV = {
    "IDLECLAW_MAX_NODES_PER_IP": "100",
    "IDLECLAW_RATE_NODE_REGISTER": "10000/m",
    "IDLECLAW_RATE_CHAT": "10000/m",
    "IDLECLAW_RATE_DEFAULT": "10000/m",
    # Nodes report what is loaded with every heartbeat: every second, so a trial need not
    # wait long for both reports.
    "IDLECLAW_HEARTBEAT_INTERVAL": "1",
    "IDLECLAW_SHUTDOWN_GRACE": "1",
}


async def _network(
    work: Path, *, prefer: bool, load_delay: float
) -> tuple[list[Service], str, list[str]]:
    env = {
        **ROUTER_ENV,
        "IDLECLAW_SQLITE_PATH": str(work / "router.sqlite3"),
        "IDLECLAW_PREFER_LOADED_NODES": "true" if prefer else "false",
    }
    await asyncio.to_thread(
        subprocess.run,
        [PYTHON, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=ROOT,
        check=True,
        env={**os.environ, **env},
    )
    services = [
        Service(
            "router",
            [
                PYTHON,
                "-m",
                "daphne",
                "-b",
                "127.0.0.1",
                "-p",
                "0",
                "idleclaw_site.asgi:application",
            ],
            log_dir=work,
            env=env,
        )
    ]
    port = (await services[0].wait_for(r"Listening on TCP address 127\.0\.0\.1:(\d+)", 30))[1]
    router = f"http://127.0.0.1:{port}"
    emulators = []
    for name in ("a", "b"):
        emulator = Service(
            f"emulator-{name}",
            [
                PYTHON,
                "-m",
                "bench.emulator",
                "--port",
                "0",
                "--load-delay",
                repr(load_delay),
                "--token-delay",
                "0.02",
                "--reply-tokens",
                "20",
                "--model",
                f"{MODEL},size=1000",
            ],
            log_dir=work,
        )
        services.append(emulator)
        emulators.append((await emulator.wait_for(r"listening on (http://\S+)", 30))[1])
    for name, url in zip(("a", "b"), emulators, strict=True):
        node = Service(
            f"node-{name}",
            [PYTHON, "skill_scripts/contribute.py"],
            log_dir=work,
            env={"IDLECLAW_SERVER": router, "OLLAMA_HOST": url},
        )
        services.append(node)
        await node.wait_for("registered with", 30)
    return services, router, emulators


def _completed(url: str) -> int:
    return requests.get(f"{url}/_emulator/stats", timeout=5).json()["chat_completed"]


def _ttft_ms(router: str, prompt: str) -> float:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
    started = time.perf_counter()
    with requests.post(f"{router}/ollama/api/chat", json=body, stream=True, timeout=60) as reply:
        reply.raise_for_status()
        first = None
        for line in reply.iter_lines():
            if line and first is None and json.loads(line)["message"].get("content"):
                first = time.perf_counter()
    assert first is not None, "no token"
    return (first - started) * 1000


async def _mode(prefer: bool, runs: int, load_delay: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-loaded-") as tmp:
        services, router, emulators = await _network(
            Path(tmp), prefer=prefer, load_delay=load_delay
        )
        try:
            ttfts, cold_hits = await asyncio.to_thread(_trials, router, emulators, runs)
        finally:
            for service in reversed(services):
                await service.astop()
    return {"prefer": prefer, "ttfts": ttfts, "cold": cold_hits, "runs": runs}


def _trials(router: str, emulators: list[str], runs: int) -> tuple[list[float], int]:
    """Each trial's TTFT, and how many requests the node without the model loaded served."""
    ttfts, cold_hits = [], 0
    for trial in range(runs):
        warm, cold = emulators[trial % 2], emulators[1 - trial % 2]
        requests.post(
            f"{cold}/api/generate", json={"model": MODEL, "keep_alive": 0}, timeout=10
        ).raise_for_status()
        requests.post(
            f"{warm}/api/chat", json={"model": MODEL, "messages": []}, timeout=30
        ).raise_for_status()
        time.sleep(2.5)  # both nodes' next heartbeats report it
        before = _completed(cold)
        ttfts.append(_ttft_ms(router, f"trial {trial}"))
        cold_hits += _completed(cold) - before
    return ttfts, cold_hits


def _row(result: dict[str, object]) -> str:
    ttfts = sorted(result["ttfts"])  # type: ignore[arg-type]
    label = "preferred (default)" if result["prefer"] else "not preferred (before)"
    return (
        f"| {label} | {result['runs']} | {result['cold']} | {statistics.median(ttfts):.0f} | "
        f"{statistics.mean(ttfts):.0f} | {ttfts[-1]:.0f} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loaded", description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="requests per mode (10)")
    parser.add_argument(
        "--load-delay",
        type=float,
        default=2.0,
        help="seconds the emulators take to load the model (2)",
    )
    args = parser.parse_args(argv)
    results = [asyncio.run(_mode(prefer, args.runs, args.load_delay)) for prefer in (True, False)]
    print(
        f"load delay {args.load_delay:g} s, 20 tokens at 50 tokens/s, two idle nodes, "
        "one with the model loaded (alternately)\n"
    )
    print(
        "| loaded node | requests | served by the node without it | TTFT median ms | "
        "mean ms | max ms |"
    )
    print("|---|---|---|---|---|---|")
    for result in results:
        print(_row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
