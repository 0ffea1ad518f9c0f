"""Requests in flight, waiting, and open per client, for the operator (rows hold no chat
content). Requests in flight can be cancelled by the "operator" group, on any worker
(``nodes.actions``). Consumer keys (issue 20) are issued and revoked here: "viewer" sees them,
"operator" issues and revokes them (routing/migrations/0007)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from nodes import actions
from nodes.admin import ReadOnlyAdmin
from routing import identity
from routing.models import ConsumerKey, ConsumerStream, InflightRequest, QueuedRequest


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

    list_display = ("request_id", "model", "consumer", "priority", "turn", "worker", "arrived_at")
    list_filter = ("model",)
    readonly_fields = (
        "request_id",
        "model",
        "consumer",
        "priority",
        "turn",
        "worker",
        "reply_channel",
        "arrived_at",
    )
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
    list_display = ("request_id", "consumer", "client_ip", "worker", "started_at")
    search_fields = ("client_ip", "consumer")
    readonly_fields = ("request_id", "consumer", "client_ip", "worker", "started_at")


@admin.register(ConsumerKey)
class ConsumerKeyAdmin(admin.ModelAdmin):
    """API keys for consumers, with their own limits and priority. The key is made here, shown
    once on the page after "Save" and never again: only its hash is stored, and neither the
    hash nor the key is ever shown. Revoking (the action, or unticking "active") refuses the
    key on every worker from its next request on."""

    list_display = (
        "name",
        "prefix",
        "rate_per_minute",
        "max_concurrent",
        "priority",
        "active",
        "created_at",
        "last_used_at",
    )
    list_filter = ("active",)
    search_fields = ("name", "prefix")
    actions = ["revoke"]

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        editable = ["name", "rate_per_minute", "max_concurrent", "priority"]
        if obj is None:
            return editable
        return ["prefix", *editable, "active", "created_at", "last_used_at"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return ("prefix", "created_at", "last_used_at") if obj is not None else ()

    def save_model(self, request: HttpRequest, obj: ConsumerKey, form: Any, change: bool):
        if not change:
            key, obj.prefix, obj.key_hash = identity.new_consumer_key()
            # Only for the page that shows it once (``response_add``); never stored.
            obj.issued_key = key
        super().save_model(request, obj, form, change)

    def response_add(
        self, request: HttpRequest, obj: ConsumerKey, post_url_continue: str | None = None
    ) -> HttpResponse:
        # The key goes out in this response's body only: a message would keep it in the
        # session or a cookie until shown.
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "key_row": obj,
            "key": obj.issued_key,
            "key_prefix": obj.issued_key[: len(identity.KEY_PREFIX) + 8],
            "title": f"Consumer key for {obj.name}",
        }
        # The admin's views are never cached (Cache-Control: no-store).
        return TemplateResponse(request, "admin/routing/consumerkey/issued.html", context)

    @admin.action(permissions=["change"], description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet) -> None:
        rows = list(queryset.filter(active=True))
        ConsumerKey.objects.filter(pk__in=[row.pk for row in rows]).update(active=False)
        for row in rows:
            self.log_change(request, row, "Revoked")
        self.message_user(
            request,
            f"Revoked {len(rows)} key(s): their requests are refused from now on.",
            messages.SUCCESS,
        )
