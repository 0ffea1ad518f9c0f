"""System checks for deployment mistakes that would silently break routing."""

from __future__ import annotations

from typing import Any

from channels.layers import InMemoryChannelLayer
from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string


def _in_process_layer(backend: str) -> bool:
    try:
        return issubclass(import_string(backend), InMemoryChannelLayer)
    except ImportError:
        return False  # channels reports a backend it cannot import on its own


@checks.register(checks.Tags.compatibility)
def check_single_process_backends(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """SQLite and the in-memory channel layer cannot be shared by several router processes."""
    if settings.DEBUG or settings.IDLECLAW_WORKERS <= 1:
        return []
    problems = []
    if _in_process_layer(settings.CHANNEL_LAYERS["default"]["BACKEND"]):
        problems.append(
            checks.Warning(
                "IDLECLAW_WORKERS > 1 with the in-memory channel layer: a node connected to "
                "one worker cannot serve a consumer on another.",
                hint="Set REDIS_URL so all workers share a Redis channel layer.",
                id="idleclaw.W001",
            )
        )
    if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        problems.append(
            checks.Warning(
                "IDLECLAW_WORKERS > 1 with SQLite: workers on other machines cannot see it and "
                "concurrent writers serialise on one file.",
                hint="Set DATABASE_URL to a PostgreSQL database.",
                id="idleclaw.W002",
            )
        )
    return problems
