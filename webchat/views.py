"""The chat page, the network page and the network page's figures.

The pages are plain documents: everything they show comes from the router's public APIs
(``/v1/chat/completions``, ``/api/models``, ``/health``) and ``network.json``, fetched by the
page's own scripts, so a page request reads nothing from the database. They are served by the
API handler (no middleware), so each response sets its own security headers here rather than
through ``SecurityMiddleware``, which the admin keeps.
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.loader import render_to_string

from idleclaw_site.db import db
from nodes import worker
from routing.limits import rate_limited
from routing.validation import MAX_CONTENT_CHARS, MAX_TOTAL_CHARS, message_limit
from routing.views import detail
from webchat import assets, selectors

# Answers come from untrusted nodes. The page renders them into the DOM without parsing HTML
# (static/webchat/markdown.js); this policy is the second wall: only the router's own scripts,
# styles and images, requests only to the router, no framing, and (Trusted Types) no string
# may reach an HTML sink such as innerHTML.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)
# Seconds between refreshes of the network page's figures.
NETWORK_REFRESH_SECONDS = 5


def _secured(response: HttpResponse, *, page: bool) -> HttpResponse:
    response["X-Content-Type-Options"] = "nosniff"
    response["Referrer-Policy"] = "no-referrer"
    if page:
        response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response["X-Frame-Options"] = "DENY"  # for browsers without frame-ancestors
        response["Cross-Origin-Opener-Policy"] = "same-origin"
        response["Cache-Control"] = "no-cache"
    return response


def _page(request: HttpRequest, template: str, context: dict) -> HttpResponse:
    if request.method not in ("GET", "HEAD"):
        response = detail(405, "method not allowed; use GET")
        response["Allow"] = "GET, HEAD"
        return _secured(response, page=False)
    html = render_to_string(
        template,
        {"version": settings.IDLECLAW_VERSION, "assets": assets.URL_PREFIX, **context},
    )
    return _secured(HttpResponse(html), page=True)


@rate_limited("default")
async def chat(request: HttpRequest) -> HttpResponse:
    """``GET /``: the chat page."""
    return _page(
        request,
        "webchat/chat.html",
        {
            "max_content_chars": MAX_CONTENT_CHARS,
            "max_messages": message_limit(),
            "max_total_chars": MAX_TOTAL_CHARS,
        },
    )


@rate_limited("default")
async def network(request: HttpRequest) -> HttpResponse:
    """``GET /network``: the network at a glance."""
    return _page(request, "webchat/network.html", {"refresh_seconds": NETWORK_REFRESH_SECONDS})


@rate_limited("default")
async def network_data(request: HttpRequest) -> HttpResponse:
    """``GET /network.json``: the network page's figures (aggregates only)."""
    if request.method not in ("GET", "HEAD"):
        response = detail(405, "method not allowed; use GET")
        response["Allow"] = "GET, HEAD"
        return _secured(response, page=False)
    await worker.ensure_started()
    overview = await db(selectors.network_overview)()
    return _secured(JsonResponse(overview), page=False)


async def asset(request: HttpRequest, version: str, name: str) -> HttpResponse:
    """``GET /assets/<version>/<name>``: a file of the pages (``webchat/assets.py``).

    Under the current version it may be kept for good; under another (a page loaded before the
    router was upgraded) the current file is sent, to be asked for again next time.
    """
    if request.method not in ("GET", "HEAD"):
        response = detail(405, "method not allowed; use GET")
        response["Allow"] = "GET, HEAD"
        return _secured(response, page=False)
    file = assets.FILES.get(name)
    if file is None:
        return _secured(detail(404, "no such file"), page=False)
    response = HttpResponse(file.body, content_type=file.content_type)
    if version == assets.VERSION:
        response["Cache-Control"] = "public, max-age=31536000, immutable"
    else:
        response["Cache-Control"] = "no-cache"
    return _secured(response, page=False)
