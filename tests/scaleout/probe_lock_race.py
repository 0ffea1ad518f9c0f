"""Race a prober's writes against finishing requests on the PostgreSQL database in
``DATABASE_URL`` (issue 20, red team F1): two threads finish requests on a contributor's two
nodes (locking each session, then the contributor) while a third records probe rounds for both
nodes. Each thread has its own connection, as two router workers and a prober would. Prints
JSON: the errors each thread met, and what was counted.

Usage: DATABASE_URL=postgres://... python -m tests.scaleout.probe_lock_race [ROUNDS]
"""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "idleclaw_site.settings")
django.setup()

from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from nodes.models import Contributor, NodeModel, NodeSession, RouterWorker  # noqa: E402
from nodes.probes import Tally, probe_results_record  # noqa: E402
from routing.models import InflightRequest  # noqa: E402
from routing.services import Outcome, inflight_finish  # noqa: E402


def main(rounds: int) -> None:
    now = timezone.now()
    worker = RouterWorker.objects.create(worker_id="w1", started_at=now, last_seen=now)
    owner = Contributor.objects.create(
        key_hash="a" * 64, token_hash="b" * 64, name="racer", first_seen=now, last_seen=now
    )
    sessions = []
    for index in range(2):
        session = NodeSession.objects.create(
            node_id=f"n{index}", channel_name=f"chan.n{index}", worker=worker, max_concurrent=10,
            connected_at=now, last_seen=now, contributor=owner,
        )
        NodeModel.objects.create(session=session, name="m")
        sessions.append(session)
    connection.close()
    start = threading.Barrier(3)
    errors: list[str] = []

    def finisher(session: NodeSession) -> None:
        start.wait()
        try:
            for _ in range(rounds):
                request_id = uuid.uuid4().hex
                InflightRequest.objects.create(
                    request_id=request_id, session=session, worker=worker, model="m",
                    reply_channel="r", created_at=timezone.now(),
                )
                inflight_finish(
                    request_id=request_id,
                    outcome=Outcome(kind="completed", tokens=7, ttft_ms=10, tokens_per_s=5),
                )
        except Exception as error:  # noqa: BLE001 - reported to the test
            errors.append(f"finish: {type(error).__name__}: {str(error)[:200]}")
        finally:
            connection.close()

    def prober() -> None:
        start.wait()
        try:
            for _ in range(rounds):
                probe_results_record(tallies={s.pk: Tally(passed=1) for s in sessions})
        except Exception as error:  # noqa: BLE001 - reported to the test
            errors.append(f"probe: {type(error).__name__}: {str(error)[:200]}")
        finally:
            connection.close()

    threads = [threading.Thread(target=finisher, args=(s,)) for s in sessions]
    threads.append(threading.Thread(target=prober))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    owner.refresh_from_db()
    print(json.dumps({
        "errors": errors,
        "served": owner.served,
        "probes_passed": owner.probes_passed,
        "left_inflight": InflightRequest.objects.count(),
    }))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
