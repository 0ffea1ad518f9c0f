"""An Ollama HTTP API emulator for tests, the demo and the benchmark.

Real Ollama needs model weights we cannot run here, so everything that would talk to
Ollama talks to this instead. It speaks Ollama's wire format closely enough that the
official ``ollama`` Python client works against it unchanged: the same routes, field
names, status codes and error wording, NDJSON streams sent with chunked transfer
encoding, and nanosecond timing statistics.

Replies are deterministic. :func:`reply_for` is the pure function the server uses, so a
benchmark can compute what a request should produce; :meth:`OllamaEmulator.expected_reply`
applies the server's defaults (thinking models think unless told not to) first.

Reply tokens:

* Content token ``i`` is a word from a 64-word vocabulary followed by ``i`` (``sky0``,
  `` lamp1``, ...): the first token has no leading space, later ones have one. The index
  makes every token in a reply distinct, so a lost, duplicated or reordered chunk shows.
  The words are drawn from a hash of the model and the conversation, so two different
  requests practically never get the same reply and crossed streams are detectable.
* Thinking tokens work the same way with a disjoint vocabulary (``hmm0``, `` ponder1``).
  A thinking reply has ``ceil(N / 2)`` thinking tokens, then the ``N`` content tokens.
* ``format`` replies are JSON text split at whitespace, each piece carrying its leading
  space, so the pieces still concatenate to the exact text.
* ``options.num_predict`` (when positive and smaller than the natural length) caps
  thinking plus content tokens and the reply ends with ``done_reason: "length"``.
* Tool calls are atomic: ``num_predict`` may cut the thinking before them, never the call.
* Embeddings (``/api/embed``, and the older ``/api/embeddings``) are unit vectors drawn from a
  hash of the model and the input text, of the model's length (``nomic-embed-text`` 768,
  ``all-minilm`` 384, ``mxbai-embed-large`` 1024, another embedding model 768 unless its spec
  says ``dims=N``, a chat model 2048), with float32 precision as Ollama writes them.
  ``dimensions`` cuts and normalizes them again, as Ollama does; an input longer than the
  context (about four characters a token) is cut, or with ``truncate: false`` refused.
  ``EMBEDDING_MODELS`` (``--embedding-models``) adds two embedding models to the model list.
* A model specified with ``searches=yes`` behaves like a model using a router's
  ``web_search`` tool: offered ``web_search`` and asked to "search" in the last user message,
  it calls ``web_search`` with the rest of that message as query (and calls no other tool);
  after a ``tool`` message it answers ``From the web: <first line of the result>``, so a test
  can see that the result reached the model.

A lying Ollama, for tests of probes (issue 20), on request and never by default:

* ``answer_as`` (``--answer-as MODEL``) answers every chat and generate request as ``MODEL``
  would: the words come from the hash of that model instead of the one asked for, so the same
  prompt and seed get different words than an honest node of the asked model gives (a
  mislabelled model). Everything else (validation, capabilities, lengths) is the asked model's.
* ``garble`` (``--garble``) answers random words: the hash also takes fresh random bytes for
  each request, so the same request never gets the same answer twice.

Loaded models work as in Ollama: a request loads its model (taking ``load_delay``, shared by
the requests that wait for the same load), which then stays ``keep_alive`` (default 5m) after
the last request that used it; ``keep_alive: 0`` unloads it; ``/api/ps`` lists what is loaded.

Test-only observability and control live under ``/_emulator/`` so they cannot collide with
Ollama's API: ``GET /_emulator/stats``, ``POST /_emulator/reset``, and ``POST
/_emulator/models`` with ``{"models": ["SPEC", ...]}`` (specs as ``--model`` takes them), which
replaces the installed models as ``ollama pull`` and ``ollama rm`` would.

Run it with ``python -m bench.emulator --port 0``; it prints ``listening on URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

__all__ = [
    "DEFAULT_MODELS",
    "EMBEDDING_MODELS",
    "DEFAULT_REPLY_TOKENS",
    "DEFAULT_VERSION",
    "ModelSpec",
    "OllamaEmulator",
    "Reply",
    "main",
    "parse_model_spec",
    "reply_for",
    "vector_for",
]

DEFAULT_VERSION = "0.12.3"
DEFAULT_REPLY_TOKENS = 20
DEFAULT_KEEP_ALIVE_NS = 5 * 60 * 1_000_000_000
REQUEST_LOG_SIZE = 100
# The context a model runs with (``/api/ps``): Ollama's default num_ctx since 0.6.
CONTEXT_LENGTH = 4096
# The context each model was trained for (``/api/show`` model_info), by name; 32768 otherwise.
TRAINED_CONTEXT_LENGTHS = {"llama3.2": 131072, "qwen3": 40960, "smollm2": 8192}

KNOWN_CAPABILITIES = ("completion", "tools", "thinking", "insert", "vision", "embedding")

# 64 words each (a power of two, so a hash byte picks one uniformly). The two lists share
# no word, and no word ends in a digit, so thinking and content tokens can never collide.
CONTENT_WORDS = tuple(
    (
        "sky lamp river stone cloud maple ember harbor meadow copper violet falcon lantern "
        "orchard pebble quartz saddle thistle valley willow anchor beacon canyon dune "
        "fable garnet hollow island juniper kettle lagoon marble nectar oasis prairie "
        "quiver ripple summit timber umber velvet wander yonder zephyr amber birch cedar "
        "delta echo fjord glacier heron ivory jasper kelp linen mosaic nimbus opal plume "
        "quill raven sable tundra"
    ).split()
)
THINKING_WORDS = tuple(
    (
        "hmm ponder perhaps consider suppose weigh recall check maybe notice assume "
        "compare infer reckon wonder guess estimate verify reason deduce examine question "
        "doubt reflect surmise gauge probe review trace sketch outline draft imagine "
        "predict judge test derive resolve clarify restate note observe list rank sort "
        "filter split merge count measure align plan decide settle confirm refine revisit "
        "tally parse map scan frame focus conclude"
    ).split()
)

_REGISTRY_PREFIX = "registry.ollama.ai/library/"
_MODIFIED_AT_NS = 1_758_360_600_000_000_000  # a fixed instant: tags must not churn


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """One installed model: its name, size on disk in bytes and Ollama capabilities."""

    name: str
    size: int
    capabilities: tuple[str, ...] = ("completion",)
    # Calls a web_search tool when asked to search, and quotes its result (module docstring).
    searches: bool = False
    # Length of its embeddings; 0 for the length its name or kind implies (``dimensions``).
    dims: int = 0

    @property
    def key(self) -> str:
        """The name as Ollama resolves it (lower case, ``:latest`` when untagged)."""
        return canonical_model_name(self.name)

    @property
    def family(self) -> str:
        base = self.key.rsplit("/", 1)[-1].split(":", 1)[0]
        match = re.match(r"[a-z]+\d*", base)
        family = match.group(0) if match else base
        # llama3.2 and smollm2 are both llama-architecture models.
        if family.startswith("llama") or family.startswith("smollm"):
            return "llama"
        return family

    @property
    def parameter_size(self) -> str:
        tag = self.key.rsplit(":", 1)[-1]
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([bm])", tag)
        if match is None:
            return "unknown"
        return f"{match.group(1)}{match.group(2).upper()}"

    @property
    def quantization_level(self) -> str:
        return "Q8_0" if self.size < 400_000_000 else "Q4_K_M"

    @property
    def parameter_count(self) -> int:
        size = self.parameter_size
        if size == "unknown":
            return self.size * 2
        scale = 1_000_000_000 if size.endswith("B") else 1_000_000
        return int(float(size[:-1]) * scale)

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"emulated:{self.key}".encode()).hexdigest()

    @property
    def context_length(self) -> int:
        """The context length the model was trained for, as ``/api/show`` reports it."""
        base = self.key.rsplit("/", 1)[-1].split(":", 1)[0]
        return TRAINED_CONTEXT_LENGTHS.get(base, 32768)

    @property
    def dimensions(self) -> int:
        """The length of this model's embeddings."""
        if self.dims:
            return self.dims
        base = self.key.rsplit("/", 1)[-1].split(":", 1)[0]
        if base in EMBEDDING_LENGTHS:
            return EMBEDDING_LENGTHS[base]
        return 768 if "embedding" in self.capabilities else 2048

    def details(self) -> dict[str, Any]:
        """The ``details`` object Ollama returns in tags, show and ps."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


DEFAULT_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("llama3.2:3b", 2019393189, ("completion", "tools")),
    ModelSpec("qwen3:0.6b", 522653767, ("completion", "tools", "thinking")),
    ModelSpec("smollm2:135m", 270898672, ("completion",)),
)


# Embedding lengths of well-known embedding models (their Ollama library pages).
EMBEDDING_LENGTHS = {"nomic-embed-text": 768, "all-minilm": 384, "mxbai-embed-large": 1024}
# Embedding models served with --embedding-models, with their real sizes.
EMBEDDING_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec("nomic-embed-text:latest", 274302450, ("embedding",)),
    ModelSpec("all-minilm:latest", 45960996, ("embedding",)),
)


def canonical_model_name(name: str) -> str:
    """Resolve a model name the way Ollama does: case-insensitive, ``:latest`` if untagged."""
    key = name.strip().lower()
    if key.startswith(_REGISTRY_PREFIX):
        key = key[len(_REGISTRY_PREFIX) :]
    if ":" not in key.rsplit("/", 1)[-1]:
        key += ":latest"
    return key


def _registry_name(name: str) -> str:
    # Ollama's capability errors name the model fully qualified (model.Name.String()).
    key = canonical_model_name(name)
    slashes = key.count("/")
    if slashes == 0:
        return _REGISTRY_PREFIX + key
    if slashes == 1:
        return "registry.ollama.ai/" + key
    return key


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse ``NAME[,size=BYTES][,caps=cap1+cap2][,searches=yes][,dims=N]`` (commas, since
    names contain colons).

    Raises ``ValueError`` on an empty name, a bad size, an unknown capability, a ``searches``
    other than yes or no, or a ``dims`` that is not a positive whole number.
    """
    name, *options = (part.strip() for part in spec.split(","))
    if not name:
        raise ValueError(f"model spec {spec!r} has no name")
    size = 1_000_000_000
    caps: tuple[str, ...] = ("completion",)
    searches = False
    dims = 0
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise ValueError(f"model spec option {option!r} is not KEY=VALUE")
        if key == "size":
            if not value.isdigit():
                raise ValueError(f"model size {value!r} is not a whole number of bytes")
            size = int(value)
        elif key == "caps":
            caps = tuple(cap for cap in value.split("+") if cap)
            unknown = sorted(set(caps) - set(KNOWN_CAPABILITIES))
            if unknown:
                raise ValueError(
                    f"unknown capabilities {unknown}; known: {', '.join(KNOWN_CAPABILITIES)}"
                )
        elif key == "searches":
            if value not in ("yes", "no"):
                raise ValueError(f"searches={value!r}: yes or no")
            searches = value == "yes"
        elif key == "dims":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"dims={value!r}: a positive whole number")
            dims = int(value)
        else:
            raise ValueError(f"unknown model spec option {key!r} (size, caps, searches or dims)")
    return ModelSpec(name=name, size=size, capabilities=caps, searches=searches, dims=dims)


