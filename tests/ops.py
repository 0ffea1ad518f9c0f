"""Helpers for the operator's tests (issue 17): staff in the documented groups, admin actions,
and scraping /metrics through the real ASGI application."""

from __future__ import annotations

import importlib
from typing import Any

from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.apps import apps
from django.contrib.auth.models import Group, User
from django.test import AsyncClient
from prometheus_client.parser import text_string_to_metric_families

from idleclaw_site.asgi import application
from tests.scripted_node import OPEN

NODES = "/admin/nodes/nodesession/"
REQUESTS = "/admin/routing/inflightrequest/"
TOKEN = "metrics-token-for-tests-0123456789"

_groups = importlib.import_module("routing.migrations.0005_ops_staff_groups")
_identity_groups = importlib.import_module("nodes.migrations.0009_identity_staff_permissions")
_key_groups = importlib.import_module("routing.migrations.0007_fairness_consumer_stream")


def staff_user(name: str, group: str) -> User:
    """A staff member in the "viewer" or "operator" group, as the data migration makes them
    (transactional tests flush the groups away; they are filled in again here)."""
    _groups.fill_groups(apps)
    _identity_groups.fill_groups(apps)
    _key_groups.fill_groups(apps)
    user = User.objects.create_user(name, password="unused", is_staff=True)
    user.groups.add(Group.objects.get(name=group))
    return user


async def staff_client(group: str) -> AsyncClient:
    user = await sync_to_async(staff_user)(group, group)
    client = AsyncClient()
    await client.aforce_login(user)
    return client


async def act(client: AsyncClient, changelist: str, action: str, pks: list[Any], **form: Any):
    """An admin action on the selected rows, as the changelist's form posts it."""
    return await client.post(
        changelist, {"action": action, "_selected_action": [str(pk) for pk in pks], **form}
    )


async def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """A GET through the router's own ASGI application (the API handler, as under daphne)."""
    raw = [(b"host", b"testserver")] + [
        (k.lower().encode(), v.encode()) for k, v in (headers or {}).items()
    ]
    exchange = ApplicationCommunicator(
        application,
        {
            "type": "http", "http_version": "1.1", "method": "GET", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
            "headers": raw, "client": ("10.3.0.1", 5000), "server": ("testserver", 80),
        },
    )  # fmt: skip
    OPEN.append(exchange)
    await exchange.send_input({"type": "http.request", "body": b""})
    start = await exchange.receive_output(5)
    body = b""
    while True:
        message = await exchange.receive_output(5)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers_out = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers_out, body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(found: dict, name: str, **labels: str) -> float:
    """One sample of ``samples()`` by name and labels."""
    return found[name, tuple(sorted(labels.items()))]
