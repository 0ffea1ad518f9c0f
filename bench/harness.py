"""The benchmark run: start everything on loopback, measure, report.

Processes (all started here, all on 127.0.0.1, all stopped at the end):

* two Ollama emulators: ``bench-fast:1b`` answers with no per-token delay (the relay's
  ceiling), ``bench-30tps:1b`` at 30 tokens/s (a realistic small model on a consumer GPU);
* the router: one daphne on SQLite and the in-memory channel layer (the embedded default), or
  ``--workers K`` daphnes on PostgreSQL and Redis;
* pools of simulated nodes (``bench.nodesim``), one process per pool, every node offering both
  models;
* the consumers, in this process (``bench.load``).

Phases, in order: warm-up; the node sweep (for each node count: connect the pool, measure the
router's memory and CPU while the nodes sit idle, then TTFT at low concurrency); with
``--workers K`` (K >= 2) the crossing phase (nodes on worker 0 only, the 30 tokens/s model
direct, through worker 0 and through worker 1, interleaved) and the scale-out phases of issue
14 (the whole stack against one embedded router started beside it, alternating rounds of the
same loads: capacity with one-frame-per-token and with batching nodes, CPU per request); the
saturation phase (issue 13: instant answers from nodes that send one frame per token, every
slot busy); then with one pool of ample slots: the throughput phase (zero-delay model, batching
nodes) and the concurrency sweep (30 tokens/s model); last, with ``--workers``, issue 14's loss
phase (200 streams, nodes on worker 0, consumers on worker 1). Every phase that compares the
paths alternates direct and router rounds, and every router process measures its own event-loop
lag throughout (``idleclaw_site/loop_lag.py``, read by ``bench.lag``). See
``bench/README.md`` for how to read the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import psutil

from bench import lag, profile, report
from bench.emulator import ModelSpec, OllamaEmulator
from bench.load import Consumers, LoadResult, Outcome, Workload

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FAST_MODEL = "bench-fast:1b"
REAL_MODEL = "bench-30tps:1b"
# Issue 13: instant answers of the saturation phase's length, and short answers of the 30
# tokens/s model for the node sweep. Emulators of their own rather than options.num_predict:
# the router's own /api/chat takes no options, and every router request of the benchmark goes
# through it.
INSTANT_MODEL = "bench-instant:1b"
SHORT_MODEL = "bench-30tps-short:1b"
# Issue 14 (--workers K >= 2 only): one-token answers, where per-request costs dominate, and the
# loss phase's answers (loss_tokens at 30 tokens/s).
ONE_TOKEN_MODEL = "bench-one:1b"
LOSS_MODEL = "bench-30tps-long:1b"
MODEL_SIZE = 1_300_000_000
# The routers' loop-lag probes write every 0.5 s (idleclaw_site/loop_lag.py): wait this long
# after the last phase before reading their files.
LAG_FLUSH_WAIT_S = 0.8
T = TypeVar("T")

# The paths of the crossing phase (issue 3): the nodes hold sockets to worker 0 only.
DIRECT = "direct"
SAME_WORKER = "router-same"  # consumers -> worker 0: the request is served where its node is
ACROSS_WORKERS = "router-across"  # consumers -> worker 1: request and chunks cross workers
# The paths of issue 14's comparison: one embedded router (SQLite, in-memory channel layer)
# started beside the workers, and the scale-out stack (every worker, Redis, PostgreSQL).
EMBEDDED = "embedded"
SCALE_OUT = "scale-out"
# Request n takes the path at n mod 10. Each router path follows the other three times in ten
# and direct once, so neither inherits more of the other's end-of-request work; direct, only a
# reference, gets half as many requests.
CROSSING_CYCLE = (
    SAME_WORKER,
    ACROSS_WORKERS,
    DIRECT,
    ACROSS_WORKERS,
    SAME_WORKER,
    ACROSS_WORKERS,
    SAME_WORKER,
    DIRECT,
    SAME_WORKER,
    ACROSS_WORKERS,
)


class BenchError(Exception):
    """The run cannot go on (a process did not start, nodes did not register, ...)."""


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Everything that shapes a run; written to the JSON as ``parameters``.

    Every phase that compares the paths runs ``rounds`` direct rounds and ``rounds`` router
    rounds, alternating (direct, router, direct, router, ...), so drift and other people's
    load hit both alike, and each path gets at least ``min_samples`` requests in the phase: a
    p99 from fewer is the slowest request or two. Each round keeps every consumer busy for at
    least ``min_waves`` requests (see :meth:`round_requests`).
    """

    mode: str
    workers: int = 1
    rounds: int = 3
    min_samples: int = 200
    min_waves: int = 2
    node_counts: list[int] = field(default_factory=lambda: [10, 100, 300, 1000, 2000])
    node_sweep_concurrency: int = 10
    # The node sweep's answers are this many tokens of the 30 tokens/s model, so that 200
    # requests per path and node count take seconds: TTFT does not depend on the length.
    node_sweep_tokens: int = 5
    node_max_concurrent: int = 2
    idle_window_s: float = 5.0
    concurrencies: list[int] = field(default_factory=lambda: [25, 50, 100, 200])
    headline_concurrency: int = 50
    headline_samples: int = 400
    realistic_tokens: int = 100
    token_delay_s: float = 1 / 30
    # Issue 13's saturation phase: (nodes, slots per node, consumers) of the instant model's
    # answers of saturation_tokens tokens, nodes sending one frame per token. The idle case is
    # the reference (one consumer, nothing else running).
    idle_case: tuple[int, int, int] = (1, 1, 1)
    saturation_case: tuple[int, int, int] = (1, 10, 10)
    wide_case: tuple[int, int, int] = (10, 10, 50)
    saturation_tokens: int = 200
    saturation_samples: int = 400
    throughput_concurrency: int = 50
    throughput_tokens: int = 500
    throughput_samples: int = 400
    pool_max_concurrent: int = 10
    warmup_requests: int = 20
    # The crossing phase (--workers K >= 2): requests of the 30 tokens/s model at each
    # concurrency, max(crossing_requests, concurrency * crossing_rounds), all paths together.
    crossing_concurrencies: list[int] = field(default_factory=lambda: [1, 10])
    crossing_requests: int = 80
    crossing_rounds: int = 15
    # Issue 14 (--workers K >= 2). Capacity: the scale-out stack and an embedded router in
    # alternating rounds of the same loads, the instant model from nodes sending one frame per
    # token (nodes, slots per node, consumers; a pool of its own per router), and the
    # throughput phase's load from batching nodes; at least capacity_samples requests per path.
    capacity_single_case: tuple[int, int, int] = (10, 10, 50)
    capacity_samples: int = 200
    # CPU per request: one-token answers at this concurrency, where per-request work dominates.
    request_cost_concurrency: int = 10
    request_cost_samples: int = 300
    # The loss phase: loss_concurrency streams of loss_tokens-token answers at the 30 tokens/s
    # rate, loss_waves requests per consumer; nodes on worker 0 with a slot per stream,
    # consumers on worker 1.
    loss_concurrency: int = 200
    loss_tokens: int = 100
    loss_waves: int = 2
    profile: bool = False

    @property
    def pool_nodes(self) -> int:
        """Nodes in the load pool: slots for the highest concurrency, plus a fifth to spare."""
        most = max([*self.concurrencies, self.throughput_concurrency, 1])
        return max(1, math.ceil(most * 1.2 / self.pool_max_concurrent))

    def round_requests(self, concurrency: int, samples: int = 0) -> int:
        """Requests in one round of one path: whole waves of ``concurrency`` consumers, at least
        ``min_waves`` of them, enough that ``rounds`` rounds give ``samples`` (at least
        ``min_samples``) requests."""
        wanted = max(samples, self.min_samples)
        waves = max(self.min_waves, math.ceil(wanted / (self.rounds * concurrency)))
        return concurrency * waves

    def realistic_requests(self, concurrency: int) -> int:
        """Requests per round of the concurrency sweep (more at the headline concurrency)."""
        headline = concurrency == self.headline_concurrency
        return self.round_requests(concurrency, self.headline_samples if headline else 0)

    @property
    def crossing_nodes(self) -> int:
        """Nodes for the crossing phase: slots for its highest concurrency, plus a fifth."""
        most = max([*self.crossing_concurrencies, 1])
        return max(1, math.ceil(most * 1.2 / self.pool_max_concurrent))

    def crossing_total(self, concurrency: int) -> int:
        """Requests of the crossing phase at ``concurrency``, whole cycles of its paths."""
        wanted = max(self.crossing_requests, concurrency * self.crossing_rounds)
        return len(CROSSING_CYCLE) * math.ceil(wanted / len(CROSSING_CYCLE))

    @property
    def capacity_nodes(self) -> int:
        """Nodes of each batching pool of issue 14's phases (one per router): slots for the
        throughput load and the per-request load, plus a fifth."""
        most = max(self.throughput_concurrency, self.request_cost_concurrency)
        return max(1, math.ceil(most * 1.2 / self.pool_max_concurrent))

    @property
    def loss_nodes(self) -> int:
        """Nodes of the loss phase: a slot for every stream."""
        return max(1, math.ceil(self.loss_concurrency / self.pool_max_concurrent))


