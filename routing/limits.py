"""Per-consumer limits: request rates on the shared cache (django-ratelimit) and concurrent
requests in the database. A chat or embedding request is counted against its consumer
(``routing.identity``: a consumer key, a contributor, else its address); everything else
against its address."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django_ratelimit.core import get_usage

from idleclaw_site.db import db
from idleclaw_site.net import client_ip, consumer_address
from routing import identity, metrics
from routing.identity import Consumer, UnknownToken

View = Callable[..., Awaitable[HttpResponse]]


def request_ip(request: HttpRequest) -> str | None:
    return client_ip(request.META.get("REMOTE_ADDR"), request.META.get("HTTP_X_FORWARDED_FOR"))


def _address_of(request: HttpRequest) -> str | None:
    """The client's address as an anonymous consumer is known (an IPv6 address by its /64)."""
    ip = request_ip(request)
    return consumer_address(ip) if ip else None


def _usage(group: str, rate: str, who: str | None, increment: bool = True) -> dict | None:
    return get_usage(
        None,
        group=group,
        key=lambda group, request: who or "unknown",
        rate=rate,
        increment=increment,
    )


def _cache_in_process() -> bool:
    return settings.CACHES["default"]["BACKEND"].endswith(".LocMemCache")


async def _counted(group: str, rate: str, who: str | None, increment: bool = True) -> dict | None:
    if _cache_in_process():
        return _usage(group, rate, who, increment)  # a dict lookup: no I/O
    # Redis: not on the event loop, and not queued behind the ORM.
    return await sync_to_async(_usage, thread_sensitive=False)(group, rate, who, increment)


# Tokens that named nobody, counted per address: past the chat rate, an address's next token
# gets a 429 before any database read, so guessing keys costs the guesser, not the router.
UNKNOWN_KEYS = "unknown-key"


def _too_many(request: HttpRequest, group: str, rate: str, usage: dict) -> HttpResponse:
    from routing.views import error_for_path

    metrics.rate_limited(group)
    retry_after = max(1, int(usage["time_left"]))
    response = error_for_path(
        request.path, 429, f"rate limit exceeded ({rate}); retry in {retry_after} s"
    )
    response["Retry-After"] = str(retry_after)
    return response


async def consumer_of(request: HttpRequest) -> Consumer | None:
    """Who sent ``request`` (``routing.identity``); None when it carries an IdleClaw token that
    names no active key or contributor. Anonymous requests cost no database read."""
    ip = request_ip(request)
    token = identity.bearer_of(request)
    if token is None:
        return identity.anonymous(ip)
    try:
        return await db(identity.consumer_resolve)(token=token, client_ip=ip)
    except UnknownToken:
        return None


def rate_limited(group: str) -> Callable[[View], View]:
    """Count each call against the client's ``chat`` or ``default`` rate; over it, answer 429
    with ``Retry-After`` in the API's own error shape.

    ``chat`` (every chat and embedding endpoint) first finds out who the consumer is
    (``consumer_of``), counts the call against that consumer's own rate and leaves it on
    ``request.consumer`` for the view; a token that names nobody is a 401, counted against the
    address (``UNKNOWN_KEYS``): past the chat rate of those, the address's tokens get a 429
    before they are looked up."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            from routing.views import error_for_path

            if group != "chat":
                rate = settings.IDLECLAW_RATE_DEFAULT
                usage = await _counted(group, rate, request_ip(request))
                if usage is not None and usage["should_limit"]:
                    return _too_many(request, group, rate, usage)
                return await view(request, *args, **kwargs)
            if identity.bearer_of(request) is not None:
                rate = settings.IDLECLAW_RATE_CHAT
                guesser = _address_of(request)
                guessed = await _counted(UNKNOWN_KEYS, rate, guesser, increment=False)
                # A peek: the count so far, not counting this request.
                if guessed is not None and guessed["count"] >= guessed["limit"]:
                    return _too_many(request, group, rate, guessed)
            consumer = await consumer_of(request)
            if consumer is None:
                await _counted(UNKNOWN_KEYS, settings.IDLECLAW_RATE_CHAT, _address_of(request))
                metrics.rate_limited("unknown_key")
                return error_for_path(request.path, 401, UnknownToken.message)
            usage = await _counted(group, consumer.rate, consumer.id or None)
            if usage is not None and usage["should_limit"]:
                return _too_many(request, group, consumer.rate, usage)
            request.consumer = consumer  # type: ignore[attr-defined]
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
