"""Ollama's own API over the network (``OLLAMA_HOST=http://<router>/ollama``): request checks
and the NDJSON and JSON shapes the official ``ollama`` client reads."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from routing.embeddings import Embeddings, vector_parts
from routing.selectors import ModelInfo
from routing.streaming import Answer, Events, Queued, RelayError, dumps
from routing.validation import (
    BadRequest,
    check_compat_messages,
    check_dimensions,
    check_embed_inputs,
    check_format,
    check_model,
    check_options,
    check_tools,
    embed_params,
    parse_json_object,
)

THINK_LEVELS = ("low", "medium", "high")


@dataclass(frozen=True)
class OllamaRequest:
    model: str
    ollama_params: dict[str, Any]
    stream: bool
    # /api/chat with no messages or /api/generate with no prompt only loads the model, as in
    # Ollama; with a keep_alive of zero it unloads it.
    load_only: bool = False
    unload: bool = False


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise BadRequest(f"{where}: must be a list", 400)
    calls = []
    for index, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"{where}[{index}].function: needs a name", 400)
        arguments = function.get("arguments", {})
        if not isinstance(arguments, dict):
            raise BadRequest(f"{where}[{index}].function.arguments: must be an object", 400)
        calls.append({"function": {"name": function["name"], "arguments": arguments}})
    return calls


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("messages: must be a list", 400)
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where}: must be an object", 400)
        if message.get("images"):
            raise BadRequest(f"{where}.images: images are not supported by this network", 400)
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content: must be a string", 400)
        converted: dict[str, Any] = {"role": message.get("role"), "content": content}
        if message.get("tool_calls"):
            converted["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        if isinstance(message.get("tool_name"), str):
            converted["tool_name"] = message["tool_name"]
        messages.append(converted)
    return messages


# A Go duration as Ollama parses keep_alive (time.ParseDuration): "0", or numbers with units.
# A number has one way to match a run of digits: with ``\d+\.?\d*`` a near-miss such as
# "11111s" * 10 + "111x" tried every split of every run, ten seconds of the event loop (red-team
# C1 of issue 19).
_GO_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_GO_DURATION = re.compile(
    rf"[+-]?(?:0|(?:(?:{_GO_NUMBER.pattern})(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+)"
)


def check_keep_alive(value: Any) -> str | int | float | None:
    """``keep_alive`` as Ollama reads it: a number of seconds or a Go duration string; None when
    absent. Anything else is a 400 here, as at Ollama: sent on, a node's Ollama would refuse
    it, and a consumer could make honest nodes fail with it (red-team C1 of issue 19)."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            return value
    elif isinstance(value, str) and len(value) <= 64 and _GO_DURATION.fullmatch(value):
        return value
    raise BadRequest("keep_alive: a number of seconds or a duration such as \"5m\"", 400)


