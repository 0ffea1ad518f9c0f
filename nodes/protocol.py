"""The node protocol (PROTOCOL.md §1): frame types, limits and validation.

Frames from nodes are untrusted. ``parse_register`` turns a first frame into a ``Registration``
or raises ``ProtocolError`` whose ``reason`` is the exact 1008 close reason of the protocol.
Channel-layer events between the HTTP side and the node consumer are typed here as well, so both
sides build them from one definition.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypedDict

from nodes import identity

MAX_FRAME_BYTES = 100_000
MAX_NODE_ID_CHARS = 64
MAX_MODELS = 20
MAX_MODEL_NAME_CHARS = 64
# One rule for model names, from nodes and consumers alike: ASCII letters, digits and ``._:/-``,
# starting with a letter or digit, no ``..``. Anything else (markup, look-alike letters,
# spaces) could be shown to consumers in the model lists, or impersonate another model.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
# Integers a node reports (stats, sizes) are believed only in 0..2**53: beyond that they are not
# exact in a JavaScript client, and absurd ones (thousands of digits) break arithmetic.
MAX_SAFE_INTEGER = 2**53
MAX_CLIENT_CHARS = 64
MAX_VERSION_CHARS = 32
MAX_CONCURRENT_DEFAULT = 2
MAX_CONCURRENT_RANGE = (1, 10)
KNOWN_CAPABILITIES = ("completion", "tools", "thinking", "vision", "embedding", "insert")
PROTOCOL_VERSION = 2

# Keys of ollama_params a router may send (PROTOCOL §1).
OLLAMA_PARAM_KEYS = (
    "model",
    "messages",
    "stream",
    "think",
    "keep_alive",
    "options",
    "tools",
    "format",
)
# Final-chunk stats relayed from Ollama (nanoseconds and counts).
STAT_KEYS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
ERROR_CODES = ("invalid_request", "ollama_unavailable", "ollama_error")
# Most chunks one ``inference_chunks`` frame may carry (docs/node-protocol-extensions.md).
MAX_CHUNKS_PER_FRAME = 256
# A model's ``details`` (docs/node-protocol-extensions.md): Ollama's short descriptive strings,
# each a word of a plain charset (they are shown in model lists), and its context length.
DETAIL_TEXT_KEYS = ("format", "family", "parameter_size", "quantization_level")
DETAIL_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")
MAX_FAMILIES = 4
MAX_CONTEXT_LENGTH = 2**27  # 134M tokens: well above any model's, far below absurd
# An expiry past this is "loaded for good" (Ollama reports keep_alive -1 as year 2318); it keeps
# absurd dates out of arithmetic and out of the database.
LOADED_FOREVER = datetime(3000, 1, 1, tzinfo=UTC)
MAX_TIMESTAMP_CHARS = 40
# The ``embeddings`` extension (docs/node-protocol-extensions.md): most inputs of one request,
# the longest vector a node may return, and all the numbers of one answer together
# (256 vectors of 8192).
MAX_EMBED_INPUTS = 256
MAX_EMBED_DIMENSIONS = 8192
MAX_EMBED_FLOATS = 2_097_152
EMBED_PARAM_KEYS = ("model", "input", "truncate", "dimensions", "keep_alive", "options")
EMBED_STAT_KEYS = ("total_duration", "load_duration", "prompt_eval_count")
# Most entries of ``register.features`` looked at; the rest are ignored.
MAX_DECLARED_FEATURES = 32
# The Ollama options a node may cap in ``register.limits`` (docs/node-protocol-extensions.md),
# and the largest cap believed: as large as any context, small enough for any integer column.
LIMIT_OPTIONS = ("num_ctx", "num_predict")
MAX_LIMIT = MAX_CONTEXT_LENGTH

CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


class FrameType(StrEnum):
    REGISTER = "register"
    REGISTERED = "registered"
    HEARTBEAT = "heartbeat"
    INFERENCE_REQUEST = "inference_request"
    INFERENCE_CHUNK = "inference_chunk"
    INFERENCE_CHUNKS = "inference_chunks"
    INFERENCE_ERROR = "inference_error"
    CANCEL_REQUEST = "cancel_request"
    MODELS_UPDATE = "models_update"
    DRAIN = "drain"
    EMBED_REQUEST = "embed_request"
    EMBED_VECTORS = "embed_vectors"
    UNDRAIN = "undrain"


class Feature(StrEnum):
    """Protocol extensions this router offers in ``registered.features``: a node uses one only
    when the router listed it (docs/node-protocol-extensions.md)."""

    INFERENCE_CHUNKS = "inference_chunks"
    LOADED_MODELS = "loaded_models"
    EMBEDDINGS = "embeddings"
    # ``drain`` and ``undrain`` frames, and ``draining`` in ``register``: a node pauses and
    # resumes without reconnecting.
    DRAIN = "drain"
    # ``models_update`` frames: a node's model list changes without reconnecting.
    MODELS_UPDATE = "models_update"


ROUTER_FEATURES = (
    Feature.INFERENCE_CHUNKS,
    Feature.LOADED_MODELS,
    Feature.EMBEDDINGS,
    Feature.DRAIN,
    Feature.MODELS_UPDATE,
)
# Extensions a node declares in ``register.features``: the router sends such requests only to
# nodes that declared them. Other names are ignored.
NODE_FEATURES = (Feature.EMBEDDINGS,)


class CloseReason(StrEnum):
    """The 1008 close reasons of PROTOCOL §1, word for word."""

    REGISTRATION_TIMEOUT = "registration timeout"
    EXPECTED_REGISTER = "expected register message"
    INVALID_NODE_ID = "invalid node_id"
    NO_MODELS = "no models provided"
    TOO_MANY_MODELS = "too many models"
    INVALID_MODEL_NAME = "invalid model name"
    TOO_MANY_NODES = "too many nodes from this IP"
    RATE_LIMITED = "rate limited"
    BANNED = "banned"
    NODE_ID_IN_USE = "node_id in use"
    FRAME_TOO_LARGE = "frame too large"
    INVALID_FRAME = "invalid frame"
    UNKNOWN_FRAME_TYPE = "unknown frame type"
    TOO_MANY_STRIKES = "too many frames for unknown requests"
    NODE_TIMEOUT = "heartbeat timeout"
    # The ``contributor`` extension of ``register`` (docs/node-protocol-extensions.md): sent by
    # new nodes only, so no existing client meets it.
    INVALID_CONTRIBUTOR = "invalid contributor"


class EventType(StrEnum):
    """Channel-layer event types. Channels maps ``node.request`` to ``node_request``."""

    NODE_REQUEST = "node.request"
    NODE_EMBED = "node.embed"
    NODE_CANCEL = "node.cancel"
    NODE_GONE = "node.gone"
    STREAM_CHUNK = "stream.chunk"
    STREAM_ERROR = "stream.error"


class NodeRequestEvent(TypedDict):
    """HTTP side → node consumer: serve this request, reply to ``reply_channel``."""

    type: str
    request_id: str
    reply_channel: str
    ollama_params: dict[str, Any]


class NodeEmbedEvent(TypedDict):
    """HTTP side → node consumer: embed these inputs (the ``embeddings`` extension)."""

    type: str
    request_id: str
    reply_channel: str
    embed_params: dict[str, Any]


class NodeCancelEvent(TypedDict):
    type: str
    request_id: str


class StreamChunkEvent(TypedDict):
    """Node consumer → HTTP side: chunks that arrived together, already reduced to the fields
    consumers may see. ``seq`` numbers the first; a request's chunks count from 0, so a
    message lost on the way shows as a gap."""

    type: str
    request_id: str
    seq: int
    chunks: list[dict[str, Any]]


class StreamErrorEvent(TypedDict):
    type: str
    request_id: str
    error: str


class ProtocolError(Exception):
    """A frame that breaks the protocol; ``reason`` is the close reason sent to the node."""

    def __init__(self, reason: str, code: int = CLOSE_POLICY) -> None:
        super().__init__(reason)
        self.reason = str(reason)
        self.code = code


@dataclass(frozen=True)
class ModelOffer:
    name: str
    size: int = 0
    capabilities: tuple[str, ...] = ()
    # What ``parse_details`` kept of the node's description of the model.
    details: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class LoadedModel:
    """A model the node's Ollama has loaded (``/api/ps``), as reported with a heartbeat."""

    name: str
    expires_at: datetime
    size_vram: int = 0


