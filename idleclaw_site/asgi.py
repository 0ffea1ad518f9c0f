"""ASGI entry point: HTTP goes to Django, WebSockets at /ws/node to the node consumer (and on
any other path are refused at the handshake).

The consumer APIs are served by a Django handler without Django's middleware: sessions, auth,
CSRF and messages serve only the operator's admin, and each sync middleware costs every API
request a hop to a fresh thread (bench/RESULTS.md). The same handler keeps Django's request
signals off threads too, and is the one place where every API response gets its CORS headers
and its ``x-request-id``. The admin and its static files keep the full stack.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import aclosing

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "idleclaw_site.settings")
# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from corsheaders.middleware import CorsMiddleware  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core import signals  # noqa: E402
from django.core.exceptions import RequestAborted  # noqa: E402
from django.core.handlers.asgi import ASGIHandler, get_script_prefix  # noqa: E402
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402
from django.http import HttpResponseBase  # noqa: E402
from django.urls import re_path, set_script_prefix  # noqa: E402

from idleclaw_site import (  # noqa: E402
    daphne_compat,
    http_guard,
    loop_lag,
    prompt_writes,
    request_ids,
    shutdown,
    ws_flow,
)
from idleclaw_site.static_files import OperatorStaticFilesHandler  # noqa: E402
from nodes.routing import websocket_urlpatterns  # noqa: E402
from routing.views import EventStream  # noqa: E402

daphne_compat.install()
http_guard.install()
prompt_writes.install()
ws_flow.install()
shutdown.install()
loop_lag.install()  # only with IDLECLAW_LOOP_LAG_FILE set (issue 13's benchmark)


class APIHandler(ASGIHandler):
    """Django's ASGI handler for the consumer APIs: no thread per request, and no middleware but
    CORS.

    Django's handler gives each request a ``ThreadSensitiveContext`` (a thread of its own) and
    sends ``request_started``/``request_finished`` and closes the response from that thread: two
    or three thread hops and a thread start per request, about 1 ms of time to first token
    (bench/RESULTS.md). The API views run no thread-sensitive sync code (their database work
    goes to ``idleclaw_site.db``), and the signals' receivers (closing this thread's database
    connections, of which the event loop has none) are quick, so here they run in place.
    """

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        get_response = self._get_response_async if is_async else self._get_response
        # CORS for browsers on other sites (settings: CORS_*), from django-cors-headers, whose
        # middleware is async-capable: handed a coroutine function it awaits it in place and
        # marks itself a coroutine function, so neither it nor the wrapper around it is adapted
        # with sync_to_async (no thread hop, unlike Django's sync middleware). It answers a
        # preflight itself and adds its headers to every other response before it is sent,
        # streamed ones included (they are headers of the response object).
        cors = CorsMiddleware(convert_exception_to_response(get_response))
        self._middleware_chain = convert_exception_to_response(cors)

    async def __call__(self, scope, receive, send) -> None:
        try:
            body = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            await self._serve(scope, body, receive, send)
        finally:
            body.close()

    async def _serve(self, scope, body, receive, send) -> None:
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        request_id = request_ids.new_id()
        request, refusal = self.create_request(scope, body)
        if request is None:
            refusal[request_ids.HEADER] = request_id
            await self.send_response(refusal, send)
            refusal.close()
            return
        responses: list[HttpResponseBase] = []
        # As in Django's handler: a client that hangs up cancels the view or its streaming
        # response, which is how a consumer's hang-up reaches the node.
        responding = asyncio.create_task(self._respond(request, send, responses, request_id))
        hangup = asyncio.create_task(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((responding, hangup), return_when=asyncio.FIRST_COMPLETED)
        finally:
            responding.cancel()
            hangup.cancel()
            await asyncio.gather(responding, hangup, return_exceptions=True)
            for response in responses:
                response.close()  # sends request_finished
            if not responses:
                signals.request_finished.send(sender=self.__class__)
        if not responding.cancelled() and responding.exception() is not None:
            raise responding.exception()
        if not hangup.cancelled() and isinstance(hangup.exception(), AssertionError):
            # The server sent something other than a disconnect after the body: an ASGI
            # violation Django's handler raises too, rather than pass over.
            raise hangup.exception()

    async def _respond(
        self, request, send, responses: list[HttpResponseBase], request_id: str
    ) -> None:
        # In this task's own context: a relay started by the view sends its node this id.
        request_ids.begin(request_id)
        response = await self.run_get_response(request)
        responses.append(response)
        response[request_ids.HEADER] = request_id
        if isinstance(response, EventStream):
            await self._send_stream(response, send)
        else:
            await self.send_response(response, send)

    async def _send_stream(self, response: EventStream, send) -> None:
        """Django's ``send_response`` for a streamed answer, minus its per-part wrappers: each
        token's write would otherwise pass three more generators (bench/RESULTS.md)."""
        headers = [(key.encode("ascii"), value.encode("latin1")) for key, value in response.items()]
        start = {"type": "http.response.start", "status": response.status_code, "headers": headers}
        await send(start)
        async with aclosing(response.parts) as parts:
            async for part in parts:
                await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body"})


# The admin's CSS and JS, so a bare `daphne` shows a usable admin without a web server.
operator_app = OperatorStaticFilesHandler(django_asgi_app)
api_app = APIHandler()
OPERATOR_PATHS = ("/admin", "/" + settings.STATIC_URL.lstrip("/"))


async def http_app(scope, receive, send):
    if scope["path"].startswith(OPERATOR_PATHS):
        return await operator_app(scope, receive, send)
    return await api_app(scope, receive, send)


async def refuse_websocket(scope, receive, send) -> None:
    """Refuse a WebSocket handshake: a close before the accept is an HTTP 403 (ASGI spec).

    Without it URLRouter raises on a path it has no route for, and daphne answers 500 a second
    later and logs a traceback: an unauthenticated way to flood the log (red-team F11).
    """
    await receive()  # websocket.connect
    await send({"type": "websocket.close"})


application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": URLRouter([*websocket_urlpatterns, re_path(r"", refuse_websocket)]),
    }
)
