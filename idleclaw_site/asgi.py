"""ASGI entry point: HTTP goes to Django, WebSockets at /ws/node to the node consumer."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "idleclaw_site.settings")
# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from idleclaw_site import daphne_compat  # noqa: E402
from nodes.routing import websocket_urlpatterns  # noqa: E402

daphne_compat.install()

application = ProtocolTypeRouter(
    {
        # The admin's CSS and JS, so a bare `daphne` shows a usable admin without a web server.
        "http": ASGIStaticFilesHandler(django_asgi_app),
        "websocket": URLRouter(websocket_urlpatterns),
    }
)