def plan_for(mode: str) -> Plan:
    """The plan of a mode. Quick runs fewer phases than full, never fewer samples per phase:
    fewer node counts and concurrencies, shorter realistic answers, the same 200 requests per
    path (at least) wherever a p99 is reported."""
    if mode == "full":
        return Plan(mode="full")
    if mode == "quick":
        return Plan(
            mode="quick",
            node_counts=[10, 100, 1000],
            idle_window_s=2.0,
            concurrencies=[50, 200],
            headline_samples=200,
            realistic_tokens=20,
            saturation_samples=200,
            throughput_samples=200,
            warmup_requests=10,
            crossing_requests=50,
            crossing_rounds=8,
        )
    if mode == "smoke":
        return Plan(
            mode="smoke",
            rounds=2,
            min_samples=4,
            min_waves=1,
            node_counts=[3],
            node_sweep_concurrency=2,
            node_sweep_tokens=3,
            idle_window_s=0.5,
            concurrencies=[2],
            headline_concurrency=2,
            headline_samples=4,
            realistic_tokens=5,
            token_delay_s=0.01,
            idle_case=(1, 1, 1),
            saturation_case=(1, 3, 3),
            wide_case=(2, 3, 5),
            saturation_tokens=20,
            saturation_samples=6,
            throughput_concurrency=2,
            throughput_tokens=20,
            throughput_samples=6,
            pool_max_concurrent=4,
            warmup_requests=2,
            crossing_concurrencies=[1, 2],
            crossing_requests=10,
            crossing_rounds=5,
            capacity_single_case=(2, 3, 5),
            capacity_samples=6,
            request_cost_concurrency=2,
            request_cost_samples=6,
            loss_concurrency=6,
            loss_tokens=5,
            loss_waves=2,
        )
    raise ValueError(f"unknown mode {mode!r}")


# --------------------------------------------------------------------------- processes


class Service:
    """A subprocess of this run, its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        self._offset = 0
        self._text = ""
        self.popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def output(self) -> str:
        with self.log_path.open() as handle:
            handle.seek(self._offset)
            self._text += handle.read()
            self._offset = handle.tell()
        return self._text

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    async def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                match = regex.search(self.output())
                if match:
                    return match
                raise BenchError(
                    f"{self.name} exited with {self.popen.returncode} before printing "
                    f"{pattern!r}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {pattern!r} within {timeout} s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            # Our own child leads its own process group (start_new_session).
            os.killpg(self.popen.pid, signum)

    def stop(self, timeout: float = 30.0) -> int | None:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    async def astop(self, timeout: float = 30.0) -> int | None:
        return await asyncio.to_thread(self.stop, timeout)


def http_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _raise_open_files_limit() -> None:
    """1,000 nodes are 1,000 sockets on each side; children inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(PYTHON).with_name("py-spy"))
    if not Path(found).exists():
        raise BenchError("--profile needs py-spy (pip install py-spy==0.4.3)")
    return found


def _keep_logs(work_dir: Path, keep_dir: Path) -> None:
    keep_dir.mkdir(parents=True, exist_ok=True)
    for item in work_dir.iterdir():
        if item.is_dir() and item.name == "profiles":
            shutil.copytree(item, keep_dir / item.name, dirs_exist_ok=True)
        elif item.suffix == ".log" or item.name.startswith("loop-lag."):
            shutil.copy2(item, keep_dir / item.name)


@dataclass
class Pool:
    service: Service
    count: int
    registered: int
    seconds: float


