"""Requests in flight, waiting, and open per client, for the operator (read-only; rows hold no
chat content)."""

from __future__ import annotations

from django.contrib import admin

from nodes.admin import ReadOnlyAdmin
from routing.models import ConsumerStream, InflightRequest, QueuedRequest


@admin.register(InflightRequest)
class InflightRequestAdmin(ReadOnlyAdmin):
    list_display = ("request_id", "model", "session", "worker", "created_at")
    list_filter = ("model",)
    readonly_fields = ("request_id", "model", "session", "worker", "reply_channel", "created_at")


@admin.register(QueuedRequest)
class QueuedRequestAdmin(ReadOnlyAdmin):
    list_display = ("request_id", "model", "worker", "arrived_at")
    list_filter = ("model",)
    readonly_fields = ("request_id", "model", "worker", "reply_channel", "arrived_at")


@admin.register(ConsumerStream)
class ConsumerStreamAdmin(ReadOnlyAdmin):
    list_display = ("request_id", "client_ip", "worker", "started_at")
    search_fields = ("client_ip",)
    readonly_fields = ("request_id", "client_ip", "worker", "started_at")
