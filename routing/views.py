"""HTTP adapters for consumers: parse, check, call one service, answer."""

from __future__ import annotations

import time
import uuid
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from nodes import worker
from routing import selectors
from routing.services import inflight_claim
from routing.streaming import relay, sse_chat
from routing.validation import BadRequest, parse_chat_request

STARTED = time.monotonic()


def detail(status: int, message: str, **headers: str) -> JsonResponse:
    response = JsonResponse({"detail": message}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def _method_not_allowed(allowed: str) -> JsonResponse:
    response = detail(405, f"method not allowed; use {allowed}")
    response["Allow"] = allowed
    return response


@csrf_exempt
async def chat(request: HttpRequest) -> HttpResponse:
    """``POST /api/chat``: stream an answer from a node as Server-Sent Events."""
    if request.method != "POST":
        return _method_not_allowed("POST")
    try:
        chat_request = parse_chat_request(request.body)
    except BadRequest as error:
        return detail(error.status, error.detail)
    await worker.ensure_started()
    layer = get_channel_layer()
    reply_channel = await layer.new_channel()
    claim = await database_sync_to_async(inflight_claim)(
        model=chat_request.model,
        request_id=uuid.uuid4().hex,
        reply_channel=reply_channel,
        worker_id=worker.WORKER_ID,
    )
    if claim is None:
        served = await database_sync_to_async(selectors.model_is_served)(model=chat_request.model)
        message = (
            f"all nodes serving {chat_request.model} are busy"
            if served
            else f"no node is serving {chat_request.model} right now"
        )
        return detail(503, message, Retry_After=str(settings.IDLECLAW_RETRY_AFTER))
    # think is always explicit: Ollama lets a thinking model think when it is left out.
    params: dict[str, Any] = {
        "model": chat_request.model,
        "messages": chat_request.messages,
        "stream": True,
        "think": chat_request.think,
    }
    chunks = relay(layer=layer, claim=claim, reply_channel=reply_channel, ollama_params=params)
    response = StreamingHttpResponse(
        sse_chat(chunks, model=chat_request.model), content_type="text/event-stream"
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


async def health(request: HttpRequest) -> HttpResponse:
    """``GET /health``: liveness and the size of the network."""
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed("GET")
    await worker.ensure_started()
    numbers = await database_sync_to_async(selectors.network_health)()
    return JsonResponse(
        {
            "status": "healthy",
            "uptime_seconds": int(time.monotonic() - STARTED),
            "version": settings.IDLECLAW_VERSION,
            **numbers,
        }
    )


async def models(request: HttpRequest) -> HttpResponse:
    """``GET /api/models``: models at least one live node serves, largest first."""
    if request.method not in ("GET", "HEAD"):
        return _method_not_allowed("GET")
    await worker.ensure_started()
    infos = await database_sync_to_async(selectors.network_models)()
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
                info.name: {"size": info.size, "nodes": info.nodes, "free_slots": info.free_slots}
                for info in infos
            },
        }
    )