class Cluster:
    """The processes of one run."""

    def __init__(
        self, plan: Plan, work_dir: Path, router_env: dict[str, str], router_tree: Path
    ) -> None:
        self.plan = plan
        self.router_tree = router_tree
        self.work_dir = work_dir
        self.router_env = router_env
        self.emulators: dict[str, Service] = {}
        self.emulator_urls: dict[str, str] = {}
        self.routers: list[Service] = []
        self.router_urls: list[str] = []
        # Issue 14: one embedded router beside the workers, for the phases that compare them.
        self.embedded: Service | None = None
        self.embedded_url = ""
        self.pools: list[Pool] = []
        self.servers: Any = None  # bench.servers handle in --workers mode
        self.profilers: list[tuple[Service, Path]] = []
        self._pool_serial = 0
        # Where the routers' loop-lag probes write (idleclaw_site/loop_lag.py), one file each;
        # None: probes off (--router-env IDLECLAW_LOOP_LAG_FILE=). The embedded router of
        # issue 14's phases writes apart, so its samples never mix with the workers'.
        self.lag_prefix: Path | None = work_dir / "loop-lag"
        self.embedded_lag_prefix: Path | None = work_dir / "embedded-loop-lag"

    # ----- emulators

    def emulator_specs(self) -> dict[str, tuple[float, int]]:
        """Each emulated model: (seconds per token, tokens per answer)."""
        plan = self.plan
        specs = {
            FAST_MODEL: (0.0, plan.throughput_tokens),
            REAL_MODEL: (plan.token_delay_s, plan.realistic_tokens),
            INSTANT_MODEL: (0.0, plan.saturation_tokens),
            SHORT_MODEL: (plan.token_delay_s, plan.node_sweep_tokens),
        }
        if plan.workers > 1:
            specs[ONE_TOKEN_MODEL] = (0.0, 1)
            specs[LOSS_MODEL] = (plan.token_delay_s, plan.loss_tokens)
        return specs

    def expectations(self) -> Callable[[dict[str, Any]], Sequence[str]]:
        """What the emulators must send for a request body (their own validation and defaults)."""
        local = {
            model: OllamaEmulator(models=[ModelSpec(model, MODEL_SIZE)], reply_tokens=tokens)
            for model, (_, tokens) in self.emulator_specs().items()
        }

        def expected(body: dict[str, Any]) -> Sequence[str]:
            reply = local[body["model"]].expected_reply("/api/chat", body)
            assert reply is not None
            return reply.content

        return expected

    async def start_emulators(self) -> None:
        for model, (delay, tokens) in self.emulator_specs().items():
            self.emulators[model] = Service(
                "emulator-" + model.removeprefix("bench-").removesuffix(":1b"),
                [
                    PYTHON,
                    "-m",
                    "bench.emulator",
                    "--port",
                    "0",
                    "--token-delay",
                    repr(delay),
                    "--reply-tokens",
                    str(tokens),
                    "--model",
                    f"{model},size={MODEL_SIZE}",
                ],
                log_dir=self.work_dir,
            )
        for model, service in self.emulators.items():
            match = await service.wait_for(r"listening on (http://\S+)", timeout=30)
            self.emulator_urls[model] = match.group(1)

    # ----- routers

    def _router_env(self) -> dict[str, str]:
        """What every router process of the run shares."""
        return {
            "IDLECLAW_LOCAL_DIR": str(self.work_dir / "local"),
            # Every node and consumer of the run comes from 127.0.0.1: lift the per-IP limits
            # meant for the internet, and the per-node frame rate (a zero-delay model streams
            # far faster than any real one).
            "IDLECLAW_MAX_NODES_PER_IP": "100000",
            "IDLECLAW_RATE_NODE_REGISTER": "100000/m",
            "IDLECLAW_RATE_CHAT": "10000000/m",
            "IDLECLAW_RATE_DEFAULT": "10000000/m",
            "IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP": "100000",
            # Up to 200 consumers' connections, kept alive between requests, wait for their next
            # head at once; at the default (64) a lagging router closes the rest (issue 12).
            "IDLECLAW_MAX_PENDING_CONNECTIONS_PER_IP": "100000",
            "IDLECLAW_NODE_MAX_FRAMES_PER_S": "1000000",
            "IDLECLAW_WORKERS": str(self.plan.workers),
            lag.ENV: str(self.lag_prefix),
            "SECRET_KEY": "bench-only-" + os.urandom(16).hex(),
            "PYTHONPATH": str(self.router_tree),
        }

    async def _migrate(self, env: dict[str, str]) -> None:
        migrate = await asyncio.to_thread(
            subprocess.run,
            [PYTHON, "manage.py", "migrate", "--noinput", "-v0"],
            cwd=self.router_tree,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        if migrate.returncode != 0:
            raise BenchError(f"migrate failed:\n{migrate.stdout}{migrate.stderr}")

    def _daphne(self, name: str, env: dict[str, str]) -> Service:
        return Service(
            name,
            [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", "0"]
            + ["idleclaw_site.asgi:application"],
            log_dir=self.work_dir,
            env=env,
            cwd=self.router_tree,
        )

    @staticmethod
    async def _listening(router: Service) -> str:
        match = await router.wait_for(r"Listening on TCP address 127\.0\.0\.1:(\d+)", timeout=60)
        url = f"http://127.0.0.1:{match.group(1)}"
        health = await asyncio.to_thread(http_json, f"{url}/health")
        if health.get("status") != "healthy":
            raise BenchError(f"router at {url} is not healthy: {health}")
        return url

    async def start_routers(self) -> None:
        env = self._router_env()
        if self.plan.workers > 1:
            env.update(await self._start_backing_servers())
        else:
            env["IDLECLAW_SQLITE_PATH"] = str(self.work_dir / "router.sqlite3")
        env.update(self.router_env)
        self.lag_prefix = Path(env[lag.ENV]) if env[lag.ENV] else None
        if self.lag_prefix is None:
            self.embedded_lag_prefix = None
        await self._migrate(env)
        for index in range(self.plan.workers):
            self.routers.append(self._daphne(f"router-{index}", env))
        for router in self.routers:
            self.router_urls.append(await self._listening(router))

    async def start_embedded(self) -> str:
        """Issue 14: one embedded router (SQLite, in-memory channel layer, one process) beside
        the scale-out stack, configured like the workers otherwise; returns its URL."""
        env = {
            **self._router_env(),
            "IDLECLAW_LOCAL_DIR": str(self.work_dir / "embedded-local"),
            "IDLECLAW_SQLITE_PATH": str(self.work_dir / "embedded.sqlite3"),
            "IDLECLAW_WORKERS": "1",
            **self.router_env,
            # Whatever the run's environment says, this one is the embedded default.
            "DATABASE_URL": "",
            "REDIS_URL": "",
            lag.ENV: str(self.embedded_lag_prefix or ""),
        }
        await self._migrate(env)
        self.embedded = self._daphne("router-embedded", env)
        self.embedded_url = await self._listening(self.embedded)
        return self.embedded_url

    async def stop_embedded(self) -> None:
        if self.embedded is not None:
            await self.embedded.astop()
            self.embedded = None
            self.embedded_url = ""

    async def _start_backing_servers(self) -> dict[str, str]:
        from bench import servers  # real Redis and PostgreSQL from pip packages

        self.servers = servers
        # From the main thread, so the servers die with this process however it ends
        # (PR_SET_PDEATHSIG, see bench/servers.py); startup takes a few seconds, once.
        try:
            return servers.start_for_bench(self.work_dir)
        except servers.ServerError as exc:
            raise BenchError(str(exc)) from exc

    def backing_cpu_seconds(self) -> dict[str, float]:
        """CPU seconds of Redis and of PostgreSQL so far. PostgreSQL serves each connection in
        a process of its own, and the router opens one per request (``conn_max_age=0``): most
        backends start and exit between two readings, so the postmaster's reaped children
        count as well as the live ones."""
        totals = {"redis": 0.0, "postgres": 0.0}
        if self.servers is None:
            return totals
        for server in self.servers._bench_servers:
            total = cpu_seconds(server.pid, reaped_children=True)
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(server.pid).children(recursive=True):
                    total += cpu_seconds(child.pid)
            totals[server.kind] = totals.get(server.kind, 0.0) + total
        return totals

    def router_pids(self) -> list[int]:
        return [router.pid for router in self.routers]

    async def node_count(self, router: str | None = None) -> int:
        health = await asyncio.to_thread(http_json, f"{router or self.router_urls[0]}/health")
        return int(health.get("node_count", 0))

    # ----- node pools

    async def start_pool(
        self,
        count: int,
        max_concurrent: int,
        timeout: float = 180.0,
        *,
        routers: Sequence[str] | None = None,
        single_frames: bool = False,
    ) -> Pool:
        """Start ``count`` simulated nodes, spread over ``routers`` (default: every worker);
        ``single_frames``: one frame per token, as the network's existing nodes send."""
        self._pool_serial += 1
        argv = [
            PYTHON,
            "-m",
            "bench.nodesim",
            "--count",
            str(count),
            "--max-concurrent",
            str(max_concurrent),
            "--register-timeout",
            str(timeout),
        ]
        if single_frames:
            argv.append("--single-frames")
        for url in routers or self.router_urls:
            argv += ["--router", url]
        for model, url in self.emulator_urls.items():
            argv += ["--model", f"{model}={url}"]
        service = Service(f"nodes-{self._pool_serial}-{count}", argv, log_dir=self.work_dir)
        match = await service.wait_for(
            r"registered (\d+) of (\d+) in ([\d.]+) s", timeout=timeout + 30
        )
        pool = Pool(service, count, int(match.group(1)), float(match.group(3)))
        self.pools.append(pool)
        return pool

    async def stop_pool(self, pool: Pool) -> dict[str, Any]:
        await pool.service.astop()
        self.pools.remove(pool)
        match = re.search(r"^stats (\{.*\})$", pool.service.output(), re.MULTILINE)
        return json.loads(match.group(1)) if match else {}

    async def wait_for_nodes(
        self, expected: int, timeout: float = 120.0, *, router: str | None = None
    ) -> int:
        """Wait until ``router`` (default: the first worker) counts ``expected`` live nodes."""
        deadline = time.monotonic() + timeout
        while True:
            count = await self.node_count(router)
            if count == expected or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.2)

    # ----- profiling

    async def start_profiler(self, name: str) -> None:
        py_spy = _py_spy()
        (self.work_dir / "profiles").mkdir(exist_ok=True)  # noqa: ASYNC240 (instant)
        for index, pid in enumerate(self.router_pids()):
            out = self.work_dir / "profiles" / f"{name}-router{index}.txt"
            service = Service(
                f"py-spy-{name}-{index}",
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    "100",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                ],
                log_dir=self.work_dir,
            )
            self.profilers.append((service, out))
        await asyncio.sleep(0.5)  # let py-spy attach before the load starts

    async def stop_profiler(self) -> list[Path]:
        outputs = []
        for service, out in self.profilers:
            service.signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(service.popen.wait, 60)
            await asyncio.to_thread(service.stop)
            outputs.append(out)
        self.profilers = []
        return outputs

    # ----- roles for CPU accounting

    def roles(self) -> dict[str, list[int]]:
        """The processes of each role. Several workers are a role each (``router-0``, ...);
        ``Meter`` adds up their sum as ``router``."""
        workers = self.router_pids()
        routers = (
            {f"router-{index}": [pid] for index, pid in enumerate(workers)}
            if self.plan.workers > 1
            else {"router": workers}
        )
        return {
            **routers,
            "embedded": [self.embedded.pid] if self.embedded is not None else [],
            "nodes": [pool.service.pid for pool in self.pools],
            "emulators": [service.pid for service in self.emulators.values()],
            "consumers": [os.getpid()],
            "profiler": [service.pid for service, _ in self.profilers],
        }

    async def stop(self) -> None:
        for service, _ in self.profilers:
            service.stop()
        for pool in list(self.pools):
            await pool.service.astop()
        for router in self.routers:
            await router.astop()
        await self.stop_embedded()
        for service in self.emulators.values():
            await service.astop()
        if self.servers is not None:
            self.servers.stop_for_bench()