@dataclass(frozen=True)
class Registration:
    node_id: str
    models: tuple[ModelOffer, ...]
    max_concurrent: int = MAX_CONCURRENT_DEFAULT
    ollama_version: str = ""
    protocol: int = 1
    client: str = ""
    resume_token: str = ""
    # Extensions of NODE_FEATURES the node declared it accepts.
    features: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # What the router dropped from the frame and tells the node in ``registered.warnings``.
    warnings: tuple[str, ...] = ()
    # The node's caps on a request's options (``parse_limits``), and whether it registers
    # paused (``draining``); both extensions.
    max_ctx: int | None = None
    max_predict: int | None = None
    draining: bool = False
    # The ``contributor`` extension: the key the node proved (never logged, never stored: the
    # router keeps its hash), the name it asked for, and why that name was not taken.
    contributor_key: str | None = field(default=None, repr=False)
    contributor_name: str | None = None
    name_problem: str | None = None


def valid_model_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and len(name) <= MAX_MODEL_NAME_CHARS
        and MODEL_NAME.fullmatch(name) is not None
        and ".." not in name
    )


def safe_int(value: Any) -> int | None:
    """An integer in 0..2**53, or None for anything else (booleans included)."""
    if type(value) is int and 0 <= value <= MAX_SAFE_INTEGER:
        return value
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: valid JSON syntax, but Infinity once parsed
        raise ValueError("number out of range")
    return value


