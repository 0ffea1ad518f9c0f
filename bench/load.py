"""The load generator: C concurrent consumers, direct to Ollama or through the router.

Both paths run the same workload (same prompts, same model, same reply length), so the only
difference is the relay. Every answer is checked against what the emulator must have sent
(:meth:`bench.emulator.OllamaEmulator.expected_reply`): the emulator numbers its tokens
(``sky0``, `` lamp1``, ...), so a lost, duplicated, reordered or foreign token is detected and
counted as an error of its kind.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# One emulator content token: an optional leading space, a word without digits, its index.
TOKEN_RE = re.compile(r"\s?[^\s\d]+\d+")
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=300, connect=30, sock_read=120)


@dataclass(frozen=True)
class Workload:
    """What the consumers ask: ``concurrency`` consumers, ``requests`` answers in total."""

    name: str
    model: str
    concurrency: int
    requests: int
    # Seconds over which the consumers' first requests are spread (0: all at once).
    ramp: float = 0.0


@dataclass
class Outcome:
    ok: bool
    error: str | None
    ttft: float | None  # seconds from sending the request to the first content token
    duration: float
    tokens: int  # content tokens received (counted whether or not the answer was right)
    # Why the router ended the stream with an error event (``stream_error``): the code of its
    # message (STREAM_ERRORS), e.g. ``queue_timeout`` or ``lost_chunks``.
    reason: str | None = None


@dataclass
class LoadResult:
    """Raw outcomes of one workload on one path."""

    workload: Workload
    path: str
    started: float
    finished: float
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return max(self.finished - self.started, 1e-9)

    def errors(self) -> Counter[str]:
        return Counter(o.error for o in self.outcomes if o.error)

    @classmethod
    def merge(cls, results: Sequence[LoadResult]) -> LoadResult:
        """The rounds of one path as one result: every outcome, and the rounds' walls added
        up (the time between rounds, when the other path ran, is not this path's)."""
        wall = sum(r.wall for r in results)
        outcomes = [o for r in results for o in r.outcomes]
        return cls(results[0].workload, results[0].path, 0.0, wall, outcomes)

    def summary(self) -> dict[str, Any]:
        ttfts = sorted(o.ttft for o in self.outcomes if o.ok and o.ttft is not None)
        rates = sorted(
            (o.tokens - 1) / (o.duration - o.ttft)
            for o in self.outcomes
            if o.ok and o.ttft is not None and o.tokens > 1 and o.duration > o.ttft
        )
        tokens = sum(o.tokens for o in self.outcomes if o.ok)
        ok = sum(1 for o in self.outcomes if o.ok)
        errors = self.errors()
        reasons = Counter(o.reason for o in self.outcomes if o.reason)
        return {
            "path": self.path,
            "requests": len(self.outcomes),
            "ok": ok,
            "errors": sum(errors.values()),
            "error_kinds": dict(errors),
            "stream_errors": dict(reasons),
            "token_errors": sum(n for kind, n in errors.items() if kind in TOKEN_ERRORS),
            "wall_s": round(self.wall, 3),
            "ttft_ms_p50": _ms(percentile(ttfts, 50)),
            "ttft_ms_p95": _ms(percentile(ttfts, 95)),
            "ttft_ms_p99": _ms(percentile(ttfts, 99)),
            "ttft_ms_max": _ms(ttfts[-1] if ttfts else None),
            "tokens": tokens,
            "tokens_per_s": round(tokens / self.wall, 1),
            "requests_per_s": round(ok / self.wall, 2),
            "stream_tokens_per_s_p10": _round(percentile(rates, 10), 2),
            "stream_tokens_per_s_p50": _round(percentile(rates, 50), 2),
        }


TOKEN_ERRORS = ("lost", "duplicated", "reordered", "foreign", "garbled")
# The router's error events say what went wrong in words (PROTOCOL §2); these are the words
# that tell its reasons apart (routing/streaming.py ERROR_MESSAGES), read without importing the
# router: the benchmark may measure another checkout's.
STREAM_ERRORS = (
    ("no node became free in time", "queue_timeout"),
    ("too many requests are waiting", "queue_full"),
    ("part of the answer was lost", "lost_chunks"),
    ("not read fast enough", "consumer_stalled"),
    ("node serving this request disconnected", "node_disconnected"),
    ("node stopped responding", "stalled"),
    ("response took too long", "timeout"),
    ("refused the request as invalid", "invalid_request"),
    ("node refused the request", "invalid_request"),  # the words of routers before issue 19
    ("sent invalid embeddings", "bad_embeddings"),
    ("an operator ended", "operator_cancelled"),
    ("model server is unavailable", "ollama_unavailable"),
    ("model server failed", "ollama_error"),
    ("no node is serving this model", "no_node"),
    ("router failed while relaying", "internal"),
    ("router is restarting", "restarting"),
)
ERROR_EVENT_RE = re.compile(r"\[Error: (.*)\]\s*$", re.DOTALL)


def stream_error_reason(content: str) -> str:
    """The reason code of an error event's content, ``other`` when the words are unknown."""
    match = ERROR_EVENT_RE.search(content)
    message = match.group(1) if match else content
    for words, code in STREAM_ERRORS:
        if words in message:
            return code
    return "other"


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    rank = (len(values) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def check_tokens(received: Sequence[str], expected: Sequence[str]) -> str | None:
    """Compare the content deltas a consumer got with the tokens the emulator sent.

    Deltas may group several tokens (a relay that batches), so the comparison is on the
    tokens inside them. Returns None when they match exactly, else the first kind of damage:
    ``foreign`` (a token of another answer: crossed streams), ``lost``, ``duplicated``,
    ``reordered`` or ``garbled`` (text that is not a sequence of the emulator's tokens).
    """
    text = "".join(received)
    if text == "".join(expected):
        return None
    tokens = TOKEN_RE.findall(text)
    if "".join(tokens) != text:
        return "garbled"
    wanted = set(expected)
    got = set(tokens)
    if got - wanted:
        return "foreign"
    if wanted - got:
        return "lost"
    if len(tokens) != len(got):
        return "duplicated"
    return "reordered"


def chat_body(model: str, prompt: str) -> dict[str, Any]:
    """The consumer request: one user message, no thinking."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "think": False}


class Consumers:
    """Runs a workload against one path and checks every answer.

    ``expected(body)`` returns the content tokens the emulator sends for an Ollama
    ``/api/chat`` body; ``targets`` are base URLs (several router workers are used in turn).
    """

    def __init__(
        self, *, path: str, targets: Sequence[str], expected: Callable[[dict], Sequence[str]]
    ) -> None:
        if path not in ("direct", "router"):
            raise ValueError(path)
        self.path = path
        self.targets = list(targets)
        self.expected = expected

    async def run(self, workload: Workload) -> LoadResult:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as http:
            counter = iter(range(workload.requests))
            outcomes: list[Outcome] = []
            started = time.perf_counter()

            async def consumer(index: int) -> None:
                if workload.ramp:
                    await asyncio.sleep(workload.ramp * index / workload.concurrency)
                for number in counter:
                    outcomes.append(await self.one(http, workload, number))

            await asyncio.gather(*(consumer(i) for i in range(workload.concurrency)))
            finished = time.perf_counter()
        return LoadResult(workload, self.path, started, finished, outcomes)

    async def one(self, http: aiohttp.ClientSession, workload: Workload, number: int) -> Outcome:
        prompt = f"{workload.name} request {number}: why is the sky blue?"
        body = chat_body(workload.model, prompt)
        expected = self.expected({**body, "stream": True})
        target = self.targets[number % len(self.targets)]
        began = time.perf_counter()
        received: list[str] = []
        first: float | None = None
        error: str | None = None
        reason: str | None = None
        try:
            if self.path == "direct":
                url, payload, parse = f"{target}/api/chat", {**body, "stream": True}, _ndjson
            else:
                url, payload, parse = f"{target}/api/chat", body, _sse
            async with http.post(url, json=payload) as response:
                if response.status != 200:
                    error = _http_error(response.status, await response.read())
                else:
                    buffer = b""
                    finished = False
                    async for data in response.content.iter_any():
                        buffer += data
                        *lines, buffer = buffer.split(b"\n")
                        for line in lines:
                            step = parse(line)
                            if step is None:
                                continue
                            kind, value = step
                            if kind == "token":
                                if first is None:
                                    first = time.perf_counter()
                                received.append(value)
                            elif kind == "error":
                                error = value
                            elif kind == "stream_error":
                                error, reason = "stream_error", value
                            elif kind == "end":
                                finished = True
                        if finished:
                            break
                    if not finished and error is None:
                        error = "unterminated"
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            error = f"client_{type(exc).__name__}"
        duration = time.perf_counter() - began
        if error is None:
            error = check_tokens(received, expected)
        tokens = len(TOKEN_RE.findall("".join(received)))
        return Outcome(
            ok=error is None,
            error=error,
            ttft=None if first is None else first - began,
            duration=duration,
            tokens=tokens,
            reason=reason,
        )


def _http_error(status: int, body: bytes) -> str:
    """``http_503`` plus why, when the router said (busy nodes, no node, a full queue and a
    restarting router are different)."""
    try:
        detail = str(json.loads(body).get("detail", ""))
    except (ValueError, AttributeError):
        detail = ""
    if status == 503 and "busy" in detail:
        return "http_503_busy"
    if status == 503 and "no node" in detail:
        return "http_503_no_node"
    if status == 503 and "too many requests are waiting" in detail:
        return "http_503_queue_full"
    if status == 503 and "restarting" in detail:
        return "http_503_restarting"
    return f"http_{status}"


def _ndjson(line: bytes) -> tuple[str, str] | None:
    """One line of Ollama's stream: a token, the end, or an error."""
    if not line.strip():
        return None
    obj = json.loads(line)
    if "error" in obj:
        return "error", "ollama_error"
    content = (obj.get("message") or {}).get("content")
    if obj.get("done"):
        # The final chunk's content is empty in a stream; anything else would be a token.
        if content:
            return "error", "garbled"
        return "end", ""
    if content:
        return "token", content
    return None


def _sse(line: bytes) -> tuple[str, str] | None:
    """One line of the router's Server-Sent Events (PROTOCOL §2)."""
    if not line.startswith(b"data:"):
        return None  # blank separators and ": queued" comments
    data = line[5:].strip()
    if data == b"[DONE]":
        return "end", ""
    event = json.loads(data)
    choice = event["choices"][0]
    delta = choice.get("delta") or {}
    if choice.get("finish_reason") == "error":
        return "stream_error", stream_error_reason(str(delta.get("content") or ""))
    content = delta.get("content")
    if content and not delta.get("reasoning"):
        return "token", content
    return None
