"""The admin's static files, served by the router itself so a bare ``daphne`` shows a usable
admin without a web server.

Django 5.2's ``ASGIStaticFilesHandler`` turns only ``Http404`` into a response. A path that
climbs out of the static directories (``/static/../../etc/passwd``, or the same with ``%2f`` or
``%2e%2e``, which daphne decodes into the path) makes ``safe_join`` raise
``SuspiciousFileOperation``, which escaped to daphne: nothing was disclosed, but the client got
no answer until daphne's application checker noticed the exception, and then a 500 (issue 12,
defect 11). Here a suspicious path gets Django's answer to any ``SuspiciousOperation``: a 400,
from the project's ``handler400`` (JSON), logged on ``django.security`` — as one line with the
path escaped, not with Django's traceback: forty lines of log for every 50-byte request were a
way to flood the operator's log, and a path may hold line breaks.
"""

from __future__ import annotations

import logging

from asgiref.sync import sync_to_async
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.exceptions import SuspiciousOperation
from django.core.handlers.exception import get_exception_response
from django.http import HttpRequest, HttpResponseBase
from django.urls import get_resolver, get_urlconf


class OperatorStaticFilesHandler(ASGIStaticFilesHandler):
    """``ASGIStaticFilesHandler`` answering a path outside the static files with a 400."""

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        try:
            response = await super().get_response_async(request)
        except SuspiciousOperation as exc:
            # Django's own handler logs this logger with the traceback; the 400 is its page.
            logging.getLogger(f"django.security.{type(exc).__name__}").error(
                "refused static path %r", request.path, extra={"status_code": 400}
            )
            return await sync_to_async(get_exception_response, thread_sensitive=False)(
                request, get_resolver(get_urlconf()), 400, exc
            )
        # The chat page's scripts and styles are only ever what their type says.
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response