# One decoder for every frame: ``json.loads`` with hooks builds a new one on every call.
_STRICT_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def strict_loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses what is not strict JSON: Python's parser accepts ``NaN`` and
    ``Infinity``, and turns ``1e999`` into infinity, and none of them can be written back out as
    JSON a browser parses. Raises ``ValueError`` (or ``RecursionError`` when absurdly deep)."""
    if not isinstance(text, str):
        text = bytes(text).decode("utf-8")  # UnicodeDecodeError is a ValueError
    return _STRICT_DECODER.decode(text)


def decode_frame(text: str | None, data: bytes | None) -> dict[str, Any]:
    """Decode a WebSocket frame into a JSON object, enforcing the size limit."""
    raw = text if text is not None else data
    if raw is None:
        raise ProtocolError(CloseReason.INVALID_FRAME)
    size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(CloseReason.FRAME_TOO_LARGE, CLOSE_TOO_BIG)
    try:
        frame = strict_loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise ProtocolError(CloseReason.INVALID_FRAME) from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise ProtocolError(CloseReason.INVALID_FRAME)
    return frame


def _clean_text(value: Any, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    return valid_unicode(value[:limit])


def valid_unicode(text: str) -> str:
    """``text`` with lone surrogates (which JSON's ``\\ud800`` escapes can carry) replaced, so
    that it can always be encoded as UTF-8 on the way to a consumer."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def depth_of(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, counting no further than ``limit + 1``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def parse_models(raw: Any) -> tuple[tuple[ModelOffer, ...], tuple[str, ...]]:
    """Validate a node's model list (register and models_update): the models it may serve,
    and a warning for each entry dropped for an invalid name. Raises ``ProtocolError`` when the
    list itself is wrong or no valid model is left."""
    if not isinstance(raw, list) or not raw:
        raise ProtocolError(CloseReason.NO_MODELS)
    if len(raw) > MAX_MODELS:
        raise ProtocolError(CloseReason.TOO_MANY_MODELS)
    offers: dict[str, ModelOffer] = {}
    warnings: list[str] = []
    for entry in raw:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not valid_model_name(name):
            shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
            warnings.append(
                f"model {shown} dropped: a model name is 1-{MAX_MODEL_NAME_CHARS} ASCII letters, "
                "digits and . _ : / -"
            )
            continue
        size = safe_int(entry.get("size", 0)) or 0
        caps = entry.get("capabilities")
        capabilities: tuple[str, ...] = ()
        if isinstance(caps, list):
            capabilities = tuple(c for c in KNOWN_CAPABILITIES if c in caps)
        offers[name] = ModelOffer(
            name=name,
            size=size,
            capabilities=capabilities,
            details=parse_details(entry.get("details"), entry.get("context_length")),
        )
    if not offers:
        raise ProtocolError(CloseReason.INVALID_MODEL_NAME)
    return tuple(offers.values()), tuple(warnings)


def _detail_text(value: Any) -> str | None:
    if isinstance(value, str) and DETAIL_TEXT.fullmatch(value):
        return value
    return None


def parse_details(raw: Any, context_length: Any) -> dict[str, Any]:
    """What the router keeps of a model entry's ``details`` and ``context_length`` (an
    extension of ``register`` and ``models_update``): the known keys whose values are short
    words of a plain charset, at most ``MAX_FAMILIES`` families, and a context length in
    1..``MAX_CONTEXT_LENGTH``. Anything else is dropped, never an error; only known keys are
    looked at, so the cost does not grow with what a node sends."""
    details: dict[str, Any] = {}
    if isinstance(raw, dict):
        for key in DETAIL_TEXT_KEYS:
            text = _detail_text(raw.get(key))
            if text is not None:
                details[key] = text
        families = raw.get("families")
        if isinstance(families, list):
            kept: list[str] = []
            for value in families[:MAX_FAMILIES]:
                text = _detail_text(value)
                if text is not None and text not in kept:
                    kept.append(text)
            if kept:
                details["families"] = kept
    length = safe_int(context_length)
    if length is not None and 0 < length <= MAX_CONTEXT_LENGTH:
        details["context_length"] = length
    return details


def parse_timestamp(value: Any) -> datetime | None:
    """An RFC 3339 time with a UTC offset, as Ollama writes them, in UTC and at most
    ``LOADED_FOREVER``; None for anything else."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TIMESTAMP_CHARS:
        return None
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            return None
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: year 9999 with a negative offset
        return None
    return min(moment, LOADED_FOREVER)


def parse_loaded(raw: Any, now: datetime) -> tuple[LoadedModel, ...] | None:
    """The ``loaded`` field of a heartbeat (docs/node-protocol-extensions.md): the models the
    node's Ollama has loaded, or None when the heartbeat says nothing about them (no field, or
    not a list). Entries that are not a valid model name with an expiry still in the future are
    dropped, only the first ``MAX_MODELS`` entries are looked at, and a name given twice keeps
    its latest expiry. Whether the node serves each model is the caller's business."""
    if not isinstance(raw, list):
        return None
    loaded: dict[str, LoadedModel] = {}
    for entry in raw[:MAX_MODELS]:
        if not isinstance(entry, dict) or not valid_model_name(entry.get("name")):
            continue
        expires_at = parse_timestamp(entry.get("expires_at"))
        if expires_at is None or expires_at <= now:
            continue
        name = entry["name"]
        model = LoadedModel(
            name=name, expires_at=expires_at, size_vram=safe_int(entry.get("size_vram")) or 0
        )
        if name not in loaded or loaded[name].expires_at < expires_at:
            loaded[name] = model
    return tuple(loaded.values())


