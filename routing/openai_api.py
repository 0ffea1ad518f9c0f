"""OpenAI's chat completions API over the network: request mapping to Ollama parameters and the
response shapes the official ``openai`` client expects.

Field mapping (OpenAI → Ollama): ``max_tokens``/``max_completion_tokens`` → ``options.num_predict``;
``temperature, top_p, seed, stop, frequency_penalty, presence_penalty`` → ``options``;
``response_format`` → ``format``; ``tools`` pass through; ``reasoning_effort`` → ``think``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from nodes.protocol import strict_loads
from routing.embeddings import Embeddings, float32_base64, vector_parts
from routing.streaming import (
    Answer,
    Events,
    RelayError,
    dumps,
    finish_reason_of,
    sse_writes,
    usage_of,
)
from routing.validation import (
    BadRequest,
    check_compat_messages,
    check_dimensions,
    check_embed_inputs,
    check_format,
    check_model,
    check_stop,
    check_tools,
    embed_params,
    parse_json_object,
)

NUMBER_RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
}


class OpenAIError(BadRequest):
    """A request error in OpenAI's shape; ``param`` names the offending field."""

    def __init__(self, detail: str, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(detail, status)
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.detail, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    ollama_params: dict[str, Any]
    stream: bool
    include_usage: bool


def _param_of(detail: str) -> str | None:
    head = detail.split(":", 1)[0]
    return head if head and " " not in head else None


def _text_of(content: Any, where: str) -> str:
    """OpenAI content: a string, null, or a list of parts of which only text is supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise OpenAIError(f"{where}: only text content parts are supported",
                                  param=where)
            text = part.get("text")
            if not isinstance(text, str):
                raise OpenAIError(f"{where}: a text part needs a string text", param=where)
            texts.append(text)
        return "".join(texts)
    raise OpenAIError(f"{where}: must be a string or a list of text parts", param=where)


def _tool_calls_to_ollama(calls: Any, where: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    if not isinstance(calls, list):
        raise OpenAIError(f"{where}: must be a list", param=where)
    converted, names = [], {}
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise OpenAIError(f"{where}[{index}].function: needs a name", param=where)
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = strict_loads(arguments)
            except (ValueError, RecursionError):
                raise OpenAIError(f"{where}[{index}].function.arguments: not valid JSON",
                                  param=where) from None
        if not isinstance(arguments, dict):
            raise OpenAIError(f"{where}[{index}].function.arguments: must be a JSON object",
                              param=where)
        converted.append({"function": {"name": function["name"], "arguments": arguments}})
        if isinstance(call.get("id"), str):
            names[call["id"]] = function["name"]
    return converted, names


def _messages_to_ollama(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise OpenAIError("messages: a non-empty list is required", param="messages")
    messages: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise OpenAIError(f"{where}: must be an object", param=where)
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for system
            role = "system"
        converted: dict[str, Any] = {
            "role": role,
            "content": _text_of(message.get("content"), f"{where}.content"),
        }
        if role == "assistant" and message.get("tool_calls"):
            calls, names = _tool_calls_to_ollama(message["tool_calls"], f"{where}.tool_calls")
            converted["tool_calls"] = calls
            call_names.update(names)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if isinstance(call_id, str) and call_id in call_names:
                converted["tool_name"] = call_names[call_id]
            elif isinstance(call_id, str) and call_names:
                raise OpenAIError(f"{where}.tool_call_id: no earlier tool call {call_id!r}",
                                  param=f"{where}.tool_call_id")
        messages.append(converted)
    return messages


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OpenAIError(f"{key}: must be a number", param=key)
    low, high = NUMBER_RANGES[key]
    if not low <= value <= high:
        raise OpenAIError(f"{key}: must be between {low:g} and {high:g}", param=key)
    return value


def _integer(data: dict[str, Any], key: str, minimum: int | None = None) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise OpenAIError(f"{key}: must be an integer", param=key)
    if minimum is not None and value < minimum:
        raise OpenAIError(f"{key}: must be at least {minimum}", param=key)
    return value


def _format_of(value: Any) -> str | dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise OpenAIError("response_format: must be an object", param="response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise OpenAIError("response_format.json_schema.schema: a JSON schema is required",
                              param="response_format")
        return check_format(schema, param="response_format")
    raise OpenAIError("response_format.type: one of text, json_object, json_schema",
                      param="response_format")


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Check an OpenAI ``/v1/chat/completions`` body and map it to Ollama's parameters."""
    try:
        data = parse_json_object(body)
        model = check_model(data.get("model"))
        messages = _messages_to_ollama(data.get("messages"))
        messages = check_compat_messages(messages)
        tools = check_tools(data.get("tools"))
        stop = data.get("stop")
        stop = check_stop(stop) if stop is not None else None
    except OpenAIError:
        raise
    except BadRequest as error:
        raise OpenAIError(error.detail, status=400, param=_param_of(error.detail)) from None
    n = _integer(data, "n", minimum=1)
    if n is not None and n != 1:
        raise OpenAIError("n: only 1 choice is supported", param="n")
    options: dict[str, Any] = {}
    max_tokens = _integer(data, "max_completion_tokens", 1) or _integer(data, "max_tokens", 1)
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    for key in NUMBER_RANGES:
        value = _number(data, key)
        if value is not None:
            options[key] = value
    seed = _integer(data, "seed")
    if seed is not None:
        options["seed"] = seed
    if stop:
        options["stop"] = stop
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError("stream: must be true or false", param="stream")
    stream_options = data.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise OpenAIError("stream_options: must be an object", param="stream_options")
    params: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
    if options:
        params["options"] = options
    if tools and data.get("tool_choice") != "none":
        params["tools"] = tools
    output_format = _format_of(data.get("response_format"))
    if output_format is not None:
        params["format"] = output_format
    effort = data.get("reasoning_effort")
    if effort is not None:
        if effort not in ("none", "minimal", "low", "medium", "high"):
            raise OpenAIError("reasoning_effort: one of none, minimal, low, medium, high",
                              param="reasoning_effort")
        params["think"] = effort != "none"
    return CompletionRequest(
        model=model,
        ollama_params=params,
        stream=stream,
        include_usage=stream_options.get("include_usage") is True,
    )


def _openai_tool_calls(
    calls: list[dict[str, Any]], *, indexed: bool, first: int = 0
) -> list[dict[str, Any]]:
    """Ollama's tool calls in OpenAI's shape; streamed ones numbered from ``first``: clients
    merge the deltas that share an ``index``, so the numbering runs across the whole stream."""
    converted = []
    for index, call in enumerate(calls, start=first):
        function = call["function"]
        arguments = function.get("arguments", {})
        entry: dict[str, Any] = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {
                "name": function["name"],
                "arguments": arguments if isinstance(arguments, str) else dumps(arguments),
            },
        }
        if indexed:
            entry = {"index": index, **entry}
        converted.append(entry)
    return converted


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(answer: Answer, *, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object for a non-streaming request."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.content or None}
    if answer.thinking:
        message["reasoning_content"] = answer.thinking
        message["reasoning"] = answer.thinking
    if answer.tool_calls:
        message["tool_calls"] = _openai_tool_calls(answer.tool_calls, indexed=False)
    elif message["content"] is None:
        message["content"] = ""
    final = {"done_reason": answer.done_reason, **answer.stats}
    usage = usage_of(final) or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_idleclaw",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason_of(final, bool(answer.tool_calls)),
            }
        ],
        "usage": usage,
    }


