"""HTTP adapters for consumers: parse, check, call one service, answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from idleclaw_site import shutdown
from idleclaw_site.db import db
from nodes import worker
from routing import metrics, ollama_api, openai_api, selectors
from routing.limits import rate_limited, request_ip
from routing.streaming import RelayError, TooMany, Unavailable, collect, open_relay, sse_chat
from routing.validation import BadRequest, check_model, parse_chat_request, parse_json_object

STARTED = time.monotonic()
STARTED_WALL = time.time()


class EventStream(StreamingHttpResponse):
    """A streamed answer whose parts are bytes ready to write. ``idleclaw_site.asgi.APIHandler``
    sends each part as it is, without Django's three generator layers per part; anything else
    that serves it (the test client) reads it as a ``StreamingHttpResponse``."""

    def __init__(self, parts: AsyncIterator[bytes], content_type: str) -> None:
        super().__init__(parts, content_type=content_type)
        self.parts = parts


def event_stream(body: AsyncIterator[bytes], content_type: str = "text/event-stream"):
    response = EventStream(body, content_type)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


def json_error(body: dict[str, Any], status: int, *, retry: bool = False) -> JsonResponse:
    """An error answer; ``retry`` adds the operator's ``Retry-After`` (busy, limited)."""
    response = JsonResponse(body, status=status)
    if retry:
        response["Retry-After"] = str(settings.IDLECLAW_RETRY_AFTER)
    return response


def detail(status: int, message: str, *, retry: bool = False) -> JsonResponse:
    """The network's own error shape (PROTOCOL §2)."""
    return json_error({"detail": message}, status, retry=retry)


def _method_not_allowed(allowed: str) -> JsonResponse:
    response = detail(405, f"method not allowed; use {allowed}")
    response["Allow"] = allowed
    return response


@csrf_exempt
@rate_limited("chat")
async def chat(request: HttpRequest) -> HttpResponse:
    """``POST /api/chat``: stream an answer from a node as Server-Sent Events."""
    if request.method != "POST":
        return _method_not_allowed("POST")
    try:
        chat_request = parse_chat_request(request.body)
    except BadRequest as error:
        return detail(error.status, error.detail)
    # think is always explicit: Ollama lets a thinking model think when it is left out.
    params: dict[str, Any] = {
        "model": chat_request.model,
        "messages": chat_request.messages,
        "stream": True,
        "think": chat_request.think,
    }
    chunks = await open_relay(
        model=chat_request.model,
        ollama_params=params,
        client_ip=request_ip(request),
        tool_status=True,
        api=metrics.API_CHAT,
    )
    if isinstance(chunks, TooMany):
        return detail(429, chunks.message, retry=True)
    if isinstance(chunks, Unavailable):
        return detail(503, chunks.message, retry=True)
    return event_stream(sse_chat(chunks, model=chat_request.model))


@rate_limited("default")
async def health(request: HttpRequest) -> HttpResponse:
    """``GET /health``: liveness and the size of the network."""
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed("GET")
    await worker.ensure_started()
    numbers = await db(selectors.network_health)()
    # A router shutting down says so with a 503, so a proxy's health check takes it out.
    draining = shutdown.draining()
    return JsonResponse(
        {
            "status": "draining" if draining else "healthy",
            "uptime_seconds": int(time.monotonic() - STARTED),
            "version": settings.IDLECLAW_VERSION,
            **numbers,
        },
        status=503 if draining else 200,
    )


@rate_limited("default")
async def models(request: HttpRequest) -> HttpResponse:
    """``GET /api/models``: models at least one live node serves, largest first."""
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed("GET")
    await worker.ensure_started()
    infos = await db(selectors.network_models)()
    queues = await db(selectors.queue_lengths)()
    return JsonResponse(
        {
            "models": [info.name for info in infos],
            "capabilities": {
                info.name: {
                    "thinking": "thinking" in info.capabilities,
                    "tool_calls": "tools" in info.capabilities,
                }
                for info in infos
            },
            "details": {
                info.name: {
                    "size": info.size,
                    "nodes": info.nodes,
                    "free_slots": info.free_slots,
                    "queued": queues.get(info.name, 0),
                }
                for info in infos
            },
        }
    )


