"""The operator's admin shows the live network."""

from __future__ import annotations

import contextlib
import sqlite3

import pytest
from django.utils import timezone

from nodes.models import NodeModel, NodeSession, RouterWorker
from tests import procs

pytestmark = pytest.mark.django_db


@pytest.fixture
def live_node():
    now = timezone.now()
    worker = RouterWorker.objects.create(worker_id="w", started_at=now, last_seen=now)
    session = NodeSession.objects.create(
        node_id="node-shown",
        channel_name="c",
        worker=worker,
        connected_at=now,
        last_seen=now,
        client_ip="10.0.0.1",
        tokens_per_s=42.0,
    )
    NodeModel.objects.create(session=session, name="llama3.2:3b", size=1)
    return session


@pytest.mark.parametrize(
    "url",
    [
        "/admin/nodes/nodesession/",
        "/admin/nodes/routerworker/",
        "/admin/nodes/nodeban/",
        "/admin/routing/inflightrequest/",
        "/admin/routing/queuedrequest/",
        "/admin/routing/consumerstream/",
        "/admin/routing/consumerkey/",
    ],
)
def test_admin_lists_render(admin_client, live_node, url):
    response = admin_client.get(url)
    assert response.status_code == 200


def test_the_operators_pages_render(admin_client, live_node):
    for url in (
        "/admin/",
        "/admin/admin/logentry/",
        "/admin/nodes/nodesession/?model=llama3.2%3A3b&cooled_down=no&draining__exact=0",
    ):
        assert admin_client.get(url).status_code == 200, url
    filtered = admin_client.get("/admin/nodes/nodesession/?cooled_down=yes").content.decode()
    assert "node-shown" not in filtered


def test_admin_shows_the_node_and_does_not_let_it_be_edited(admin_client, live_node):
    listing = admin_client.get("/admin/nodes/nodesession/").content.decode()
    assert "node-shown" in listing and "llama3.2:3b" in listing
    page = admin_client.get(f"/admin/nodes/nodesession/{live_node.pk}/change/")
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert admin_client.get("/admin/nodes/nodesession/add/").status_code == 403


def test_operator_can_add_a_ban(admin_client):
    response = admin_client.post(
        "/admin/nodes/nodeban/add/", {"kind": "ip", "value": "10.6.6.6", "reason": "spam"}
    )
    assert response.status_code == 302
    from nodes.models import NodeBan

    assert NodeBan.objects.get().value == "10.6.6.6"


def test_the_ban_list_shows_what_each_ban_covers(admin_client):
    for value in ("2001:db8:9:9::1", "10.6.6.8"):
        admin_client.post("/admin/nodes/nodeban/add/", {"kind": "ip", "value": value})
    admin_client.post("/admin/nodes/nodeban/add/", {"kind": "node_id", "value": "bad-node"})
    listing = admin_client.get("/admin/nodes/nodeban/").content.decode()
    assert ">Covers<" in listing
    for covered in ("2001:db8:9:9::/64", "10.6.6.8", "bad-node"):
        assert f'<td class="field-covers">{covered}</td>' in listing


def test_an_ip_ban_must_name_an_ip_address(admin_client):
    response = admin_client.post(
        "/admin/nodes/nodeban/add/", {"kind": "ip", "value": "not-an-ip", "reason": "typo"}
    )
    assert response.status_code == 200  # the form again, with the error
    assert b"valid IPv4 or IPv6 address" in response.content


def test_the_migrations_create_the_viewer_and_operator_groups(tmp_path):
    # Read from a database `manage.py migrate` wrote: the test database may have been flushed
    # by a transactional test before this one (they run in any order under xdist).
    db_path = tmp_path / "migrated.sqlite3"
    procs.migrate_database(db_path)
    with contextlib.closing(sqlite3.connect(db_path)) as db:

        def codenames(group: str) -> set[str]:
            return {
                codename for (codename,) in db.execute(
                    "SELECT p.codename FROM auth_group g"
                    " JOIN auth_group_permissions gp ON gp.group_id = g.id"
                    " JOIN auth_permission p ON p.id = gp.permission_id WHERE g.name = ?",
                    (group,),
                )
            }  # fmt: skip

        viewer, operator = codenames("viewer"), codenames("operator")
    assert {"view_nodesession", "view_inflightrequest", "view_nodeban", "view_logentry"} <= viewer
    assert all(name.startswith("view_") for name in viewer)
    assert "view_consumerkey" in viewer
    assert operator - viewer == {
        "operate_nodesession", "cancel_inflightrequest", "add_nodeban", "change_nodeban",
        "delete_nodeban", "change_contributor", "add_consumerkey", "change_consumerkey",
    }  # fmt: skip
    assert {"view_contributor", "view_contributormodel"} <= viewer


# --- consumer keys (issue 20) ----------------------------------------------------------------


def staff(group: str):
    from django.test import Client

    from tests import ops

    client = Client()
    client.force_login(ops.staff_user(group, group))
    return client


def test_an_operator_issues_a_consumer_key_shown_once_and_stored_only_as_a_hash():
    import hashlib
    import re

    from routing.models import ConsumerKey

    operator = staff("operator")
    page = operator.post(
        "/admin/routing/consumerkey/add/",
        {"name": "Ada's lab", "rate_per_minute": "30", "max_concurrent": "4", "priority": "1"},
    )
    assert page.status_code == 200
    assert "no-store" in page["Cache-Control"]
    key = re.search(r"ick_[0-9a-f]{48}", page.content.decode()).group(0)
    row = ConsumerKey.objects.get()
    assert row.key_hash == hashlib.sha256(key.encode("ascii")).hexdigest()
    assert (row.prefix, row.rate_per_minute, row.max_concurrent, row.priority, row.active) == (
        key[4:12], 30, 4, 1, True
    )
    # Never again: neither the list nor the key's own page shows the key or its hash.
    for url in ("/admin/routing/consumerkey/", f"/admin/routing/consumerkey/{row.pk}/change/"):
        shown = operator.get(url).content.decode()
        assert "Ada&#x27;s lab" in shown and row.prefix in shown
        assert key not in shown and row.key_hash not in shown


def test_an_operator_revokes_keys_and_a_viewer_only_looks():
    from routing import identity
    from routing.models import ConsumerKey

    _, prefix, hashed = identity.new_consumer_key()
    row = ConsumerKey.objects.create(name="old", prefix=prefix, key_hash=hashed)
    viewer = staff("viewer")
    assert viewer.get("/admin/routing/consumerkey/").status_code == 200
    assert viewer.get("/admin/routing/consumerkey/add/").status_code == 403
    viewer.post(
        "/admin/routing/consumerkey/", {"action": "revoke", "_selected_action": [str(row.pk)]}
    )
    row.refresh_from_db()
    assert row.active
    operator = staff("operator")
    response = operator.post(
        "/admin/routing/consumerkey/", {"action": "revoke", "_selected_action": [str(row.pk)]}
    )
    assert response.status_code == 302
    row.refresh_from_db()
    assert not row.active