# --------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class Reply:
    """What the emulator generates for one request.

    ``thinking`` and ``content`` are the tokens exactly as streamed, one per chunk;
    ``tool_calls`` are Ollama-shaped (``{"function": {"name", "arguments"}}``) and are
    streamed as one chunk after any thinking. ``eval_count`` is what Ollama reports as
    generated tokens: thinking plus content tokens, plus the size of any tool call.
    """

    thinking: tuple[str, ...]
    content: tuple[str, ...]
    tool_calls: tuple[dict[str, Any], ...]
    done_reason: str
    prompt_eval_count: int
    eval_count: int
    digest: str = field(repr=False)  # hex hash of the inputs the words were drawn from

    @property
    def text(self) -> str:
        """The whole reply content."""
        return "".join(self.content)

    @property
    def thinking_text(self) -> str:
        """The whole thinking text (empty when the model did not think)."""
        return "".join(self.thinking)


def _digest(*parts: Any) -> bytes:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).digest()


def _hash_bytes(seed: bytes) -> Iterator[int]:
    block = 0
    while True:
        yield from hashlib.sha256(seed + block.to_bytes(8, "big")).digest()
        block += 1


def _words(seed: bytes, vocabulary: Sequence[str], count: int) -> list[str]:
    picks = _hash_bytes(seed)
    return [f"{vocabulary[next(picks) % len(vocabulary)]}{i}" for i in range(count)]


def _spaced(words: Sequence[str]) -> list[str]:
    return [word if i == 0 else f" {word}" for i, word in enumerate(words)]


def _approx_tokens(text: str) -> int:
    # Roughly four characters per token, like the usual rule of thumb for BPE vocabularies.
    return math.ceil(len(text) / 4)


