"""Serving the operator's pages over HTTPS behind a reverse proxy (``IDLECLAW_HTTPS``).

The proxy terminates TLS and says so in ``X-Forwarded-Proto``; Django believes that header
(``SECURE_PROXY_SSL_HEADER``) from anyone who sends it, so a client talking plain HTTP to daphne
could claim HTTPS and be served the admin without the redirect and with HSTS. Here the header is
removed from every request whose socket peer is not one of ``IDLECLAW_TRUSTED_PROXIES``, the
same rule ``X-Forwarded-For`` follows (``idleclaw_site/net.py``), before Django reads it.

Only the operator's pages (the admin and its static files) pass Django's middleware; the
consumer APIs never ask whether a request was secure (``idleclaw_site/asgi.py``).
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core import checks
from django.http import HttpRequest
from django.utils.decorators import sync_and_async_middleware

from idleclaw_site.net import is_trusted_proxy

FORWARDED_PROTO = "HTTP_X_FORWARDED_PROTO"


def _drop_untrusted_proto(request: HttpRequest) -> None:
    if FORWARDED_PROTO not in request.META:
        return
    if not is_trusted_proxy(request.META.get("REMOTE_ADDR")):
        del request.META[FORWARDED_PROTO]


@sync_and_async_middleware
def forwarded_proto_from_trusted_proxies(get_response: Any) -> Any:
    """Middleware (first in the stack): ``X-Forwarded-Proto`` counts only from a trusted proxy.

    Both sync and async, so it costs the admin's async stack no thread hop.
    """
    if iscoroutinefunction(get_response):

        async def middleware(request: HttpRequest) -> Any:
            _drop_untrusted_proto(request)
            return await get_response(request)

    else:

        def middleware(request: HttpRequest) -> Any:
            _drop_untrusted_proto(request)
            return get_response(request)

    return middleware


@checks.register(checks.Tags.security)
def check_https_hosts(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """In HTTPS mode the host names must be listed: with ``*`` any Host header is accepted, so
    links Django builds (password resets, redirects) may point at a host an attacker names."""
    if not settings.IDLECLAW_HTTPS or "*" not in settings.ALLOWED_HOSTS:
        return []
    return [
        checks.Warning(
            "IDLECLAW_HTTPS is on but ALLOWED_HOSTS is '*': any Host header is accepted.",
            hint="Set IDLECLAW_ALLOWED_HOSTS to the router's host names, e.g. "
            "router.example.org.",
            id="idleclaw.W010",
        )
    ]
