"""The admin's log of what operators did (issue 17), for every staff member to read."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.http import HttpRequest


@admin.register(LogEntry)
class LogEntryAdmin(admin.ModelAdmin):
    """Who disconnected, drained or banned which node, or cancelled which request, and when;
    newest first. Nobody edits it."""

    list_display = ("action_time", "user", "content_type", "object_repr", "change_message")
    list_filter = ("user", "content_type")
    search_fields = ("object_repr", "change_message")
    date_hierarchy = "action_time"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