def _schema_type(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if not isinstance(kind, str):
        if "properties" in schema:
            return "object"
        return "string"
    return kind


def _value_for_schema(schema: Any, name: str, seed: bytes, depth: int = 0) -> Any:
    """A deterministic JSON value of the schema's type."""
    if not isinstance(schema, Mapping):
        schema = {}
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    number = next(_hash_bytes(_digest(seed.hex(), name)))
    kind = _schema_type(schema)
    if kind == "integer":
        return number
    if kind == "number":
        return number + 0.5
    if kind == "boolean":
        return number % 2 == 0
    if kind == "null":
        return None
    if kind == "array":
        if depth >= 4 or not isinstance(schema.get("items"), Mapping):
            return []
        return [_value_for_schema(schema["items"], f"{name}[0]", seed, depth + 1)]
    if kind == "object":
        properties = schema.get("properties")
        if depth >= 4 or not isinstance(properties, Mapping):
            return {}
        return {
            key: _value_for_schema(sub, f"{name}.{key}" if name else key, seed, depth + 1)
            for key, sub in properties.items()
        }
    word = CONTENT_WORDS[number % len(CONTENT_WORDS)]
    return f"{word}-{name}" if name else word


def _tool_call(tools: Sequence[Any], seed: bytes) -> dict[str, Any] | None:
    if not tools or not isinstance(tools[0], Mapping):
        return None
    function = tools[0].get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        return None
    parameters = function.get("parameters")
    parameters = parameters if isinstance(parameters, Mapping) else {}
    properties = parameters.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required = parameters.get("required")
    required = required if isinstance(required, list) else []
    arguments = {
        str(param): _value_for_schema(properties.get(param), str(param), seed) for param in required
    }
    return {"function": {"name": function["name"], "arguments": arguments}}


SEARCH_TOOL = "web_search"
_SEARCH_REQUEST = re.compile(r"\bsearch\b(?:\s+(?:for|the web for|about))?[\s:,]*", re.IGNORECASE)
MAX_SEARCH_QUERY_CHARS = 200


def _offers(tools: Sequence[Any] | None, name: str) -> bool:
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and function.get("name") == name:
            return True
    return False


def _search_call(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None) -> Any:
    """A searching model's ``web_search`` call for the last user message, or None when it was
    not asked to search or has no such tool."""
    last = messages[-1] if messages else {}
    text = _message_text(last)
    match = _SEARCH_REQUEST.search(text)
    if last.get("role") != "user" or match is None or not _offers(tools, SEARCH_TOOL):
        return None
    query = (text[match.end() :].strip() or text.strip())[:MAX_SEARCH_QUERY_CHARS]
    return {"function": {"name": SEARCH_TOOL, "arguments": {"query": query}}}


def _quoted_result(messages: Sequence[Mapping[str, Any]]) -> list[str] | None:
    """A searching model's answer after a tool result: its first line, quoted."""
    if not messages or messages[-1].get("role") != "tool":
        return None
    lines = _message_text(messages[-1]).strip().splitlines() or [""]
    return re.findall(r"\s*\S+", f"From the web: {lines[0].strip()}")


def _format_text(output_format: Any, words: Sequence[str], seed: bytes) -> str:
    if isinstance(output_format, Mapping):
        return json.dumps(_value_for_schema(output_format, "", seed))
    return json.dumps({"reply": " ".join(words)})


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def reply_for(
    model: str,
    *,
    messages: Sequence[Mapping[str, Any]] | None = None,
    prompt: str | None = None,
    system: str | None = None,
    context: Sequence[int] | None = None,
    think: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    output_format: str | Mapping[str, Any] | None = None,
    num_predict: int | None = None,
    reply_tokens: int = DEFAULT_REPLY_TOKENS,
    searches: bool = False,
    salt: bytes = b"",
) -> Reply:
    """Compute the emulator's reply to a chat (``messages``) or generate (``prompt``) request.

    A pure function: the words depend on the model and the conversation (role and content of
    each message, or prompt, system and context), never on the clock. ``think`` is whether
    the model thinks (already resolved: pass ``True`` for a thinking model asked without
    ``think``), and it adds thinking tokens without changing the content tokens.
    ``num_predict`` only truncates, so a truncated reply is a prefix of the full one.
    ``tools`` produce a call to the first tool when the last message is from the user;
    ``output_format`` (``"json"`` or a JSON schema) makes the content JSON text.
    ``searches``: the model of a ``searches=yes`` spec (module docstring). ``salt`` joins the
    hash the words are drawn from (``garble``: random bytes, so the reply is too).
    """
    if (messages is None) == (prompt is None):
        raise ValueError("pass exactly one of messages (chat) or prompt (generate)")
    if reply_tokens < 1:
        raise ValueError("reply_tokens must be at least 1")
    key = canonical_model_name(model)
    if messages is not None:
        conversation = [[str(m.get("role", "")), _message_text(m)] for m in messages]
        seed = _digest(key, "chat", conversation) + salt
        prompt_eval_count = sum(4 + _approx_tokens(text) for _, text in conversation)
        if tools:
            prompt_eval_count += _approx_tokens(json.dumps(list(tools), sort_keys=True))
        wants_tool = bool(tools) and bool(messages) and messages[-1].get("role") == "user"
    else:
        assert prompt is not None
        seed = _digest(key, "generate", prompt, system or "", list(context or [])) + salt
        prompt_eval_count = 4 + _approx_tokens(prompt) + len(context or [])
        if system:
            prompt_eval_count += 4 + _approx_tokens(system)
        wants_tool = False

    thinking = _spaced(_words(seed + b"think", THINKING_WORDS, math.ceil(reply_tokens / 2)))
    if not think:
        thinking = []
    words = _words(seed, CONTENT_WORDS, reply_tokens)
    quoted = None
    if searches and messages is not None:
        call = _search_call(messages, tools)
        quoted = _quoted_result(messages)
    else:
        call = _tool_call(tools or [], seed) if wants_tool else None
    if call is not None:
        content: list[str] = []
    elif quoted is not None:
        content = quoted
    elif output_format:
        content = re.findall(r"\s*\S+", _format_text(output_format, words, seed))
    else:
        content = _spaced(words)

    budget = num_predict if num_predict is not None and num_predict > 0 else None
    done_reason = "stop"
    thought = len(thinking)
    if budget is not None and call is not None:
        if budget <= thought:
            # The budget ran out while thinking, so the call was never generated.
            thinking, call, done_reason = thinking[:budget], None, "length"
    elif budget is not None and budget < thought + len(content):
        thinking, content = thinking[:budget], content[: max(0, budget - thought)]
        done_reason = "length"
    tool_calls = (call,) if call is not None else ()
    eval_count = len(thinking) + len(content)
    if call is not None:
        eval_count += max(1, _approx_tokens(json.dumps(call["function"])))
    return Reply(
        thinking=tuple(thinking),
        content=tuple(content),
        tool_calls=tool_calls,
        done_reason=done_reason,
        prompt_eval_count=prompt_eval_count,
        eval_count=eval_count,
        digest=seed.hex(),
    )


def vector_for(model: str, text: str, length: int) -> list[float]:
    """The embedding of ``text``: a unit vector of ``length`` numbers drawn from a hash of the
    model and the text, each as Ollama writes a float32 (at most nine significant digits)."""
    picks = _hash_bytes(_digest("embed", canonical_model_name(model), text))
    raw = [((next(picks) << 8 | next(picks)) - 32767.5) / 32767.5 for _ in range(length)]
    return _unit(raw)


def _unit(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(value * value for value in vector)) or 1.0
    return [float(f"{_float32(value / norm):.9g}") for value in vector]


def _float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


# --------------------------------------------------------------------------- request parsing


class _ApiError(Exception):
    """An Ollama-style error answer: ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_JSON_KIND = {dict: "object", list: "array", str: "string", bool: "bool", type(None): "null"}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return _JSON_KIND.get(type(value), "value")


def _type_error(value: Any, struct: str, path: str, go_type: str) -> _ApiError:
    # Mirrors encoding/json's wording, which is what Ollama's ShouldBindJSON returns.
    return _ApiError(
        400,
        f"json: cannot unmarshal {_json_kind(value)} into Go struct field "
        f"{struct}.{path} of type {go_type}",
    )


def _expect(body: Mapping[str, Any], struct: str, key: str, kinds: Any, go_type: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kinds):
        raise _type_error(value, struct, key, go_type)
    return value


_DURATION_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def _keep_alive_ns(value: Any) -> int | None:
    """Ollama's keep_alive: seconds as a number or a Go duration string; negative = forever.

    Returns nanoseconds, or ``None`` for "keep loaded forever".
    """
    if value is None:
        return DEFAULT_KEEP_ALIVE_NS
    if isinstance(value, int | float) and not isinstance(value, bool):
        return None if value < 0 else int(value * 1_000_000_000)
    if not isinstance(value, str):
        raise _ApiError(400, f"Unsupported type: '{_json_kind(value)}'")
    text = value.strip()
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body == "0":
        return 0
    total, position = 0.0, 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS_NS[match.group(2)]
        position = match.end()
    if not body or position != len(body):
        raise _ApiError(400, f'time: invalid duration "{value}"')
    return None if sign < 0 else int(total)


def _num_predict(options: Mapping[str, Any] | None) -> int | None:
    if not options or options.get("num_predict") is None:
        return None
    value = options["num_predict"]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise _ApiError(400, f"option num_predict must be of type integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- the server


def _go_time(ns: int | None = None) -> str:
    """A UTC timestamp the way Go's time.Time marshals it (RFC 3339, trimmed nanoseconds)."""
    stamp = time.time_ns() if ns is None else ns
    seconds, fraction = divmod(stamp, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    digits = f"{fraction:09d}".rstrip("0")
    return f"{base}.{digits}Z" if digits else f"{base}Z"


def _json_response(payload: Mapping[str, Any], status: int = 200) -> web.Response:
    # Compact like Go's encoding/json; aiohttp's default json.dumps adds spaces.
    return web.json_response(payload, status=status, dumps=_compact)


def _compact(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def _ndjson(payload: Mapping[str, Any]) -> bytes:
    return (_compact(payload) + "\n").encode()


@dataclass
class _Stats:
    counts: dict[str, int] = field(default_factory=dict)
    active: int = 0
    requests: deque[Any] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG_SIZE))

    def bump(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1


@dataclass
class _Generation:
    """A validated chat or generate request, ready to run."""

    kind: str  # "chat" or "generate"
    model: ModelSpec
    model_field: str  # the name as the client sent it, which Ollama echoes back
    stream: bool
    keep_alive_ns: int | None
    thinks: bool
    num_predict: int | None
    output_format: str | dict[str, Any] | None
    raw: bool = False
    reply: Reply | None = None  # None: no prompt or messages, so only load the model


class OllamaEmulator:
    """An in-process Ollama API server on aiohttp.

    ``port=0`` (the default here, unlike the CLI) picks a free port. ``await start()``
    returns the base URL; ``await stop()`` shuts it down. Also usable as
    ``async with OllamaEmulator(...) as emulator:``. State (counters, loaded models) is
    per instance.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        models: Sequence[ModelSpec] | None = None,
        reply_tokens: int = DEFAULT_REPLY_TOKENS,
        token_delay: float = 0.0,
        load_delay: float = 0.0,
        version: str = DEFAULT_VERSION,
        answer_as: str | None = None,
        garble: bool = False,
    ) -> None:
        if reply_tokens < 1:
            raise ValueError("reply_tokens must be at least 1")
        if token_delay < 0 or load_delay < 0:
            raise ValueError("delays cannot be negative")
        self.host = host
        self.port = port
        self.models: dict[str, ModelSpec] = {m.key: m for m in (models or DEFAULT_MODELS)}
        self.reply_tokens = reply_tokens
        self.token_delay = token_delay
        self.load_delay = load_delay
        self.version = version
        # A lying Ollama (module docstring): never by default.
        self.answer_as = answer_as
        self.garble = garble
        self.url: str | None = None
        self._stats = _Stats()
        self._loaded: dict[str, int | None] = {}  # model key -> expiry (ns) or None = forever
        self._loading: dict[str, asyncio.Task[None]] = {}  # model key -> its load under way
        self._runner: web.AppRunner | None = None

    # ----- lifecycle

    def make_app(self) -> web.Application:
        """The aiohttp application (for embedding; :meth:`start` uses it)."""
        app = web.Application(middlewares=[_error_middleware], client_max_size=64 * 1024**2)
        app.router.add_get("/", self._root)
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/show", self._show)
        app.router.add_post("/api/chat", self._chat)
        app.router.add_post("/api/generate", self._generate)
        app.router.add_post("/api/embed", self._embed)
        app.router.add_post("/api/embeddings", self._embeddings)
        app.router.add_get("/_emulator/stats", self._stats_view)
        app.router.add_post("/_emulator/reset", self._reset_view)
        app.router.add_post("/_emulator/models", self._models_view)
        return app

    async def start(self) -> str:
        """Start listening and return the base URL, e.g. ``http://127.0.0.1:43121``."""
        if self._runner is not None:
            raise RuntimeError("emulator already started")
        # handler_cancellation: a client that hangs up cancels its handler at once, even
        # mid-sleep, which is how a real disconnect is noticed during --token-delay waits.
        runner = web.AppRunner(
            self.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        """Stop listening and drop open connections (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> OllamaEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ----- observability

    def stats(self) -> dict[str, Any]:
        """Counters and the last request bodies, as served on ``GET /_emulator/stats``.

        ``<kind>_started`` counts accepted chat/generate/embed requests; each then ends as
        ``completed`` (final chunk written), ``cancelled`` (the client hung up first) or
        ``failed`` (an emulator bug). ``rejected`` counts requests answered with a 4xx error,
        ``active`` the generations in flight, and ``requests`` holds the last 100 bodies
        received on ``/api/chat``, ``/api/generate`` and ``/api/embed``, as parsed JSON, oldest
        first.
        """
        counts = {
            f"{kind}_{event}": self._stats.counts.get(f"{kind}_{event}", 0)
            for kind in ("chat", "generate", "embed")
            for event in ("started", "completed", "cancelled", "failed")
        }
        return {
            **counts,
            "rejected": self._stats.counts.get("rejected", 0),
            "active": self._stats.active,
            "requests": list(self._stats.requests),
        }

    def reset(self) -> None:
        """Zero the counters and forget logged requests (in-flight streams stay ``active``)."""
        self._stats.counts.clear()
        self._stats.requests.clear()

    def install(self, models: Sequence[ModelSpec]) -> None:
        """Replace the installed models, as pulling and removing models would; a removed
        model is unloaded."""
        self.models = {m.key: m for m in models}
        for key in [key for key in self._loaded if key not in self.models]:
            del self._loaded[key]

    def expected_reply(self, path: str, body: Mapping[str, Any]) -> Reply | None:
        """The reply this emulator gives to ``body`` posted on ``/api/chat`` or ``/api/generate``.

        Runs the server's own validation and defaults (a thinking model thinks unless
        ``think`` is false; this emulator's reply length), so it cannot disagree with what is
        served. Returns ``None`` for a load-only request (no messages or prompt) and raises
        ``ValueError("<status>: <error>")`` for a request the server would reject.
        """
        try:
            if path.rstrip("/").endswith("/api/chat"):
                return self._validate_chat(body).reply
            if path.rstrip("/").endswith("/api/generate"):
                return self._validate_generate(body).reply
        except _ApiError as exc:
            raise ValueError(f"{exc.status}: {exc.message}") from None
        raise ValueError(f"{path!r} is neither /api/chat nor /api/generate")

    # ----- plain endpoints

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return _json_response({"version": self.version})

    async def _tags(self, request: web.Request) -> web.Response:
        models = [
            {
                "name": m.name,
                "model": m.name,
                "modified_at": _go_time(_MODIFIED_AT_NS),
                "size": m.size,
                "digest": m.digest,
                "details": m.details(),
            }
            for m in self.models.values()
        ]
        return _json_response({"models": models})

    async def _ps(self, request: web.Request) -> web.Response:
        now = time.time_ns()
        forever = now + 2**63 - 1 - 1_000_000_000  # Go's time.Now().Add(math.MaxInt64)
        running = []
        for key, expires in list(self._loaded.items()):
            # Expired, or removed (``install``) while a request still used it.
            if (expires is not None and expires <= now) or key not in self.models:
                del self._loaded[key]
                continue
            running.append((expires if expires is not None else forever, self.models[key]))
        running.sort(key=lambda item: item[0], reverse=True)
        models = [
            {
                "name": m.name,
                "model": m.name,
                "size": m.size,
                "digest": m.digest,
                "details": m.details(),
                "expires_at": _go_time(expires),
                "size_vram": m.size,
                "context_length": CONTEXT_LENGTH,
            }
            for expires, m in running
        ]
        return _json_response({"models": models})

    async def _show(self, request: web.Request) -> web.Response:
        body = await _read_json(request, "ShowRequest")
        name = _expect(body, "ShowRequest", "model", str, "string") or _expect(
            body, "ShowRequest", "name", str, "string"
        )
        if not name:
            raise _ApiError(400, "model is required")
        model = self.models.get(canonical_model_name(name))
        if model is None:
            raise _ApiError(404, f"model '{name}' not found")
        arch = model.family
        template = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
        return _json_response(
            {
                "license": "",
                "modelfile": (
                    '# Modelfile generated by "ollama show"\n'
                    "# To build a new Modelfile based on this, replace FROM with:\n"
                    f"# FROM {model.name}\n\n"
                    f"FROM /emulated/blobs/sha256-{model.digest}\n"
                    f'TEMPLATE """{template}"""\n'
                ),
                "parameters": 'stop                           "<|im_end|>"',
                "template": template,
                "details": model.details(),
                "model_info": {
                    "general.architecture": arch,
                    "general.file_type": 15,
                    "general.parameter_count": model.parameter_count,
                    "general.quantization_version": 2,
                    f"{arch}.context_length": model.context_length,
                    f"{arch}.embedding_length": model.dimensions,
                    f"{arch}.block_count": 28,
                },
                "capabilities": list(model.capabilities),
                "modified_at": _go_time(_MODIFIED_AT_NS),
            }
        )

    async def _stats_view(self, request: web.Request) -> web.Response:
        return _json_response(self.stats())

    async def _reset_view(self, request: web.Request) -> web.Response:
        self.reset()
        return _json_response(self.stats())

    async def _models_view(self, request: web.Request) -> web.Response:
        body = await _read_json(request, "EmulatorModels")
        specs = body.get("models")
        if not isinstance(specs, list) or not all(isinstance(spec, str) for spec in specs):
            raise _ApiError(400, "models: a list of model specs is required")
        try:
            models = [parse_model_spec(spec) for spec in specs]
        except ValueError as exc:
            raise _ApiError(400, str(exc)) from None
        self.install(models)
        return await self._tags(request)

    # ----- generation endpoints

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        started_ns = time.perf_counter_ns()
        try:
            body = await _read_json(request, "ChatRequest")
            self._stats.requests.append(body)
            job = self._validate_chat(body)
        except _ApiError:
            self._stats.bump("rejected")
            raise
        return await self._run(request, job, started_ns)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        started_ns = time.perf_counter_ns()
        try:
            body = await _read_json(request, "GenerateRequest")
            self._stats.requests.append(body)
            job = self._validate_generate(body)
        except _ApiError:
            self._stats.bump("rejected")
            raise
        return await self._run(request, job, started_ns)

    async def _embed(self, request: web.Request) -> web.Response:
        started_ns = time.perf_counter_ns()
        struct = "EmbedRequest"
        try:
            body = await _read_json(request, struct)
            self._stats.requests.append(body)
            name = _expect(body, struct, "model", str, "string")
            model = self.models.get(canonical_model_name(name or ""))
            if model is None:
                raise _ApiError(404, f"model '{name or ''}' not found")
            raw = body.get("input")
            if isinstance(raw, list) and all(isinstance(text, str) for text in raw):
                texts = raw
            elif isinstance(raw, str) or raw is None:
                texts = [raw] if raw else []
            else:
                raise _ApiError(400, "invalid input type")
            truncate = _expect(body, struct, "truncate", bool, "*bool")
            dimensions = body.get("dimensions")
            if dimensions is not None and (
                isinstance(dimensions, bool) or not isinstance(dimensions, int)
            ):
                raise _type_error(dimensions, struct, "dimensions", "int")
            _expect(body, struct, "options", dict, "map[string]interface {}")
            keep_alive_ns = _keep_alive_ns(body.get("keep_alive"))
        except _ApiError:
            self._stats.bump("rejected")
            raise
        embeddings, tokens, load_ns = await self._run_embed(
            model, texts, truncate is not False, dimensions or 0, keep_alive_ns
        )
        payload: dict[str, Any] = {"model": name, "embeddings": embeddings}
        if texts:
            payload["total_duration"] = max(time.perf_counter_ns() - started_ns, 1)
            payload["load_duration"] = max(load_ns, 1)
            payload["prompt_eval_count"] = tokens
        return _json_response(payload)

    async def _embeddings(self, request: web.Request) -> web.Response:
        """Ollama's older ``/api/embeddings``: one ``prompt``, one vector."""
        struct = "EmbeddingRequest"
        try:
            body = await _read_json(request, struct)
            self._stats.requests.append(body)
            model, _name = self._resolve(body, struct)
            prompt = _expect(body, struct, "prompt", str, "string")
            _expect(body, struct, "options", dict, "map[string]interface {}")
            keep_alive_ns = _keep_alive_ns(body.get("keep_alive"))
        except _ApiError:
            self._stats.bump("rejected")
            raise
        texts = [prompt] if prompt else []
        embeddings, _tokens, _load_ns = await self._run_embed(model, texts, True, 0, keep_alive_ns)
        return _json_response({"embedding": embeddings[0] if embeddings else []})

    async def _run_embed(
        self,
        model: ModelSpec,
        texts: Sequence[str],
        truncate: bool,
        dimensions: int,
        keep_alive_ns: int | None,
    ) -> tuple[list[list[float]], int, int]:
        """The vectors of ``texts``, their token count and the load time (nanoseconds)."""
        self._stats.bump("embed_started")
        self._stats.active += 1
        self._loaded[model.key] = self._expiry(keep_alive_ns)
        outcome = "failed"
        try:
            load_ns = await self._pause(self.load_delay)
            embeddings, tokens = [], 0
            for text in texts:
                count = _approx_tokens(text)
                if count > CONTEXT_LENGTH:
                    if not truncate:
                        raise _ApiError(400, "the input length exceeds the context length")
                    text, count = text[: CONTEXT_LENGTH * 4], CONTEXT_LENGTH
                vector = vector_for(model.name, text, model.dimensions)
                if 0 < dimensions < len(vector):
                    vector = _unit(vector[:dimensions])
                embeddings.append(vector)
                tokens += count
            outcome = "completed"
            return embeddings, tokens, load_ns
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._stats.active -= 1
            self._stats.bump(f"embed_{outcome}")
            if keep_alive_ns == 0:
                self._loaded.pop(model.key, None)
            else:
                self._loaded[model.key] = self._expiry(keep_alive_ns)

    def _resolve(self, body: Mapping[str, Any], struct: str) -> tuple[ModelSpec, str]:
        name = _expect(body, struct, "model", str, "string")
        if not name:
            raise _ApiError(400, "model is required")
        model = self.models.get(canonical_model_name(name))
        if model is None:
            raise _ApiError(404, f'model "{name}" not found, try pulling it first')
        return model, name

    def _check_think(self, model: ModelSpec, name: str, think: Any) -> bool:
        """Ollama's thinking rules; returns whether the model will think."""
        if "thinking" not in model.capabilities:
            if think:
                raise _ApiError(400, f"{json.dumps(name)} does not support thinking")
            return False
        if isinstance(think, str):
            # String levels are only for gpt-oss (harmony) models, which we do not emulate.
            raise _ApiError(400, f"think value {json.dumps(think)} is not supported for this model")
        # A thinking model thinks unless told not to (Ollama sets think=true when unset).
        return think is None or bool(think)

    def _validate_common(self, body: Mapping[str, Any], struct: str) -> _Generation:
        """Checks shared by chat and generate, in Ollama's order; the reply is filled later."""
        model, name = self._resolve(body, struct)
        stream = _expect(body, struct, "stream", bool, "bool")
        think = _expect(body, struct, "think", (bool, str), "api.ThinkValue")
        options = _expect(body, struct, "options", dict, "map[string]interface {}")
        output_format = _expect(body, struct, "format", (str, dict), "json.RawMessage")
        if isinstance(output_format, str) and output_format not in ("", "json"):
            raise _ApiError(
                400,
                f"invalid format: {json.dumps(output_format)}; "
                'expected "json" or a valid JSON Schema object',
            )
        return _Generation(
            kind="chat" if struct == "ChatRequest" else "generate",
            model=model,
            model_field=name,
            stream=stream is not False,
            keep_alive_ns=_keep_alive_ns(body.get("keep_alive")),
            thinks=self._check_think(model, name, think),
            num_predict=_num_predict(options),
            output_format=output_format or None,
        )

    def _validate_chat(self, body: Mapping[str, Any]) -> _Generation:
        struct = "ChatRequest"
        messages = _expect(body, struct, "messages", list, "[]api.Message")
        for message in messages or []:
            if not isinstance(message, dict):
                raise _type_error(message, struct, "messages", "api.Message")
            for key in ("role", "content", "thinking"):
                value = message.get(key)
                if value is not None and not isinstance(value, str):
                    raise _type_error(value, struct, f"messages.{key}", "string")
        tools = _expect(body, struct, "tools", list, "api.Tools")
        job = self._validate_common(body, struct)
        if tools and "tools" not in job.model.capabilities:
            raise _ApiError(400, f"{_registry_name(job.model_field)} does not support tools")
        if "completion" not in job.model.capabilities:
            raise _ApiError(400, f"{json.dumps(job.model_field)} does not support chat")
        if messages:
            job.reply = reply_for(
                self.answer_as or job.model.name,
                messages=messages,
                think=job.thinks,
                tools=tools,
                output_format=job.output_format,
                num_predict=job.num_predict,
                reply_tokens=self.reply_tokens,
                searches=job.model.searches,
                salt=self._salt(),
            )
        return job

    def _validate_generate(self, body: Mapping[str, Any]) -> _Generation:
        struct = "GenerateRequest"
        prompt = _expect(body, struct, "prompt", str, "string")
        system = _expect(body, struct, "system", str, "string")
        raw = _expect(body, struct, "raw", bool, "bool")
        context = _expect(body, struct, "context", list, "[]int")
        for token in context or []:
            if isinstance(token, bool) or not isinstance(token, int):
                raise _type_error(token, struct, "context", "int")
        job = self._validate_common(body, struct)
        job.raw = bool(raw)
        if raw and (system or context or body.get("template")):
            raise _ApiError(400, "raw mode does not support template, system, or context")
        if "completion" not in job.model.capabilities:
            raise _ApiError(400, f"{json.dumps(job.model_field)} does not support generate")
        if prompt:
            job.reply = reply_for(
                self.answer_as or job.model.name,
                prompt=prompt,
                system=system,
                context=context,
                think=job.thinks,
                output_format=job.output_format,
                num_predict=job.num_predict,
                reply_tokens=self.reply_tokens,
                salt=self._salt(),
            )
        return job

    def _salt(self) -> bytes:
        return os.urandom(16) if self.garble else b""

    # ----- running a generation

    async def _run(
        self, request: web.Request, job: _Generation, started_ns: int
    ) -> web.StreamResponse:
        self._stats.bump(f"{job.kind}_started")
        self._stats.active += 1
        key = job.model.key
        outcome = "failed"
        try:
            if job.reply is None and job.keep_alive_ns == 0:
                response = self._done_only(job, "unload")
                await self._send_whole(request, response)
            else:
                load_ns = await self._load(job)
                if job.reply is None:
                    response = self._done_only(job, "load")
                    await self._send_whole(request, response)
                elif job.stream:
                    response = await self._stream(request, job, started_ns, load_ns)
                else:
                    response = await self._collect(request, job, started_ns, load_ns)
            outcome = "completed"
            return response
        except _Disconnected as exc:
            # A write found the connection gone; aiohttp copes with getting the response back.
            outcome = "cancelled"
            return exc.response
        except asyncio.CancelledError:
            # handler_cancellation: the client hung up while we were waiting.
            outcome = "cancelled"
            raise
        finally:
            self._stats.active -= 1
            self._stats.bump(f"{job.kind}_{outcome}")
            # Like Ollama, the model stays keep_alive from the end of its last request.
            if job.keep_alive_ns == 0:
                self._loaded.pop(key, None)
            elif key in self._loaded:
                self._loaded[key] = self._expiry(job.keep_alive_ns)

    @staticmethod
    def _expiry(keep_alive_ns: int | None) -> int | None:
        return None if keep_alive_ns is None else time.time_ns() + keep_alive_ns

    def _is_loaded(self, key: str) -> bool:
        if key not in self._loaded:
            return False
        expires = self._loaded[key]
        return expires is None or expires > time.time_ns()

    async def _load(self, job: _Generation) -> int:
        """Wait until the model is loaded: a loaded model is ready at once, otherwise loading
        takes ``load_delay``. Requests that arrive while it loads wait for the same load, and a
        load goes on when the request that started it hangs up, as in Ollama. Returns the
        nanoseconds waited (reported as ``load_duration``)."""
        began = time.perf_counter_ns()
        key = job.model.key
        if self._is_loaded(key):
            await asyncio.sleep(0)  # yield, so that concurrent streams interleave
        else:
            loading = self._loading.get(key)
            if loading is None:
                loading = asyncio.ensure_future(self._load_model(key, job.keep_alive_ns))
                self._loading[key] = loading
            await asyncio.shield(loading)
        return time.perf_counter_ns() - began

    async def _load_model(self, key: str, keep_alive_ns: int | None) -> None:
        try:
            await asyncio.sleep(self.load_delay)
            self._loaded[key] = self._expiry(keep_alive_ns)
        finally:
            self._loading.pop(key, None)

    async def _pause(self, seconds: float) -> int:
        began = time.perf_counter_ns()
        # Even with no delay, yield so that many concurrent streams interleave like real ones.
        await asyncio.sleep(seconds)
        return time.perf_counter_ns() - began

    @staticmethod
    async def _send_whole(request: web.Request, response: web.StreamResponse) -> None:
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionResetError as exc:
            raise _Disconnected(response) from exc

    def _done_only(self, job: _Generation, reason: str) -> web.Response:
        if job.kind == "chat":
            payload: dict[str, Any] = {
                "model": job.model_field,
                "created_at": _go_time(),
                "message": {"role": "assistant", "content": ""},
                "done_reason": reason,
                "done": True,
            }
        else:
            payload = {
                "model": job.model_field,
                "created_at": _go_time(),
                "response": "",
                "done": True,
                "done_reason": reason,
            }
        return _json_response(payload)

    def _pieces(self, job: _Generation) -> list[dict[str, Any]]:
        """One entry per streamed chunk before the final one."""
        reply = job.reply
        assert reply is not None
        pieces: list[dict[str, Any]] = [{"thinking": token} for token in reply.thinking]
        pieces += [{"content": token} for token in reply.content]
        if reply.tool_calls:
            pieces.append({"tool_calls": list(reply.tool_calls)})
        return pieces

    def _chunk(self, job: _Generation, piece: Mapping[str, Any]) -> dict[str, Any]:
        if job.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": piece.get("content", "")}
            if piece.get("thinking"):
                message["thinking"] = piece["thinking"]
            if piece.get("tool_calls"):
                message["tool_calls"] = piece["tool_calls"]
            return {
                "model": job.model_field,
                "created_at": _go_time(),
                "message": message,
                "done": False,
            }
        chunk: dict[str, Any] = {
            "model": job.model_field,
            "created_at": _go_time(),
            "response": piece.get("content", ""),
        }
        if piece.get("thinking"):
            chunk["thinking"] = piece["thinking"]
        chunk["done"] = False
        return chunk

    def _final(
        self,
        job: _Generation,
        whole: Mapping[str, Any],
        started_ns: int,
        load_ns: int,
        eval_ns: int,
    ) -> dict[str, Any]:
        reply = job.reply
        assert reply is not None
        prompt_eval_ns = max(1, reply.prompt_eval_count) * 50_000  # ~20k prompt tokens/s
        eval_ns = max(eval_ns, reply.eval_count * 1_000, 1)  # never zero: clients divide by it
        total_ns = max(time.perf_counter_ns() - started_ns, load_ns + prompt_eval_ns + eval_ns)
        stats = {
            "total_duration": total_ns,
            "load_duration": max(load_ns, 1),
            "prompt_eval_count": reply.prompt_eval_count,
            "prompt_eval_duration": prompt_eval_ns,
            "eval_count": reply.eval_count,
            "eval_duration": eval_ns,
        }
        if job.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": whole.get("content", "")}
            if whole.get("thinking"):
                message["thinking"] = whole["thinking"]
            if whole.get("tool_calls"):
                message["tool_calls"] = whole["tool_calls"]
            return {
                "model": job.model_field,
                "created_at": _go_time(),
                "message": message,
                "done_reason": reply.done_reason,
                "done": True,
                **stats,
            }
        final: dict[str, Any] = {
            "model": job.model_field,
            "created_at": _go_time(),
            "response": whole.get("content", ""),
        }
        if whole.get("thinking"):
            final["thinking"] = whole["thinking"]
        final["done"] = True
        final["done_reason"] = reply.done_reason
        if not job.raw:
            final["context"] = _context_tokens(reply)
        final.update(stats)
        return final

    async def _stream(
        self, request: web.Request, job: _Generation, started_ns: int, load_ns: int
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        response.enable_chunked_encoding()
        eval_began = time.perf_counter_ns()
        try:
            for piece in self._pieces(job):
                await self._pause(self.token_delay)
                # Like Go's net/http, headers leave with the first chunk, after the load.
                if not response.prepared:
                    await response.prepare(request)
                await response.write(_ndjson(self._chunk(job, piece)))
            eval_ns = time.perf_counter_ns() - eval_began
            if not response.prepared:
                await response.prepare(request)
            await response.write(_ndjson(self._final(job, {}, started_ns, load_ns, eval_ns)))
        except ConnectionResetError as exc:
            raise _Disconnected(response) from exc
        try:
            await response.write_eof()
        except ConnectionResetError:
            pass  # the final chunk went out; a hang-up now is not a cancellation
        return response

    async def _collect(
        self, request: web.Request, job: _Generation, started_ns: int, load_ns: int
    ) -> web.StreamResponse:
        reply = job.reply
        assert reply is not None
        eval_began = time.perf_counter_ns()
        for _ in self._pieces(job):
            await self._pause(self.token_delay)
        eval_ns = time.perf_counter_ns() - eval_began
        whole = {
            "content": reply.text,
            "thinking": reply.thinking_text,
            "tool_calls": list(reply.tool_calls),
        }
        response = _json_response(self._final(job, whole, started_ns, load_ns, eval_ns))
        await self._send_whole(request, response)
        return response


class _Disconnected(ConnectionResetError):
    """The client hung up mid-response; carries the response aiohttp should finish."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client disconnected")
        self.response = response


def _context_tokens(reply: Reply) -> list[int]:
    # Ollama's deprecated `context` is the token ids of prompt plus reply; ours are stand-ins.
    picks = _hash_bytes(bytes.fromhex(reply.digest) + b"context")
    count = reply.prompt_eval_count + reply.eval_count
    return [(next(picks) << 8 | next(picks)) + 1 for _ in range(count)]


async def _read_json(request: web.Request, struct: str) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        raise _ApiError(400, "missing request body")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _ApiError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise _ApiError(
            400, f"json: cannot unmarshal {_json_kind(body)} into Go value of type api.{struct}"
        )
    return body


@web.middleware
async def _error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except _ApiError as exc:
        return _json_response({"error": exc.message}, status=exc.status)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        # Ollama's gin router answers unknown routes and methods with a plain 404.
        return web.Response(status=404, text="404 page not found")


# --------------------------------------------------------------------------- CLI


def _model_arg(spec: str) -> ModelSpec:
    try:
        return parse_model_spec(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number of seconds")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.emulator",
        description="Serve Ollama's HTTP API with deterministic fake models.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=11434, help="port; 0 picks a free one")
    parser.add_argument("--version", default=DEFAULT_VERSION, help="version for /api/version")
    parser.add_argument(
        "--token-delay", type=_non_negative, default=0.0, help="seconds before each token"
    )
    parser.add_argument(
        "--load-delay",
        type=_non_negative,
        default=0.0,
        help="seconds a request for a model that is not loaded waits before its first token "
        "(reported as load_duration); a loaded model stays keep_alive (default 5m) after its "
        "last request, as /api/ps shows",
    )
    parser.add_argument(
        "--reply-tokens",
        type=_positive_int,
        default=DEFAULT_REPLY_TOKENS,
        help="natural reply length in tokens",
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        type=_model_arg,
        metavar="SPEC",
        help="NAME[,size=BYTES][,caps=cap1+cap2][,searches=yes][,dims=N]; repeatable; "
        "replaces the default models",
    )
    parser.add_argument(
        "--answer-as",
        metavar="MODEL",
        help="a mislabelled model, for tests of probes: answer every request as MODEL would",
    )
    parser.add_argument(
        "--garble",
        action="store_true",
        help="a garbling node, for tests of probes: answer random words, never the same twice",
    )
    parser.add_argument(
        "--embedding-models",
        action="store_true",
        help="also serve nomic-embed-text:latest and all-minilm:latest (embeddings only)",
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    emulator = OllamaEmulator(
        host=args.host,
        port=args.port,
        models=[
            *(args.models or DEFAULT_MODELS),
            *(EMBEDDING_MODELS if args.embedding_models else ()),
        ],
        reply_tokens=args.reply_tokens,
        token_delay=args.token_delay,
        load_delay=args.load_delay,
        version=args.version,
        answer_as=args.answer_as,
        garble=args.garble,
    )
    url = await emulator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await emulator.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator until SIGTERM or SIGINT; returns the process exit status."""
    args = _parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"emulator: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
