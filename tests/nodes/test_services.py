"""The node services against the real database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from nodes import services
from nodes.models import NodeSession, RouterWorker

pytestmark = pytest.mark.django_db


def make_sessions(count: int, *, silent_for: float = 30) -> list[int]:
    seen = timezone.now() - timedelta(seconds=silent_for)
    worker = RouterWorker.objects.create(worker_id="w1", started_at=seen, last_seen=seen)
    NodeSession.objects.bulk_create(
        NodeSession(node_id=f"n{i}", channel_name=f"chan.n{i}", worker=worker,
                    connected_at=seen, last_seen=seen)
        for i in range(count)
    )
    return list(NodeSession.objects.order_by("pk").values_list("pk", flat=True))


def test_touching_sessions_refreshes_them_and_reports_the_ones_that_are_gone():
    first, second, untouched = make_sessions(3)
    gone = services.node_sessions_touch(session_ids=[first, second, 999_999])
    assert gone == {999_999}
    fresh = timezone.now() - timedelta(seconds=5)
    assert set(NodeSession.objects.filter(last_seen__gte=fresh).values_list("pk", flat=True)) == {
        first, second}
    assert NodeSession.objects.get(pk=untouched).last_seen < fresh


def test_a_thousand_sessions_are_touched_in_a_few_statements():
    ids = make_sessions(1_200)
    with CaptureQueriesContext(connection) as queries:
        assert services.node_sessions_touch(session_ids=ids) == set()
    updates = [q["sql"] for q in queries if q["sql"].startswith("UPDATE")]
    assert len(updates) == 3  # 500 ids per statement
    fresh = timezone.now() - timedelta(seconds=5)
    assert NodeSession.objects.filter(last_seen__gte=fresh).count() == 1_200


def test_touching_no_sessions_runs_no_statement():
    with CaptureQueriesContext(connection) as queries:
        assert services.node_sessions_touch(session_ids=[]) == set()
    assert len(queries) == 0