# --------------------------------------------------------------------------- measuring


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User and system CPU of the process; ``reaped_children``: also of its children that
    have exited and been waited for."""
    proc = _proc(pid)
    if proc is None:
        return 0.0
    try:
        times = proc.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    total = times.user + times.system
    if reaped_children:
        total += times.children_user + times.children_system
    return total


def rss_mb(pid: int) -> float:
    proc = _proc(pid)
    try:
        return proc.memory_info().rss / 2**20 if proc else 0.0
    except psutil.NoSuchProcess:
        return 0.0


def peak_rss_mb(pid: int) -> float | None:
    """The kernel's high-water mark of the process's resident set (VmHWM)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def system_busy_seconds() -> float:
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    return sum(times) - idle


@dataclass
class Usage:
    """Resources spent during one measured stretch."""

    wall_s: float
    cpu_s: dict[str, float]
    other_cpu_s: float  # busy CPU of processes that are not part of this run
    router_rss_mb_peak: float
    router_threads_peak: int  # OS threads of the router process(es): its thread pools show here
    # CLOCK_MONOTONIC start and end of each stretch (several for a path's rounds together):
    # the router's loop-lag samples inside them are this usage's.
    windows: list[lag.Window] = field(default_factory=list)

    @classmethod
    def combine(cls, usages: Sequence[Usage]) -> Usage:
        """Several stretches as one: times and CPU added up, peaks the highest."""
        roles = {role for usage in usages for role in usage.cpu_s}
        return cls(
            wall_s=sum(u.wall_s for u in usages),
            cpu_s={role: sum(u.cpu_s.get(role, 0.0) for u in usages) for role in roles},
            other_cpu_s=sum(u.other_cpu_s for u in usages),
            router_rss_mb_peak=max(u.router_rss_mb_peak for u in usages),
            router_threads_peak=max(u.router_threads_peak for u in usages),
            windows=[w for u in usages for w in u.windows],
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "cpu_s": {role: round(value, 3) for role, value in self.cpu_s.items()},
            "other_cpu_s": round(self.other_cpu_s, 3),
            "router_rss_mb_peak": round(self.router_rss_mb_peak, 1),
            "router_threads_peak": self.router_threads_peak,
        }


class Meter:
    """CPU by role and the router's resident memory, sampled in the background."""

    def __init__(self, cluster: Cluster, interval: float = 0.1) -> None:
        self.cluster = cluster
        self.interval = interval
        self._peak = 0.0
        self._threads = 0
        self._task: asyncio.Task[None] | None = None

    def router_rss_mb(self) -> float:
        return sum(rss_mb(pid) for pid in self.cluster.router_pids())

    def router_threads(self) -> int:
        total = 0
        for pid in self.cluster.router_pids():
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(pid).num_threads()
        return total

    async def _sample(self) -> None:
        while True:
            rss, threads = await asyncio.to_thread(
                lambda: (self.router_rss_mb(), self.router_threads())
            )
            self._peak = max(self._peak, rss)
            self._threads = max(self._threads, threads)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _snapshot(self) -> tuple[float, dict[str, float], float]:
        cpu = {
            role: sum(cpu_seconds(pid) for pid in pids)
            for role, pids in self.cluster.roles().items()
        }
        cpu.update(self.cluster.backing_cpu_seconds())
        return time.perf_counter(), cpu, system_busy_seconds()

    async def measure(self, work: Awaitable[T]) -> tuple[T, Usage]:
        began, cpu_before, busy_before = self._snapshot()
        self._peak = self.router_rss_mb()
        self._threads = self.router_threads()
        window_start = time.monotonic()  # the clock of the routers' loop-lag probes
        result = await work
        window = (window_start, time.monotonic())
        ended, cpu_after, busy_after = self._snapshot()
        cpu = {
            role: max(0.0, cpu_after.get(role, 0.0) - cpu_before.get(role, 0.0))
            for role in cpu_after
        }
        other = max(0.0, (busy_after - busy_before) - sum(cpu.values()))
        # Sums of the roles above, for the tables: every worker, and the backing servers.
        workers = [value for role, value in cpu.items() if role.startswith("router-")]
        if workers:
            cpu["router"] = sum(workers)
        cpu["redis+postgres"] = cpu.get("redis", 0.0) + cpu.get("postgres", 0.0)
        peak = max(self._peak, self.router_rss_mb())
        threads = max(self._threads, self.router_threads())
        return result, Usage(ended - began, cpu, other, peak, threads, [window])


# --------------------------------------------------------------------------- the run


