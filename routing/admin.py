"""Requests in flight, for the operator (read-only; rows hold no chat content)."""

from __future__ import annotations

from django.contrib import admin

from nodes.admin import ReadOnlyAdmin
from routing.models import InflightRequest


@admin.register(InflightRequest)
class InflightRequestAdmin(ReadOnlyAdmin):
    list_display = ("request_id", "model", "session", "worker", "created_at")
    list_filter = ("model",)
    readonly_fields = ("request_id", "model", "session", "worker", "reply_channel", "created_at")
