"""HTTP adapters for consumers: parse, check, call one service, answer."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from idleclaw_site import shutdown
from idleclaw_site.db import db
from nodes import worker
from routing import metrics, ollama_api, openai_api, probes, selectors
from routing.embeddings import embed
from routing.limits import rate_limited, request_ip
from routing.services import OverLimit
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


def over_limit_message(over: OverLimit, names: Mapping[str, str]) -> str:
    """Why a request over the nodes' caps is refused, naming the limit in the words of the
    API it came through (``names`` maps ``num_ctx``/``num_predict`` to them)."""
    if not over.option:
        return (
            f"{names['num_ctx']} and {names['num_predict']}: no node serving {over.model} "
            "allows both this large at once; lower one of them"
        )
    return (
        f"{names[over.option]}: at most {over.limit} for {over.model} on this network "
        "(the largest any node serving it allows)"
    )


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
        consumer=request.consumer,
        tool_status=True,
        api=metrics.API_CHAT,
    )
    if isinstance(chunks, TooMany):
        return detail(429, chunks.message, retry=True)
    if isinstance(chunks, Unavailable):
        return detail(503, chunks.message, retry=True)
    if isinstance(chunks, OverLimit):  # not today: this API sets no options
        return detail(400, over_limit_message(chunks, OLLAMA_OPTION_NAMES))
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
                    # An embedding-only model cannot chat (the chat page leaves it out).
                    "chat": "completion" in ollama_api.capabilities_of(info),
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


@rate_limited("default")
async def network_nodes(request: HttpRequest) -> HttpResponse:
    """``GET /api/network/nodes``: the live nodes by contributor name, with their models,
    measured speed, reputation band and requests served; never addresses or node ids."""
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed("GET")
    await worker.ensure_started()
    return JsonResponse(await db(selectors.network_nodes)())


# --- OpenAI-compatible API (/v1) -------------------------------------------------------------


def openai_error(error: openai_api.OpenAIError, *, retry: bool = False) -> JsonResponse:
    return json_error(error.body(), error.status, retry=retry)


def openai_relay_error(error: RelayError) -> JsonResponse:
    """A whole answer that failed, in OpenAI's shape (``RelayError.status``)."""
    kinds = {400: "invalid_request_error", 503: "service_unavailable"}
    failure = openai_api.OpenAIError(
        error.message, status=error.status, code=error.code,
        kind=kinds.get(error.status, "server_error"),
    )
    return openai_error(failure, retry=error.status == 503)


def openai_model_not_found(model: str) -> JsonResponse:
    """404 ``model_not_found`` for a model no live node serves, as OpenAI answers for a model it
    does not have: the OpenAI SDKs raise ``NotFoundError`` at once instead of retrying."""
    return openai_error(
        openai_api.OpenAIError(
            f"The model '{model}' is not served by any node right now",
            status=404,
            param="model",
            code="model_not_found",
        )
    )


# The router's own chat page sends this (webchat/static/webchat/api.js) to keep the network's
# contract (PROTOCOL §2) on /v1: a model no node serves is a 503 with Retry-After, as on
# /api/chat, which the page counts down before it offers to retry.
NETWORK_CONTRACT_HEADER = "X-IdleClaw-Contract"


def wants_network_contract(request: HttpRequest) -> bool:
    return request.headers.get(NETWORK_CONTRACT_HEADER) == "network"


# The Ollama options a node may cap, as each API calls them (the OpenAI API has no num_ctx).
OPENAI_OPTION_NAMES = {"num_ctx": "num_ctx", "num_predict": "max_tokens"}
OLLAMA_OPTION_NAMES = {"num_ctx": "options.num_ctx", "num_predict": "options.num_predict"}


def openai_refusal(
    refusal: TooMany | Unavailable | OverLimit, *, network: bool = False
) -> JsonResponse:
    """Why a relay could not start, in OpenAI's shape: 429 over the client's limit, 400 over
    every node's caps, 404 for a model no node serves (503 under the network's contract), else
    503 (busy, or restarting) with ``Retry-After``."""
    if isinstance(refusal, OverLimit):
        message = over_limit_message(refusal, OPENAI_OPTION_NAMES)
        param = OPENAI_OPTION_NAMES.get(refusal.option)
        return openai_error(openai_api.OpenAIError(message, status=400, param=param))
    if isinstance(refusal, TooMany):
        error = openai_api.OpenAIError(
            refusal.message, status=429, code="too_many_requests", kind="rate_limit_error"
        )
        return openai_error(error, retry=True)
    if not refusal.served and not network:
        return openai_model_not_found(refusal.model)
    error = openai_api.OpenAIError(
        refusal.message,
        status=503,
        param="model",
        code="model_unavailable",
        kind="service_unavailable",
    )
    return openai_error(error, retry=True)


