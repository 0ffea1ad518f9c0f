"""Race claims for a node's last slots on the PostgreSQL database in ``DATABASE_URL``, from
several threads (each with its own connection, as several workers would have); print JSON.

Usage: DATABASE_URL=postgres://... python -m tests.scaleout.claim_probe
"""

from __future__ import annotations

import json
import os
import threading
import uuid

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "idleclaw_site.settings")
django.setup()

from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from nodes.models import NodeModel, NodeSession, RouterWorker  # noqa: E402
from routing.models import InflightRequest  # noqa: E402
from routing.services import Claim, inflight_claim  # noqa: E402

CLAIMERS = 12


def main() -> None:
    now = timezone.now()
    worker = RouterWorker.objects.create(worker_id="w1", started_at=now, last_seen=now)
    for name, slots in (("small", 2), ("tiny", 1)):
        session = NodeSession.objects.create(node_id=name, channel_name=f"chan.{name}",
                                             worker=worker, max_concurrent=slots,
                                             connected_at=now, last_seen=now)
        NodeModel.objects.create(session=session, name="m")
    start = threading.Barrier(CLAIMERS)
    results: list[str] = []

    def claim() -> None:
        try:
            start.wait()
            result = inflight_claim(model="m", request_id=uuid.uuid4().hex,
                                    reply_channel="reply", worker_id="w1",
                                    arrived_at=timezone.now())
            results.append(result.node_id if isinstance(result, Claim) else "none")
        except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
            results.append(f"error: {exc!r}")
        finally:
            connection.close()

    threads = [threading.Thread(target=claim) for _ in range(CLAIMERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = {name: InflightRequest.objects.filter(session__node_id=name).count()
            for name in ("small", "tiny")}
    print(json.dumps({"results": sorted(results), "held": held}))


if __name__ == "__main__":
    main()
