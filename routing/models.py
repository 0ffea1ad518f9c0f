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