class Lanes(Consumers):
    """Consumers that send request ``n`` down the path at ``cycle[n % len(cycle)]``, so the
    paths share one run (and whatever else the machine does meanwhile), and keep each path's
    outcomes apart."""

    def __init__(self, paths: dict[str, Consumers], cycle: Sequence[str]) -> None:
        first = next(iter(paths.values()))
        super().__init__(path=first.path, targets=first.targets, expected=first.expected)
        self.paths = paths
        self.cycle = list(cycle)
        self.outcomes: dict[str, list[Outcome]] = {name: [] for name in paths}

    async def one(self, http: Any, workload: Workload, number: int) -> Outcome:
        name = self.cycle[number % len(self.cycle)]
        outcome = await self.paths[name].one(http, workload, number)
        self.outcomes[name].append(outcome)
        return outcome

    def split(self, result: LoadResult) -> dict[str, LoadResult]:
        """One result per path. The wall time is shared out in proportion to the time each
        path's requests took, so tokens/s reads as if the path had run alone."""
        busy = {name: sum(o.duration for o in outcomes) for name, outcomes in self.outcomes.items()}
        total = sum(busy.values()) or 1.0
        return {
            name: LoadResult(
                result.workload,
                name,
                result.started,
                result.started + result.wall * busy[name] / total,
                outcomes,
            )
            for name, outcomes in self.outcomes.items()
        }


@dataclass
class Phase:
    """One measured stretch: a workload on one path, or an idle window. A phase that compares
    the paths is two of these, one per path, each the sum of that path's rounds."""

    name: str
    kind: str  # warmup, idle, nodes, saturation, throughput, realistic, crossing
    path: str  # direct, router, idle; router-same, router-across (crossing)
    model: str
    concurrency: int
    nodes: int
    summary: dict[str, Any]
    usage: Usage
    extra: dict[str, Any] = field(default_factory=dict)
    loop_lag: dict[str, Any] | None = None  # the router's, inside usage.windows (bench.lag)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "path": self.path,
            "model": self.model,
            "concurrency": self.concurrency,
            "nodes": self.nodes,
            **self.extra,
            # The phase's path, not its consumers' (both of issue 14's paths speak "router").
            **{key: value for key, value in self.summary.items() if key != "path"},
            **self.usage.as_dict(),
            "loop_lag_ms": self.loop_lag,
        }


def stack_cpu_s(path: str, usage: Usage) -> float:
    """CPU of what relays on ``path``: the embedded router alone, or every worker with Redis
    and PostgreSQL."""
    if path == EMBEDDED:
        return usage.cpu_s.get("embedded", 0.0)
    return usage.cpu_s.get("router", 0.0) + usage.cpu_s.get("redis+postgres", 0.0)


def _spread(values: Sequence[float | None]) -> dict[str, float] | None:
    """min / median / max of the rounds' figures."""
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    middle = len(present) // 2
    median = (
        present[middle]
        if len(present) % 2
        else round((present[middle - 1] + present[middle]) / 2, 2)
    )
    return {"min": present[0], "median": median, "max": present[-1]}


