"""Share this machine's Ollama models with the IdleClaw network.

Connects to the router's node WebSocket (docs/protocol.md §1), registers the local models (with
what Ollama's ``/api/show`` says of them) and serves ``inference_request`` frames by streaming
from the local Ollama; to a router that offers the ``inference_chunks`` extension it sends the
chunks that arrived together in one frame, and to one that offers ``loaded_models`` it says with
its heartbeats which shared models Ollama has loaded (docs/node-protocol-extensions.md). It
declares the ``embeddings`` extension and serves the router's ``embed_request`` frames from
Ollama's ``/api/embed``. The router is untrusted input: requests are reduced to the whitelisted
parameters of docs/protocol.md §4 before they reach Ollama, and only the whitelisted answer
fields go back.

The contributor stays in charge (``node_control``): caps on a request's context and length
(also stated in ``register``, so a router sends nothing larger), the ``keep_alive`` its Ollama
gets, serving hours, pausing while named programs run, and a drain on Ctrl+C that lets the
answers in flight finish. It reads Ollama's models again every minute, tells the router when
they change, and stops taking requests while Ollama is gone.

It proves a contributor key (``contributor_key``: made once in the user's config folder,
``--key-file``) at each registration, so the router keeps the contributor's record and public
name across restarts and address changes (docs/node-protocol-extensions.md ``contributor``).
The key never leaves this machine: a router is sent only its own derivation of it, bound to
its origin. ``--name`` chooses the name, ``--print-token`` prints the consumer token for the
router IDLECLAW_SERVER names, ``--anonymous`` registers without a key.

Configuration: ``IDLECLAW_SERVER`` (router base URL) and ``OLLAMA_HOST``. Logs go to stderr and
never contain prompt or answer text, nor the key. Exit codes: 0 stopped by Ctrl+C/SIGTERM,
1 Ollama unusable or the router refused this node for good, 2 bad configuration or arguments
(an unusable key file included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import queue
import random
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import contributor_key
import idleclaw_config as config
import node_control
import requests
import urllib3
import websocket
from node_control import RequestPolicy, ServingHours, apply_policy, escaped, event

log = logging.getLogger("idleclaw.contribute")

MAX_FRAME_BYTES = 100_000
# Most chunks in one inference_chunks frame (docs/node-protocol-extensions.md).
MAX_CHUNKS_PER_FRAME = 256
# The extension a router lists in ``registered.features`` when it takes inference_chunks.
INFERENCE_CHUNKS = "inference_chunks"
# ... and when it takes the models Ollama has loaded (``/api/ps``) with each heartbeat.
LOADED_MODELS = "loaded_models"
# ... when it takes drain and undrain (and draining in register): a node pauses while connected.
DRAIN = "drain"
# ... when it takes models_update: a node's models change while it stays connected.
MODELS_UPDATE = "models_update"
# Keys of Ollama's ``details`` of a model sent at registration, and their longest value.
DETAIL_KEYS = ("format", "family", "parameter_size", "quantization_level")
MAX_DETAIL_CHARS = 32
MAX_FAMILIES = 4
# The extension this node declares in ``register.features``: it serves embed_request frames.
# A router that does not know it ignores the field and never sends one.
EMBEDDINGS = "embeddings"
# Limits of an embedding request (docs/node-protocol-extensions.md).
MAX_EMBED_INPUTS = 256
MAX_EMBED_DIMENSIONS = 8192
EMBED_STAT_KEYS = ("total_duration", "load_duration", "prompt_eval_count")
# Most of Ollama's /api/embed answer that is read, per input: one vector of 8192 numbers of at
# most 25 characters each ("-0.012345678901234567e-05,"), plus room for the statistics. The
# largest request (256 inputs) is so read up to ~50 MB, a one-input request up to ~200 KB.
EMBED_ANSWER_BYTES_PER_NUMBER = 25
EMBED_ANSWER_SLACK_BYTES = 65_536
# Lines read from Ollama but not yet sent on: past this the reader stops reading, so a slow link
# to the router slows Ollama down instead of piling a whole answer up in memory.
MAX_WAITING_LINES = 1024
MAX_MODELS = 20
MAX_MESSAGES = 50
MAX_CONTENT_CHARS = 10_000
MAX_REQUEST_ID_CHARS = 64
MAX_CONCURRENT_RANGE = (1, 10)
MESSAGE_ROLES = frozenset({"user", "assistant", "system", "tool"})
FORWARDED_PARAMS = (
    "model",
    "messages",
    "stream",
    "think",
    "keep_alive",
    "options",
    "tools",
    "format",
)
# Keys of one message passed on to Ollama; ``images`` and anything else are dropped.
MESSAGE_KEYS = ("role", "content", "thinking", "tool_calls", "tool_name")
CHUNK_MESSAGE_KEYS = ("role", "content", "thinking", "tool_calls")
STAT_KEYS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
# Options that decide how the contributor's hardware runs the model rather than what the answer
# is; a stranger's request has no business pinning memory or choosing GPUs on this machine.
HOST_OPTIONS = frozenset(
    {"num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa", "low_vram", "vocab_only"}
)
THINK_LEVELS = frozenset({"low", "medium", "high"})

# 1008 close reasons (docs/protocol.md §1) that will not change by trying again.
PERMANENT_REFUSALS = frozenset(
    {
        "expected register message",
        "invalid node_id",
        "no models provided",
        "too many models",
        "invalid model name",
        "banned",
        "invalid contributor",
    }
)

DEFAULT_HEARTBEAT_S = 15.0
WS_CONNECT_TIMEOUT_S = 10.0
# Socket timeout while connected: how often the receive loop wakes to check liveness, and how
# long one send may block before the connection counts as dead.
WS_POLL_S = 5.0
REGISTER_WAIT_S = 15.0
OLLAMA_CONNECT_TIMEOUT_S = 5.0
# Between two lines of Ollama's stream; loading a large model before the first token is slow.
OLLAMA_READ_TIMEOUT_S = 300.0
OLLAMA_INFO_TIMEOUT = (5.0, 15.0)
# /api/ps is asked from the heartbeat thread: a slow answer must not delay a heartbeat for long.
OLLAMA_PS_TIMEOUT = (2.0, 5.0)
# Besides the one with each heartbeat, /api/ps is asked soon after a request that may have loaded
# or unloaded a model, so the router learns it quickly; never more often than this.
PS_MIN_INTERVAL_S = 1.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
# A router that is restarting closes its nodes with 1012 (RFC 6455 "Service Restart", an
# extension of docs/protocol.md §1); it, or another worker, takes them back within seconds.
ROUTER_RESTART_CODE = 1012
RESTART_RETRY_S = 1.0
RESTART_WINDOW_S = 60.0
BUSY_ERROR = "node busy: max_concurrent reached"
# Free text (docs/protocol.md §1): the router treats it as ollama_error and tries another node.
PAUSED_ERROR = "node paused: not taking requests"
# How often Ollama's model list is read again (--recheck-seconds), and how often the serving
# hours and the programs of --pause-while are looked at (more often when rechecks are).
RECHECK_DEFAULT_S = 60.0
PAUSE_CHECK_S = 5.0
# How often the main thread looks for Ctrl+C/SIGTERM and for the end of a drain.
MAIN_POLL_S = 0.2
# While stopping with answers in flight, how often the log says what it waits for.
DRAIN_NOTICE_S = 30.0
# How long a close this node started may wait for the router's answer.
LEAVE_WAIT_S = 2.0
# Loading a model for --warmup: a large one takes minutes from a slow disk.
WARMUP_TIMEOUT = (5.0, 600.0)
# Why the node does not take requests (``Contributor.set_paused``), by cause.
PAUSE_HOURS = "hours"
PAUSE_PROGRAMS = "programs"
PAUSE_OLLAMA = "ollama"
PAUSE_STOP = "stop"


class InvalidRequest(ValueError):
    """An ``inference_request`` this node refuses; answered with ``invalid_request``."""


class StartupError(Exception):
    """Ollama cannot be shared as asked; ``exit_code`` is what the script exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopRequested(BaseException):
    """Raised in the main thread by the SIGINT/SIGTERM handler while the node starts.

    A BaseException so that no ``except Exception`` on the way swallows it.
    """


class _Signals:
    """Ctrl+C and SIGTERM, counted by the handler (it runs in the main thread). While the node
    starts (``raising``) the first one ends the script at once; once it serves, the main thread
    reads ``count``: the first drains, the second stops at once. Plain attributes, no lock: a
    signal may interrupt the handler itself."""

    count = 0
    raising = True


# --------------------------------------------------------------------------- pure helpers


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _clean_message(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidRequest("message is not an object")
    role = raw.get("role")
    if role not in MESSAGE_ROLES:
        raise InvalidRequest("message role not allowed")
    content = raw.get("content")
    if not isinstance(content, str) or len(content) > MAX_CONTENT_CHARS:
        raise InvalidRequest("message content missing or too long")
    message: dict[str, Any] = {"role": role, "content": content}
    thinking = raw.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, str) or len(thinking) > MAX_CONTENT_CHARS:
            raise InvalidRequest("message thinking not a string or too long")
        message["thinking"] = thinking
    tool_calls = raw.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls):
            raise InvalidRequest("message tool_calls is not a list of objects")
        message["tool_calls"] = tool_calls
    tool_name = raw.get("tool_name")
    if tool_name is not None:
        if not isinstance(tool_name, str) or len(tool_name) > 64:
            raise InvalidRequest("message tool_name invalid")
        message["tool_name"] = tool_name
    return message


