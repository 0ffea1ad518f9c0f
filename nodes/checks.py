"""System checks for deployment mistakes that would silently break routing."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.compatibility)
def check_single_process_backends(
    app_configs: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """SQLite and the in-memory channel layer cannot be shared by several router processes."""
    if settings.DEBUG or settings.IDLECLAW_WORKERS <= 1:
        return []
    problems = []
    if settings.CHANNEL_LAYERS["default"]["BACKEND"].endswith("InMemoryChannelLayer"):
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