# --- OpenAI-compatible API (/v1) -------------------------------------------------------------


def openai_error(error: openai_api.OpenAIError, *, retry: bool = False) -> JsonResponse:
    return json_error(error.body(), error.status, retry=retry)


@csrf_exempt
@rate_limited("chat")
async def openai_chat_completions(request: HttpRequest) -> HttpResponse:
    """``POST /v1/chat/completions``, streaming or not. ``Authorization`` is accepted and
    ignored: the network has no keys."""
    if request.method != "POST":
        return openai_error(openai_api.OpenAIError("use POST", status=405))
    try:
        completion = openai_api.parse_completion_request(request.body)
    except openai_api.OpenAIError as error:
        return openai_error(error)
    chunks = await open_relay(
        model=completion.model,
        ollama_params=completion.ollama_params,
        client_ip=request_ip(request),
        stream=completion.stream,
        api=metrics.API_OPENAI,
    )
    if isinstance(chunks, TooMany):
        error = openai_api.OpenAIError(
            chunks.message, status=429, code="too_many_requests", kind="rate_limit_error"
        )
        return openai_error(error, retry=True)
    if isinstance(chunks, Unavailable):
        error = openai_api.OpenAIError(
            chunks.message, status=503, param="model", code="model_unavailable",
            kind="service_unavailable",
        )
        return openai_error(error, retry=True)
    if completion.stream:
        return event_stream(
            openai_api.completion_stream(
                chunks, model=completion.model, include_usage=completion.include_usage
            )
        )
    try:
        answer = await collect(chunks)
    except RelayError as error:
        restarting = error.code == shutdown.RESTARTING
        failure = openai_api.OpenAIError(
            error.message, status=503 if restarting else 502, code=error.code,
            kind="service_unavailable" if restarting else "server_error",
        )
        return openai_error(failure, retry=restarting)
    return JsonResponse(openai_api.completion_body(answer, model=completion.model))


def _openai_model(info: selectors.ModelInfo) -> dict[str, Any]:
    return {
        "id": info.name, "object": "model", "created": int(STARTED_WALL), "owned_by": "idleclaw",
    }


@rate_limited("default")
async def openai_models(request: HttpRequest) -> HttpResponse:
    """``GET /v1/models``: models live nodes serve."""
    if request.method not in ("GET", "HEAD"):
        return openai_error(openai_api.OpenAIError("use GET", status=405))
    await worker.ensure_started()
    infos = await db(selectors.network_models)()
    return JsonResponse({"object": "list", "data": [_openai_model(info) for info in infos]})


@rate_limited("default")
async def openai_model(request: HttpRequest, model: str) -> HttpResponse:
    """``GET /v1/models/{id}``."""
    if request.method not in ("GET", "HEAD"):
        return openai_error(openai_api.OpenAIError("use GET", status=405))
    await worker.ensure_started()
    info = await db(selectors.model_info)(model=model)
    if info is None:
        return openai_error(openai_api.OpenAIError(
            f"The model '{model}' is not served by any node right now", status=404,
            param="model", code="model_not_found",
        ))
    return JsonResponse(_openai_model(info))


# --- Ollama-compatible API (/ollama) ---------------------------------------------------------


def ollama_error(status: int, message: str, *, retry: bool = False) -> JsonResponse:
    return json_error({"error": message}, status, retry=retry)


@rate_limited("default")
async def ollama_root(request: HttpRequest) -> HttpResponse:
    return HttpResponse("Ollama is running", content_type="text/plain; charset=utf-8")


@rate_limited("default")
async def ollama_version(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"version": settings.IDLECLAW_OLLAMA_VERSION})


@rate_limited("default")
async def ollama_tags(request: HttpRequest) -> HttpResponse:
    await worker.ensure_started()
    infos = await db(selectors.network_models)()
    return JsonResponse(ollama_api.tags_body(infos))