def sanitize_params(params: Any, models: Collection[str]) -> dict[str, Any]:
    """Reduce a router's ``ollama_params`` to what may be sent to Ollama (docs/protocol.md §4).

    Keeps only ``model, messages, stream, think, keep_alive, options, tools, format``, forces
    ``stream`` to true, and requires a model from ``models`` and 0..50 messages with an allowed
    role and string content of at most 10,000 chars. Keys set to null count as absent.
    Raises ``InvalidRequest`` with a short reason (safe to log: it never quotes the prompt).
    """
    if not isinstance(params, dict):
        raise InvalidRequest("ollama_params is not an object")
    model = params.get("model")
    if not isinstance(model, str) or model not in models:
        raise InvalidRequest("model not shared by this node")
    messages = params.get("messages")
    if not isinstance(messages, list) or len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"messages must be a list of at most {MAX_MESSAGES}")
    clean: dict[str, Any] = {
        "model": model,
        "messages": [_clean_message(m) for m in messages],
        "stream": True,
    }
    think = params.get("think")
    if think is not None:
        if not isinstance(think, bool) and think not in THINK_LEVELS:
            raise InvalidRequest("think must be a boolean or low/medium/high")
        clean["think"] = think
    keep_alive = params.get("keep_alive")
    if keep_alive is not None:
        valid_number = isinstance(keep_alive, int | float) and not isinstance(keep_alive, bool)
        if not valid_number and not (isinstance(keep_alive, str) and len(keep_alive) <= 32):
            raise InvalidRequest("keep_alive must be a number or a duration")
        clean["keep_alive"] = keep_alive
    options = params.get("options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("options is not an object")
        clean["options"] = {k: v for k, v in options.items() if k not in HOST_OPTIONS}
    tools = params.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise InvalidRequest("tools is not a list of objects")
        clean["tools"] = tools
    fmt = params.get("format")
    if fmt is not None:
        if not isinstance(fmt, str | dict):
            raise InvalidRequest("format must be a string or a JSON schema")
        clean["format"] = fmt
    return clean


def _keep_alive(value: Any) -> Any:
    valid_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not valid_number and not (isinstance(value, str) and len(value) <= 32):
        raise InvalidRequest("keep_alive must be a number or a duration")
    return value


def sanitize_embed_params(params: Any, models: Collection[str]) -> dict[str, Any]:
    """Reduce a router's ``embed_params`` to what may be sent to Ollama's ``/api/embed``:
    ``model`` (one this node shares), ``input`` (1..256 strings), and ``truncate``,
    ``dimensions`` (1..8192), ``keep_alive``, ``options`` (without the host options) when set.
    Raises ``InvalidRequest`` with a short reason that never quotes the input."""
    if not isinstance(params, dict):
        raise InvalidRequest("embed_params is not an object")
    model = params.get("model")
    if not isinstance(model, str) or model not in models:
        raise InvalidRequest("model not shared by this node")
    texts = params.get("input")
    if (
        not isinstance(texts, list)
        or not 0 < len(texts) <= MAX_EMBED_INPUTS
        or not all(isinstance(text, str) for text in texts)
    ):
        raise InvalidRequest(f"input must be a list of 1 to {MAX_EMBED_INPUTS} strings")
    clean: dict[str, Any] = {"model": model, "input": texts}
    truncate = params.get("truncate")
    if truncate is not None:
        if not isinstance(truncate, bool):
            raise InvalidRequest("truncate must be a boolean")
        clean["truncate"] = truncate
    dimensions = params.get("dimensions")
    if dimensions is not None:
        if not _is_int(dimensions) or not 0 < dimensions <= MAX_EMBED_DIMENSIONS:
            raise InvalidRequest(f"dimensions must be 1 to {MAX_EMBED_DIMENSIONS}")
        clean["dimensions"] = dimensions
    if params.get("keep_alive") is not None:
        clean["keep_alive"] = _keep_alive(params["keep_alive"])
    options = params.get("options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("options is not an object")
        clean["options"] = {k: v for k, v in options.items() if k not in HOST_OPTIONS}
    return clean


def _normalized(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(value * value for value in vector)) or 1.0
    return [value / norm for value in vector]


def embeddings_of(
    answer: Any, inputs: int, dimensions: int | None
) -> tuple[list[list[float]], str | None]:
    """The vectors of Ollama's ``/api/embed`` answer, or why they cannot be sent: one list of
    finite numbers per input, all of one length of 1..8192. Vectors longer than ``dimensions``
    are cut and normalized again, as Ollama does since it knows ``dimensions`` (an older Ollama
    ignores the field)."""
    vectors = answer.get("embeddings") if isinstance(answer, dict) else None
    if not isinstance(vectors, list) or len(vectors) != inputs:
        return (
            [],
            f"Ollama sent {len(vectors) if isinstance(vectors, list) else 'no'} "
            f"embeddings for {inputs} inputs",
        )
    length = None
    clean = []
    for vector in vectors:
        if (
            not isinstance(vector, list)
            or not vector
            or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in vector
            )
        ):
            return [], "Ollama sent an embedding that is not a list of finite numbers"
        if dimensions is not None and len(vector) > dimensions:
            vector = _normalized(vector[:dimensions])
        if length is None:
            length = len(vector)
        if len(vector) != length or length > MAX_EMBED_DIMENSIONS:
            return [], "Ollama sent embeddings of different or too large lengths"
        clean.append(vector)
    return clean, None


def pack_vectors(
    request_id: str, vectors: Sequence[Sequence[float]], stats: dict[str, int]
) -> list[str]:
    """Encode an embedding answer as ``embed_vectors`` frames of at most 100,000 bytes, in
    order: whole vectors while they fit, and a vector too long for any frame in parts, each
    frame after the first part saying ``continued``. The last frame is ``done`` and carries
    ``stats``."""
    head = '{"type":"embed_vectors","request_id":' + json.dumps(request_id) + ',"embeddings":['
    final = "".join(f",{json.dumps(key)}:{int(value)}" for key, value in stats.items())

    def tail(continued: bool, done: bool) -> str:
        return (
            f'],"continued":{json.dumps(continued)},"done":{json.dumps(done)}'
            + (final if done else "")
            + "}"
        )

    room = (
        MAX_FRAME_BYTES
        - len(head)
        - max(len(tail(continued, done)) for continued in (False, True) for done in (False, True))
    )
    frames: list[str] = []
    pieces: list[str] = []  # the vectors (or parts of one) of the frame being filled
    used = 0  # their length, commas included
    continued = False  # whether pieces[0] continues the previous frame's last vector

    def add(text: str) -> None:
        nonlocal used
        used += len(text) + (1 if pieces else 0)
        pieces.append(text)

    def flush(done: bool) -> None:
        nonlocal pieces, used, continued
        frames.append(head + ",".join(pieces) + tail(continued, done))
        pieces, used, continued = [], 0, False

    for vector in vectors:
        text = json.dumps(list(vector), separators=(",", ":"))  # numbers are ASCII
        if used + len(text) + (1 if pieces else 0) <= room:
            add(text)
            continue
        if len(text) <= room:
            flush(False)
            add(text)
            continue
        part: list[str] = []
        part_used = 0
        for number in text[1:-1].split(","):
            extra = len(number) + (1 if part else 0)
            if used + (1 if pieces else 0) + 2 + part_used + extra > room:
                if part:
                    add("[" + ",".join(part) + "]")
                    flush(False)
                    continued = True
                    part, part_used, extra = [], 0, len(number)
                else:
                    flush(False)  # no room left after the whole vectors before it
            part.append(number)
            part_used += extra
        add("[" + ",".join(part) + "]")
    flush(True)
    return frames


def build_chunk(line: dict[str, Any]) -> dict[str, Any]:
    """Reduce one line of Ollama's ``/api/chat`` stream to the chunk the router may see.

    ``message`` keeps only ``role, content, thinking, tool_calls``; then ``done``, and
    ``done_reason`` plus the timing/count stats on the final chunk.
    """
    raw_message = line.get("message")
    message: dict[str, Any] = {}
    if isinstance(raw_message, dict):
        message = {k: raw_message[k] for k in CHUNK_MESSAGE_KEYS if k in raw_message}
    message.setdefault("role", "assistant")
    message.setdefault("content", "")
    done = line.get("done") is True
    chunk: dict[str, Any] = {"message": message, "done": done}
    done_reason = line.get("done_reason")
    if isinstance(done_reason, str) and done_reason:
        chunk["done_reason"] = done_reason
    if done:
        for key in STAT_KEYS:
            if _is_int(line.get(key)):
                chunk[key] = line[key]
    return chunk


def encode_frame(frame: dict[str, Any]) -> str | None:
    """JSON text of a frame, or None when it is over the 100,000-byte frame limit."""
    text = json.dumps(frame, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode("utf-8")) > MAX_FRAME_BYTES:
        return None
    return text


def pack_chunks(
    request_id: str, chunks: Sequence[dict[str, Any]], *, batched: bool
) -> tuple[list[str], list[dict[str, Any]]]:
    """Encode a request's chunks, in order, as frames of at most 100,000 bytes.

    ``batched``: as few ``inference_chunks`` frames as the size limit and the 256 chunks per
    frame allow; otherwise one classic ``inference_chunk`` frame per chunk. Returns the frames
    and the chunks too big for any frame, which are left out.
    """
    frames: list[str] = []
    oversized: list[dict[str, Any]] = []
    if not batched:
        for chunk in chunks:
            text = encode_frame(
                {"type": "inference_chunk", "request_id": request_id, "chunk": chunk}
            )
            if text is None:
                oversized.append(chunk)
            else:
                frames.append(text)
        return frames, oversized
    head = (
        '{"type":"inference_chunks","request_id":'
        + json.dumps(request_id, ensure_ascii=False)
        + ',"chunks":['
    )
    tail = "]}"
    room = MAX_FRAME_BYTES - len(head.encode("utf-8")) - len(tail)
    pieces: list[str] = []
    used = 0
    for chunk in chunks:
        piece = json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
        size = len(piece.encode("utf-8"))
        if size > room:
            oversized.append(chunk)
            continue
        # ``used`` counts a comma before every piece but the first.
        if pieces and (used + 1 + size > room or len(pieces) == MAX_CHUNKS_PER_FRAME):
            frames.append(head + ",".join(pieces) + tail)
            pieces, used = [], 0
        used += size + (1 if pieces else 0)
        pieces.append(piece)
    if pieces:
        frames.append(head + ",".join(pieces) + tail)
    return frames, oversized


def chunks_of_lines(lines: Sequence[bytes]) -> tuple[list[dict[str, Any]], str | None]:
    """The chunks of lines of Ollama's stream, up to the one with ``done``, and why the stream
    is broken if a line is not a chunk (the chunks before that line are good)."""
    chunks: list[dict[str, Any]] = []
    for raw_line in lines:
        try:
            line = json.loads(raw_line)
        except ValueError:
            return chunks, "Ollama sent a line that is not JSON"
        if not isinstance(line, dict):
            return chunks, "Ollama sent a line that is not an object"
        if "error" in line:
            return chunks, f"Ollama: {str(line['error'])[:120]}"
        chunk = build_chunk(line)
        chunks.append(chunk)
        if chunk["done"]:
            break
    return chunks, None


def parse_close(data: bytes) -> tuple[int | None, str]:
    """Status code and reason of a WebSocket close frame's payload."""
    if len(data) < 2:
        return None, ""
    code = int.from_bytes(data[:2], "big")
    return code, data[2:].decode("utf-8", errors="replace").strip()


@dataclass
class Backoff:
    """Exponential backoff with jitter: 1 s doubling to 60 s, each delay drawn from
    [base/2, base] so that nodes cut off together do not come back together."""

    first: float = BACKOFF_FIRST_S
    cap: float = BACKOFF_MAX_S
    rng: Callable[[], float] = random.random
    _base: float = 0.0

    def __post_init__(self) -> None:
        self._base = self.first

    def next_delay(self) -> float:
        """The next delay in seconds; the following one doubles up to ``cap``."""
        base = self._base
        self._base = min(self.cap, base * 2)
        return base / 2 + self.rng() * base / 2

    def reset(self) -> None:
        """Start from ``first`` again (after a successful registration)."""
        self._base = self.first


def _describe(exc: BaseException) -> str:
    """A one-line reason for a network failure, without a traceback."""
    if isinstance(exc, websocket.WebSocketBadStatusException):
        return f"HTTP {exc.status_code} on the WebSocket handshake"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "host not found"
    if isinstance(exc, TimeoutError | websocket.WebSocketTimeoutException):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        text = str(exc)
        if "refused" in text.lower():
            return "connection refused"
        if "resolve" in text.lower() or "name or service" in text.lower():
            return "host not found"
        return "connection failed"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


# --------------------------------------------------------------------------- Ollama discovery


@dataclass(frozen=True)
class LocalModel:
    """A model offered to the network, as sent in ``register``."""

    name: str
    size: int = 0
    capabilities: tuple[str, ...] | None = None
    # Ollama's ``details`` (family, parameter size, ...) and the model's context length, from
    # /api/show; None when Ollama did not say.
    details: dict[str, Any] | None = field(default=None, compare=False)
    context_length: int | None = None

    def offer(self) -> dict[str, Any]:
        """The ``models`` entry of the register frame."""
        entry: dict[str, Any] = {"name": self.name, "size": self.size}
        if self.capabilities is not None:
            entry["capabilities"] = list(self.capabilities)
        if self.details:
            entry["details"] = dict(self.details)
        if self.context_length is not None:
            entry["context_length"] = self.context_length
        return entry


def show_details(raw: Any) -> dict[str, Any] | None:
    """Ollama's ``details`` of a model reduced to the keys the router reads, short strings
    only (a router refuses the rest anyway)."""
    if not isinstance(raw, dict):
        return None
    details: dict[str, Any] = {
        key: raw[key]
        for key in DETAIL_KEYS
        if isinstance(raw.get(key), str) and 0 < len(raw[key]) <= MAX_DETAIL_CHARS
    }
    families = raw.get("families")
    if isinstance(families, list):
        kept = [f for f in families if isinstance(f, str) and 0 < len(f) <= MAX_DETAIL_CHARS]
        if kept:
            details["families"] = kept[:MAX_FAMILIES]
    return details or None


def context_length_of(model_info: Any) -> int | None:
    """The context length the model was trained for: ``<architecture>.context_length`` of
    Ollama's ``model_info``."""
    if not isinstance(model_info, dict):
        return None
    architecture = model_info.get("general.architecture")
    if not isinstance(architecture, str):
        return None
    value = model_info.get(f"{architecture}.context_length")
    return value if _is_int(value) and value > 0 else None


def loaded_entries(ps: Any, shared: Collection[str]) -> list[dict[str, Any]]:
    """The ``loaded`` list of a heartbeat from Ollama's ``/api/ps`` answer: the shared models
    it has loaded, with their size, memory use and expiry, at most ``MAX_MODELS``."""
    models = ps.get("models") if isinstance(ps, dict) else None
    loaded: list[dict[str, Any]] = []
    for entry in models if isinstance(models, list) else []:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name") or entry.get("model")
        if not isinstance(name, str) or name not in shared:
            continue
        item: dict[str, Any] = {"name": name}
        for key in ("size", "size_vram"):
            if _is_int(entry.get(key)):
                item[key] = entry[key]
        if isinstance(entry.get("expires_at"), str):
            item["expires_at"] = entry["expires_at"][:64]
        loaded.append(item)
        if len(loaded) == MAX_MODELS:
            break
    return loaded


def _get_json(
    method: str, url: str, *, timeout: tuple[float, float] = OLLAMA_INFO_TIMEOUT, **kwargs: Any
) -> Any:
    response = requests.request(
        method, url, timeout=timeout, headers={"User-Agent": config.CLIENT_NAME}, **kwargs
    )
    response.raise_for_status()
    return response.json()


def select_models(
    local: Sequence[LocalModel], wanted: Sequence[str] | None, *, missing_ok: bool = False
) -> list[LocalModel]:
    """Pick the models to share: those named in ``wanted`` (``name`` matches ``name:latest``)
    or all, at most 20, largest first. Raises ``StartupError`` (exit 2) for unknown names,
    unless ``missing_ok`` (a model removed while the node runs is just no longer shared)."""
    by_name = {m.name: m for m in local}
    chosen: list[LocalModel] = []
    if wanted:
        unknown = []
        for name in wanted:
            model = by_name.get(name) or by_name.get(f"{name}:latest")
            if model is None:
                unknown.append(name)
            elif model not in chosen:
                chosen.append(model)
        if unknown and not missing_ok:
            raise StartupError(
                f"not a local model: {', '.join(unknown)} (local models: "
                f"{', '.join(sorted(by_name)) or 'none'})",
                exit_code=2,
            )
    else:
        chosen = list(local)
    chosen.sort(key=lambda m: m.size, reverse=True)
    return chosen[:MAX_MODELS]


def local_models(ollama: str, *, warn: bool = True) -> list[LocalModel]:
    """The models Ollama lists (``/api/tags``) under names the network accepts (``warn``: say
    which are skipped). Raises ``StartupError`` with a message that says what to do when Ollama
    cannot be reached or does not answer as Ollama."""
    try:
        tags = _get_json("GET", f"{ollama}/api/tags")
    except requests.ConnectionError as exc:
        raise StartupError(
            f"cannot reach Ollama at {ollama} ({_describe(exc)}); start it with `ollama serve` "
            "or set OLLAMA_HOST to where it runs"
        ) from None
    except requests.HTTPError as exc:
        raise StartupError(
            f"Ollama at {ollama} answered HTTP {exc.response.status_code} to /api/tags; "
            "check that OLLAMA_HOST points at Ollama"
        ) from None
    except (requests.RequestException, ValueError) as exc:
        raise StartupError(
            f"cannot read the model list from Ollama at {ollama} ({_describe(exc)}); "
            "check that OLLAMA_HOST points at Ollama"
        ) from None
    raw_models = tags.get("models") if isinstance(tags, dict) else None
    local: list[LocalModel] = []
    for entry in raw_models if isinstance(raw_models, list) else []:
        if not isinstance(entry, dict):
            continue
        name = entry.get("name") or entry.get("model")
        if not config.valid_model_name(name):
            if warn:
                log.warning(
                    "skipping local model with a name the network does not accept: %r",
                    str(name)[:80],
                )
            continue
        size = entry.get("size")
        local.append(LocalModel(name=name, size=size if _is_int(size) and size > 0 else 0))
    return local


def discover_models(ollama: str, wanted: Sequence[str] | None) -> tuple[list[LocalModel], str]:
    """Read the local models and the Ollama version, and choose the models to share.

    Raises ``StartupError`` with a message that says what to do.
    """
    local = local_models(ollama)
    if not local:
        raise StartupError(
            f"Ollama at {ollama} has no models to share; pull one first, "
            "e.g. `ollama pull llama3.2:3b`"
        )
    chosen = select_models(local, wanted)
    available = len(local) if not wanted else len(set(wanted))
    if len(chosen) < available:
        log.warning(
            "the network takes at most %d models: sharing the %d largest of %d",
            MAX_MODELS,
            len(chosen),
            available,
        )
    try:
        version = _get_json("GET", f"{ollama}/api/version").get("version")
    except (requests.RequestException, ValueError, AttributeError):
        version = None
    version = version[:32] if isinstance(version, str) and version else "unknown"
    return [_described(ollama, m) for m in chosen], version


def _described(ollama: str, model: LocalModel) -> LocalModel:
    """The model with what Ollama's /api/show says of it: capabilities (since Ollama 0.6.4;
    older versions just omit the field), details and context length."""
    try:
        shown = _get_json("POST", f"{ollama}/api/show", json={"model": model.name})
    except (requests.RequestException, ValueError):
        return model
    if not isinstance(shown, dict):
        return model
    caps = shown.get("capabilities")
    capabilities = None
    if isinstance(caps, list):
        capabilities = tuple(c for c in caps if isinstance(c, str) and 0 < len(c) <= 32)[:16]
    return LocalModel(
        name=model.name,
        size=model.size,
        capabilities=capabilities,
        details=show_details(shown.get("details")),
        context_length=context_length_of(shown.get("model_info")),
    )


def warm_up(ollama: str, models: Sequence[LocalModel], keep_alive: Any = None) -> None:
    """Load each model into Ollama's memory once (``--warmup``), as Ollama itself does for a
    request without a prompt, with the node's ``keep_alive``. A model that cannot generate
    (embeddings only) is left alone; a failure is logged, never fatal."""
    for model in models:
        if model.capabilities is not None and "completion" not in model.capabilities:
            continue
        body: dict[str, Any] = {"model": model.name, "stream": False}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        started = time.monotonic()
        try:
            _get_json("POST", f"{ollama}/api/generate", json=body, timeout=WARMUP_TIMEOUT)
        except (requests.RequestException, ValueError) as exc:
            log.warning(
                "could not warm up %s: %s",
                model.name,
                _describe(exc),
                extra=event("warmup", model=model.name, ok=False),
            )
            continue
        seconds = time.monotonic() - started
        log.info(
            "warmed up %s in %.1f s",
            model.name,
            seconds,
            extra=event("warmup", model=model.name, ok=True, seconds=round(seconds, 3)),
        )


# --------------------------------------------------------------------------- connection state


class _Connection:
    """One WebSocket connection to the router. Sends from any thread go through one lock,
    because websocket-client's send is not thread-safe."""

    def __init__(self, ws: websocket.WebSocket) -> None:
        self.ws = ws
        self.send_lock = threading.Lock()
        self.closed = threading.Event()
        # Wakes the heartbeat thread early: a loaded-models report is due, or the connection
        # is over.
        self.wake = threading.Event()
        # Extensions the router listed in ``registered``; set before any request arrives.
        self.features: frozenset[str] = frozenset()
        self.registered = False
        # The models entries this connection's router was last told of (register or
        # models_update), and what it was last told of the node pausing (register's draining,
        # drain, undrain): None for a router that does not take drain.
        self.offered: list[dict[str, Any]] = []
        self.drained: bool | None = None
        # Orders those messages when several threads have news at once.
        self.state_lock = threading.Lock()
        # Why this node closes the connection itself, once it has sent its close frame.
        self.leaving: str | None = None
        self.leaving_at = 0.0

    def send_text(self, text: str) -> bool:
        """Send one encoded frame; False when the connection is gone or closing."""
        if self.closed.is_set() or self.leaving is not None:
            return False
        try:
            with self.send_lock:
                self.ws.send(text)
        # AttributeError: websocket-client racing its own teardown of a socket shut elsewhere.
        except (websocket.WebSocketException, OSError, AttributeError) as exc:
            log.debug("send failed: %s", _describe(exc))
            self.lost()
            return False
        return True

    def send(self, frame: dict[str, Any]) -> bool:
        """Encode and send a frame; frames over the size limit are dropped (False)."""
        text = encode_frame(frame)
        if text is None:
            log.warning("dropped a %s frame over %d bytes", frame.get("type"), MAX_FRAME_BYTES)
            return False
        return self.send_text(text)

    def ping(self) -> None:
        """A WebSocket ping, so that the router's pong proves the link is alive."""
        if self.closed.is_set():
            return
        try:
            with self.send_lock:
                self.ws.ping()
        except (websocket.WebSocketException, OSError, AttributeError):
            self.lost()

    def lost(self) -> None:
        """Mark the connection dead and wake the receive loop."""
        self.closed.set()
        self.wake.set()
        self.ws.abort()

    def send_close(self, reason: str) -> None:
        """Start the close handshake from any thread: the receive loop ends when the router
        answers it (or ``LEAVE_WAIT_S`` later). ``reason`` is for this node's log."""
        if self.leaving is not None or self.closed.is_set():
            return
        self.leaving = reason
        self.leaving_at = time.monotonic()
        if not self.send_lock.acquire(timeout=0.5):  # a send is stuck: do not wait for it
            self.lost()
            return
        try:
            self.ws.send_close(websocket.STATUS_NORMAL)
        except (websocket.WebSocketException, OSError, AttributeError):
            self.lost()
        finally:
            self.send_lock.release()

    def close(self) -> None:
        """Close the socket at once, when the session is over. A close handshake is started
        beforehand with ``send_close`` (by this node) or came from the router."""
        self.closed.set()
        self.wake.set()
        self.ws.shutdown()


def _start_thread(target: Callable[..., None], *args: Any, name: str) -> threading.Thread:
    """Start a daemon thread that never receives SIGINT/SIGTERM."""

    def run() -> None:
        # The kernel hands a process signal to any thread that does not block it. Python runs
        # the handler in the main thread only once that thread wakes up, so a signal landing
        # here would wait for the main thread's next socket timeout: block them in workers.
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        target(*args)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def _close_response(response: requests.Response) -> None:
    # response.close() alone leaves a worker blocked in recv() until Ollama sends its next bytes
    # (closing a socket does not wake a reader blocked on it), and the kernel keeps the TCP
    # connection open until then. shutdown() wakes the reader and sends FIN now, so Ollama
    # notices the disconnect and stops generating.
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    try:
        response.close()
    except Exception:  # noqa: BLE001 - best effort while another thread may be reading
        pass


class _LineReader:
    """Ollama's stream read on a thread of its own, so that the request's thread can send all
    the lines that have already arrived in one frame, and never waits for one that has not.

    A plain read cannot tell which lines arrived together: Ollama sends each line as an HTTP
    chunk of its own, and on a chunk-encoded body ``read1`` stops at the end of the current
    chunk (http.client's ``_read1_chunked``, under urllib3 2.8.0), so it returns one line per
    call however many are waiting.
    """

    def __init__(self, response: requests.Response, *, name: str) -> None:
        # Lines, then None at the end of the body or the exception that ended the reading.
        self._items: queue.Queue[bytes | Exception | None] = queue.Queue(MAX_WAITING_LINES)
        self._stopped = threading.Event()
        _start_thread(self._read, response, name=name)

    def _put(self, item: bytes | Exception | None) -> bool:
        """Queue an item, waiting while the queue is full; False once nobody takes them."""
        while not self._stopped.is_set():
            try:
                self._items.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, response: requests.Response) -> None:
        end: Exception | None = None
        try:
            for line in config.iter_lines(response):
                if line.strip() and not self._put(line):
                    return
        except Exception as exc:  # noqa: BLE001 - the request's thread reports it
            end = exc
        finally:
            self._put(end)

    def batches(self) -> Iterator[list[bytes]]:
        """The lines in order, in lists of those already there when the previous list was
        taken; waits only when none is. Raises what ended the reading, after the lines before
        it. Leaving the loop early releases a reader waiting on a full queue."""
        try:
            while True:
                items = [self._items.get()]
                while True:
                    try:
                        items.append(self._items.get_nowait())
                    except queue.Empty:
                        break
                end = items[-1]
                if isinstance(end, bytes):
                    yield items
                    continue
                if len(items) > 1:
                    yield items[:-1]
                if end is None:
                    return
                raise end
        finally:
            self._stopped.set()


