"""A process writing to the router's SQLite database while the router runs (a management
command: ``probe_nodes``, ``migrate``, a shell) and the router keep seeing each other's writes.

The router used to open and close its own database files on every new connection
(idleclaw_site/local_files.py), which dropped the POSIX locks SQLite held on them; the other
process then deleted the ``-wal`` file as if it were the last user, and the router's writes
went to a file nobody else read."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest
import requests

from tests import procs

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"


def test_the_router_and_another_process_see_each_others_writes(router, tmp_path, emulator):
    db = tmp_path / "router.sqlite3"
    node = procs.start_contributor(router.url, emulator.url)
    try:
        node.wait_for_line("registered")

        def ask() -> None:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            response = requests.post(f"{router.url}/v1/chat/completions", json=body, timeout=30)
            assert response.status_code == 200

        def completed() -> int:
            with closing(sqlite3.connect(db)) as connection:
                return connection.execute("SELECT completed FROM nodes_nodesession").fetchone()[0]

        ask()
        procs.wait_until(lambda: completed() == 1, what="the first answer counted")
        with closing(sqlite3.connect(db)) as connection:
            connection.execute("UPDATE nodes_nodesession SET reputation = 0.4")
            connection.commit()
        ask()
        procs.wait_until(lambda: completed() == 2, what="the router's write seen outside")
        assert (tmp_path / "router.sqlite3-wal").exists()
    finally:
        node.stop()