@rate_limited("default")
async def ollama_ps(request: HttpRequest) -> HttpResponse:
    await worker.ensure_started()
    infos = await db(selectors.network_models)()
    return JsonResponse(ollama_api.ps_body(infos))


@csrf_exempt
@rate_limited("default")
async def ollama_show(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return ollama_error(405, "method not allowed")
    try:
        data = parse_json_object(request.body)
        model = check_model(data.get("model") or data.get("name"))
    except BadRequest as error:
        return ollama_error(400, error.detail)
    await worker.ensure_started()
    info = await db(selectors.model_info)(model=model)
    if info is None:
        return ollama_error(404, f"model '{model}' not found")
    return JsonResponse(ollama_api.show_body(info))


async def _ollama_answer(request: HttpRequest, *, chat: bool) -> HttpResponse:
    if request.method != "POST":
        return ollama_error(405, "method not allowed")
    parse = ollama_api.parse_chat if chat else ollama_api.parse_generate
    try:
        parsed = parse(request.body)
    except BadRequest as error:
        return ollama_error(400, error.detail)
    if parsed.load_only:
        await worker.ensure_started()
        if await db(selectors.model_info)(model=parsed.model) is None:
            return ollama_error(404, f'model "{parsed.model}" not found, try pulling it first')
        return JsonResponse(ollama_api.load_body(parsed.model, chat=chat))
    chunks = await open_relay(
        model=parsed.model,
        ollama_params=parsed.ollama_params,
        client_ip=request_ip(request),
        stream=parsed.stream,
        api=metrics.API_OLLAMA,
    )
    if isinstance(chunks, TooMany):
        return ollama_error(429, chunks.message, retry=True)
    if isinstance(chunks, Unavailable):
        if chunks.restarting:
            return ollama_error(503, chunks.message, retry=True)
        if not chunks.served:
            return ollama_error(404, f'model "{parsed.model}" not found, try pulling it first')
        # Ollama's own words when its queue is full.
        return ollama_error(503, "server busy, please try again.  maximum pending requests "
                            "exceeded", retry=True)
    if parsed.stream:
        lines = ollama_api.ndjson_chat if chat else ollama_api.ndjson_generate
        return event_stream(lines(chunks, model=parsed.model), "application/x-ndjson")
    try:
        answer = await collect(chunks)
    except RelayError as error:
        if error.code == shutdown.RESTARTING:
            return ollama_error(503, error.message, retry=True)
        return ollama_error(502, error.message)
    body = ollama_api.chat_body if chat else ollama_api.generate_body
    return JsonResponse(body(answer, model=parsed.model))


@csrf_exempt
@rate_limited("chat")
async def ollama_chat(request: HttpRequest) -> HttpResponse:
    return await _ollama_answer(request, chat=True)


@csrf_exempt
@rate_limited("chat")
async def ollama_generate(request: HttpRequest) -> HttpResponse:
    return await _ollama_answer(request, chat=False)


@csrf_exempt
@rate_limited("default")
async def ollama_unsupported(request: HttpRequest) -> HttpResponse:
    """Model management belongs to each contributor's own Ollama, not to the network."""
    return ollama_error(501, f"{request.path.removeprefix('/ollama')} is not supported by the "
                        "IdleClaw network; models are managed by each contributor")


# --- Errors outside any view -----------------------------------------------------------------


def error_for_path(path: str, status: int, message: str) -> JsonResponse:
    """An error in the shape of the API that ``path`` belongs to."""
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return openai_error(openai_api.OpenAIError(message, status=status, kind=kind))
    if path.startswith("/ollama/"):
        return ollama_error(status, message)
    return detail(status, message)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if isinstance(exception, RequestDataTooBig):
        return error_for_path(request.path, 413, "request body is too large")
    return error_for_path(request.path, 400, "bad request")


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return error_for_path(request.path, 404, f"no such endpoint: {request.path}")


def server_error(request: HttpRequest) -> HttpResponse:
    return error_for_path(request.path, 500, "internal error; it has been logged")