def loaded_changed(
    before: Mapping[str, LoadedModel], after: tuple[LoadedModel, ...], *, slack: float
) -> bool:
    """Whether a loaded report says something the router does not know yet: another set of
    models, another memory use, or an expiry moved by more than ``slack`` seconds. Ollama moves
    a model's expiry with every request it serves; writing each move would cost a write per
    heartbeat of every busy node, and an expiry a few seconds early does not matter."""
    if len(before) != len(after):
        return True
    for model in after:
        known = before.get(model.name)
        if (
            known is None
            or known.size_vram != model.size_vram
            or abs((known.expires_at - model.expires_at).total_seconds()) > slack
        ):
            return True
    return False


def parse_limits(raw: Any) -> dict[str, int]:
    """The caps of ``register.limits`` (docs/node-protocol-extensions.md): for each option of
    ``LIMIT_OPTIONS``, an integer in 1..``MAX_LIMIT``. Anything else is dropped, never an error:
    a node whose caps are unreadable is taken to have none, as a node that does not know the
    extension."""
    if not isinstance(raw, dict):
        return {}
    limits = {}
    for option in LIMIT_OPTIONS:
        value = safe_int(raw.get(option))
        if value is not None and 0 < value <= MAX_LIMIT:
            limits[option] = value
    return limits