@dataclass(eq=False)
class _InFlight:
    """One request being served. ``lock`` orders sends against ``cancel`` so that nothing is
    sent for a request after its cancel_request has been handled."""

    request_id: str
    model: str
    conn: _Connection
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: bool = False
    response: requests.Response | None = None
    thread: threading.Thread | None = None

    def send(self, frame: dict[str, Any]) -> bool:
        with self.lock:
            return not self.cancelled and self.conn.send(frame)

    def send_text(self, text: str) -> bool:
        with self.lock:
            return not self.cancelled and self.conn.send_text(text)

    def attach(self, response: requests.Response) -> bool:
        with self.lock:
            if self.cancelled:
                return False
            self.response = response
            return True

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            response = self.response
        if response is not None:
            _close_response(response)


@dataclass
class _SessionEnd:
    message: str
    fatal: bool = False
    restarting: bool = False  # the router closed with 1012: it is restarting (or draining)
    registered: bool = False  # the session had registered before it ended
    planned: bool = False  # this node closed it (to pause, or to register other models)


@dataclass(frozen=True)
class Watch:
    """What the node keeps an eye on besides the router: Ollama's models every ``recheck_s``
    (``wanted``: the ones named by ``--models``), the serving ``hours`` and the programs of
    ``--pause-while``."""

    recheck_s: float = RECHECK_DEFAULT_S
    wanted: tuple[str, ...] | None = None
    hours: ServingHours | None = None
    pause_while: tuple[str, ...] = ()


