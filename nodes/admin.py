"""The operator's view of the live network: sessions (with actions that reach their sockets on
any worker, ``nodes.actions``), workers and bans; and the contributors' records (issue 20),
whose name, reputation and notes operators may edit.

Staff in the "viewer" group look; the "operator" group may also act (the
``nodes.operate_nodesession`` permission) and edit bans (routing/migrations/0005).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import ValidationError
from django.core.validators import validate_ipv46_address
from django.db import transaction
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.timesince import timesince

from nodes import actions, identity
from nodes.models import (
    Contributor,
    ContributorModel,
    NodeBan,
    NodeModel,
    NodeSession,
    RouterWorker,
)
from nodes.protocol import MAX_NODE_ID_CHARS
from nodes.services import live_cutoff
from routing.models import InflightRequest


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


class LiveRequestInline(admin.TabularInline):
    """The requests the node is serving now; cancelled from "Requests in flight"."""

    model = InflightRequest
    verbose_name = "request in flight"
    verbose_name_plural = "requests in flight"
    fields = (
        "request_id",
        "model",
        "state",
        "api",
        "client_ip",
        "created_at",
        "first_token_at",
        "tokens",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="state")
    def state(self, obj: Any) -> str:
        return "streaming" if obj.first_token_at else "queued"


class ModelFilter(admin.SimpleListFilter):
    title = "model"
    parameter_name = "model"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        names = NodeModel.objects.values_list("name", flat=True).distinct().order_by("name")
        return [(name, name) for name in names[:200]]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value():
            return queryset.filter(models__name=self.value())
        return queryset


class CooledDownFilter(admin.SimpleListFilter):
    title = "cooled down"
    parameter_name = "cooled_down"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        cooling = Q(cooldown_until__gt=timezone.now())
        if self.value() == "yes":
            return queryset.filter(cooling)
        if self.value() == "no":
            return queryset.exclude(cooling)
        return queryset


# Ban lengths the ban form offers; None: until an operator lifts it.
BAN_LENGTHS = {
    "1h": ("an hour", timedelta(hours=1)),
    "1d": ("a day", timedelta(days=1)),
    "7d": ("a week", timedelta(days=7)),
    "30d": ("30 days", timedelta(days=30)),
    "forever": ("until lifted", None),
}


class BanForm(forms.Form):
    """What a ban of the selected nodes covers (issue 17: the node id and/or the IP)."""

    node_ids = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple, label="Node ids"
    )
    ips = forms.MultipleChoiceField(
        required=False, widget=forms.CheckboxSelectMultiple, label="IP addresses"
    )
    length = forms.ChoiceField(
        choices=[(key, label) for key, (label, _) in BAN_LENGTHS.items()], initial="1d"
    )
    reason = forms.CharField(max_length=255, required=False)

    def __init__(self, *args: Any, node_ids: list[str], ips: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["node_ids"].choices = [(value, value) for value in node_ids]
        # An IPv6 address is banned with its whole host network (``NodeBan.host``): say so.
        self.fields["ips"].choices = [
            (value, NodeBan(kind=NodeBan.Kind.IP, value=value).covering) for value in ips
        ]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if not data.get("node_ids") and not data.get("ips"):
            raise ValidationError("Choose at least one node id or IP address to ban.")
        for value in data.get("node_ids", []):
            if len(value) > MAX_NODE_ID_CHARS:
                raise ValidationError("A node id has at most 64 characters.")
        for value in data.get("ips", []):
            validate_ipv46_address(value)
        return data


@admin.register(NodeSession)
class NodeSessionAdmin(ReadOnlyAdmin):
    list_display = (
        "node_id",
        "contributor_name",
        "model_names",
        "client_ip",
        "client_version",
        "connected_for",
        "load",
        "ttft_ms",
        "tokens_per_s",
        "completed_failed",
        "cooldown_until",
        "draining",
        "worker",
    )
    list_filter = (ModelFilter, CooledDownFilter, "draining", "worker")
    search_fields = ("node_id", "client_ip")
    list_select_related = ("worker", "contributor")
    readonly_fields = (
        "node_id",
        "contributor",
        "reputation",
        "channel_name",
        "worker",
        "max_concurrent",
        "client_ip",
        "ollama_version",
        "client",
        "protocol",
        "draining",
        "connected_at",
        "last_seen",
        "ttft_ms",
        "tokens_per_s",
        "completed",
        "failed",
        "timed_out",
        "dropped_tool_calls",
        "consecutive_failures",
        "cooldown_until",
    )
    exclude = ("resume_token_hash", "features")
    inlines = [NodeModelInline, LiveRequestInline]
    actions = ["disconnect", "drain", "ban"]

    def get_queryset(self, request: HttpRequest) -> Any:
        return (
            super()
            .get_queryset(request)
            .annotate(active=Count("inflight", distinct=True))
            .prefetch_related("models")
        )

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("nodes.operate_nodesession")

    def has_ban_permission(self, request: HttpRequest) -> bool:
        return self.has_operate_permission(request) and request.user.has_perm("nodes.add_nodeban")

    @admin.display(description="contributor", ordering="contributor__name")
    def contributor_name(self, obj: NodeSession) -> str:
        return obj.contributor.name if obj.contributor is not None else "anonymous"

    @admin.display(description="models")
    def model_names(self, obj: NodeSession) -> str:
        return ", ".join(m.name for m in obj.models.all())

    @admin.display(description="client")
    def client_version(self, obj: NodeSession) -> str:
        parts = [obj.client or "unknown client"]
        if obj.ollama_version:
            parts.append(f"Ollama {obj.ollama_version}")
        return ", ".join(parts)

    @admin.display(description="connected for", ordering="connected_at")
    def connected_for(self, obj: NodeSession) -> str:
        return timesince(obj.connected_at)

    @admin.display(description="load", ordering="active")
    def load(self, obj: Any) -> str:
        return f"{obj.active} / {obj.max_concurrent}"

    @admin.display(description="completed / failed")
    def completed_failed(self, obj: NodeSession) -> str:
        return f"{obj.completed} / {obj.failed + obj.timed_out}"

    def _log(self, request: HttpRequest, sessions: list[NodeSession], message: str) -> None:
        for session in sessions:
            self.log_change(request, session, message)

    @admin.action(permissions=["operate"], description="Disconnect the selected nodes")
    def disconnect(self, request: HttpRequest, queryset: QuerySet) -> None:
        sessions = list(queryset)
        told = actions.nodes_disconnect(session_ids=[s.pk for s in sessions])
        self._log(request, sessions, "Disconnected by an operator")
        self.message_user(request, f"Disconnected {told} node(s).", messages.SUCCESS)

    @admin.action(permissions=["operate"], description="Drain the selected nodes")
    def drain(self, request: HttpRequest, queryset: QuerySet) -> None:
        sessions = list(queryset)
        drained = actions.nodes_drain(session_ids=[s.pk for s in sessions])
        self._log(request, sessions, "Drained: no new requests; those in flight finish")
        self.message_user(
            request,
            f"Drained {drained} node(s): no new requests; those in flight finish.",
            messages.SUCCESS,
        )

    @admin.action(permissions=["ban"], description="Ban the selected nodes…")
    def ban(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        """Asks what to ban (node ids, addresses) and for how long, then bans and
        disconnects. The form carries the values, so a node that reconnected in between (as
        a new session) is still banned and closed."""
        sessions = list(queryset)
        node_ids = sorted({s.node_id for s in sessions} | set(request.POST.getlist("node_ids")))
        ips = sorted(
            {s.client_ip for s in sessions if s.client_ip} | set(request.POST.getlist("ips"))
        )
        form = BanForm(
            request.POST if "apply" in request.POST else None,
            node_ids=node_ids,
            ips=ips,
            initial={"node_ids": node_ids, "ips": ips},
        )
        if not form.is_valid():
            context = {
                **self.admin_site.each_context(request),
                "title": "Ban nodes",
                "form": form,
                "sessions": sessions,
                "opts": self.model._meta,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/nodes/nodesession/ban.html", context)
        label, length = BAN_LENGTHS[form.cleaned_data["length"]]
        banned = actions.nodes_ban(
            node_ids=form.cleaned_data["node_ids"],
            ips=form.cleaned_data["ips"],
            expires_at=None if length is None else timezone.now() + length,
            reason=form.cleaned_data["reason"],
        )
        for ban in banned.bans:
            self.log_addition(request, ban, f"Banned for {label} by an operator")
        self._log(request, sessions, f"Banned for {label} and disconnected")
        self.message_user(
            request,
            f"Banned {', '.join(str(b) for b in banned.bans)} for {label}; "
            f"disconnected {banned.disconnected} node(s).",
            messages.SUCCESS,
        )
        return None


@admin.register(RouterWorker)
class RouterWorkerAdmin(ReadOnlyAdmin):
    list_display = ("worker_id", "hostname", "pid", "started_at", "last_seen")
    readonly_fields = list_display


@admin.register(NodeBan)
class NodeBanAdmin(admin.ModelAdmin):
    list_display = ("kind", "value", "covers", "reason", "created_at", "expires_at")
    list_filter = ("kind",)
    search_fields = ("value", "reason")

    @admin.display(description="Covers")
    def covers(self, ban: NodeBan) -> str:
        """What the ban refuses: an IP ban holds for the address's host (``NodeBan.host``)."""
        return ban.host or ban.value


