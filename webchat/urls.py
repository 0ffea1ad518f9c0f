"""URLs of the web chat page (issue 16)."""

from __future__ import annotations

urlpatterns: list = []