@csrf_exempt
@rate_limited("chat")
async def openai_chat_completions(request: HttpRequest) -> HttpResponse:
    """``POST /v1/chat/completions``, streaming or not. ``Authorization`` names the consumer
    when it holds an IdleClaw key or contributor token; any other key is accepted and ignored
    (``routing.identity``)."""
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
        consumer=request.consumer,
        stream=completion.stream,
        api=metrics.API_OPENAI,
    )
    if isinstance(chunks, TooMany | Unavailable | OverLimit):
        return openai_refusal(chunks, network=wants_network_contract(request))
    if completion.stream:
        return event_stream(
            openai_api.completion_stream(
                chunks, model=completion.model, include_usage=completion.include_usage
            )
        )
    try:
        answer = await collect(chunks)
    except RelayError as error:
        return openai_relay_error(error)
    return JsonResponse(openai_api.completion_body(answer, model=completion.model))


def _openai_model(info: selectors.ModelInfo) -> dict[str, Any]:
    # ``capabilities`` is ours (Ollama's names): how a client tells an embedding model.
    model: dict[str, Any] = {
        "id": info.name,
        "object": "model",
        "created": int(STARTED_WALL),
        "owned_by": "idleclaw",
        "capabilities": ollama_api.capabilities_of(info),
    }
    # Extra fields, which OpenAI's clients keep: what the nodes' Ollama says of the model.
    details = {key: value for key, value in info.details.items() if key != "context_length"}
    if details:
        model["details"] = details
    if "context_length" in info.details:
        model["context_length"] = info.details["context_length"]
    return model


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
        return openai_model_not_found(model)
    return JsonResponse(_openai_model(info))


@csrf_exempt
@rate_limited("chat")
async def openai_embeddings(request: HttpRequest) -> HttpResponse:
    """``POST /v1/embeddings``: vectors from a node that serves embeddings."""
    if request.method != "POST":
        return openai_error(openai_api.OpenAIError("use POST", status=405))
    try:
        parsed = openai_api.parse_embedding_request(request.body)
    except openai_api.OpenAIError as error:
        return openai_error(error)
    try:
        answer = await embed(
            model=parsed.model,
            embed_params=parsed.embed_params,
            client_ip=request_ip(request),
            consumer=request.consumer,
            api=metrics.API_OPENAI,
        )
    except RelayError as error:
        return openai_relay_error(error)
    if isinstance(answer, TooMany | Unavailable | OverLimit):
        return openai_refusal(answer)
    parts = openai_api.embedding_parts(answer, model=parsed.model, base64=parsed.base64)
    return EventStream(parts, "application/json")


# --- Ollama-compatible API (/ollama) ---------------------------------------------------------


def ollama_error(status: int, message: str, *, retry: bool = False) -> JsonResponse:
    return json_error({"error": message}, status, retry=retry)


def ollama_model_not_found(model: str) -> JsonResponse:
    """404 for a model no live node serves, in the words of Ollama's own handlers."""
    return ollama_error(404, f"model '{model}' not found")


def ollama_relay_error(error: RelayError) -> JsonResponse:
    """A whole answer that failed, in Ollama's shape (``RelayError.status``)."""
    return ollama_error(error.status, error.message, retry=error.status == 503)


def ollama_refusal(refusal: TooMany | Unavailable | OverLimit) -> JsonResponse:
    """Why a relay could not start, in Ollama's shape: 429, 400 over every node's caps, 404
    for a model no node serves, 503 with ``Retry-After`` when busy or restarting."""
    if isinstance(refusal, OverLimit):
        return ollama_error(400, over_limit_message(refusal, OLLAMA_OPTION_NAMES))
    if isinstance(refusal, TooMany):
        return ollama_error(429, refusal.message, retry=True)
    if refusal.restarting:
        return ollama_error(503, refusal.message, retry=True)
    if not refusal.served:
        return ollama_model_not_found(refusal.model)
    # Ollama's own words when its queue is full.
    return ollama_error(
        503, "server busy, please try again.  maximum pending requests exceeded", retry=True
    )


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
        return ollama_model_not_found(model)
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
            return ollama_model_not_found(parsed.model)
        return JsonResponse(ollama_api.load_body(parsed.model, chat=chat, unload=parsed.unload))
    chunks = await open_relay(
        model=parsed.model,
        ollama_params=parsed.ollama_params,
        client_ip=request_ip(request),
        consumer=request.consumer,
        stream=parsed.stream,
        api=metrics.API_OLLAMA,
    )
    if isinstance(chunks, TooMany | Unavailable | OverLimit):
        return ollama_refusal(chunks)
    if parsed.stream:
        lines = ollama_api.ndjson_chat if chat else ollama_api.ndjson_generate
        return event_stream(lines(chunks, model=parsed.model), "application/x-ndjson")
    try:
        answer = await collect(chunks)
    except RelayError as error:
        return ollama_relay_error(error)
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