def parse_register(frame: dict[str, Any]) -> Registration:
    """Validate a ``register`` frame (PROTOCOL §1 Handshake)."""
    if frame.get("type") != FrameType.REGISTER:
        raise ProtocolError(CloseReason.EXPECTED_REGISTER)
    node_id = frame.get("node_id")
    if (
        not isinstance(node_id, str)
        or not node_id.strip()
        or len(node_id) > MAX_NODE_ID_CHARS
        or not node_id.isprintable()
    ):
        raise ProtocolError(CloseReason.INVALID_NODE_ID)
    models, warnings = parse_models(frame.get("models"))
    max_concurrent = frame.get("max_concurrent", MAX_CONCURRENT_DEFAULT)
    if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
        max_concurrent = MAX_CONCURRENT_DEFAULT
    low, high = MAX_CONCURRENT_RANGE
    protocol = safe_int(frame.get("protocol", 1))
    if protocol is None or not 1 <= protocol <= 1000:
        protocol = 1  # stored in a small integer column: an absurd version must not reach it
    limits = parse_limits(frame.get("limits"))
    key, name, problem = parse_contributor(frame.get("contributor"))
    return Registration(
        node_id=node_id,
        models=models,
        max_concurrent=max(low, min(high, max_concurrent)),
        ollama_version=_clean_text(frame.get("ollama_version"), MAX_VERSION_CHARS),
        protocol=protocol,
        client=_clean_text(frame.get("client"), MAX_CLIENT_CHARS),
        resume_token=_clean_text(frame.get("resume_token"), 128),
        features=_declared_features(frame.get("features")),
        warnings=warnings,
        max_ctx=limits.get("num_ctx"),
        max_predict=limits.get("num_predict"),
        draining=frame.get("draining") is True,
        contributor_key=key,
        contributor_name=name,
        name_problem=problem,
    )


def parse_contributor(raw: Any) -> tuple[str | None, str | None, str | None]:
    """The ``contributor`` object of ``register`` (docs/node-protocol-extensions.md) as
    ``(key, name, why the name is refused)``. Absent (or null): an anonymous node. A node that
    sends one means to prove a key, so anything but an object whose ``key`` is exactly 64
    lowercase hex characters refuses the registration (``invalid contributor``) rather than
    quietly making the node anonymous. A bad ``name`` only loses the name: the node keeps the
    one it had, and ``registered`` says why."""
    if raw is None:
        return None, None, None
    if not isinstance(raw, dict) or not identity.valid_key(raw.get("key")):
        raise ProtocolError(CloseReason.INVALID_CONTRIBUTOR)
    name = raw.get("name")
    if name is None:
        return raw["key"], None, None
    problem = identity.name_problem(name)
    if problem is not None:
        return raw["key"], None, f"name not changed: {problem}"
    return raw["key"], name, None


