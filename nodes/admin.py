"""The operator's view of the live network: read-only sessions, editable bans."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from nodes.models import NodeBan, NodeModel, NodeSession, RouterWorker


class ReadOnlyAdmin(admin.ModelAdmin):
    """Live state is written by the router only; operators look, they do not edit."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class NodeModelInline(admin.TabularInline):
    model = NodeModel
    fields = ("name", "size", "capabilities")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(NodeSession)
class NodeSessionAdmin(ReadOnlyAdmin):
    list_display = (
        "node_id", "client_ip", "model_names", "active_requests", "max_concurrent", "draining",
        "tokens_per_s", "ttft_ms", "completed", "failed", "timed_out", "cooldown_until",
        "ollama_version", "client", "connected_at", "last_seen",
    )
    list_filter = ("draining", "worker")
    search_fields = ("node_id", "client_ip", "models__name")
    readonly_fields = (
        "node_id", "channel_name", "worker", "max_concurrent", "client_ip", "ollama_version",
        "client", "protocol", "draining", "connected_at", "last_seen", "ttft_ms", "tokens_per_s",
        "completed", "failed", "timed_out", "dropped_tool_calls", "consecutive_failures",
        "cooldown_until",
    )
    exclude = ("resume_token_hash",)
    inlines = [NodeModelInline]

    def get_queryset(self, request: HttpRequest) -> Any:
        from django.db.models import Count

        return super().get_queryset(request).annotate(active=Count("inflight", distinct=True))

    @admin.display(description="models")
    def model_names(self, obj: NodeSession) -> str:
        return ", ".join(m.name for m in obj.models.all())

    @admin.display(description="active", ordering="active")
    def active_requests(self, obj: Any) -> int:
        return obj.active


@admin.register(RouterWorker)
class RouterWorkerAdmin(ReadOnlyAdmin):
    list_display = ("worker_id", "hostname", "pid", "started_at", "last_seen")
    readonly_fields = list_display


@admin.register(NodeBan)
class NodeBanAdmin(admin.ModelAdmin):
    list_display = ("kind", "value", "reason", "created_at", "expires_at")
    list_filter = ("kind",)
    search_fields = ("value", "reason")