class Run:
    def __init__(self, plan: Plan, cluster: Cluster, log: Callable[[str], None]) -> None:
        self.plan = plan
        self.cluster = cluster
        self.meter = Meter(cluster)
        self.log = log
        self.began = time.monotonic()  # rounds' start and end are reported from here
        self.phases: list[Phase] = []
        self.node_sweep: list[dict[str, Any]] = []
        self.profiles: dict[str, Any] = {}
        self.load_pool_stats: dict[str, Any] = {}
        self.saturation_pool_stats: dict[str, Any] = {}
        self.baseline_rss_mb = 0.0
        self.expected = cluster.expectations()

    def consumers(self, path: str, model: str) -> Consumers:
        if path == "direct":
            # The same workload straight to the emulator that serves its model.
            targets = [self.cluster.emulator_urls[model]]
        else:
            targets = self.cluster.router_urls
        return Consumers(path=path, targets=targets, expected=self.expected)

    async def workload(
        self,
        *,
        name: str,
        kind: str,
        path: str,
        workload: Workload,
        nodes: int,
    ) -> Phase:
        """One workload on one path, once (the warm-up)."""
        result, usage = await self.meter.measure(self.consumers(path, workload.model).run(workload))
        phase = Phase(
            name=name,
            kind=kind,
            path=path,
            model=workload.model,
            concurrency=workload.concurrency,
            nodes=nodes,
            summary=result.summary(),
            usage=usage,
        )
        self.record(phase)
        return phase

    async def compare(
        self,
        *,
        name: str,
        kind: str,
        workload: Workload,
        nodes: int,
        profile_as: str | None = None,
        extra: dict[str, Any] | None = None,
        lanes: dict[str, Consumers] | None = None,
    ) -> dict[str, Phase]:
        """The workload (``workload.requests`` per round) in alternating rounds: direct,
        router, direct, router, ... ``plan.rounds`` of each; or the paths of ``lanes``, in
        their order. Returns one phase per path with every request of its rounds, and the
        spread of the rounds' TTFT p50."""
        consumers = lanes or {
            path: self.consumers(path, workload.model) for path in ("direct", "router")
        }
        paths = tuple(consumers)
        results: dict[str, list[LoadResult]] = {path: [] for path in paths}
        usages: dict[str, list[Usage]] = {path: [] for path in paths}
        profiling = bool(profile_as and self.plan.profile)
        if profiling:
            # Over all rounds: the direct rounds add only idle samples, which are dropped.
            await self.cluster.start_profiler(str(profile_as))
        for index in range(self.plan.rounds):
            for path in paths:
                # Prompts of their own per round, so no two answers of a phase are alike.
                round_load = replace(workload, name=f"{workload.name} {path} {index}")
                result, usage = await self.meter.measure(consumers[path].run(round_load))
                results[path].append(result)
                usages[path].append(usage)
        if profiling:
            outputs = await self.cluster.stop_profiler()
            self.profiles[str(profile_as)] = [
                {"file": str(path_), **profile.summarize(path_)} for path_ in outputs
            ]
        phases = {}
        for path in paths:
            summary = LoadResult.merge(results[path]).summary()
            rounds = []
            for result, usage in zip(results[path], usages[path], strict=True):
                part = result.summary()
                (start, end), *_ = usage.windows
                rounds.append(
                    {
                        "began_s": round(start - self.began, 3),
                        "ended_s": round(end - self.began, 3),
                        "requests": part["requests"],
                        "ttft_ms_p50": part["ttft_ms_p50"],
                        "ttft_ms_p99": part["ttft_ms_p99"],
                        "stream_tokens_per_s_p50": part["stream_tokens_per_s_p50"],
                        "wall_s": part["wall_s"],
                        "tokens": part["tokens"],
                        "errors": part["errors"],
                        "router_cpu_s": round(usage.cpu_s.get("router", 0.0), 3),
                        "cpu_s": {role: round(v, 3) for role, v in usage.cpu_s.items()},
                    }
                )
            summary["rounds"] = rounds
            summary["ttft_ms_p50_rounds"] = _spread([r["ttft_ms_p50"] for r in rounds])
            phase = Phase(
                name=name,
                kind=kind,
                path=path,
                model=workload.model,
                concurrency=workload.concurrency,
                nodes=nodes,
                summary=summary,
                usage=Usage.combine(usages[path]),
                extra=dict(extra or {}),
            )
            self.record(phase)
            phases[path] = phase
        return phases

    def record(self, phase: Phase) -> None:
        self.phases.append(phase)
        s = phase.summary
        spread = s.get("ttft_ms_p50_rounds")
        router_cpu = phase.usage.cpu_s.get("embedded" if phase.path == EMBEDDED else "router", 0)
        self.log(
            f"  {phase.name:<28} {phase.path:<13} C={phase.concurrency:<4} "
            f"ok {s['ok']}/{s['requests']} "
            f"TTFT p50 {s['ttft_ms_p50']} ms p99 {s['ttft_ms_p99']} ms"
            + (
                f" (rounds' p50 {spread['min']}/{spread['median']}/{spread['max']})"
                if spread
                else ""
            )
            + f", {s['tokens_per_s']} tok/s, router CPU {router_cpu:.2f} s"
            + (f", errors {s['error_kinds']}" if s["errors"] else "")
        )

    async def warmup(self) -> None:
        self.log("warm-up")
        pool = await self.cluster.start_pool(1, 4)
        if pool.registered != 1:
            raise BenchError(f"warm-up node did not register:\n{pool.service.tail()}")
        for path in ("direct", "router"):
            workload = Workload("warmup", FAST_MODEL, 2, self.plan.warmup_requests)
            phase = await self.workload(
                name="warm-up", kind="warmup", path=path, workload=workload, nodes=1
            )
            if phase.summary["ok"] == 0:
                raise BenchError(
                    f"warm-up: no request succeeded on the {path} path "
                    f"({phase.summary['error_kinds']}). Router log:\n"
                    + "\n".join(r.tail() for r in self.cluster.routers)
                )
        await self.cluster.stop_pool(pool)
        await self.cluster.wait_for_nodes(0)
        await asyncio.sleep(0.5)
        self.baseline_rss_mb = self.meter.router_rss_mb()
        # The probes flush twice a second: by now every router has written if it probes.
        prefix = self.cluster.lag_prefix
        probes = lag.files(prefix) if prefix else []
        if prefix is None:
            self.log("event-loop lag probe: off (IDLECLAW_LOOP_LAG_FILE is empty)")
        elif probes:
            self.log(f"event-loop lag probe: {len(probes)} router process(es) writing samples")
        else:
            self.log(
                "event-loop lag probe: no samples (a router tree without "
                "idleclaw_site/loop_lag.py?); lag figures will be empty"
            )

    def realistic(
        self, name: str, concurrency: int, requests: int, *, short: bool = False
    ) -> Workload:
        """The 30 tokens/s model; ``short``: its node-sweep answers (``node_sweep_tokens``)."""
        model = SHORT_MODEL if short else REAL_MODEL
        delay, tokens = self.cluster.emulator_specs()[model]
        # Spread the first requests over one answer's duration, as independent consumers would.
        return Workload(name, model, concurrency, requests, ramp=tokens * delay)

    async def sweep_nodes(self) -> None:
        plan = self.plan
        c = plan.node_sweep_concurrency
        self.log(
            f"node sweep: {plan.node_counts} nodes, TTFT at C={c} ({SHORT_MODEL}: "
            f"{plan.node_sweep_tokens}-token answers at {1 / plan.token_delay_s:.0f} tokens/s)"
        )
        for count in plan.node_counts:
            rss_before = self.meter.router_rss_mb()
            pool, usage = await self.meter.measure(
                self.cluster.start_pool(count, plan.node_max_concurrent)
            )
            held = await self.cluster.wait_for_nodes(pool.registered, timeout=30)
            _, idle = await self.meter.measure(asyncio.sleep(plan.idle_window_s))
            rss_idle = self.meter.router_rss_mb()
            self.phases.append(Phase(f"{count} idle nodes", "idle", "idle", "", 0, count, {}, idle))
            self.log(
                f"  {count} nodes: {pool.registered} registered in {pool.seconds:.1f} s, "
                f"router says {held}; RSS {rss_before:.0f} -> {rss_idle:.0f} MB; idle CPU "
                f"{100 * idle.cpu_s['router'] / idle.wall_s:.1f} %"
            )
            phases: dict[str, Phase] = {}
            if pool.registered * plan.node_max_concurrent >= c:
                phases = await self.compare(
                    name=f"{count} nodes",
                    kind="nodes",
                    workload=self.realistic(
                        f"nodes-{count}",
                        c,
                        plan.round_requests(c),
                        short=True,
                    ),
                    nodes=count,
                )
            stats = await self.cluster.stop_pool(pool)
            left = await self.cluster.wait_for_nodes(0)
            direct = phases["direct"].summary if phases else {}
            router = phases["router"].summary if phases else {}
            self.node_sweep.append(
                {
                    "nodes": count,
                    "registered": pool.registered,
                    "held": held,
                    "register_s": round(pool.seconds, 2),
                    "register_router_cpu_s": round(usage.cpu_s["router"], 3),
                    "rss_mb_before": round(rss_before, 1),
                    "rss_mb_idle": round(rss_idle, 1),
                    "rss_kb_per_node": round(
                        (rss_idle - self.baseline_rss_mb) * 1024 / max(1, held), 1
                    ),
                    "idle_router_cpu_pct": round(100 * idle.cpu_s["router"] / idle.wall_s, 2),
                    "requests": router.get("requests"),
                    "direct_ttft_ms_p50": direct.get("ttft_ms_p50"),
                    "router_ttft_ms_p50": router.get("ttft_ms_p50"),
                    "router_ttft_ms_p95": router.get("ttft_ms_p95"),
                    "router_ttft_ms_p99": router.get("ttft_ms_p99"),
                    "errors": (router.get("errors") or 0) + (direct.get("errors") or 0)
                    if phases
                    else None,
                    "node_stats": stats,
                    "left_after_stop": left,
                }
            )

    def crossing_lanes(self, model: str) -> Lanes:
        worker_0, worker_1 = self.cluster.router_urls[:2]
        paths = {
            DIRECT: self.consumers("direct", model),
            SAME_WORKER: Consumers(path="router", targets=[worker_0], expected=self.expected),
            ACROSS_WORKERS: Consumers(path="router", targets=[worker_1], expected=self.expected),
        }
        return Lanes(paths, CROSSING_CYCLE)

    async def crossing(self) -> None:
        """Issue 3: what crossing workers through Redis adds to TTFT. The nodes connect to
        worker 0 only; consumers send the same workload direct, to worker 0 (the request is
        served where its node is) and to worker 1 (the request and every chunk cross to worker
        0 and back), interleaved request by request."""
        plan = self.plan
        if plan.workers < 2:
            return
        nodes = plan.crossing_nodes
        self.log(
            f"crossing workers: {nodes} node(s) x {plan.pool_max_concurrent} slots on worker 0; "
            f"{REAL_MODEL} direct / same worker / across workers, concurrency "
            f"{plan.crossing_concurrencies}"
        )
        pool = await self.cluster.start_pool(
            nodes, plan.pool_max_concurrent, routers=self.cluster.router_urls[:1]
        )
        if pool.registered != nodes:
            raise BenchError(f"only {pool.registered} of {nodes} nodes registered on worker 0")
        await self.cluster.wait_for_nodes(pool.registered, timeout=30)
        # Every path's connections opened before anything is measured.
        most = max(plan.crossing_concurrencies)
        warm = Workload("crossing-warmup", REAL_MODEL, most, len(CROSSING_CYCLE) * 2)
        lanes = self.crossing_lanes(REAL_MODEL)
        warmed = await lanes.run(warm)
        if warmed.errors():
            self.log(f"  crossing warm-up errors: {dict(warmed.errors())}")
        for concurrency in plan.crossing_concurrencies:
            lanes = self.crossing_lanes(REAL_MODEL)
            workload = self.realistic(
                f"crossing-{concurrency}", concurrency, plan.crossing_total(concurrency)
            )
            result, usage = await self.meter.measure(lanes.run(workload))
            for path, part in lanes.split(result).items():
                summary = part.summary()
                # wall_s and CPU (usage) are the interleaved run's, shared by its paths.
                summary["path_wall_s"] = summary["wall_s"]  # the path's share, for tokens/s
                summary["interleaved_with"] = [p for p in lanes.paths if p != path]
                self.record(
                    Phase(
                        name=f"crossing C={concurrency}",
                        kind="crossing",
                        path=path,
                        model=REAL_MODEL,
                        concurrency=concurrency,
                        nodes=pool.registered,
                        summary=summary,
                        usage=usage,
                    )
                )
        await self.cluster.stop_pool(pool)
        await self.cluster.wait_for_nodes(0)

    def embedded_and_scale_out(self) -> dict[str, Consumers]:
        """Issue 14's two paths, in the order of each round: the embedded router, then the
        scale-out stack with consumers spread over every worker."""
        cluster = self.cluster
        return {
            EMBEDDED: Consumers(
                path="router", targets=[cluster.embedded_url], expected=self.expected
            ),
            SCALE_OUT: Consumers(
                path="router", targets=cluster.router_urls, expected=self.expected
            ),
        }

    async def pool_pair(self, nodes: int, slots: int, *, single_frames: bool) -> list[Pool]:
        """Two pools alike: one on the embedded router, one spread over every worker. Each
        path's rounds use its own pool; the other's nodes only heartbeat meanwhile."""
        cluster = self.cluster
        pools = [
            await cluster.start_pool(
                nodes, slots, routers=[cluster.embedded_url], single_frames=single_frames
            ),
            await cluster.start_pool(nodes, slots, single_frames=single_frames),
        ]
        for pool, router in zip(pools, (cluster.embedded_url, None), strict=True):
            if pool.registered != nodes:
                raise BenchError(f"only {pool.registered} of {nodes} nodes registered")
            await cluster.wait_for_nodes(pool.registered, timeout=30, router=router)
        return pools

    async def stop_pool_pair(self, pools: list[Pool]) -> None:
        for pool in pools:
            await self.cluster.stop_pool(pool)
        await self.cluster.wait_for_nodes(0, router=self.cluster.embedded_url)
        await self.cluster.wait_for_nodes(0)

    async def scale_out(self) -> None:
        """Issue 14: what the scale-out stack (every worker, Redis, PostgreSQL) spends per
        relayed token and per request, against one embedded router started beside it for
        this phase, in alternating rounds of the same load: embedded, scale-out, embedded,
        scale-out, ... Nodes sending one frame per token, then batching nodes; then one-token
        answers, whose cost is the request's own."""
        plan = self.plan
        if plan.workers < 2:
            return
        url = await self.cluster.start_embedded()
        self.log(f"scale-out vs embedded (issue 14): embedded router {url}")
        try:
            nodes, slots, consumers = plan.capacity_single_case
            self.log(
                f"  one frame per token: {INSTANT_MODEL}, {plan.saturation_tokens} tokens, "
                f"{nodes} nodes x {slots} slots / {consumers} consumers per path"
            )
            pools = await self.pool_pair(nodes, slots, single_frames=True)
            await self.compare(
                name="capacity, one frame per token",
                kind="capacity",
                workload=Workload(
                    "capacity-single",
                    INSTANT_MODEL,
                    consumers,
                    plan.round_requests(consumers, plan.capacity_samples),
                ),
                nodes=nodes,
                extra={"frames": "single", "slots": slots},
                lanes=self.embedded_and_scale_out(),
            )
            self.log_capacity()
            await self.stop_pool_pair(pools)

            nodes, c = plan.capacity_nodes, plan.throughput_concurrency
            self.log(
                f"  batching nodes: {FAST_MODEL}, {plan.throughput_tokens} tokens, {nodes} "
                f"nodes x {plan.pool_max_concurrent} slots / {c} consumers per path"
            )
            pools = await self.pool_pair(nodes, plan.pool_max_concurrent, single_frames=False)
            await self.compare(
                name="capacity, batching nodes",
                kind="capacity",
                workload=Workload(
                    "capacity-batched",
                    FAST_MODEL,
                    c,
                    plan.round_requests(c, plan.capacity_samples),
                ),
                nodes=nodes,
                extra={"frames": "batched", "slots": plan.pool_max_concurrent},
                lanes=self.embedded_and_scale_out(),
            )
            self.log_capacity()
            c = plan.request_cost_concurrency
            self.log(f"  CPU per request: {ONE_TOKEN_MODEL}, one-token answers, {c} consumers")
            phases = await self.compare(
                name="CPU per request",
                kind="per-request",
                workload=Workload(
                    "per-request",
                    ONE_TOKEN_MODEL,
                    c,
                    plan.round_requests(c, plan.request_cost_samples),
                ),
                nodes=nodes,
                lanes=self.embedded_and_scale_out(),
            )
            for path, phase in phases.items():
                cpu, requests = phase.usage.cpu_s, max(1, phase.summary["requests"])
                router = cpu.get("embedded" if path == EMBEDDED else "router", 0.0)
                self.log(
                    f"    {path}: router CPU {1000 * router / requests:.2f} ms per request"
                    + (
                        f", with Redis and PostgreSQL "
                        f"{1000 * (router + cpu['redis+postgres']) / requests:.2f} ms"
                        if path == SCALE_OUT
                        else ""
                    )
                )
            await self.stop_pool_pair(pools)
        finally:
            await self.cluster.stop_embedded()

    def log_capacity(self) -> None:
        embedded, scale_out = self.phases[-2:]
        tokens_per_cpu = {
            phase.path: phase.summary["tokens"] / max(1e-9, stack_cpu_s(phase.path, phase.usage))
            for phase in (embedded, scale_out)
        }
        self.log(
            f"    tokens per CPU-second: embedded {tokens_per_cpu[EMBEDDED]:,.0f}, scale-out "
            f"{tokens_per_cpu[SCALE_OUT]:,.0f} (workers + Redis + PostgreSQL); CPU per token "
            f"ratio {tokens_per_cpu[EMBEDDED] / max(1e-9, tokens_per_cpu[SCALE_OUT]):.2f}"
        )

    async def loss(self) -> None:
        """Issue 14: nothing lost. ``loss_concurrency`` streams of the 30 tokens/s model with
        the nodes on worker 0 and the consumers on worker 1, so the request and every chunk
        cross workers; a slot for every stream, so nearly all run at once. Each answer is
        token-checked; the report counts cut streams apart from queue timeouts."""
        plan = self.plan
        if plan.workers < 2:
            return
        nodes, c = plan.loss_nodes, plan.loss_concurrency
        delay, tokens = self.cluster.emulator_specs()[LOSS_MODEL]
        self.log(
            f"loss (issue 14): {c} streams of {LOSS_MODEL} ({tokens} tokens at "
            f"{1 / delay:.0f} tokens/s), {nodes} nodes x {plan.pool_max_concurrent} slots on "
            "worker 0, consumers on worker 1"
        )
        worker_0, worker_1 = self.cluster.router_urls[:2]
        pool = await self.cluster.start_pool(nodes, plan.pool_max_concurrent, routers=[worker_0])
        if pool.registered != nodes:
            raise BenchError(f"only {pool.registered} of {nodes} nodes registered on worker 0")
        await self.cluster.wait_for_nodes(pool.registered, timeout=30)
        consumers = Consumers(path="router", targets=[worker_1], expected=self.expected)
        workload = Workload("loss", LOSS_MODEL, c, c * plan.loss_waves, ramp=tokens * delay)
        result, usage = await self.meter.measure(consumers.run(workload))
        self.record(
            Phase(
                name=f"loss, {c} streams across workers",
                kind="loss",
                path=SCALE_OUT,
                model=LOSS_MODEL,
                concurrency=c,
                nodes=pool.registered,
                summary=result.summary(),
                usage=usage,
            )
        )
        stats = await self.cluster.stop_pool(pool)
        self.phases[-1].extra["node_stats"] = stats
        await self.cluster.wait_for_nodes(0)

    async def saturation(self) -> None:
        """Issue 13: instant answers of ``saturation_tokens`` tokens from nodes that send one
        frame per token, as the network's existing nodes do, every slot kept busy; the idle
        case (one slot, one consumer) first, as the reference."""
        plan = self.plan
        cases = (
            ("idle", plan.idle_case),
            ("saturation", plan.saturation_case),
            ("wide", plan.wide_case),
        )
        self.log(
            f"saturation: {INSTANT_MODEL}, {plan.saturation_tokens} tokens per answer, no delay, "
            "one frame per token; nodes x slots / consumers "
            + ", ".join(f"{n}x{s}/{c}" for _, (n, s, c) in cases)
        )
        for role, (nodes, slots, consumers) in cases:
            pool = await self.cluster.start_pool(nodes, slots, single_frames=True)
            if pool.registered != nodes:
                raise BenchError(f"only {pool.registered} of {nodes} nodes registered")
            await self.cluster.wait_for_nodes(pool.registered, timeout=30)
            workload = Workload(
                f"saturation-{role}",
                INSTANT_MODEL,
                consumers,
                plan.round_requests(consumers, plan.saturation_samples),
            )
            await self.compare(
                name=f"saturation {nodes}x{slots}/{consumers}",
                kind="saturation",
                workload=workload,
                nodes=nodes,
                profile_as="saturation" if role == "saturation" else None,
                extra={"case": role, "slots": slots},
            )
            stats = await self.cluster.stop_pool(pool)
            self.saturation_pool_stats[role] = stats
            # Tokens per frame as the nodes sent them (the done chunk counts as one chunk).
            if stats.get("frames"):
                for phase in self.phases[-2:]:
                    phase.extra["chunks_per_frame"] = round(stats["chunks"] / stats["frames"], 3)
            await self.cluster.wait_for_nodes(0)

    async def load_phases(self) -> None:
        plan = self.plan
        self.log(f"load pool: {plan.pool_nodes} nodes x {plan.pool_max_concurrent} slots")
        pool = await self.cluster.start_pool(plan.pool_nodes, plan.pool_max_concurrent)
        if pool.registered != plan.pool_nodes:
            raise BenchError(f"only {pool.registered} of {plan.pool_nodes} nodes registered")
        await self.cluster.wait_for_nodes(pool.registered, timeout=30)
        self.log(
            f"throughput: {FAST_MODEL}, {plan.throughput_tokens} tokens per answer, no delay, "
            "nodes batching (inference_chunks)"
        )
        c = plan.throughput_concurrency
        await self.compare(
            name="throughput",
            kind="throughput",
            workload=Workload(
                "throughput", FAST_MODEL, c, plan.round_requests(c, plan.throughput_samples)
            ),
            nodes=pool.registered,
            profile_as="throughput",
        )
        self.log(
            f"concurrency sweep: {REAL_MODEL}, {plan.realistic_tokens} tokens at "
            f"{1 / plan.token_delay_s:.0f} tokens/s, concurrency {plan.concurrencies}"
        )
        for concurrency in plan.concurrencies:
            headline = concurrency == plan.headline_concurrency
            await self.compare(
                name=f"realistic C={concurrency}",
                kind="realistic",
                workload=self.realistic(
                    f"realistic-{concurrency}",
                    concurrency,
                    plan.realistic_requests(concurrency),
                ),
                nodes=pool.registered,
                profile_as="realistic" if headline else None,
            )
        self.load_pool_stats = await self.cluster.stop_pool(pool)

    async def attach_loop_lag(self) -> None:
        """Give every phase the router's event-loop lag inside its stretches."""
        await asyncio.sleep(LAG_FLUSH_WAIT_S)  # the probes' last lines of the last phase
        if self.cluster.lag_prefix is None:
            return
        samples = await asyncio.to_thread(lag.read, self.cluster.lag_prefix)
        embedded: list[lag.Sample] = []
        if self.cluster.embedded_lag_prefix is not None:
            embedded = await asyncio.to_thread(lag.read, self.cluster.embedded_lag_prefix)
        for phase in self.phases:
            own = embedded if phase.path == EMBEDDED else samples
            phase.loop_lag = lag.stats(own, phase.usage.windows)


