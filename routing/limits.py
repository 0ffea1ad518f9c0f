"""Per-address limits for consumers: request rates on the shared cache (django-ratelimit) and
concurrent requests in the database."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django_ratelimit.core import get_usage

from idleclaw_site.net import client_ip
from routing import metrics

View = Callable[..., Awaitable[HttpResponse]]


def request_ip(request: HttpRequest) -> str | None:
    return client_ip(request.META.get("REMOTE_ADDR"), request.META.get("HTTP_X_FORWARDED_FOR"))


def _usage(group: str, rate: str, ip: str | None) -> dict | None:
    return get_usage(
        None, group=group, key=lambda group, request: ip or "unknown", rate=rate, increment=True
    )


def _cache_in_process() -> bool:
    return settings.CACHES["default"]["BACKEND"].endswith(".LocMemCache")


def rate_limited(group: str) -> Callable[[View], View]:
    """Count each call against the client's ``chat`` or ``default`` rate; over it, answer 429
    with ``Retry-After`` in the API's own error shape."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            from routing.views import error_for_path

            rate = (
                settings.IDLECLAW_RATE_CHAT if group == "chat" else settings.IDLECLAW_RATE_DEFAULT
            )
            if _cache_in_process():
                usage = _usage(group, rate, request_ip(request))  # a dict lookup: no I/O
            else:
                # Redis: not on the event loop, and not queued behind the ORM.
                usage = await sync_to_async(_usage, thread_sensitive=False)(
                    group, rate, request_ip(request)
                )
            if usage is not None and usage["should_limit"]:
                metrics.rate_limited(group)
                retry_after = max(1, int(usage["time_left"]))
                response = error_for_path(
                    request.path, 429, f"rate limit exceeded ({rate}); retry in {retry_after} s"
                )
                response["Retry-After"] = str(retry_after)
                return response
            return await view(request, *args, **kwargs)

        # API views take no cookies, so CSRF has nothing to protect; exempting them lets a wrong
        # method get the API's JSON 405 instead of Django's HTML 403.
        wrapper.csrf_exempt = True  # type: ignore[attr-defined]
        return wrapper

    return decorate


def admin_login(request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
    """The admin's login, with password attempts held to the default rate per address."""
    from django.contrib import admin

    if request.method == "POST":
        usage = _usage("admin-login", settings.IDLECLAW_RATE_DEFAULT, request_ip(request))
        if usage is not None and usage["should_limit"]:
            metrics.rate_limited("admin_login")
            retry_after = max(1, int(usage["time_left"]))
            response = HttpResponse(
                f"Too many login attempts; try again in {retry_after} s.",
                status=429,
                content_type="text/plain; charset=utf-8",
            )
            response["Retry-After"] = str(retry_after)
            return response
    return admin.site.login(request, extra_context)
