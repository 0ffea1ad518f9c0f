"""Requests in flight, waiting, and open per client, for the operator (rows hold no chat
content). Requests in flight can be cancelled by the "operator" group, on any worker
(``nodes.actions``)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from nodes import actions
from nodes.admin import ReadOnlyAdmin
from routing.models import ConsumerStream, InflightRequest, QueuedRequest


@admin.register(InflightRequest)
class InflightRequestAdmin(ReadOnlyAdmin):
    """Requests on a node's slot. "queued": sent to the node, no token yet (the node's Ollama
    may be loading the model or serving others); "streaming": tokens are coming. Address,
    front end, first token and tokens so far are written by the consumer's worker about once a
    second (routing/metrics.py)."""

    list_display = (
        "request_id",
        "model",
        "node",
        "client_ip",
        "api",
        "created_at",
        "first_token_at",
        "tokens",
        "state",
        "worker",
    )
    list_filter = ("model", "api")
    search_fields = ("request_id", "session__node_id", "client_ip")
    list_select_related = ("session", "worker")
    readonly_fields = (
        "request_id",
        "model",
        "session",
        "worker",
        "client_ip",
        "api",
        "created_at",
        "first_token_at",
        "tokens",
    )
    actions = ["cancel"]

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("routing.cancel_inflightrequest")

    @admin.display(description="node", ordering="session__node_id")
    def node(self, obj: InflightRequest) -> str:
        return obj.session.node_id

    @admin.display(description="state")
    def state(self, obj: InflightRequest) -> str:
        return "streaming" if obj.first_token_at else "queued"

    @admin.action(permissions=["cancel"], description="Cancel the selected requests")
    def cancel(self, request: HttpRequest, queryset: QuerySet) -> None:
        rows = list(queryset.select_related("session"))
        told = actions.requests_cancel(request_ids=[row.request_id for row in rows])
        for row in rows:
            self.log_change(request, row, f"Cancelled by an operator (node {row.session.node_id})")
        self.message_user(
            request,
            f"Cancelled {told} request(s): their consumers are told an operator ended them.",
            messages.SUCCESS,
        )


@admin.register(QueuedRequest)
class QueuedRequestAdmin(ReadOnlyAdmin):
    """Requests waiting in the router's queue for a free node (state "waiting")."""

    list_display = ("request_id", "model", "worker", "arrived_at")
    list_filter = ("model",)
    readonly_fields = ("request_id", "model", "worker", "reply_channel", "arrived_at")
    actions = ["cancel"]

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("routing.cancel_inflightrequest")

    @admin.action(permissions=["cancel"], description="Cancel the selected waiting requests")
    def cancel(self, request: HttpRequest, queryset: QuerySet) -> None:
        rows = list(queryset)
        told = actions.queued_cancel(request_ids=[row.request_id for row in rows])
        for row in rows:
            self.log_change(request, row, "Cancelled by an operator while it waited")
        self.message_user(
            request,
            f"Asked {told} waiting request(s) to end: their consumers are told an operator "
            "ended them.",
            messages.SUCCESS,
        )


@admin.register(ConsumerStream)
class ConsumerStreamAdmin(ReadOnlyAdmin):
    list_display = ("request_id", "client_ip", "worker", "started_at")
    search_fields = ("client_ip",)
    readonly_fields = ("request_id", "client_ip", "worker", "started_at")