class ContributorModelInline(admin.TabularInline):
    """The contributor's figures per model, from real traffic."""

    model = ContributorModel
    fields = ("model", "served", "tokens", "ttft_ms", "tokens_per_s")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ContributorForm(forms.ModelForm):
    class Meta:
        model = Contributor
        fields = ("name", "reputation", "notes")

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        problem = identity.name_problem(name)
        if problem is not None:
            raise ValidationError(problem[0].upper() + problem[1:] + ".")
        taken = Contributor.objects.filter(name__iexact=name).exclude(pk=self.instance.pk)
        if taken.exists():
            raise ValidationError("Another contributor has this name.")
        return name

    def clean_reputation(self) -> float:
        reputation = self.cleaned_data["reputation"]
        if not 0.0 <= reputation <= 1.0:
            raise ValidationError("Reputation is from 0 to 1.")
        return reputation


@admin.register(Contributor)
class ContributorAdmin(admin.ModelAdmin):
    """Contributors' records: operator data (never chat content). Made by the router when a
    node first proves a key; removed by ``manage.py contributors_prune``."""

    form = ContributorForm
    list_display = (
        "name",
        "reputation",
        "served",
        "failed",
        "tokens",
        "live_nodes",
        "first_seen",
        "last_seen",
    )
    search_fields = ("name",)
    readonly_fields = (
        "served",
        "failed",
        "tokens",
        "probes_passed",
        "probes_failed",
        "probed_at",
        "first_seen",
        "last_seen",
    )
    # What an operator may change (the form's), then the router's figures.
    fields = ContributorForm.Meta.fields + readonly_fields
    inlines = [ContributorModelInline]

    def get_queryset(self, request: HttpRequest) -> Any:
        live = Q(sessions__last_seen__gte=live_cutoff())
        return super().get_queryset(request).annotate(live=Count("sessions", filter=live))

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # a record is made by a node proving its key

    @admin.display(description="live nodes", ordering="live")
    def live_nodes(self, obj: Any) -> int:
        return obj.live

    def save_model(self, request: HttpRequest, obj: Contributor, form: Any, change: bool) -> None:
        # Only the fields the form edits: a full-row save would put back the counters as they
        # were when the page was loaded, losing what finishing requests and probes added since.
        fields = ["name", "reputation", "notes"]
        with transaction.atomic():
            sessions = NodeSession.objects.filter(contributor=obj)
            # Sessions first, then the record: the order a finishing request locks them in.
            locked = list(sessions.select_for_update().order_by("pk").values_list("pk", flat=True))
            if "reputation" in form.changed_data:
                # The operator's value is the new starting point: decay runs from now, so the
                # next probe round does not undo it as if it were old evidence.
                obj.probed_at = timezone.now()
                fields.append("probed_at")
                # Its live nodes are routed by their own copy of the reputation.
                NodeSession.objects.filter(pk__in=locked).update(
                    reputation=obj.reputation, probed_at=obj.probed_at
                )
            obj.save(update_fields=fields)