def _declared_features(raw: Any) -> tuple[str, ...]:
    """The known extensions among the first MAX_DECLARED_FEATURES entries of
    ``register.features``; anything else (not a list, unknown names, non-strings) is ignored."""
    if not isinstance(raw, list):
        return ()
    named = {item for item in raw[:MAX_DECLARED_FEATURES] if isinstance(item, str)}
    return tuple(feature.value for feature in NODE_FEATURES if feature in named)


NODE_FRAME_TYPES = frozenset(
    {
        FrameType.HEARTBEAT,
        FrameType.INFERENCE_CHUNK,
        FrameType.INFERENCE_CHUNKS,
        FrameType.INFERENCE_ERROR,
        FrameType.MODELS_UPDATE,
        FrameType.DRAIN,
        FrameType.UNDRAIN,
        FrameType.REGISTER,
        FrameType.EMBED_VECTORS,
    }
)
# Frames about one request: they need a valid ``request_id``.
REQUEST_FRAME_TYPES = frozenset(
    {
        FrameType.INFERENCE_CHUNK,
        FrameType.INFERENCE_CHUNKS,
        FrameType.INFERENCE_ERROR,
        FrameType.EMBED_VECTORS,
    }
)
MAX_TOOL_CALLS = 16
MAX_TOOL_CALL_JSON_CHARS = 20_000
# Deepest JSON nesting accepted in tool arguments and schemas; real ones are a few levels deep.
MAX_JSON_DEPTH = 32


def check_node_frame(frame: dict[str, Any]) -> None:
    """Refuse a frame from a registered node whose type is unknown or whose fields have the
    wrong types (PROTOCOL §1 says what each carries). Unknown extra fields are fine."""
    kind = frame["type"]
    if kind not in NODE_FRAME_TYPES:
        raise ProtocolError(CloseReason.UNKNOWN_FRAME_TYPE)
    if kind == FrameType.HEARTBEAT:
        active = frame.get("active_requests", 0)
        available = frame.get("available", True)
        if (
            isinstance(active, bool)
            or not isinstance(active, int)
            or not isinstance(available, bool)
            or not isinstance(frame.get("node_id", ""), str)
        ):
            raise ProtocolError(CloseReason.INVALID_FRAME)
    elif kind in REQUEST_FRAME_TYPES:
        if request_id_of(frame) is None:
            raise ProtocolError(CloseReason.INVALID_FRAME)
        if kind == FrameType.INFERENCE_CHUNK:
            chunk = frame.get("chunk")
            if not isinstance(chunk, dict) or not isinstance(chunk.get("done", False), bool):
                raise ProtocolError(CloseReason.INVALID_FRAME)
            if not isinstance(chunk.get("message", {}), dict):
                raise ProtocolError(CloseReason.INVALID_FRAME)
        elif kind == FrameType.INFERENCE_ERROR and not isinstance(frame.get("error"), str):
            raise ProtocolError(CloseReason.INVALID_FRAME)
        # The chunks of an ``inference_chunks`` frame are checked by ``clean_chunks`` when they
        # are relayed, the vectors of an ``embed_vectors`` frame by its request's
        # ``EmbedCheck``: a bad batch fails its request, like a chunk ``clean_chunk`` refuses,
        # rather than the connection.


def request_id_of(frame: dict[str, Any]) -> str | None:
    request_id = frame.get("request_id")
    if isinstance(request_id, str) and 0 < len(request_id) <= 64:
        return request_id
    return None