def _is_zero_duration(value: Any) -> bool:
    """Whether Ollama reads ``keep_alive`` as zero: a number of seconds below a nanosecond
    (negative means forever), or a duration string whose every number is zero."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return 0 <= value < 1e-9
    if isinstance(value, str) and len(value) <= 64 and _GO_DURATION.fullmatch(value):
        return all(float(number) == 0 for number in _GO_NUMBER.findall(value))
    return False


def _common(data: dict[str, Any]) -> tuple[str, dict[str, Any], bool]:
    model = check_model(data.get("model") or data.get("name"))
    params: dict[str, Any] = {"model": model, "stream": True}
    think = data.get("think")
    if think is not None:
        if not isinstance(think, bool) and think not in THINK_LEVELS:
            raise BadRequest('think: true, false, or one of "low", "medium", "high"', 400)
        params["think"] = think
    options = check_options(data.get("options"))
    if options:
        params["options"] = options
    output_format = check_format(data.get("format"))
    if output_format is not None:
        params["format"] = output_format
    keep_alive = check_keep_alive(data.get("keep_alive"))
    if keep_alive is not None:
        params["keep_alive"] = keep_alive
    stream = data.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise BadRequest("stream: must be true or false", 400)
    return model, params, stream


def parse_chat(body: bytes) -> OllamaRequest:
    """Check an Ollama ``/api/chat`` body."""
    data = parse_json_object(body)
    model, params, stream = _common(data)
    messages = _messages(data.get("messages"))
    if not messages:
        return OllamaRequest(
            model=model,
            ollama_params=params,
            stream=stream,
            load_only=True,
            unload=_is_zero_duration(data.get("keep_alive")),
        )
    params["messages"] = check_compat_messages(messages)
    tools = check_tools(data.get("tools"))
    if tools:
        params["tools"] = tools
    return OllamaRequest(model=model, ollama_params=params, stream=stream)


def parse_generate(body: bytes) -> OllamaRequest:
    """Check an Ollama ``/api/generate`` body; the node answers it as a chat."""
    data = parse_json_object(body)
    model, params, stream = _common(data)
    if data.get("images"):
        raise BadRequest("images: images are not supported by this network", 400)
    prompt = data.get("prompt") or ""
    system = data.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise BadRequest("prompt and system: must be strings", 400)
    if not prompt:
        return OllamaRequest(
            model=model,
            ollama_params=params,
            stream=stream,
            load_only=True,
            unload=_is_zero_duration(data.get("keep_alive")),
        )
    messages = [{"role": "user", "content": prompt}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    params["messages"] = check_compat_messages(messages)
    return OllamaRequest(model=model, ollama_params=params, stream=stream)


def _final_fields(chunk: dict[str, Any]) -> dict[str, Any]:
    fields = {"done_reason": chunk.get("done_reason", "stop")}
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration"):
        if key in chunk:
            fields[key] = chunk[key]
    return fields


def _chat_lines(chunk: dict[str, Any], model: str) -> list[dict[str, Any]]:
    message = chunk["message"]
    if not chunk["done"]:
        return [{"model": model, "created_at": now_rfc3339(),
                 "message": {"content": "", **message}, "done": False}]
    lines = []
    if message.get("content") or message.get("thinking"):
        # Ollama's final line carries no text; text that came with the node's last chunk
        # goes on a line of its own first.
        text = {k: v for k, v in message.items() if k in ("role", "content", "thinking")}
        lines.append({"model": model, "created_at": now_rfc3339(),
                      "message": {"content": "", **text}, "done": False})
    final_message = {"role": "assistant", "content": "", **{
        k: v for k, v in message.items() if k not in ("role", "content", "thinking")}}
    lines.append({"model": model, "created_at": now_rfc3339(), "message": final_message,
                  "done": True, **_final_fields(chunk)})
    return lines


def _generate_lines(chunk: dict[str, Any], model: str) -> list[dict[str, Any]]:
    message = chunk["message"]
    line: dict[str, Any] = {"model": model, "created_at": now_rfc3339(),
                            "response": message.get("content", "")}
    if "thinking" in message:
        line["thinking"] = message["thinking"]
    line["done"] = chunk["done"]
    if chunk["done"]:
        line.update(_final_fields(chunk))
    return [line]


async def _ndjson(
    chunks: Events, model: str, lines_of: Callable[[dict[str, Any], str], list[dict[str, Any]]]
) -> AsyncIterator[bytes]:
    try:
        async for batch in chunks:
            if isinstance(batch, Queued):
                continue  # NDJSON has no comment lines; Ollama clients would choke
            # One write for all the chunks that arrived together.
            yield "".join(
                dumps(line) + "\n" for chunk in batch for line in lines_of(chunk, model)
            ).encode()
    except RelayError as error:
        # An error after the stream started is a last line of its own, as Ollama writes it.
        yield (dumps({"error": error.message}) + "\n").encode()


def ndjson_chat(chunks: Events, *, model: str) -> AsyncIterator[bytes]:
    """Ollama's streaming ``/api/chat`` lines."""
    return _ndjson(chunks, model, _chat_lines)


def ndjson_generate(chunks: Events, *, model: str) -> AsyncIterator[bytes]:
    """Ollama's streaming ``/api/generate`` lines, made from the node's chat chunks."""
    return _ndjson(chunks, model, _generate_lines)