def machine_info(router_tree: Path) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu_model = match.group(1) if match else ""
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    if router_tree != ROOT:
        commit = f"{router_tree} (harness at {commit})"
    return {
        "cpu": cpu_model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


async def run(
    plan: Plan,
    *,
    router_env: dict[str, str],
    log: Callable[[str], None],
    keep_dir: Path | None,
    router_tree: Path = ROOT,
) -> dict[str, Any]:
    """Run the whole benchmark and return the results (the JSON document).

    ``router_tree`` is the checkout whose router is measured (default: this one), so the same
    harness can compare two versions, e.g. a ``git archive`` of the last commit.
    """
    _raise_open_files_limit()
    machine = machine_info(router_tree)
    began = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="idleclaw-bench-"))
    cluster = Cluster(plan, work_dir, router_env, router_tree)
    bench_run = Run(plan, cluster, log)
    try:
        log(f"work dir {work_dir}")
        await cluster.start_emulators()
        await cluster.start_routers()
        log(f"router(s) {' '.join(cluster.router_urls)} pid(s) {cluster.router_pids()}")
        bench_run.meter.start()
        await bench_run.warmup()
        await bench_run.sweep_nodes()
        await bench_run.crossing()
        await bench_run.scale_out()
        await bench_run.saturation()
        await bench_run.load_phases()
        await bench_run.loss()
        await bench_run.attach_loop_lag()
        await bench_run.meter.stop()
        router_peaks = [peak_rss_mb(pid) or 0.0 for pid in cluster.router_pids()]
        router_logs = {r.name: r.tail(40) for r in cluster.routers}
    finally:
        await bench_run.meter.stop()
        await cluster.stop()
        if keep_dir is not None:
            await asyncio.to_thread(_keep_logs, work_dir, keep_dir)
        await asyncio.to_thread(shutil.rmtree, work_dir, ignore_errors=True)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results = report.results(
        plan=asdict(plan),
        machine=machine,
        phases=[phase.as_dict() for phase in bench_run.phases],
        node_sweep=bench_run.node_sweep,
        baseline_rss_mb=bench_run.baseline_rss_mb,
        router_peak_rss_mb=sum(router_peaks),
        profiles=bench_run.profiles,
        duration_s=time.monotonic() - began,
    )
    results["load_pool_node_stats"] = bench_run.load_pool_stats
    results["saturation_node_stats"] = bench_run.saturation_pool_stats
    results["router_log_tail"] = router_logs
    return results
