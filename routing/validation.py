"""Checks on consumer input (PROTOCOL §2). Bad input becomes a ``BadRequest`` with the status
and a ``detail`` that says what is wrong; nothing here raises anything else."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from nodes.protocol import (
    MAX_EMBED_DIMENSIONS,
    MAX_FRAME_BYTES,
    MAX_JSON_DEPTH,
    MAX_MODEL_NAME_CHARS,
    depth_of,
    embed_request_text,
    strict_loads,
    valid_model_name,
    valid_unicode,
)

MAX_MODEL_CHARS = MAX_MODEL_NAME_CHARS
MAX_MESSAGES = 50
MAX_CONTENT_CHARS = 10_000
MAX_TOTAL_CHARS = 100_000
MAX_BODY_BYTES = 1_000_000
CHAT_ROLES = ("user", "assistant")


def message_limit() -> int:
    """Messages a consumer may send: the operator's system prompt, if any, takes one of the
    50 a node accepts."""
    return MAX_MESSAGES - (1 if settings.IDLECLAW_SYSTEM_PROMPT else 0)


class BadRequest(Exception):
    def __init__(self, detail: str, status: int = 422) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    think: bool = False


def parse_json_object(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"request body is larger than {MAX_BODY_BYTES} bytes", 413)
    if not body:
        raise BadRequest("request body is empty; expected a JSON object", 400)
    try:
        data = strict_loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON (or nested too deeply)", 400) from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", 400)
    return data


def check_model(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest("model: a non-empty string is required")
    if len(value) > MAX_MODEL_CHARS:
        raise BadRequest(f"model: at most {MAX_MODEL_CHARS} characters")
    if not valid_model_name(value):
        raise BadRequest("model: only letters, digits and . _ : / - are allowed")
    return value


def check_messages(value: Any, *, roles: tuple[str, ...]) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages: a non-empty list is required")
    if len(value) > message_limit():
        raise BadRequest(f"messages: at most {message_limit()} messages")
    total = 0
    clean: list[dict[str, str]] = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where}: must be an object with role and content")
        role = message.get("role")
        if role not in roles:
            raise BadRequest(f"{where}.role: must be one of {', '.join(roles)}")
        content = message.get("content")
        if not isinstance(content, str) or not content:
            raise BadRequest(f"{where}.content: a non-empty string is required")
        if len(content) > MAX_CONTENT_CHARS:
            raise BadRequest(f"{where}.content: at most {MAX_CONTENT_CHARS} characters")
        total += len(content)
        clean.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"messages: at most {MAX_TOTAL_CHARS} characters of content in all")
    return clean


def parse_chat_request(body: bytes) -> ChatRequest:
    """The network's own ``POST /api/chat`` body."""
    data = parse_json_object(body)
    model = check_model(data.get("model"))
    messages = check_messages(data.get("messages"), roles=CHAT_ROLES)
    think = data.get("think", False)
    if think is None:
        think = False
    if not isinstance(think, bool):
        raise BadRequest("think: must be true or false")
    return ChatRequest(model=model, messages=messages, think=think)


# --- The compatible APIs (OpenAI, Ollama) ----------------------------------------------------

MAX_TOOLS = 32
MAX_TOOLS_JSON_CHARS = 32_000
MAX_STOP_SEQUENCES = 4
# The largest context a node may advertise (nodes.protocol.MAX_CONTEXT_LENGTH): far beyond any
# model's window, small enough that no arithmetic on it overflows on the way to the runner.
MAX_NUM_CTX = 2**27
# Ollama options a consumer may set; the rest (GPU placement, threads, memory mapping) are the
# contributor's business.
OPTION_KEYS = (
    "num_predict", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "repeat_penalty",
    "repeat_last_n", "frequency_penalty", "presence_penalty", "num_ctx", "typical_p", "mirostat",
    "mirostat_eta", "mirostat_tau", "tfs_z", "num_keep", "penalize_newline",
)


def check_tools(value: Any, *, param: str = "tools") -> list[dict[str, Any]] | None:
    """Function tools in OpenAI's (and Ollama's) shape: ``{"type": "function", "function":
    {"name", "description"?, "parameters"?}}``."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise BadRequest(f"{param}: must be a list", 400)
    if len(value) > MAX_TOOLS:
        raise BadRequest(f"{param}: at most {MAX_TOOLS} tools", 400)
    tools = []
    for index, tool in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise BadRequest(f"{where}: only function tools are supported", 400)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise BadRequest(f"{where}.function: an object is required", 400)
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise BadRequest(f"{where}.function.name: 1-64 letters, digits, _ . or -", 400)
        clean = {"name": name}
        if isinstance(function.get("description"), str):
            clean["description"] = function["description"]
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise BadRequest(f"{where}.function.parameters: must be a JSON schema object", 400)
            check_depth(parameters, f"{where}.function.parameters")
            clean["parameters"] = parameters
        if function.get("strict") is True:
            # The router holds the node's calls to this schema (routing.tool_calls); the node's
            # Ollama never sees the flag.
            clean["strict"] = True
        tools.append({"type": "function", "function": clean})
    if len(json.dumps(tools)) > MAX_TOOLS_JSON_CHARS:
        raise BadRequest(f"{param}: at most {MAX_TOOLS_JSON_CHARS} characters of JSON", 400)
    return tools or None


def check_compat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Limits and role rules for messages already converted to Ollama's shape.

    ``system`` and ``tool`` are allowed because standard clients send them (unless the operator
    narrowed ``IDLECLAW_COMPAT_ROLES``); a ``tool`` message must answer a ``tool_calls`` of an
    earlier assistant message in the same request.
    """
    roles = settings.IDLECLAW_COMPAT_ROLES
    if not messages:
        raise BadRequest("messages: a non-empty list is required", 400)
    limit = message_limit()
    if len(messages) > limit:
        raise BadRequest(f"messages: at most {limit} messages", 400)
    total = 0
    calls_seen: set[str] = set()
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role")
        if role not in roles:
            raise BadRequest(
                f"{where}.role: {role!r} is not accepted; this network accepts "
                f"{', '.join(roles)}",
                400,
            )
        content = message.get("content", "")
        if len(content) > MAX_CONTENT_CHARS:
            raise BadRequest(f"{where}.content: at most {MAX_CONTENT_CHARS} characters", 400)
        total += len(content)
        if role == "assistant":
            for call in message.get("tool_calls", ()):
                calls_seen.add(call["function"]["name"])
        elif role == "tool":
            if not calls_seen:
                raise BadRequest(
                    f"{where}: a tool message must answer an earlier assistant tool_calls", 400
                )
            name = message.get("tool_name")
            if name is not None and name not in calls_seen:
                raise BadRequest(f"{where}: no earlier tool call named {name!r}", 400)
        elif not content and role != "assistant":
            raise BadRequest(f"{where}.content: a non-empty string is required", 400)
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"messages: at most {MAX_TOTAL_CHARS} characters of content in all", 400)
    return messages


