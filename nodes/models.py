"""Live state of the network: router workers, connected nodes, their models, and bans.

Rows here exist only while the thing they describe is alive; nothing here is chat content.
"""

from __future__ import annotations

from django.db import models
from django.db.models.functions import Lower


class RouterWorker(models.Model):
    """One router process. It refreshes ``last_seen``; survivors reap a worker that stops."""

    worker_id = models.CharField(max_length=64, primary_key=True)
    hostname = models.CharField(max_length=255, blank=True)
    pid = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.hostname}:{self.pid}"


class Contributor(models.Model):
    """A contributor's record across restarts and address changes (issue 20): operator data,
    never chat content. A node proves its contributor key at registration; the router keeps only
    hashes of the key and of the consumer token derived from it."""

    key_hash = models.CharField(max_length=64, unique=True)
    # SHA-256 of the bearer token `contribute.py --print-token` prints (derived from the key):
    # a request carrying it is this contributor's (priority, higher limits).
    token_hash = models.CharField(max_length=64, unique=True)
    # Pseudonymous, what everyone else sees; never the IP.
    name = models.CharField(max_length=64, unique=True)
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    served = models.PositiveBigIntegerField(default=0, help_text="Requests answered")
    failed = models.PositiveBigIntegerField(default=0)
    tokens = models.PositiveBigIntegerField(default=0, help_text="Tokens answered")
    probes_passed = models.PositiveIntegerField(default=0)
    probes_failed = models.PositiveIntegerField(default=0)
    probed_at = models.DateTimeField(null=True, blank=True)
    # When a probe round last failed it: passes within IDLECLAW_REPUTATION_FAIL_HOLD of it earn
    # nothing, whichever prober sent them.
    failed_probe_at = models.DateTimeField(null=True, blank=True)
    # 0 to 1; 0.5 is neutral and where it decays back to. Below IDLECLAW_REPUTATION_FLOOR the
    # contributor's nodes get no consumer traffic until they pass probes again.
    reputation = models.FloatField(default=0.5)
    notes = models.TextField(blank=True, help_text="The operators' own notes")

    class Meta:
        ordering = ["-last_seen"]
        constraints = [
            # Names differing only in case would pass for one another (red-team F9 of
            # issue 20): the database refuses the second, even when two insert at once.
            models.UniqueConstraint(Lower("name"), name="unique_contributor_name_lower"),
        ]

    def __str__(self) -> str:
        return self.name


class ContributorModel(models.Model):
    """A contributor's measurements for one model, from real traffic (moving averages)."""

    contributor = models.ForeignKey(Contributor, on_delete=models.CASCADE, related_name="models")
    model = models.CharField(max_length=64)
    served = models.PositiveBigIntegerField(default=0)
    tokens = models.PositiveBigIntegerField(default=0)
    ttft_ms = models.FloatField(null=True, blank=True, help_text="Time to first token, ms")
    tokens_per_s = models.FloatField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["contributor", "model"], name="unique_model_per_contributor"
            )
        ]

    def __str__(self) -> str:
        return f"{self.contributor} {self.model}"


class ContributorHour(models.Model):
    """Tokens a contributor served in one hour: the last 24 rows make its priority."""

    contributor = models.ForeignKey(Contributor, on_delete=models.CASCADE, related_name="hours")
    hour = models.DateTimeField()
    tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["contributor", "hour"], name="unique_contributor_hour")
        ]

    def __str__(self) -> str:
        return f"{self.contributor} {self.hour:%Y-%m-%d %H}h"