async def _ollama_embed(request: HttpRequest, *, legacy: bool) -> HttpResponse:
    if request.method != "POST":
        return ollama_error(405, "method not allowed")
    parse = ollama_api.parse_embeddings if legacy else ollama_api.parse_embed
    try:
        parsed = parse(request.body)
    except BadRequest as error:
        return ollama_error(400, error.detail)
    if parsed.embed_params is None:
        # Nothing to embed: Ollama loads the model and answers an empty list.
        await worker.ensure_started()
        if not await db(selectors.embeddings_served)(model=parsed.model):
            return ollama_model_not_found(parsed.model)
        empty: dict[str, Any] = {"embedding": []} if legacy else {
            "model": parsed.model, "embeddings": []}
        return JsonResponse(empty)
    try:
        answer = await embed(
            model=parsed.model,
            embed_params=parsed.embed_params,
            client_ip=request_ip(request),
            consumer=request.consumer,
            api=metrics.API_OLLAMA,
        )
    except RelayError as error:
        return ollama_relay_error(error)
    if isinstance(answer, TooMany | Unavailable | OverLimit):
        return ollama_refusal(answer)
    if legacy:
        return JsonResponse({"embedding": answer.vectors[0]})
    return EventStream(ollama_api.embed_parts(answer, model=parsed.model), "application/json")


@csrf_exempt
@rate_limited("chat")
async def ollama_embed(request: HttpRequest) -> HttpResponse:
    """``POST /ollama/api/embed``."""
    return await _ollama_embed(request, legacy=False)


@csrf_exempt
@rate_limited("chat")
async def ollama_embeddings(request: HttpRequest) -> HttpResponse:
    """``POST /ollama/api/embeddings``, Ollama's older form: one ``prompt``, one vector."""
    return await _ollama_embed(request, legacy=True)


@csrf_exempt
@rate_limited("default")
async def ollama_unsupported(request: HttpRequest) -> HttpResponse:
    """Model management belongs to each contributor's own Ollama, not to the network."""
    return ollama_error(
        501,
        f"{request.path.removeprefix('/ollama')} is not supported by the "
        "IdleClaw network; models are managed by each contributor",
    )


# --- Errors outside any view -----------------------------------------------------------------


def error_for_path(path: str, status: int, message: str) -> JsonResponse:
    """An error in the shape of the API that ``path`` belongs to."""
    if path.startswith(("/v1/", "/ollama/v1/")):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return openai_error(openai_api.OpenAIError(message, status=status, kind=kind))
    if path.startswith("/ollama/"):
        return ollama_error(status, message)
    return detail(status, message)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if isinstance(exception, RequestDataTooBig):
        return error_for_path(request.path, 413, "request body is too large")
    return error_for_path(request.path, 400, "bad request")


@csrf_exempt
async def internal_probe(request: HttpRequest) -> HttpResponse:
    """``POST /api/internal/probe?session=ID``: send the OpenAI-shaped body to that one node as
    a probe and answer with what it said (routing/probes.py). 404 without the probe token."""
    if not probes.probe_authorized(request.headers.get("Authorization")):
        return not_found(request)
    if request.method != "POST":
        return _method_not_allowed("POST")
    session = request.GET.get("session", "")
    if not session.isascii() or not session.isdigit() or len(session) > 18 or int(session) < 1:
        return detail(400, "session: the id of a live node session is required")
    try:
        completion = openai_api.parse_completion_request(request.body)
    except BadRequest as error:
        return detail(error.status, error.detail)
    answer = await probes.probe_send(
        session_id=int(session), model=completion.model, ollama_params=completion.ollama_params
    )
    response = JsonResponse(answer.as_json())
    response["Cache-Control"] = "no-store"
    return response


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return error_for_path(request.path, 404, f"no such endpoint: {request.path}")


def server_error(request: HttpRequest) -> HttpResponse:
    return error_for_path(request.path, 500, "internal error; it has been logged")