async def completion_stream(
    chunks: Events, *, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` events: the role first, then deltas, ``finish_reason`` on the
    last choice chunk, an optional usage chunk, then ``[DONE]``."""
    head = (
        f'{{"id":"{completion_id()}","object":"chat.completion.chunk",'
        f'"created":{int(time.time())},"model":{dumps(model)},'
        f'"system_fingerprint":"fp_idleclaw","choices":'
    )
    usage_tail = ',"usage":null}' if include_usage else "}"

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = f'[{{"index":0,"delta":{dumps(delta)},"logprobs":null,"finish_reason":' \
                 f"{dumps(finish)}}}]"
        return f"data: {head}{choice}{usage_tail}\n\n".encode()

    # The event of most tokens, event({"content": text}), assembled around the text alone.
    content_open = f'data: {head}[{{"index":0,"delta":{{"content":'.encode()
    content_close = f'}},"logprobs":null,"finish_reason":null}}]{usage_tail}\n\n'.encode()

    yield event({"role": "assistant", "content": ""})
    calls_seen = 0

    def render(chunk: dict[str, Any]) -> Iterator[bytes]:
        nonlocal calls_seen
        message = chunk["message"]
        if "thinking" in message:
            thinking = message["thinking"]
            yield event({"reasoning_content": thinking, "reasoning": thinking})
        if "content" in message:
            yield content_open + dumps(message["content"]).encode() + content_close
        if "tool_calls" in message:
            calls = _openai_tool_calls(message["tool_calls"], indexed=True, first=calls_seen)
            calls_seen += len(calls)
            yield event({"tool_calls": calls})
        if chunk["done"]:
            yield event({}, finish_reason_of(chunk, calls_seen > 0))
            if include_usage:
                usage = usage_of(chunk) or {
                    "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                }
                yield f"data: {head}[],\"usage\":{dumps(usage)}}}\n\n".encode()

    try:
        async for part in sse_writes(chunks, render):
            yield part
    except RelayError as error:
        # The openai client raises APIError on an event that carries "error".
        body = {"error": {"message": error.message, "type": "server_error", "param": None,
                          "code": error.code}}
        yield f"data: {dumps(body)}\n\n".encode()
    yield b"data: [DONE]\n\n"


# --- Embeddings (/v1/embeddings) ---------------------------------------------------------------

TOKEN_IDS_REFUSED = (
    "input: arrays of token ids are not supported; send the text itself. LangChain's "
    "OpenAIEmbeddings sends token ids unless created with check_embedding_ctx_length=False"
)


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    embed_params: dict[str, Any]
    base64: bool


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_ids(value: Any) -> bool:
    """A token id, or a non-empty list of them."""
    if isinstance(value, list):
        return bool(value) and all(_is_token_id(item) for item in value)
    return _is_token_id(value)


def _embedding_texts(value: Any) -> list[str]:
    """OpenAI's ``input``: a string or an array of strings (token ids are refused)."""
    if isinstance(value, str):
        if not value:
            raise OpenAIError("input: cannot be an empty string", param="input")
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return value
        if _is_token_ids(value) or all(_is_token_ids(item) for item in value):
            raise OpenAIError(TOKEN_IDS_REFUSED, param="input")
    raise OpenAIError("input: a non-empty string or array of strings is required",
                      param="input")


def parse_embedding_request(body: bytes) -> EmbeddingRequest:
    """Check an OpenAI ``/v1/embeddings`` body; ``user`` is accepted and ignored."""
    try:
        data = parse_json_object(body)
        model = check_model(data.get("model"))
    except BadRequest as error:
        raise OpenAIError(error.detail, status=error.status if error.status != 422 else 400,
                          param=_param_of(error.detail)) from None
    texts = _embedding_texts(data.get("input"))
    encoding = data.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise OpenAIError("encoding_format: float or base64", param="encoding_format")
    try:
        dimensions = check_dimensions(data.get("dimensions"))
        params = embed_params(model=model, texts=check_embed_inputs(texts),
                              dimensions=dimensions)
    except BadRequest as error:
        raise OpenAIError(error.detail, param=_param_of(error.detail.split("[", 1)[0])) from None
    return EmbeddingRequest(model=model, embed_params=params, base64=encoding == "base64")


def embedding_parts(answer: Embeddings, *, model: str, base64: bool) -> AsyncIterator[bytes]:
    """The ``list`` of ``embedding`` objects, a few vectors per write; with ``base64`` each
    vector is little-endian float32 in base64, as OpenAI sends it."""
    tokens = answer.prompt_tokens
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}

    def render(index: int, vector: list[float]) -> str:
        embedding = dumps(float32_base64(vector)) if base64 else dumps(vector)
        return f'{{"object":"embedding","index":{index},"embedding":{embedding}}}'

    return vector_parts(
        answer.vectors,
        render,
        head='{"object":"list","data":[',
        tail=f'],"model":{dumps(model)},"usage":{dumps(usage)}}}',
    )