class NodeSession(models.Model):
    """A contributor node's live WebSocket connection to one router worker."""

    node_id = models.CharField(max_length=64, unique=True)
    channel_name = models.CharField(max_length=255, unique=True)
    worker = models.ForeignKey(RouterWorker, on_delete=models.CASCADE, related_name="sessions")
    max_concurrent = models.PositiveSmallIntegerField(default=2)
    client_ip = models.GenericIPAddressField(null=True, blank=True, db_index=True)
    # The address as a whole host is counted (``idleclaw_site.net.consumer_address``: an IPv6
    # address by its /64): what IDLECLAW_MAX_NODES_PER_IP limits.
    client_net = models.CharField(
        max_length=64, blank=True, default="", db_default="", db_index=True
    )
    ollama_version = models.CharField(max_length=32, blank=True)
    client = models.CharField(max_length=64, blank=True)
    protocol = models.PositiveSmallIntegerField(default=1)
    # Only a hash: whoever can read the admin must not be able to take a session over.
    resume_token_hash = models.CharField(max_length=64, blank=True)
    draining = models.BooleanField(default=False)
    # The contributor whose key the node proved at registration; empty for an anonymous node.
    contributor = models.ForeignKey(
        Contributor, on_delete=models.SET_NULL, null=True, blank=True, related_name="sessions"
    )
    # The contributor's reputation (or, anonymous, this session's own), 0 to 1: routing skips
    # the node below IDLECLAW_REPUTATION_FLOOR.
    reputation = models.FloatField(default=0.5, db_default=0.5)
    # When probes last judged this session (``manage.py probe_nodes``): an anonymous node's
    # reputation decays toward neutral from here (a contributor's from ``Contributor.probed_at``).
    probed_at = models.DateTimeField(null=True, blank=True)
    # When a probe round last failed this anonymous session (``Contributor.failed_probe_at``).
    failed_probe_at = models.DateTimeField(null=True, blank=True)
    # Extensions the node said it accepts from the router in ``register.features``
    # (docs/node-protocol-extensions.md); a router sends a node nothing else.
    features = models.JSONField(default=list, blank=True)
    # The largest ``num_ctx`` and ``num_predict`` the node lets a request set (``register.limits``,
    # docs/node-protocol-extensions.md); empty when it set none. A request asking more is never
    # sent to it.
    max_ctx = models.PositiveIntegerField(null=True, blank=True)
    max_predict = models.PositiveIntegerField(null=True, blank=True)
    connected_at = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)
    # Measured from this session's real traffic (moving averages), never from what it claims.
    ttft_ms = models.FloatField(null=True, blank=True, help_text="Time to first token, ms")
    tokens_per_s = models.FloatField(null=True, blank=True)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    timed_out = models.PositiveIntegerField(default=0)
    # Tool calls it sent that the request never offered, or that broke a strict schema: dropped
    # before any consumer saw them, and each such answer counted as a failure.
    dropped_tool_calls = models.PositiveIntegerField(default=0)
    consecutive_failures = models.PositiveSmallIntegerField(default=0)
    # Not routed to until then; afterwards it gets one trial request.
    cooldown_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["connected_at"]
        permissions = [("operate_nodesession", "Can disconnect, drain and ban nodes")]

    def __str__(self) -> str:
        return self.node_id


class NodeModel(models.Model):
    """A model a node serves; one row per (session, model) so selection is an indexed lookup."""

    session = models.ForeignKey(NodeSession, on_delete=models.CASCADE, related_name="models")
    name = models.CharField(max_length=64, db_index=True)
    size = models.BigIntegerField(default=0)
    capabilities = models.JSONField(default=list, blank=True)
    # What the node's Ollama reports of the model (``/api/show``): family, parameter size,
    # quantization level, context length. Checked and bounded at registration.
    details = models.JSONField(default=dict, blank=True)
    # Loaded in the node's Ollama (``/api/ps``, reported with the heartbeat) until then; empty
    # when not loaded, or when the node does not say.
    loaded_until = models.DateTimeField(null=True, blank=True)
    size_vram = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["session", "name"], name="unique_model_per_session"),
        ]
        # Node selection reads a window of a model's rows in id order from a random point.
        indexes = [models.Index(fields=["name", "id"], name="model_name_id")]

    def __str__(self) -> str:
        return self.name


class ProbeLease(models.Model):
    """One model's probe round, held by one ``probe_nodes`` process until ``expires_at``: two
    probers on different hosts never probe the same model at once (and never count one round
    twice). A row, not the cache: the embedded cache is per process."""

    model = models.CharField(max_length=64, primary_key=True)
    holder = models.CharField(max_length=64)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.model


class NodeBan(models.Model):
    """An operator's ban of an IP address or a node id; registration is refused while it holds.
    An IP ban holds for the address's host as nodes are counted per host: an IPv4 address, or
    the IPv6 network of ``IDLECLAW_IPV6_CONSUMER_PREFIX`` bits around it (``host``)."""

    class Kind(models.TextChoices):
        IP = "ip", "IP address"
        NODE_ID = "node_id", "Node id"

    kind = models.CharField(max_length=8, choices=Kind.choices)
    value = models.CharField(max_length=64, db_index=True)
    reason = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty: never expires.")

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.covering}"

    @property
    def covering(self) -> str:
        """The value, with the network it stands for when that is more: ``2001:db8::1 (all of
        2001:db8::/64)``."""
        host = self.host
        return self.value if host in (None, self.value) else f"{self.value} (all of {host})"

    @property
    def host(self) -> str | None:
        """What an IP ban holds for (``NodeSession.client_net`` spells a node's the same way);
        None for a node id ban, and for an IP ban whose value is no address (a row written
        around ``clean``), which bans nothing."""
        from idleclaw_site.net import consumer_address, is_ip

        if self.kind != self.Kind.IP or not is_ip(self.value):
            return None
        return consumer_address(self.value)

    def clean(self) -> None:
        from django.core.exceptions import ValidationError
        from django.core.validators import validate_ipv46_address

        if self.kind == self.Kind.IP:
            try:
                validate_ipv46_address(self.value)
            except ValidationError:
                raise ValidationError({"value": "Enter a valid IPv4 or IPv6 address."}) from None
            # As nodes' addresses are stored (idleclaw_site.net.normalized), or the ban would
            # never match: 2001:DB8::1 is 2001:db8::1, ::ffff:192.0.2.9 is 192.0.2.9.
            from idleclaw_site.net import normalized

            self.value = normalized(self.value)