NO_POLICY = RequestPolicy()
DEFAULT_WATCH = Watch()


@dataclass(frozen=True)
class Identity:
    """What this node proves at registration: the router key derived from the contributor key
    for this router's origin (``contributor_key.router_key``; never the key itself), and the
    name it asks for (None: keep the one the router has, or get a generated one)."""

    router_key: str = field(repr=False)
    name: str | None = None


# --------------------------------------------------------------------------- the node


class Contributor:
    """A contributor node: one process-lifetime ``node_id``, reconnecting until stopped.

    Threads: the main thread handles signals and the drain (``run``); one thread keeps the
    connection to the router and reads its frames; one watches Ollama's models, the serving
    hours and the programs to pause for; each connection has a heartbeat thread and each
    request one of its own."""

    def __init__(
        self,
        *,
        server: str,
        ollama: str,
        models: Sequence[LocalModel],
        max_concurrent: int,
        ollama_version: str,
        policy: RequestPolicy = NO_POLICY,
        watch: Watch = DEFAULT_WATCH,
        identity: Identity | None = None,
    ) -> None:
        self.server = server
        # The contributor key proved at registration, and the name asked for; None: anonymous.
        self.identity = identity
        # The public name the router said is in effect.
        self.contributor_name: str | None = None
        self.url = config.ws_url(server)
        self.ollama = ollama
        # Replaced whole (never changed in place) when Ollama's models change.
        self.models = list(models)
        self.model_names = frozenset(m.name for m in models)
        self.max_concurrent = max_concurrent
        self.ollama_version = ollama_version
        self.policy = policy
        self.watch = watch
        self.node_id = str(uuid.uuid4())
        self.resume_token: str | None = None
        self.heartbeat_interval = DEFAULT_HEARTBEAT_S
        self._lock = threading.Lock()
        self._inflight: dict[str, _InFlight] = {}
        # Why the node takes no new requests now, by cause (PAUSE_*): it serves while this is
        # empty. Changed under ``_lock``, with the check a request makes, so no request starts
        # after a pause took effect.
        self._pauses: dict[str, str] = {}
        self._conn: _Connection | None = None
        # Whether the last router that registered this node takes drain (None: none yet).
        self._router_drains: bool | None = None
        self._stopping = False  # Ctrl+C: draining, to stop once nothing is in flight
        self._quit = threading.Event()  # the router and watch threads end
        self._done = threading.Event()  # the router thread ended
        self._exit_code = 0
        # Wakes the watch thread: Ollama failed a request (its models are read again now), or
        # the node stops.
        self._watch_wake = threading.Event()
        # The shared models Ollama had loaded at the last /api/ps (heartbeat thread writes it).
        self._loaded_names: frozenset[str] = frozenset()

    # ---- frames

    def register_frame(self) -> dict[str, Any]:
        """The ``register`` frame, with the resume token of the previous session if any, the
        node's caps (``limits``) and, while it is paused, ``draining``
        (docs/node-protocol-extensions.md)."""
        frame: dict[str, Any] = {
            "type": "register",
            "node_id": self.node_id,
            "models": [m.offer() for m in self.models],
            "max_concurrent": self.max_concurrent,
            "ollama_version": self.ollama_version,
            "protocol": config.PROTOCOL_VERSION,
            "client": config.CLIENT_NAME,
            # Extensions this node accepts (docs/node-protocol-extensions.md); a router that
            # does not know the field ignores it.
            "features": [EMBEDDINGS],
        }
        limits = self.policy.limits()
        if limits:
            frame["limits"] = limits
        if self.paused:
            frame["draining"] = True
        if self.resume_token:
            frame["resume_token"] = self.resume_token
        if self.identity is not None:
            # The contributor extension (docs/node-protocol-extensions.md): a router that does
            # not know it ignores it. The field is called ``key`` but carries this router's own
            # derivation of it; it goes only here, never to the log.
            contributor = {"key": self.identity.router_key}
            if self.identity.name:
                contributor["name"] = self.identity.name
            frame["contributor"] = contributor
        return frame

    def active_requests(self) -> int:
        """How many requests this node is serving now."""
        with self._lock:
            return len(self._inflight)

    # ---- pausing

    @property
    def paused(self) -> bool:
        """Whether the node takes no new requests now."""
        return bool(self._pauses)

    def set_paused(self, cause: str, reason: str | None) -> None:
        """Pause for ``cause`` with ``reason`` (what the log says), or end that cause's pause
        with None; the router hears of it when the node pauses or serves again."""
        with self._lock:
            before = self._pauses.get(cause)
            if before == reason:
                return
            if reason is None:
                del self._pauses[cause]
            else:
                self._pauses[cause] = reason
            others = [text for key, text in self._pauses.items() if key != cause]
        if cause != PAUSE_STOP:
            if reason is not None:
                log.info("paused: %s", reason, extra=event("pause", reason=reason))
            elif others:
                log.info(
                    "no longer paused for %s, but still: %s",
                    before,
                    "; ".join(others),
                    extra=event("pause", reason="; ".join(others), ended=before),
                )
            else:
                log.info(
                    "resumed (was paused: %s); taking requests again",
                    before,
                    extra=event("resume", ended=before),
                )
        self._sync_router()

    def check_pauses(self) -> None:
        """Pause or resume for the serving hours and the programs of ``--pause-while``."""
        self.set_paused(PAUSE_HOURS, node_control.outside_hours(self.watch.hours))
        if self.watch.pause_while:
            names = node_control.process_names() or set()
            running = node_control.running_programs(self.watch.pause_while, names)
            reason = None
            if running:
                reason = f"{', '.join(running)} {'is' if len(running) == 1 else 'are'} running"
            self.set_paused(PAUSE_PROGRAMS, reason)

    # ---- main loop

    def run(self) -> int:
        """Serve until stopped; the process exit code. Runs in the main thread, which alone
        receives Ctrl+C and SIGTERM: the first one drains (no new requests; the answers in
        flight finish, then the script exits 0), a second one stops at once."""
        self.check_pauses()
        _Signals.raising = False
        handled = _Signals.count
        _start_thread(self._serve_router, name="router")
        _start_thread(self._watch_loop, name="watch")
        notice_at = 0.0
        while not self._done.wait(MAIN_POLL_S):
            received, handled = _Signals.count - handled, _Signals.count
            if received and (self._stopping or received > 1):
                return self._stop_now()
            if received:
                self._begin_stop()
            if self._stopping:
                active = self.active_requests()
                if not active:
                    return self._finish_stop()
                if time.monotonic() >= notice_at:
                    if notice_at:
                        log.info("stopping: still finishing %s in flight", _requests(active))
                    notice_at = time.monotonic() + DRAIN_NOTICE_S
        if self._stopping:  # the connection ended while draining: nothing is left in flight
            log.info("stopped; goodbye", extra=event("stopped"))
            return 0
        return self._exit_code

    def _begin_stop(self) -> None:
        self._stopping = True
        self.set_paused(PAUSE_STOP, "stopping")
        active = self.active_requests()
        if active:
            log.info(
                "stopping: finishing %s in flight first (Ctrl+C again stops at once)",
                _requests(active),
                extra=event("stop", in_flight=active),
            )
        else:
            log.info("stopping", extra=event("stop", in_flight=0))

    def _finish_stop(self) -> int:
        """Nothing is in flight any more: close the connection and end."""
        self._quit.set()
        self._watch_wake.set()
        if self._conn is not None:
            self._conn.send_close("stopping")
        self._done.wait(LEAVE_WAIT_S)  # the router answers the close: the session ends
        log.info("stopped; goodbye", extra=event("stopped"))
        return 0

    def _stop_now(self) -> int:
        """A second Ctrl+C: cancel what is in flight and end."""
        self._quit.set()
        self._watch_wake.set()
        cancelled = self._shutdown()
        log.info(
            "stopping at once: %s in flight cancelled",
            _requests(cancelled),
            extra=event("stop", cancelled=cancelled),
        )
        log.info("stopped; goodbye", extra=event("stopped"))
        return 0

    def _serve_router(self) -> None:
        """The router thread: connect, register and serve until ``_quit`` or a refusal."""
        try:
            self._exit_code = self._run()
        except Exception:
            log.exception("the connection to the router failed")
            self._exit_code = 1
        finally:
            self._done.set()

    def _run(self) -> int:
        backoff = Backoff()
        announce = True  # one "connecting" line per outage, not one per attempt
        # After a restart notice the router is back within seconds (or another worker takes the
        # node at once): retry about every second until then, not on the growing backoff.
        restart_until = 0.0
        while not self._quit.is_set():
            if self.paused and self._router_drains is False:
                # A router that cannot be told to pause is left while paused (``_sync_router``)
                # and only come back to once serving again.
                self._quit.wait(MAIN_POLL_S)
                continue
            if announce:
                log.info("connecting to %s", self.url)
            try:
                ws = websocket.create_connection(
                    self.url,
                    timeout=WS_CONNECT_TIMEOUT_S,
                    enable_multithread=True,
                    header=[f"User-Agent: {config.CLIENT_NAME}"],
                )
            except (websocket.WebSocketException, OSError) as exc:
                delay = backoff.next_delay()
                if time.monotonic() < restart_until:
                    delay = RESTART_RETRY_S / 2 + random.random() * RESTART_RETRY_S / 2
                log.warning(
                    "cannot reach the router at %s (%s); retrying in %.1f s",
                    self.url,
                    _describe(exc),
                    delay,
                    extra=event("reconnect", reason=_describe(exc), delay=round(delay, 1)),
                )
                announce = False
                self._quit.wait(delay)
                continue
            announce = True
            conn = _Connection(ws)
            self._conn = conn
            try:
                end = self._session(conn, backoff)
            finally:
                self._end_connection(conn)
            if end.fatal:
                log.error("%s", end.message, extra=event("refused", reason=end.message))
                return 1
            if self._quit.is_set() or self._stopping:
                return 0
            if end.planned:
                log.info("%s", end.message, extra=event("leave", reason=end.message))
                continue
            if end.restarting and end.registered:
                # Sent away by a router that is restarting: straight back (another worker
                # takes the node, or this one is back within seconds).
                restart_until = time.monotonic() + RESTART_WINDOW_S
                log.info(
                    "%s; reconnecting at once",
                    end.message,
                    extra=event("reconnect", reason=end.message, delay=0),
                )
                continue
            delay = backoff.next_delay()
            if end.restarting and time.monotonic() < restart_until:
                delay = RESTART_RETRY_S / 2 + random.random() * RESTART_RETRY_S / 2
            log.log(
                logging.INFO if end.restarting else logging.WARNING,
                "%s; reconnecting in %.1f s",
                end.message,
                delay,
                extra=event("reconnect", reason=end.message, delay=round(delay, 1)),
            )
            self._quit.wait(delay)
        return 0

    def _session(self, conn: _Connection, backoff: Backoff) -> _SessionEnd:
        ws = conn.ws
        ws.settimeout(WS_POLL_S)
        register = self.register_frame()
        conn.offered = register["models"]
        draining = register.get("draining", False)
        if not conn.send(register):
            return _SessionEnd("connection lost while registering")
        registered = False
        started = last_seen = time.monotonic()
        while True:
            now = time.monotonic()
            if conn.leaving is not None and now - conn.leaving_at > LEAVE_WAIT_S:
                return _SessionEnd(conn.leaving, planned=True)
            if not registered and now - started > REGISTER_WAIT_S:
                return _SessionEnd(f"no answer to register within {REGISTER_WAIT_S:.0f} s")
            silent = now - last_seen
            if registered and silent > 3 * self.heartbeat_interval:
                return _SessionEnd(f"nothing from the router for {silent:.0f} s")
            try:
                opcode, frame = ws.recv_data_frame(True)
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError) as exc:
                if conn.leaving is not None:
                    return _SessionEnd(conn.leaving, planned=True)
                return _SessionEnd(f"connection lost ({_describe(exc)})")
            last_seen = time.monotonic()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                if conn.leaving is not None:
                    return _SessionEnd(conn.leaving, planned=True)
                return self._closed_by_router(frame.data, registered)
            if opcode not in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                continue  # ping/pong: only proof of life
            message = self._decode(frame.data)
            if message is None:
                continue
            kind = message.get("type")
            if kind == "registered" and not registered:
                registered = True
                backoff.reset()
                self._on_registered(conn, message, draining=draining)
            elif not registered:
                continue
            elif kind == "inference_request":
                self._on_request(conn, message)
            elif kind == "embed_request":
                self._on_embed(conn, message)
            elif kind == "cancel_request":
                self._on_cancel(conn, message)
            # Other frame types are from newer routers: ignore them (docs/protocol.md: a field
            # or frame a peer does not know is ignored).

    def _decode(self, data: bytes | str) -> dict[str, Any] | None:
        size = len(data.encode("utf-8")) if isinstance(data, str) else len(data)
        if size > MAX_FRAME_BYTES:
            log.warning(
                "dropped a frame of %d bytes from the router (limit %d)", size, MAX_FRAME_BYTES
            )
            return None
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("ignored a frame from the router that is not JSON")
            return None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return None
        return message

    def _closed_by_router(self, data: bytes, registered: bool) -> _SessionEnd:
        code, reason = parse_close(data)
        # The router's words, escaped: no control character reaches the terminal.
        text = escaped(reason[:200]) or "no reason given"
        if code == 1008 and reason in PERMANENT_REFUSALS and not registered:
            return _SessionEnd(f"the router refused this node: {text}", fatal=True)
        if code == 1008:
            return _SessionEnd(f"the router closed the connection: {text}")
        if code == ROUTER_RESTART_CODE:
            return _SessionEnd("the router is restarting", restarting=True, registered=registered)
        return _SessionEnd(f"the router closed the connection (code {code}, {text})")

    def _on_registered(self, conn: _Connection, message: dict[str, Any], *, draining: bool) -> None:
        interval = message.get("heartbeat_interval")
        if isinstance(interval, int | float) and not isinstance(interval, bool):
            self.heartbeat_interval = float(min(300.0, max(1.0, interval)))
        token = message.get("resume_token")
        if isinstance(token, str) and 0 < len(token) <= 256:
            self.resume_token = token
        features = message.get("features")
        if isinstance(features, list):
            conn.features = frozenset(f for f in features if isinstance(f, str))
        warnings = message.get("warnings")
        if isinstance(warnings, list):
            for warning in warnings[:20]:
                if isinstance(warning, str):
                    # The router's words, escaped: no control character reaches the terminal.
                    log.warning("the router says: %s", escaped(warning[:300]))
        self._note_contributor(message.get("contributor"))
        with conn.state_lock:
            conn.registered = True
            # A router that takes drain took register's ``draining`` too.
            conn.drained = draining if DRAIN in conn.features else None
        self._router_drains = DRAIN in conn.features
        log.info(
            "registered with %s as node %s: %d models (%s), max_concurrent %d, heartbeat %g s",
            self.server,
            self.node_id,
            len(conn.offered),
            ", ".join(entry["name"] for entry in conn.offered),
            self.max_concurrent,
            self.heartbeat_interval,
            extra=event(
                "registered",
                server=self.server,
                node_id=self.node_id,
                models=[entry["name"] for entry in conn.offered],
                max_concurrent=self.max_concurrent,
                limits=self.policy.limits(),
                draining=draining,
            ),
        )
        _start_thread(self._heartbeat_loop, conn, name="heartbeat")
        self._sync_router(conn)  # what changed while registering

    def _note_contributor(self, raw: Any) -> None:
        """Log the public name the router gave this contributor (``registered.contributor``),
        and its note when that is not the name asked for."""
        if self.identity is None:
            return
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            log.info("the router keeps no contributor record (it does not know contributor keys)")
            return
        name = escaped(raw["name"][:64])
        note = raw.get("note")
        if isinstance(note, str) and note:
            log.warning("the router says: %s", escaped(note[:300]))
        if name != self.contributor_name:
            log.info(
                "contributing as %s (the name others see)",
                name,
                extra=event("contributor", contributor=name),
            )
        self.contributor_name = name

    def _sync_router(self, conn: _Connection | None = None) -> None:
        """Tell the router what changed: other models (``models_update``), or the node pausing
        or serving again (``drain``/``undrain``). A router without those extensions is
        registered with anew for the models, and left while the node is paused, once nothing is
        in flight on it (docs/node-protocol-extensions.md)."""
        conn = conn or self._conn
        if conn is None or not conn.registered or conn.leaving is not None:
            return
        leave = None
        # Read under the lock: of two threads with news, the later one sends the latest state.
        with conn.state_lock:
            paused = self.paused
            offers = [m.offer() for m in self.models]
            if offers != conn.offered:
                if MODELS_UPDATE in conn.features:
                    conn.offered = offers
                    conn.send({"type": "models_update", "models": offers})
                else:
                    leave = "the shared models changed; registering again to say so"
            if conn.drained is not None and conn.drained != paused:
                conn.drained = paused
                conn.send({"type": "drain" if paused else "undrain"})
        if leave is None and paused and conn.drained is None and self._idle(conn):
            leave = "paused; disconnected from the router until serving again"
        if leave is not None:
            conn.send_close(leave)

    def _idle(self, conn: _Connection) -> bool:
        with self._lock:
            return not any(request.conn is conn for request in self._inflight.values())

    def _heartbeat_loop(self, conn: _Connection) -> None:
        """A heartbeat every interval; to a router that takes ``loaded_models``, each says what
        Ollama has loaded, and one more is sent soon after a request that may have changed
        that (``conn.wake``), at most one /api/ps per PS_MIN_INTERVAL_S besides."""
        reports = LOADED_MODELS in conn.features
        if reports:
            conn.wake.set()  # the router learns at once what is loaded
        last_ps = -PS_MIN_INTERVAL_S
        next_beat = time.monotonic() + self.heartbeat_interval
        while True:
            early = conn.wake.wait(max(0.0, next_beat - time.monotonic()))
            conn.wake.clear()
            if conn.closed.is_set():
                return
            if early:
                # Not sooner than PS_MIN_INTERVAL_S after the last /api/ps, and not later than
                # the regular heartbeat.
                pause = min(last_ps + PS_MIN_INTERVAL_S, next_beat) - time.monotonic()
                if pause > 0 and conn.closed.wait(pause):
                    return
            active = self.active_requests()
            frame: dict[str, Any] = {
                "type": "heartbeat",
                "node_id": self.node_id,
                "active_requests": active,
                "available": active < self.max_concurrent and not self.paused,
            }
            if reports:
                last_ps = time.monotonic()
                loaded = self._loaded_models()
                if loaded is not None:
                    frame["loaded"] = loaded
            conn.send(frame)
            conn.ping()
            next_beat = time.monotonic() + self.heartbeat_interval

    def _loaded_models(self) -> list[dict[str, Any]] | None:
        """The shared models Ollama has loaded, or None when it does not answer (the heartbeat
        then says nothing about them, rather than that none is loaded)."""
        try:
            ps = _get_json("GET", f"{self.ollama}/api/ps", timeout=OLLAMA_PS_TIMEOUT)
        except (requests.RequestException, ValueError) as exc:
            log.debug("Ollama's /api/ps failed: %s", _describe(exc))
            return None
        loaded = loaded_entries(ps, self.model_names)
        self._loaded_names = frozenset(entry["name"] for entry in loaded)
        return loaded

    # ---- Ollama, the hours and the programs, watched

    def _watch_loop(self) -> None:
        """Every ``PAUSE_CHECK_S`` (or ``recheck_s`` if shorter), the serving hours and the
        programs to pause for; every ``recheck_s``, or at once after Ollama failed a request,
        Ollama's models."""
        recheck = self.watch.recheck_s
        tick = min(PAUSE_CHECK_S, recheck)
        next_models = time.monotonic() + recheck
        while True:
            woken = self._watch_wake.wait(max(0.05, min(tick, next_models - time.monotonic())))
            self._watch_wake.clear()
            if self._quit.is_set():
                return
            try:
                self.check_pauses()
                if woken or time.monotonic() >= next_models:
                    self.recheck_ollama()
                    next_models = time.monotonic() + recheck
            except Exception:  # the watch must go on
                log.exception("checking Ollama, the hours or the programs failed")

    def recheck_ollama(self) -> None:
        """Read Ollama's models again: pause while it does not answer or has none of the
        models to share, share the ones it has now, and serve again."""
        try:
            local = local_models(self.ollama, warn=False)
        except StartupError as exc:
            self.set_paused(PAUSE_OLLAMA, str(exc))
            return
        chosen = select_models(local, self.watch.wanted, missing_ok=True)
        if not chosen:
            wanted = ", ".join(self.watch.wanted or ())
            self.set_paused(
                PAUSE_OLLAMA,
                f"Ollama at {self.ollama} has none of the models to share ({wanted})"
                if wanted
                else f"Ollama at {self.ollama} has no models to share",
            )
            return
        known = {m.name: m for m in self.models}
        models = [
            known[m.name]
            if m.name in known and known[m.name].size == m.size
            else _described(self.ollama, m)
            for m in chosen
        ]
        if [m.offer() for m in models] != [m.offer() for m in self.models]:
            self._share(models)
        else:
            log.debug("Ollama's models unchanged")
        self.set_paused(PAUSE_OLLAMA, None)

    def _share(self, models: list[LocalModel]) -> None:
        before = {m.name for m in self.models}
        after = [m.name for m in models]
        self.models = list(models)
        self.model_names = frozenset(after)
        added = [name for name in after if name not in before]
        removed = sorted(before - set(after))
        log.info(
            "Ollama's models changed: sharing %d models: %s (added: %s; removed: %s)",
            len(after),
            ", ".join(after),
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
            extra=event("models", models=after, added=added, removed=removed),
        )
        self._sync_router()

    # ---- requests

    def _on_request(self, conn: _Connection, message: dict[str, Any]) -> None:
        request_id = self._request_id(message)
        if request_id is None:
            return
        try:
            params = sanitize_params(message.get("ollama_params"), self.model_names)
        except InvalidRequest as exc:
            log.warning(
                "request %s refused: %s",
                request_id,
                exc,
                extra=event("request", id=request_id, outcome="invalid", reason=str(exc)),
            )
            conn.send(self._error(request_id, "invalid_request"))
            return
        params, changes = apply_policy(params, self.policy)
        inflight = self._take_slot(conn, request_id, params["model"])
        if inflight is None:
            return
        log.info(
            "request %s started: model=%s messages=%d",
            request_id,
            params["model"],
            len(params["messages"]),
        )
        if changes:
            log.debug("request %s: %s", request_id, "; ".join(changes))
        inflight.thread = _start_thread(
            self._serve, inflight, params, name=f"request-{request_id[:12]}"
        )

    def _on_embed(self, conn: _Connection, message: dict[str, Any]) -> None:
        """An ``embed_request`` (the ``embeddings`` extension): served like an inference
        request, within the same max_concurrent."""
        request_id = self._request_id(message)
        if request_id is None:
            return
        try:
            params = sanitize_embed_params(message.get("embed_params"), self.model_names)
        except InvalidRequest as exc:
            log.warning("embed request %s refused: %s", request_id, exc)
            conn.send(self._error(request_id, "invalid_request"))
            return
        # The contributor's keep_alive and context cap hold for embeddings too; an embedding
        # predicts nothing, so the answer-length cap has nothing to hold.
        params, _ = apply_policy(params, dataclasses.replace(self.policy, max_predict=None))
        inflight = self._take_slot(conn, request_id, params["model"])
        if inflight is None:
            return
        log.info(
            "embed request %s started: model=%s inputs=%d",
            request_id,
            params["model"],
            len(params["input"]),
        )
        inflight.thread = _start_thread(
            self._serve_embed, inflight, params, name=f"embed-{request_id[:12]}"
        )

    @staticmethod
    def _request_id(message: dict[str, Any]) -> str | None:
        request_id = message.get("request_id")
        if (
            not isinstance(request_id, str)
            or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS
            or not request_id.isprintable()
        ):  # it goes into the log
            log.warning("ignored a %s without a valid request_id", message.get("type"))
            return None
        return request_id

    def _take_slot(self, conn: _Connection, request_id: str, model: str) -> _InFlight | None:
        """Count a request against max_concurrent; None (the router told, if busy) when it
        cannot be served."""
        with self._lock:
            if request_id in self._inflight:
                log.warning("ignored a second request %s", request_id)
                return None
            paused = next(iter(self._pauses.values()), None)
            busy = len(self._inflight) >= self.max_concurrent
            if paused is None and not busy:
                inflight = _InFlight(request_id=request_id, model=model, conn=conn)
                self._inflight[request_id] = inflight
        if paused is not None or busy:
            why = f"paused ({paused})" if paused else f"already serving {self.max_concurrent}"
            log.warning(
                "request %s refused: %s",
                request_id,
                why,
                extra=event("request", id=request_id, model=model, outcome="refused"),
            )
            conn.send(self._error(request_id, PAUSED_ERROR if paused else BUSY_ERROR))
            return None
        return inflight

    def _open_ollama(
        self,
        path: str,
        params: dict[str, Any],
        inflight: _InFlight,
        fail: Callable[[str, str], None],
    ) -> requests.Response | None:
        """POST a request in flight to Ollama's ``path`` and return its streamed answer; None
        when it cannot be served (reported through ``fail``) or was cancelled meanwhile."""
        try:
            response = requests.post(
                f"{self.ollama}{path}",
                json=params,
                stream=True,
                timeout=(OLLAMA_CONNECT_TIMEOUT_S, OLLAMA_READ_TIMEOUT_S),
                headers={"User-Agent": config.CLIENT_NAME},
            )
        except requests.ConnectionError as exc:
            fail("ollama_unavailable", _describe(exc))
            return None
        if not inflight.attach(response):
            return None
        if response.status_code >= 400:
            fail(
                _error_for_status(response.status_code),
                f"Ollama answered HTTP {response.status_code}{_ollama_error_text(response)}",
            )
            return None
        return response

    def _on_cancel(self, conn: _Connection, message: dict[str, Any]) -> None:
        request_id = message.get("request_id")
        with self._lock:
            inflight = self._inflight.get(request_id) if isinstance(request_id, str) else None
        if inflight is None or inflight.conn is not conn:
            return
        log.info("request %s cancelled by the router", request_id)
        self._cancel(inflight)

    def _cancel(self, inflight: _InFlight) -> None:
        # Free the slot now, not when the worker ends: a worker waiting for Ollama to load the
        # model only sees the cancel once Ollama sends its first line, possibly a minute later,
        # and the router already counts the slot as free.
        with self._lock:
            if self._inflight.get(inflight.request_id) is inflight:
                del self._inflight[inflight.request_id]
        inflight.cancel()

    @staticmethod
    def _error(request_id: str, error: str) -> dict[str, Any]:
        return {"type": "inference_error", "request_id": request_id, "error": error}

    def _serve(self, inflight: _InFlight, params: dict[str, Any]) -> None:
        """Worker thread: stream one request from Ollama to the router."""
        started = time.monotonic()
        tokens = sent_chunks = sent_frames = 0
        eval_seconds: float | None = None  # Ollama's own time for the tokens, when it says
        outcome = "failed"
        response: requests.Response | None = None
        rid = inflight.request_id

        def fail(error: str, why: str) -> None:
            nonlocal outcome
            if inflight.send(self._error(rid, error)):
                log.warning(
                    "request %s failed: %s (%s)",
                    rid,
                    error,
                    why,
                    extra=event(
                        "request",
                        id=rid,
                        model=inflight.model,
                        outcome="failed",
                        error=error,
                        reason=why,
                        tokens=tokens,
                        seconds=round(time.monotonic() - started, 3),
                    ),
                )
            if error == "ollama_unavailable":
                self._watch_wake.set()  # is Ollama gone? look now, not in a minute
            outcome = "reported"

        try:
            response = self._open_ollama("/api/chat", params, inflight, fail)
            if response is None:
                return
            # Several chunks per frame only for a router that takes them (docs/protocol.md: a
            # node uses an extension only when the router listed it).
            batched = INFERENCE_CHUNKS in inflight.conn.features
            reader = _LineReader(response, name=f"ollama-{rid[:12]}")
            for lines in reader.batches():
                chunks, problem = chunks_of_lines(lines)
                tokens += sum(
                    1 for c in chunks if c["message"].get("content") or c["message"].get("thinking")
                )
                frames, oversized = pack_chunks(rid, chunks, batched=batched)
                for text in frames:
                    if not inflight.send_text(text):
                        if not inflight.cancelled:
                            outcome = "abandoned"
                            log.warning("request %s abandoned: connection to the router lost", rid)
                        return
                sent_chunks += len(chunks) - len(oversized)
                sent_frames += len(frames)
                final = chunks[-1] if chunks and chunks[-1]["done"] else None
                for chunk in oversized:
                    if chunk is not final:
                        log.warning(
                            "request %s: dropped a chunk over %d bytes", rid, MAX_FRAME_BYTES
                        )
                if problem is not None:
                    fail("ollama_error", problem)
                    return
                if final is not None:
                    if oversized and oversized[-1] is final:
                        fail("ollama_error", "final chunk over the frame size limit")
                        return
                    if _is_int(final.get("eval_count")):
                        tokens = final["eval_count"]
                        if _is_int(final.get("eval_duration")) and final["eval_duration"] > 0:
                            eval_seconds = final["eval_duration"] / 1e9
                    outcome = "finished"
                    return
            fail("ollama_error", "Ollama's stream ended before done")
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            OSError,
            ValueError,
        ) as exc:
            if not inflight.cancelled:
                fail("ollama_error", _describe(exc))
        except Exception:  # a worker must never die silently with its slot taken
            if not inflight.cancelled:
                log.exception("request %s: unexpected error", rid)
                fail("ollama_error", "internal error")
        finally:
            if response is not None:
                _close_response(response)
            with self._lock:
                if self._inflight.get(rid) is inflight:
                    del self._inflight[rid]
            if (
                outcome == "finished"
                and LOADED_MODELS in inflight.conn.features
                and (inflight.model not in self._loaded_names or "keep_alive" in params)
            ):
                # Ollama loaded the model for it, or its keep_alive moved or ended the model's
                # stay: tell the router soon rather than at the next heartbeat.
                inflight.conn.wake.set()
            self._log_end(
                inflight, outcome, started, tokens, eval_seconds, sent_chunks, sent_frames
            )
            if self.paused:
                self._sync_router(inflight.conn)  # a router without drain is left once idle

    def _log_end(
        self,
        inflight: _InFlight,
        outcome: str,
        started: float,
        tokens: int,
        eval_seconds: float | None,
        chunks: int,
        frames: int,
    ) -> None:
        """The log line of a request that finished or was stopped (failures have theirs)."""
        elapsed = time.monotonic() - started
        rid = inflight.request_id
        if outcome == "finished":
            # Ollama's generation time when it says, else the whole request's.
            speed = tokens / (eval_seconds or max(elapsed, 1e-3))
            log.info(
                "request %s finished: model=%s tokens=%d in %.1f s, %.1f tokens/s "
                "(%d chunks in %d frames)",
                rid,
                inflight.model,
                tokens,
                elapsed,
                speed,
                chunks,
                frames,
                extra=event(
                    "request",
                    id=rid,
                    model=inflight.model,
                    outcome="finished",
                    tokens=tokens,
                    tokens_per_s=round(speed, 1),
                    seconds=round(elapsed, 3),
                ),
            )
        elif inflight.cancelled:
            log.info(
                "request %s stopped after %.1f s",
                rid,
                elapsed,
                extra=event(
                    "request",
                    id=rid,
                    model=inflight.model,
                    outcome="cancelled",
                    tokens=tokens,
                    seconds=round(elapsed, 3),
                ),
            )

    def _serve_embed(self, inflight: _InFlight, params: dict[str, Any]) -> None:
        """Worker thread: one embedding request from Ollama's ``/api/embed`` to the router."""
        started = time.monotonic()
        outcome = "failed"
        response: requests.Response | None = None
        rid = inflight.request_id
        frames: list[str] = []
        vectors: list[list[float]] = []

        def fail(error: str, why: str) -> None:
            nonlocal outcome
            if inflight.send(self._error(rid, error)):
                log.warning("embed request %s failed: %s (%s)", rid, error, why)
            outcome = "reported"

        try:
            response = self._open_ollama("/api/embed", params, inflight, fail)
            if response is None:
                return
            limit = embed_answer_limit(len(params["input"]))
            body = _read_at_most(response, limit)
            if body is None:
                fail("ollama_error", f"Ollama's answer is over {limit} bytes")
                return
            answer = json.loads(body)
            vectors, problem = embeddings_of(answer, len(params["input"]), params.get("dimensions"))
            if problem is not None:
                fail("ollama_error", problem)
                return
            stats = {key: answer[key] for key in EMBED_STAT_KEYS if _is_int(answer.get(key))}
            frames = pack_vectors(rid, vectors, stats)
            for text in frames:
                if not inflight.send_text(text):
                    if not inflight.cancelled:
                        log.warning(
                            "embed request %s abandoned: connection to the router lost", rid
                        )
                    return
            outcome = "finished"
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            OSError,
            ValueError,
        ) as exc:
            if not inflight.cancelled:
                fail("ollama_error", _describe(exc))
        except Exception:  # a worker must never die silently with its slot taken
            if not inflight.cancelled:
                log.exception("embed request %s: unexpected error", rid)
                fail("ollama_error", "internal error")
        finally:
            if response is not None:
                _close_response(response)
            with self._lock:
                if self._inflight.get(rid) is inflight:
                    del self._inflight[rid]
            elapsed = time.monotonic() - started
            if outcome == "finished":
                log.info(
                    "embed request %s finished: model=%s vectors=%d of %d in %.1f s (%d frames)",
                    rid,
                    inflight.model,
                    len(vectors),
                    len(vectors[0]),
                    elapsed,
                    len(frames),
                )
            elif inflight.cancelled:
                log.info("embed request %s stopped after %.1f s", rid, elapsed)

    # ---- teardown

    def _end_connection(self, conn: _Connection) -> None:
        conn.close()
        with self._lock:
            orphans = [r for r in self._inflight.values() if r.conn is conn]
        for inflight in orphans:
            self._cancel(inflight)

    def _shutdown(self) -> int:
        """Cancel every request in flight and close the connection; how many were cancelled."""
        with self._lock:
            inflight = list(self._inflight.values())
        for request in inflight:
            self._cancel(request)
        conn = self._conn
        if conn is not None:
            conn.send_close("stopping")
            conn.lost()
        deadline = time.monotonic() + 1.0
        for request in inflight:
            if request.thread is not None:
                request.thread.join(max(0.0, deadline - time.monotonic()))
        return len(inflight)


