"""Run the reaping services against the PostgreSQL database in ``DATABASE_URL`` while another
connection plays a second survivor; print what each call returned as JSON.

A script rather than an in-process test: the test process's Django is bound to its own
database, and the services must run in a process configured like a router worker.
Usage: DATABASE_URL=postgres://... python -m tests.scaleout.reap_probe
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import django
import psycopg

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "idleclaw_site.settings")
django.setup()

from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from nodes import services  # noqa: E402
from nodes.models import NodeSession, RouterWorker  # noqa: E402
from routing.models import InflightRequest  # noqa: E402


def worker(worker_id: str, *, silent_for: float) -> RouterWorker:
    seen = timezone.now() - timedelta(seconds=silent_for)
    return RouterWorker.objects.create(worker_id=worker_id, started_at=seen, last_seen=seen)


def session(node_id: str, on: RouterWorker, *, silent_for: float = 0) -> NodeSession:
    seen = timezone.now() - timedelta(seconds=silent_for)
    return NodeSession.objects.create(node_id=node_id, channel_name=f"chan.{node_id}",
                                      worker=on, connected_at=seen, last_seen=seen)


def request(request_id: str, node: NodeSession, consumer_on: RouterWorker) -> None:
    InflightRequest.objects.create(request_id=request_id, session=node, worker=consumer_on,
                                   model="m", reply_channel=f"reply.{request_id}",
                                   created_at=timezone.now())


def held_by_another_survivor(table: str, key: str, value: object):
    """A transaction on its own connection that has locked one row, as a reaper would."""
    conn = psycopg.connect(os.environ["DATABASE_URL"], connect_timeout=10)
    conn.execute(f"SELECT 1 FROM {table} WHERE {key} = %s FOR UPDATE", [value])
    return conn


def main() -> None:
    # A reaper that waits for another survivor's locks instead of skipping them fails fast.
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '5s'")
    timeout = 10 * 60  # long dead, whatever IDLECLAW_WORKER_TIMEOUT says
    live, dead = worker("live", silent_for=0), worker("dead", silent_for=timeout)
    node_on_dead, node_on_live = session("node-on-dead", dead), session("node-on-live", live)
    request("to-dead-node", node_on_dead, consumer_on=live)
    request("from-dead-consumer", node_on_live, consumer_on=dead)
    stale = session("stale", live, silent_for=timeout)
    request("to-stale-node", stale, consumer_on=live)

    other = held_by_another_survivor("nodes_routerworker", "worker_id", "dead")
    while_held = services.router_workers_reap(worker_id="live")
    other.rollback()
    other.close()
    reaped = services.router_workers_reap(worker_id="live")

    other = held_by_another_survivor("nodes_nodesession", "id", stale.pk)
    sessions_while_held = services.node_sessions_reap()
    other.rollback()
    other.close()
    sessions_reaped = services.node_sessions_reap()

    print(json.dumps({
        "while_held": [len(while_held.orphans), len(while_held.abandoned)],
        "orphans": [[o.request_id, o.reply_channel] for o in reaped.orphans],
        "abandoned": [[a.request_id, a.node_channel] for a in reaped.abandoned],
        "workers_left": sorted(RouterWorker.objects.values_list("worker_id", flat=True)),
        "sessions_while_held": [o.request_id for o in sessions_while_held],
        "sessions_reaped": [o.request_id for o in sessions_reaped],
        "sessions_left": sorted(NodeSession.objects.values_list("node_id", flat=True)),
        "requests_left": sorted(InflightRequest.objects.values_list("request_id", flat=True)),
    }))


if __name__ == "__main__":
    main()
