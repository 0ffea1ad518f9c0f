"""Many simulated contributor nodes in one asyncio process.

``skill_scripts/contribute.py`` is the real contributor, but it spends a process and a thread
per request; the benchmark needs 10 to thousands of nodes on a 2-core machine. Each simulated
node speaks PROTOCOL §1 like the real one: it registers, sends a heartbeat at the interval the
router asks for, and serves each ``inference_request`` by streaming Ollama's (here the
emulator's) ``/api/chat`` and forwarding every line as a chunk reduced to the fields a
contributor may forward. When the router lists ``inference_chunks`` in ``registered.features``
(docs/node-protocol-extensions.md), the lines of one read from Ollama go in one
``inference_chunks`` frame; otherwise each goes in its own ``inference_chunk`` frame. With
``--single-frames`` the nodes ignore the extension and send one ``inference_chunk`` frame per
line, one token each, as the network's existing nodes do (issue 13's saturation phase). A
``cancel_request`` closes the HTTP stream to Ollama.

Run it with ``python -m bench.nodesim --router URL --count N --model NAME=OLLAMA_URL``. It
prints ``registered K of N`` once every node has registered (or the wait timed out), ``lost
node ...`` for a socket the router closed, and on SIGTERM closes every socket and prints one
``stats {json}`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

# What a simulated node forwards and how it frames it are the real contributor's own code.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "skill_scripts"))
from contribute import INFERENCE_CHUNKS, build_chunk, pack_chunks  # noqa: E402

CLIENT = "idleclaw-bench-nodesim/0.1"
OLLAMA_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_read=120)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _describe_close(msg: aiohttp.WSMessage) -> str:
    if msg.type == aiohttp.WSMsgType.CLOSE:
        return f"{msg.data} {msg.extra or ''}".strip()
    return msg.type.name.lower()


def ws_url(server: str) -> str:
    if server.startswith("https://"):
        return "wss://" + server[len("https://") :].rstrip("/") + "/ws/node"
    if server.startswith("http://"):
        return "ws://" + server[len("http://") :].rstrip("/") + "/ws/node"
    raise ValueError(f"not an http(s) URL: {server!r}")


@dataclass
class Stats:
    registered: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    chunks: int = 0
    frames: int = 0
    heartbeats: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "registered": self.registered,
            "refused": dict(self.refused),
            "lost": dict(self.lost),
            "requests": self.requests,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "failed": dict(self.failed),
            "chunks": self.chunks,
            "frames": self.frames,
            "heartbeats": self.heartbeats,
        }


class SimulatedNode:
    """One node: a WebSocket to the router and the requests it is serving."""

    def __init__(
        self,
        *,
        sim: NodeSimulator,
        index: int,
        server: str,
        max_concurrent: int,
        single_frames: bool = False,
    ) -> None:
        self.sim = sim
        self.index = index
        self.server = server
        self.node_id = str(uuid.uuid4())
        self.max_concurrent = max_concurrent
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.serving: dict[str, asyncio.Task[None]] = {}
        self.registered = asyncio.Event()
        self.stopping = False
        self.batched = False  # the router takes inference_chunks
        self.single_frames = single_frames  # never use the extension, even when offered

    def register_frame(self) -> dict[str, Any]:
        return {
            "type": "register",
            "node_id": self.node_id,
            "models": [{"name": name, "size": 1_000_000_000} for name in self.sim.backends],
            "max_concurrent": self.max_concurrent,
            "ollama_version": "0.12.3",
            "protocol": 2,
            "client": CLIENT,
        }

    async def send(self, frame: dict[str, Any]) -> None:
        if self.ws is None or self.ws.closed:
            return
        await self.ws.send_str(_dumps(frame))

    async def run(self) -> None:
        stats = self.sim.stats
        try:
            async with self.sim.connecting:
                ws = await self.sim.http.ws_connect(
                    ws_url(self.server), autoping=True, max_msg_size=0, timeout=30.0
                )
                self.ws = ws
                await self.send(self.register_frame())
                first = await ws.receive(timeout=30)
            if first.type != aiohttp.WSMsgType.TEXT:
                stats.refused[_describe_close(first)] += 1
                return
            reply = json.loads(first.data)
            if reply.get("type") != "registered":
                stats.refused[str(reply.get("type"))] += 1
                return
            stats.registered += 1
            features = reply.get("features")
            self.batched = (
                not self.single_frames
                and isinstance(features, list)
                and INFERENCE_CHUNKS in features
            )
            self.registered.set()
            self.sim.on_registered()
            interval = reply.get("heartbeat_interval")
            interval = float(interval) if isinstance(interval, int | float) else 15.0
            beat = asyncio.create_task(self._heartbeats(max(1.0, interval)))
            try:
                reason = await self._receive(ws)
            finally:
                beat.cancel()
                for task in list(self.serving.values()):
                    task.cancel()
            if not self.stopping:
                stats.lost[reason] += 1
                print(f"lost node {self.index}: {reason}", flush=True)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if not self.stopping:
                key = type(exc).__name__
                if self.registered.is_set():
                    stats.lost[key] += 1
                else:
                    stats.refused[key] += 1
                print(f"node {self.index} failed: {exc!r}", flush=True)
        finally:
            if not self.registered.is_set():
                self.sim.on_refused()

    async def _heartbeats(self, interval: float) -> None:
        # Real nodes connect at unrelated times, so their heartbeats are spread over the
        # interval; a pool that registered within a few seconds would otherwise beat in bursts
        # and a short idle window would see none.
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            active = len(self.serving)
            await self.send(
                {
                    "type": "heartbeat",
                    "node_id": self.node_id,
                    "active_requests": active,
                    "available": active < self.max_concurrent,
                }
            )
            self.sim.stats.heartbeats += 1
            await asyncio.sleep(interval)

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """Serve frames until the socket closes; return why it closed."""
        while True:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                if msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    return _describe_close(msg)
                continue
            frame = json.loads(msg.data)
            kind = frame.get("type")
            if kind == "inference_request":
                request_id = frame.get("request_id")
                if isinstance(request_id, str) and request_id not in self.serving:
                    self.sim.stats.requests += 1
                    task = asyncio.create_task(self._serve(request_id, frame["ollama_params"]))
                    self.serving[request_id] = task
            elif kind == "cancel_request":
                task = self.serving.pop(frame.get("request_id"), None)
                if task is not None:
                    task.cancel()
                    self.sim.stats.cancelled += 1

    async def _serve(self, request_id: str, params: dict[str, Any]) -> None:
        stats = self.sim.stats
        try:
            backend = self.sim.backends.get(params.get("model"))
            if backend is None:
                stats.failed["unknown_model"] += 1
                await self._error(request_id, "invalid_request")
                return
            async with self.sim.http.post(
                f"{backend}/api/chat", json=params, timeout=OLLAMA_TIMEOUT
            ) as response:
                if response.status >= 400:
                    stats.failed[f"ollama_{response.status}"] += 1
                    await self._error(request_id, "ollama_error")
                    return
                buffer = b""
                # One read: the lines that have arrived, sent together and at once.
                async for data in response.content.iter_any():
                    buffer += data
                    *lines, buffer = buffer.split(b"\n")
                    chunks = []
                    for line in lines:
                        if line.strip():
                            chunks.append(build_chunk(json.loads(line)))
                            if chunks[-1]["done"]:
                                break
                    if not chunks:
                        continue
                    for text in pack_chunks(request_id, chunks, batched=self.batched)[0]:
                        if self.ws is None or self.ws.closed:
                            return
                        await self.ws.send_str(text)
                        stats.frames += 1
                    stats.chunks += len(chunks)
                    if chunks[-1]["done"]:
                        stats.completed += 1
                        return
            stats.failed["stream_ended"] += 1
            await self._error(request_id, "ollama_error")
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            stats.failed[type(exc).__name__] += 1
            await self._error(request_id, "ollama_error")
        finally:
            if self.serving.get(request_id) is asyncio.current_task():
                del self.serving[request_id]

    async def _error(self, request_id: str, error: str) -> None:
        await self.send({"type": "inference_error", "request_id": request_id, "error": error})

    async def close(self) -> None:
        self.stopping = True
        if self.ws is not None and not self.ws.closed:
            try:
                await asyncio.wait_for(self.ws.close(), timeout=5)
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass


class NodeSimulator:
    """``count`` nodes spread over ``servers`` (router base URLs), all offering ``backends``."""

    def __init__(
        self,
        *,
        servers: Sequence[str],
        backends: dict[str, str],
        count: int,
        max_concurrent: int,
        connect_concurrency: int = 64,
        single_frames: bool = False,
    ) -> None:
        self.servers = list(servers)
        self.backends = dict(backends)
        self.count = count
        self.max_concurrent = max_concurrent
        self.single_frames = single_frames
        self.stats = Stats()
        self.connecting = asyncio.Semaphore(connect_concurrency)
        self.nodes: list[SimulatedNode] = []
        self.tasks: list[asyncio.Task[None]] = []
        self._settled = 0
        self._all_settled = asyncio.Event()
        self.http: aiohttp.ClientSession

    def on_registered(self) -> None:
        self._settle()

    def on_refused(self) -> None:
        self._settle()

    def _settle(self) -> None:
        self._settled += 1
        if self._settled >= self.count:
            self._all_settled.set()

    async def start(self, timeout: float) -> int:
        """Connect every node; return how many registered within ``timeout`` seconds."""
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self.http = aiohttp.ClientSession(connector=connector)
        for index in range(self.count):
            node = SimulatedNode(
                sim=self,
                index=index,
                server=self.servers[index % len(self.servers)],
                max_concurrent=self.max_concurrent,
                single_frames=self.single_frames,
            )
            self.nodes.append(node)
            self.tasks.append(asyncio.create_task(node.run()))
        if self.count == 0:
            self._all_settled.set()
        try:
            await asyncio.wait_for(self._all_settled.wait(), timeout=timeout)
        except TimeoutError:
            pass
        return self.stats.registered

    async def stop(self) -> None:
        await asyncio.gather(*(node.close() for node in self.nodes))
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.http.close()


def _raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _backend(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError("expected NAME=http://host:port")
    return name, url.rstrip("/")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.nodesim", description="Simulate many IdleClaw contributor nodes."
    )
    parser.add_argument("--router", action="append", required=True, help="router base URL")
    parser.add_argument("--count", type=int, required=True, help="number of nodes")
    parser.add_argument("--max-concurrent", type=int, default=2, help="slots per node")
    parser.add_argument(
        "--model",
        action="append",
        type=_backend,
        required=True,
        metavar="NAME=OLLAMA_URL",
        help="a model every node offers, served by the Ollama at OLLAMA_URL; repeatable",
    )
    parser.add_argument(
        "--register-timeout", type=float, default=120.0, help="seconds to wait for all nodes"
    )
    parser.add_argument(
        "--single-frames",
        action="store_true",
        help="one inference_chunk frame per token even when the router offers inference_chunks",
    )
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    sim = NodeSimulator(
        servers=args.router,
        backends=dict(args.model),
        count=args.count,
        max_concurrent=args.max_concurrent,
        single_frames=args.single_frames,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    began = time.monotonic()
    registered = await sim.start(args.register_timeout)
    print(
        f"registered {registered} of {args.count} in {time.monotonic() - began:.2f} s",
        flush=True,
    )
    await stop.wait()
    await sim.stop()
    print("stats " + _dumps(sim.stats.as_dict()), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    _raise_open_files_limit()
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
