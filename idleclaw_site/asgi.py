"""ASGI entry point: HTTP goes to Django, WebSockets at /ws/node to the node consumer.

The consumer APIs are served by a Django handler without middleware: sessions, auth, CSRF and
messages serve only the operator's admin, and each sync middleware costs every API request a
hop to a fresh thread (bench/RESULTS.md). The admin and its static files keep the full stack.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "idleclaw_site.settings")
# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.exception import convert_exception_to_response  # noqa: E402

from idleclaw_site import daphne_compat  # noqa: E402
from nodes.routing import websocket_urlpatterns  # noqa: E402

daphne_compat.install()


class APIHandler(ASGIHandler):
    """Django's ASGI handler with no middleware, for the consumer APIs."""

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        get_response = self._get_response_async if is_async else self._get_response
        self._middleware_chain = convert_exception_to_response(get_response)


# The admin's CSS and JS, so a bare `daphne` shows a usable admin without a web server.
operator_app = ASGIStaticFilesHandler(django_asgi_app)
api_app = APIHandler()
OPERATOR_PATHS = ("/admin", "/" + settings.STATIC_URL.lstrip("/"))


async def http_app(scope, receive, send):
    if scope["path"].startswith(OPERATOR_PATHS):
        return await operator_app(scope, receive, send)
    return await api_app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": URLRouter(websocket_urlpatterns),
    }
)
