"""Migration nodes/0011 (red-team F9 of issue 20): names unique without case. Records that a
past race let in with names differing only in case are renamed before the index is made: the
oldest keeps its name."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

pytestmark = [pytest.mark.django_db(transaction=True)]

BEFORE = [("nodes", "0010_merge_identity_probes")]
AFTER = [("nodes", "0011_contributor_name_unique_lower")]


def test_names_differing_only_in_case_are_renamed_and_the_oldest_keeps_its_own():
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    old = executor.loader.project_state(BEFORE).apps.get_model("nodes", "Contributor")
    now = timezone.now()
    for index, name in enumerate(["ada", "ADA", "grace", "Ada"]):
        old.objects.create(
            key_hash=f"{index}" * 64, token_hash=f"{index + 5}" * 64, name=name,
            first_seen=now + timedelta(minutes=index), last_seen=now,
        )  # fmt: skip
    executor = MigrationExecutor(connection)
    executor.migrate(AFTER)
    new = executor.loader.project_state(AFTER).apps.get_model("nodes", "Contributor")
    names = dict(new.objects.values_list("key_hash", "name"))
    assert names["0" * 64] == "ada" and names["2" * 64] == "grace"
    renamed = {names["1" * 64], names["3" * 64]}
    assert len({name.lower() for name in names.values()}) == 4
    assert all(name.startswith(("ADA-", "Ada-")) for name in renamed)
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