def _requests(count: int) -> str:
    return f"{count} request" if count == 1 else f"{count} requests"


def _read_at_most(response: requests.Response, limit: int) -> bytes | None:
    """The whole body, or None once it is longer than ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    while True:
        part = response.raw.read(65536, decode_content=True)
        if not part:
            return b"".join(parts)
        size += len(part)
        if size > limit:
            return None
        parts.append(part)


def embed_answer_limit(inputs: int) -> int:
    """How much of Ollama's /api/embed answer to ``inputs`` texts is read at most."""
    return inputs * MAX_EMBED_DIMENSIONS * EMBED_ANSWER_BYTES_PER_NUMBER + EMBED_ANSWER_SLACK_BYTES


def _error_for_status(status: int) -> str:
    """The ``inference_error`` for an Ollama answer with HTTP ``status``: a 400 refuses the
    request itself (a bad keep_alive or option, an input over the context with truncate false),
    which no other node would take either, so the router is told it is invalid, not that this
    node failed."""
    return "invalid_request" if status == 400 else "ollama_error"


def _ollama_error_text(response: requests.Response) -> str:
    try:
        body = response.raw.read(2048, decode_content=True)
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, OSError, urllib3.exceptions.HTTPError):
        return ""
    # Ollama's words, escaped here too: they reach the log and --json-log's "reason".
    return f": {escaped(str(error)[:120])}" if error else ""