def chat_body(answer: Answer, *, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.thinking:
        message["thinking"] = answer.thinking
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    return {"model": model, "created_at": now_rfc3339(), "message": message, "done": True,
            **_final_fields({"done_reason": answer.done_reason, **answer.stats})}


def generate_body(answer: Answer, *, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "created_at": now_rfc3339(),
                            "response": answer.content}
    if answer.thinking:
        body["thinking"] = answer.thinking
    body["done"] = True
    body.update(_final_fields({"done_reason": answer.done_reason, **answer.stats}))
    return body


def load_body(model: str, *, chat: bool, unload: bool = False) -> dict[str, Any]:
    """What Ollama answers to a request with no messages or prompt: the model is loaded, or with
    ``keep_alive`` zero unloaded (the same fields, ``done_reason`` "unload"). Each node's Ollama
    loads and unloads its models itself; the answer only tells the client that it may go on."""
    body: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
    if chat:
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    return {**body, "done": True, "done_reason": "unload" if unload else "load"}


def _details(info: ModelInfo) -> dict[str, Any]:
    """Ollama's ``details`` of a model: what its nodes reported (``ModelInfo.details``), else
    a family guessed from the name."""
    reported = info.details
    family = reported.get("family") or info.name.split(":", 1)[0].rstrip("0123456789.")
    return {
        "parent_model": "",
        "format": reported.get("format", "gguf"),
        "family": family,
        "families": reported.get("families", [family]),
        "parameter_size": reported.get("parameter_size", ""),
        "quantization_level": reported.get("quantization_level", ""),
    }


def _digest(name: str) -> str:
    # The router does not know the node's blob digest; a stable stand-in per name.
    return hashlib.sha256(name.encode()).hexdigest()


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def tags_body(infos: list[ModelInfo]) -> dict[str, Any]:
    now = now_rfc3339()
    return {"models": [{"name": info.name, "model": info.name, "modified_at": now,
                        "size": info.size, "digest": _digest(info.name),
                        "details": _details(info), "capabilities": capabilities_of(info)}
                       for info in infos]}


def ps_body(infos: list[ModelInfo]) -> dict[str, Any]:
    """The models loaded on at least one live node, as their heartbeats said, one entry per
    model with the latest expiry, latest first as Ollama lists them; a model being generated
    with right now is loaded too, even on a node that does not report it."""
    now = datetime.now(UTC)
    running = [
        (info.loaded_until or now, info)
        for info in infos
        if info.loaded_until is not None or info.active
    ]
    running.sort(key=lambda item: item[0], reverse=True)
    models = []
    for expires_at, info in running:
        entry = {
            "name": info.name,
            "model": info.name,
            "size": max(info.size, info.size_vram),
            "size_vram": info.size if info.loaded_until is None else info.size_vram,
            "digest": _digest(info.name),
            "details": _details(info),
            "expires_at": _rfc3339(expires_at),
        }
        if "context_length" in info.details:
            entry["context_length"] = info.details["context_length"]
        models.append(entry)
    return {"models": models}


def capabilities_of(info: ModelInfo) -> list[str]:
    """Ollama's capabilities of a model: ``completion`` first, which nodes that report no
    capabilities are assumed to have, unless it is an embedding model."""
    others = sorted(c for c in info.capabilities if c != "completion")
    if "embedding" in info.capabilities and "completion" not in info.capabilities:
        return others
    return ["completion", *others]


def show_body(info: ModelInfo) -> dict[str, Any]:
    model_info: dict[str, Any] = {}
    family = info.details.get("family")
    if family:
        # Ollama's keys: the architecture, and its numbers under the architecture's name.
        model_info["general.architecture"] = family
        if "context_length" in info.details:
            model_info[f"{family}.context_length"] = info.details["context_length"]
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": _details(info),
        "model_info": model_info,
        "capabilities": capabilities_of(info),
        "modified_at": now_rfc3339(),
    }


# --- Embeddings (/api/embed and the older /api/embeddings) -------------------------------------


@dataclass(frozen=True)
class OllamaEmbedRequest:
    model: str
    # None when there is nothing to embed: Ollama then only loads the model and answers an empty
    # list, and so does the router, without asking a node.
    embed_params: dict[str, Any] | None


def _embed_common(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    model = check_model(data.get("model"))
    extra: dict[str, Any] = {}
    options = check_options(data.get("options"))
    if options:
        extra["options"] = options
    keep_alive = check_keep_alive(data.get("keep_alive"))
    if keep_alive is not None:
        extra["keep_alive"] = keep_alive
    return model, extra


def parse_embed(body: bytes) -> OllamaEmbedRequest:
    """Check an Ollama ``/api/embed`` body: ``input`` a string or a list of strings,
    ``truncate``, ``dimensions``, ``options``, ``keep_alive``."""
    data = parse_json_object(body)
    model, extra = _embed_common(data)
    raw = data.get("input")
    if raw is None or raw == "":
        texts = []
    elif isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        texts = raw
    else:
        raise BadRequest("invalid input type", 400)  # Ollama's words
    truncate = data.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise BadRequest("truncate: must be true or false", 400)
    dimensions = data.get("dimensions")
    if isinstance(dimensions, int) and not isinstance(dimensions, bool) and dimensions <= 0:
        dimensions = None  # Ollama ignores a length that is not positive
    dimensions = check_dimensions(dimensions)
    if not texts:
        return OllamaEmbedRequest(model=model, embed_params=None)
    params = embed_params(model=model, texts=check_embed_inputs(texts), truncate=truncate,
                          dimensions=dimensions, **extra)
    return OllamaEmbedRequest(model=model, embed_params=params)


def parse_embeddings(body: bytes) -> OllamaEmbedRequest:
    """Check a body of Ollama's older ``/api/embeddings``: one ``prompt``."""
    data = parse_json_object(body)
    model, extra = _embed_common(data)
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest("prompt: must be a string", 400)
    if not prompt:
        return OllamaEmbedRequest(model=model, embed_params=None)
    params = embed_params(model=model, texts=check_embed_inputs([prompt], param="prompt"),
                          **extra)
    return OllamaEmbedRequest(model=model, embed_params=params)


def embed_parts(answer: Embeddings, *, model: str) -> AsyncIterator[bytes]:
    """Ollama's ``/api/embed`` answer, a few vectors per write."""
    stats = "".join(f",{dumps(key)}:{value}" for key, value in answer.stats.items() if value)
    return vector_parts(
        answer.vectors,
        lambda index, vector: dumps(vector),
        head=f'{{"model":{dumps(model)},"embeddings":[',
        tail=f"]{stats}}}",
    )