def check_options(value: Any, *, param: str = "options") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{param}: must be an object", 400)
    clean = {}
    for key in OPTION_KEYS:
        # null is "not set", as Ollama reads it: LangChain's OllamaEmbeddings sends every
        # option it knows, most of them null.
        if value.get(key) is not None:
            option = value[key]
            if key == "stop":
                clean[key] = check_stop(option, param=f"{param}.stop")
            elif isinstance(option, bool) or not isinstance(option, int | float):
                if key == "penalize_newline" and isinstance(option, bool):
                    clean[key] = option
                    continue
                raise BadRequest(f"{param}.{key}: must be a number", 400)
            elif key == "num_ctx" and not (
                isinstance(option, int) and 1 <= option <= MAX_NUM_CTX
            ):
                # Ollama reads it into an integer; 0 or less would reach its runner as is.
                raise BadRequest(f"{param}.num_ctx: a whole number from 1 to {MAX_NUM_CTX}", 400)
            else:
                clean[key] = option
    return clean


def check_depth(value: Any, param: str) -> None:
    if depth_of(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BadRequest(f"{param}: nested more than {MAX_JSON_DEPTH} levels deep", 400)


def check_stop(value: Any, *, param: str = "stop") -> list[str]:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, list)
        or len(value) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and 0 < len(s) <= 100 for s in value)
    ):
        raise BadRequest(
            f"{param}: a string or a list of up to {MAX_STOP_SEQUENCES} strings", 400
        )
    return value


def check_format(value: Any, *, param: str = "format") -> str | dict[str, Any] | None:
    if value is None or value == "":
        return None
    if value == "json" or isinstance(value, dict):
        if isinstance(value, dict):
            check_depth(value, param)
            if len(json.dumps(value)) > MAX_TOOLS_JSON_CHARS:
                raise BadRequest(f"{param}: schema too large", 400)
        return value
    raise BadRequest(f'{param}: must be "json" or a JSON schema object', 400)


# --- Embeddings (/v1/embeddings, /ollama/api/embed) ---------------------------------------------


def check_embed_inputs(texts: list[str], *, param: str = "input") -> list[str]:
    """Texts to embed: 1..IDLECLAW_EMBED_MAX_INPUTS non-empty strings of at most
    IDLECLAW_EMBED_MAX_CHARS characters in all."""
    if not texts:
        raise BadRequest(f"{param}: at least one text to embed is required", 400)
    most = settings.IDLECLAW_EMBED_MAX_INPUTS
    if len(texts) > most:
        raise BadRequest(f"{param}: at most {most} inputs in one request; send several", 400)
    total = 0
    for index, text in enumerate(texts):
        if not text:
            raise BadRequest(f"{param}[{index}]: an empty string cannot be embedded", 400)
        total += len(text)
    chars = settings.IDLECLAW_EMBED_MAX_CHARS
    if total > chars:
        raise BadRequest(
            f"{param}: at most {chars} characters in all ({total} sent); send fewer or shorter "
            "inputs per request",
            400,
        )
    return [valid_unicode(text) for text in texts]


def check_dimensions(value: Any, *, param: str = "dimensions") -> int | None:
    """A requested vector length: a positive integer. Beyond MAX_EMBED_DIMENSIONS it asks for
    nothing (no node returns a longer vector), so it is not passed on."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{param}: must be a positive integer", 400)
    return value if value <= MAX_EMBED_DIMENSIONS else None


# The longest request id the router sends: the frame is measured with it.
_LONGEST_REQUEST_ID = "x" * 64


def embed_params(
    *,
    model: str,
    texts: list[str],
    truncate: bool | None = None,
    dimensions: int | None = None,
    keep_alive: Any = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a node is sent for an embedding request (``embed_request.embed_params``), refused
    with a 400 when it would not fit the 100,000-byte frame it travels in (text with many
    escaped or non-Latin characters takes more bytes than characters)."""
    params: dict[str, Any] = {"model": model, "input": texts}
    if truncate is not None:
        params["truncate"] = truncate
    if dimensions is not None:
        params["dimensions"] = dimensions
    if keep_alive is not None:
        params["keep_alive"] = keep_alive
    if options:
        params["options"] = options
    size = len(embed_request_text(_LONGEST_REQUEST_ID, params).encode("utf-8"))
    if size > MAX_FRAME_BYTES:
        raise BadRequest(
            f"input: {size} bytes once encoded, more than the {MAX_FRAME_BYTES} a node takes in "
            "one request; send fewer or shorter inputs per request",
            400,
        )
    return params