def clean_chunk(raw: Any) -> dict[str, Any] | None:
    """Reduce a node's chunk to the fields consumers may see, or None if it is malformed."""
    if not isinstance(raw, dict):
        return None
    message = raw.get("message")
    if message is None:
        message = {}
    if not isinstance(message, dict):
        return None
    clean_message: dict[str, Any] = {"role": "assistant"}
    for key in ("content", "thinking"):
        value = message.get(key)
        if isinstance(value, str) and value:
            clean_message[key] = valid_unicode(value)
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list) and tool_calls:
        calls = [_clean_tool_call(c) for c in tool_calls[:MAX_TOOL_CALLS]]
        calls = [c for c in calls if c is not None]
        if calls:
            clean_message["tool_calls"] = calls
    chunk: dict[str, Any] = {"message": clean_message, "done": raw.get("done") is True}
    if chunk["done"]:
        reason = raw.get("done_reason")
        if isinstance(reason, str) and reason in ("stop", "length", "load", "unload"):
            chunk["done_reason"] = reason
        for key in STAT_KEYS:
            value = safe_int(raw.get(key))
            if value is not None:
                chunk[key] = value
    return chunk


def clean_chunks(raw: Any) -> list[dict[str, Any]] | None:
    """The chunks of an ``inference_chunks`` frame reduced like ``clean_chunk``, or None if the
    batch is malformed: not a list of 1..MAX_CHUNKS_PER_FRAME chunks, a chunk that is not one
    (``done`` must be a boolean, as in ``inference_chunk``), or a chunk with ``done`` true before
    the last. One bad chunk refuses the whole frame."""
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_CHUNKS_PER_FRAME:
        return None
    chunks = []
    last = len(raw) - 1
    for index, item in enumerate(raw):
        chunk = clean_chunk(item)
        if (
            chunk is None
            or not isinstance(item.get("done", False), bool)
            or (chunk["done"] and index != last)
        ):
            return None
        chunks.append(chunk)
    return chunks


TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _clean_tool_call(call: Any) -> dict[str, Any] | None:
    """A tool call in Ollama's shape with only its name and arguments, or None if it is not
    one: the name is a plain identifier, the arguments an object of bounded size."""
    if not isinstance(call, dict):
        return None
    function = call.get("function")
    if not isinstance(function, dict):
        return None
    name = function.get("name")
    arguments = function.get("arguments", {})
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        return None
    if isinstance(arguments, str):
        if len(arguments) > MAX_TOOL_CALL_JSON_CHARS:
            return None
        try:
            arguments = strict_loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict) or depth_of(arguments, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        return None
    text = json.dumps(arguments, ensure_ascii=False)
    if len(text) > MAX_TOOL_CALL_JSON_CHARS:
        return None
    # Lone surrogates inside the arguments become U+FFFD, like in content.
    arguments = json.loads(valid_unicode(text))
    return {"function": {"name": name, "arguments": arguments}}


def error_code_of(frame: dict[str, Any]) -> str:
    error = frame.get("error")
    if isinstance(error, str) and error in ERROR_CODES:
        return error
    return "ollama_error"


# --- The ``embeddings`` extension (docs/node-protocol-extensions.md) ---------------------------


def embed_request_text(request_id: str, embed_params: dict[str, Any]) -> str:
    """The ``embed_request`` frame as sent to a node: UTF-8 rather than ASCII escapes, which
    would make non-Latin text take up to six times its room in the 100,000-byte frame. Lone
    surrogates, which UTF-8 cannot carry, become U+FFFD."""
    frame = {"type": FrameType.EMBED_REQUEST, "request_id": request_id,
             "embed_params": embed_params}
    return valid_unicode(json.dumps(frame, ensure_ascii=False, separators=(",", ":")))


class EmbedError(Exception):
    """What is wrong with a node's vectors; safe to log (counts and lengths, never values)."""


# The largest float32: clients decode embeddings as float32 (OpenAI's base64, numpy), where a
# larger finite double is an infinity (red-team M1 of issue 19).
MAX_FLOAT32 = 3.4028234663852886e38


def _float32(values: list[float]) -> list[float]:
    if values and (max(values) > MAX_FLOAT32 or min(values) < -MAX_FLOAT32):
        raise EmbedError("a number out of float32's range")
    return values


def _numbers(raw: list[Any]) -> list[float]:
    """``raw`` as floats, or ``EmbedError`` if an element is not a number. The strict frame
    decoder has already refused NaN and infinities; JSON integers (Go writes ``0`` for 0.0) are
    numbers too, booleans are not."""
    if all(type(value) is float for value in raw):
        return _float32(raw)
    values = []
    for value in raw:
        kind = type(value)
        if kind is float:
            values.append(value)
        elif kind is int:
            try:
                values.append(float(value))
            except OverflowError:
                raise EmbedError("a number out of range") from None
        else:
            raise EmbedError(f"a vector holds a {kind.__name__}, not a number")
    return _float32(values)


@dataclass
class EmbedCheck:
    """One embedding request's answer as a node sends it, checked frame by frame: vectors of
    numbers, one per input and in order, all of one length of 1..MAX_EMBED_DIMENSIONS (at most
    the ``dimensions`` asked for), at most MAX_EMBED_FLOATS numbers in all. ``take`` raises
    ``EmbedError`` at the first frame that breaks a rule, so a node cannot make the router hold
    more than one answer's worth."""

    inputs: int
    dimensions: int | None = None
    vectors: int = 0  # vectors begun
    length: int = 0  # the length of the first complete vector; 0 until there is one
    current: int = 0  # numbers of the last vector begun
    floats: int = 0

    def take(self, frame: dict[str, Any]) -> dict[str, Any]:
        """The vectors of an ``embed_vectors`` frame as they go on to the consumer's worker:
        ``{"embeddings", "continued", "done"}`` and, on the last, the stats."""
        vectors = frame.get("embeddings")
        continued = frame.get("continued", False)
        done = frame.get("done", False)
        if not isinstance(vectors, list) or not isinstance(continued, bool):
            raise EmbedError("embeddings is not a list of vectors")
        if not isinstance(done, bool):
            raise EmbedError("done is not a boolean")
        if not vectors and not done:
            raise EmbedError("a frame without vectors that is not the last")
        if len(vectors) > self.inputs - self.vectors + int(continued):
            raise EmbedError(f"more vectors than the {self.inputs} inputs")
        if continued and (not vectors or not self.vectors):
            raise EmbedError("continued with no vector to continue")
        limit = min(MAX_EMBED_DIMENSIONS, self.dimensions or MAX_EMBED_DIMENSIONS)
        clean = []
        for position, raw in enumerate(vectors):
            if not isinstance(raw, list) or not raw:
                raise EmbedError("a vector is not a non-empty list of numbers")
            if position or not continued:
                self._complete()
                self.vectors += 1
                self.current = 0
            self.current += len(raw)
            if self.current > (self.length or limit):
                raise EmbedError(f"a vector longer than {self.length or limit}")
            self.floats += len(raw)
            if self.floats > MAX_EMBED_FLOATS:
                raise EmbedError(f"more than {MAX_EMBED_FLOATS} numbers")
            clean.append(_numbers(raw))
        piece: dict[str, Any] = {"embeddings": clean, "continued": continued, "done": done}
        if done:
            self._complete()
            if self.vectors != self.inputs:
                raise EmbedError(f"{self.vectors} vectors for {self.inputs} inputs")
            for key in EMBED_STAT_KEYS:
                value = safe_int(frame.get(key))
                if value is not None:
                    piece[key] = value
        return piece

    def _complete(self) -> None:
        """The last vector begun is whole: it must be as long as the first."""
        if not self.vectors:
            return
        if not self.length:
            self.length = self.current
        elif self.current != self.length:
            raise EmbedError(f"vectors of {self.length} and {self.current} numbers")
