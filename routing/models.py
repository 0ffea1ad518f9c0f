"""Requests in flight: one row per request a node is serving. Slot counts derive from these."""

from __future__ import annotations

from django.db import models

from nodes.models import NodeSession, RouterWorker


class InflightRequest(models.Model):
    """A consumer's request claimed on a node's slot. Holds routing facts only, never content."""

    request_id = models.CharField(max_length=64, primary_key=True)
    session = models.ForeignKey(NodeSession, on_delete=models.CASCADE, related_name="inflight")
    # The worker that holds the consumer's HTTP stream (may differ from the node's worker).
    worker = models.ForeignKey(RouterWorker, on_delete=models.CASCADE, related_name="streams")
    model = models.CharField(max_length=64)
    reply_channel = models.CharField(max_length=255)
    created_at = models.DateTimeField()
    # For the operator's view of requests in flight, written by the consumer's worker about
    # once a second from its live relays (routing/metrics.py), never per token. Database
    # defaults: the claim inserts the row without them.
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    api = models.CharField(max_length=8, blank=True, default="", db_default="")
    first_token_at = models.DateTimeField(null=True, blank=True)
    tokens = models.PositiveIntegerField(default=0, db_default=0)

    class Meta:
        permissions = [("cancel_inflightrequest", "Can cancel a request in flight")]

    def __str__(self) -> str:
        return self.request_id


class QueuedRequest(models.Model):
    """A consumer's request waiting for a free slot. The queue is per model and fair across all
    workers: round-robin across consumers (``turn``), then priority within a round, then
    ``arrived_at`` (then ``request_id``) order it (``routing.services``)."""

    request_id = models.CharField(max_length=64, primary_key=True)
    model = models.CharField(max_length=64, db_index=True)
    worker = models.ForeignKey(RouterWorker, on_delete=models.CASCADE, related_name="queued")
    # Where a wake-up is sent when a slot frees.
    reply_channel = models.CharField(max_length=255)
    arrived_at = models.DateTimeField(db_index=True)
    # Fair queueing (issue 20): who asked (a consumer key's or contributor's id, else the
    # address), the round of the queue it is served in (its turn: round-robin across
    # consumers; a consumer of priority p has 1 + p requests a round), and its priority
    # (first within its round).
    consumer = models.CharField(max_length=80, blank=True, default="", db_default="")
    turn = models.PositiveBigIntegerField(default=0, db_default=0)
    priority = models.IntegerField(default=0, db_default=0)
    # What it needs of a node (``routing.services.Demand``, the extension in ``feature``): a
    # waiting request holds back only claims on nodes that could serve it.
    feature = models.CharField(max_length=32, blank=True, default="", db_default="")
    num_ctx = models.PositiveIntegerField(default=0, db_default=0)
    num_predict = models.PositiveIntegerField(default=0, db_default=0)
    # The sessions that already failed it (failover), as ",12,34,": it holds none of them back.
    tried = models.TextField(blank=True, default="", db_default="")

    class Meta:
        ordering = ["turn", "-priority", "arrived_at", "request_id"]
        indexes = [
            models.Index(fields=["model", "turn", "arrived_at"], name="queued_fair_order"),
        ]

    def __str__(self) -> str:
        return self.request_id


class QueueRound(models.Model):
    """The round of a model's queue being served: the highest turn a queued request claimed a
    slot in (issue 20). It only moves forward, so a consumer that keeps one request answering
    and one waiting cannot keep joining a round it has already had its share of."""

    model = models.CharField(max_length=64, primary_key=True)
    turn = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.model}: round {self.turn}"


class QueueAccount(models.Model):
    """A consumer's share of its latest round in a model's queue: ``used`` of its requests were
    given turn ``turn`` (served or still waiting). A consumer of priority p has 1 + p a round.
    Accounts of rounds already over mean nothing and are pruned by the workers' housekeeping."""

    model = models.CharField(max_length=64)
    consumer = models.CharField(max_length=80, blank=True, default="")
    turn = models.PositiveBigIntegerField()
    used = models.PositiveIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["model", "consumer"], name="queue_account_unique")
        ]
        indexes = [models.Index(fields=["model", "turn"], name="queue_account_turn")]

    def __str__(self) -> str:
        return f"{self.model} {self.consumer}: {self.used} in round {self.turn}"


class ConsumerKey(models.Model):
    """An API key an operator issued to a consumer (issue 20), hashed at rest, with its own
    limits; anonymous use stays allowed at the anonymous limits."""

    name = models.CharField(max_length=100, help_text="Who it was issued to")
    prefix = models.CharField(max_length=16, help_text="The key's first characters, to tell it")
    key_hash = models.CharField(max_length=64, unique=True)
    rate_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Chat requests a minute; empty: the anonymous rate"
    )
    max_concurrent = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Requests at once; empty: the anonymous limit"
    )
    priority = models.SmallIntegerField(
        default=0,
        help_text="Its requests' priority: first within each round of a model's queue, and "
        "1 + priority requests a round (README, 'Fair queues and priority')",
    )
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class ConsumerStream(models.Model):
    """A consumer's request from the moment it is accepted until its answer ends (queued, in
    flight, or between failover attempts): counts concurrent requests per consumer."""

    request_id = models.CharField(max_length=64, primary_key=True)
    client_ip = models.GenericIPAddressField(null=True, blank=True, db_index=True)
    # Whose request it is (``routing.identity.Consumer.id``): ``key:<id>``,
    # ``contributor:<id>`` or ``ip:<address>``; what the concurrent-request limit counts.
    consumer = models.CharField(max_length=80, blank=True, default="", db_default="", db_index=True)
    worker = models.ForeignKey(RouterWorker, on_delete=models.CASCADE, related_name="consumers")
    started_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.request_id


class RequestCount(models.Model):
    """Consumer requests that ended, counted for /metrics and the admin's overview (issue 17).

    One row per minute and per model, front end, outcome and the histogram buckets that the
    request's time to first token and duration fell in (``routing.metrics``); a request adds
    itself to its row in the transaction that frees its slot. Minutes older than an hour are
    folded into ``minute`` 0, so the table stays small and every sum stays exact.
    """

    minute = models.BigIntegerField(help_text="Minutes since the epoch; 0 for all older ones")
    model = models.CharField(max_length=64)
    api = models.CharField(max_length=8)
    outcome = models.CharField(max_length=16)
    ttft_bucket = models.SmallIntegerField(help_text="-1: no first token")
    duration_bucket = models.SmallIntegerField(help_text="-1: not timed (refused)")
    requests = models.BigIntegerField(default=0)
    tokens = models.BigIntegerField(default=0)
    ttft_seconds = models.FloatField(default=0.0, help_text="Sum over the requests")
    duration_seconds = models.FloatField(default=0.0, help_text="Sum over the requests")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["minute", "model", "api", "outcome", "ttft_bucket", "duration_bucket"],
                name="request_count_key",
            )
        ]

    def __str__(self) -> str:
        return f"{self.minute} {self.model} {self.api} {self.outcome}"


class EventCount(models.Model):
    """Events counted for /metrics other than requests: node errors by reason, refusals by the
    limit that refused them. Each worker adds what it counted about once a second."""

    kind = models.CharField(max_length=16)
    label = models.CharField(max_length=64)
    count = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "label"], name="event_count_key")]

    def __str__(self) -> str:
        return f"{self.kind} {self.label}"