# --------------------------------------------------------------------------- command line


def _max_concurrent(value: str) -> int:
    low, high = MAX_CONCURRENT_RANGE
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if not low <= number <= high:
        raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
    return number


def _cap(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if not 1 <= number <= node_control.MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {node_control.MAX_LIMIT}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0.1 <= number <= 86_400:
        raise argparse.ArgumentTypeError("must be between 0.1 and 86400 seconds")
    return number


def _parsed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def check(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return check


def _model_list(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one model name")
    return names


def _program_list(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one program name")
    return names


def _contributor_name(value: str) -> str:
    problem = contributor_key.name_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="contribute.py",
        description="Share your local Ollama models with the IdleClaw network. "
        "Runs until Ctrl+C: the first one lets the answers in flight finish, a second one "
        "stops at once. Uses IDLECLAW_SERVER (default https://api.idleclaw.com) and "
        "OLLAMA_HOST (default http://localhost:11434).",
    )
    parser.add_argument(
        "--models",
        type=_model_list,
        metavar="A,B",
        help="share only these local models (comma separated; default: all, "
        f"at most the {MAX_MODELS} largest)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=_max_concurrent,
        default=2,
        metavar="N",
        help="requests served at the same time, 1..10 (default 2)",
    )
    limits = parser.add_argument_group("what a request may ask of your Ollama")
    limits.add_argument(
        "--keep-alive",
        type=_parsed(node_control.parse_keep_alive),
        metavar="DURATION",
        help="how long Ollama keeps a model loaded after a request, e.g. 10m, 1h, 0, or -1 "
        "for ever (default: Ollama's own, 5m)",
    )
    limits.add_argument(
        "--allow-keep-alive",
        action="store_true",
        help="let a request's own keep_alive through (default: ignored)",
    )
    limits.add_argument(
        "--max-ctx",
        type=_cap,
        metavar="N",
        help="largest context (num_ctx) a request may ask; the router sends nothing larger",
    )
    limits.add_argument(
        "--max-predict",
        type=_cap,
        metavar="N",
        help="longest answer (num_predict) in tokens; the router sends nothing asking more, "
        "and requests that set none get N",
    )
    limits.add_argument(
        "--warmup",
        action="store_true",
        help="load each shared model into Ollama once at start",
    )
    when = parser.add_argument_group("when to serve")
    when.add_argument(
        "--hours",
        type=_parsed(node_control.parse_hours),
        metavar="HH:MM-HH:MM",
        help="serve only in this daily window of local time, e.g. 22:00-08:00",
    )
    when.add_argument(
        "--pause-while",
        type=_program_list,
        metavar="PROGRAM,PROGRAM",
        help="take no requests while any of these programs runs (its process name, e.g. "
        "blender,steam); checked every 5 s",
    )
    when.add_argument(
        "--recheck-seconds",
        type=_seconds,
        default=RECHECK_DEFAULT_S,
        metavar="S",
        help="how often Ollama's models are read again (default 60)",
    )
    who = parser.add_argument_group(
        "who you are (a key kept in a private file keeps your name and record)"
    )
    who.add_argument(
        "--key-file",
        type=Path,
        metavar="PATH",
        help="your contributor key; made there at first start (default: "
        "$XDG_CONFIG_HOME/idleclaw/contributor.key, i.e. ~/.config/idleclaw/contributor.key)",
    )
    who.add_argument(
        "--name",
        type=_contributor_name,
        metavar="NAME",
        help="the public name others see instead of a generated one such as amber-otter-417 "
        "(1-64 letters, digits and . _ -; not an address, a UUID or beginning with admin, "
        "anonymous, idleclaw, operator, root or system); the router keeps it until changed",
    )
    who.add_argument(
        "--print-token",
        action="store_true",
        help="print the consumer token derived from your key for the router IDLECLAW_SERVER "
        "names (good on that router only; a secret: requests carrying it get a contributor's "
        "priority) and exit; needs an existing key file (the first start makes it)",
    )
    who.add_argument(
        "--anonymous",
        action="store_true",
        help="register without a key: no name, no record kept across restarts",
    )
    logs = parser.add_argument_group("the log (stderr)")
    verbosity = logs.add_mutually_exclusive_group()
    verbosity.add_argument("--quiet", action="store_true", help="only warnings and errors")
    verbosity.add_argument("--verbose", action="store_true", help="debugging details too")
    logs.add_argument(
        "--json-log", action="store_true", help="one JSON object per line, for other programs"
    )
    return parser


def _on_signal(signum: int, _frame: Any) -> None:
    _Signals.count += 1
    if _Signals.raising:
        # While starting, one signal ends the script; a second one during that short clean-up
        # is ignored.
        _Signals.raising = False
        raise StopRequested


def main(argv: Sequence[str] | None = None) -> int:
    """Run the contributor; returns the exit code."""
    args = build_parser().parse_args(argv)
    node_control.setup_logging(quiet=args.quiet, verbose=args.verbose, json_lines=args.json_log)

    def fail(message: str, code: int) -> int:
        if args.json_log:
            log.error("%s", message, extra=event("error", exit_code=code))
        else:
            print(f"error: {message}", file=sys.stderr)
        return code

    if args.anonymous and (args.key_file or args.name or args.print_token):
        return fail("--anonymous is without a key: no --key-file, --name or --print-token", 2)
    try:
        server = config.server_from_env()
        ollama = config.ollama_host_from_env()
        origin = contributor_key.router_origin(server)
    except (config.ConfigError, ValueError) as exc:
        return fail(str(exc), 2)
    identity = None
    if not args.anonymous:
        key_path = args.key_file or contributor_key.default_key_path()
        if args.print_token:
            # A token is worth something only once its key has served: it is never made here.
            try:
                key = contributor_key.load(key_path)
            except FileNotFoundError:
                return fail(
                    f"no contributor key in {key_path} yet: it is made when contribute.py first "
                    "starts; a token gets priority only once that key's nodes have served",
                    2,
                )
            except contributor_key.KeyFileError as exc:
                return fail(str(exc), 2)
            print(contributor_key.token_of(contributor_key.router_key(key, server)))
            print(
                f"this token is good only on the router at {origin} (IDLECLAW_SERVER); "
                "it is a secret: send it as `Authorization: Bearer <token>`",
                file=sys.stderr,
            )
            return 0
        try:
            key, created = contributor_key.load_or_create(key_path)
        except contributor_key.KeyFileError as exc:
            return fail(f"{exc} (or run with --anonymous)", 2)
        if created:
            log.info(
                "made a new contributor key in %s: it is your identity on the network, keep it",
                key_path,
                extra=event("key_created", path=str(key_path)),
            )
        # The key itself never leaves this machine; the router gets its own derivation.
        identity = Identity(router_key=contributor_key.router_key(key, server), name=args.name)
    if args.pause_while and node_control.process_names() is None:
        return fail("--pause-while cannot see the running programs on this system", 2)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    policy = RequestPolicy(
        keep_alive=args.keep_alive,
        allow_keep_alive=args.allow_keep_alive,
        max_ctx=args.max_ctx,
        max_predict=args.max_predict,
    )
    watch = Watch(
        recheck_s=args.recheck_seconds,
        wanted=tuple(args.models) if args.models else None,
        hours=args.hours,
        pause_while=tuple(args.pause_while or ()),
    )
    try:
        try:
            models, version = discover_models(ollama, args.models)
        except StartupError as exc:
            return fail(str(exc), exc.exit_code)
        log.info(
            "Ollama %s at %s: sharing %d models: %s",
            version,
            ollama,
            len(models),
            ", ".join(m.name for m in models),
            extra=event("ollama", version=version, models=[m.name for m in models]),
        )
        if args.warmup:
            warm_up(ollama, models, policy.keep_alive)
        node = Contributor(
            server=server,
            ollama=ollama,
            models=models,
            max_concurrent=args.max_concurrent,
            ollama_version=version,
            policy=policy,
            watch=watch,
            identity=identity,
        )
        return node.run()
    except StopRequested:
        log.info("stopped; goodbye", extra=event("stopped"))
        return 0


if __name__ == "__main__":
    sys.exit(main())
