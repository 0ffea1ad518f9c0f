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

    def __str__(self) -> str:
        return self.request_id


class QueuedRequest(models.Model):
    """A consumer's request waiting for a free slot. The queue is per model and first in, first
    out across all workers: ``arrived_at`` (then ``request_id``) orders it."""

    request_id = models.CharField(max_length=64, primary_key=True)
    model = models.CharField(max_length=64, db_index=True)
    worker = models.ForeignKey(RouterWorker, on_delete=models.CASCADE, related_name="queued")
    # Where a wake-up is sent when a slot frees.
    reply_channel = models.CharField(max_length=255)
    arrived_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["arrived_at", "request_id"]

    def __str__(self) -> str:
        return self.request_id


class ConsumerStream(models.Model):
    """A consumer's request from the moment it is accepted until its answer ends (queued, in
    flight, or between failover attempts): counts concurrent requests per client address."""

    request_id = models.CharField(max_length=64, primary_key=True)
    client_ip = models.GenericIPAddressField(null=True, blank=True, db_index=True)
    worker = models.ForeignKey(RouterWorker, on_delete=models.CASCADE, related_name="consumers")
    started_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.request_id
