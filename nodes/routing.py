from __future__ import annotations

from django.urls import re_path

from nodes.consumers import NodeConsumer

websocket_urlpatterns = [
    re_path(r"^ws/node/?$", NodeConsumer.as_asgi()),
]
