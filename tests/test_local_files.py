"""The router's local folder, embedded database and secret key are readable by their owner only.

A real router is started as ``tests/procs.py`` starts one (``manage.py migrate``, then daphne)
with a local folder of its own, and its files are looked at with ``stat`` while it serves: mode
bits, not access attempts, because root can read anything and the tests may run as root.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from django.db.backends.sqlite3.base import DatabaseWrapper

from idleclaw_site import local_files
from tests import procs
from tests.conftest import ROOMY_ENV


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def modes_below(folder: Path) -> dict[str, int]:
    """Mode of the folder ('.') and of everything under it, by relative path."""
    found = {".": mode(folder)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = mode(path)
    return found


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The umask most systems give a login (022), so that files are created group- and
    world-readable unless the router itself prevents it; the router subprocesses inherit it."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def router_env(local: Path, **extra: str) -> dict[str, str]:
    # An empty SECRET_KEY makes the router generate its own into the local folder.
    return {**ROOMY_ENV, "IDLECLAW_LOCAL_DIR": str(local), "SECRET_KEY": "", **extra}


@pytest.mark.e2e
def test_a_fresh_router_keeps_its_folder_database_and_secret_key_private(tmp_path, usual_umask):
    local = tmp_path / "local"
    router, url = procs.start_router(local / "db.sqlite3", router_env(local))
    try:
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        assert requests.post(f"{url}/api/chat", json={"model": "none:1b", "messages": [
            {"role": "user", "content": "hi"}]}, timeout=10).status_code == 503
        procs.wait_until(lambda: (local / "db.sqlite3-wal").exists(), what="the -wal file")
        found = modes_below(local)
    finally:
        router.stop()
    assert {"db.sqlite3", "db.sqlite3-wal", "db.sqlite3-shm", "secret_key"} <= set(found)
    assert found == {name: 0o700 if name == "." else 0o600 for name in found}


@pytest.mark.e2e
def test_loose_modes_are_repaired_at_start_and_the_repair_is_logged(tmp_path, usual_umask):
    local = tmp_path / "local"
    db = local / "db.sqlite3"
    procs.start_router(db, router_env(local))[0].stop()  # a router that ran here before
    (local / "static" / "admin").mkdir(parents=True)
    (local / "static" / "admin" / "base.css").write_text("body {}")
    (local / "db.sqlite3-wal").write_bytes(b"")  # as a crash would leave it
    outside = tmp_path / "not-ours.txt"
    outside.write_text("someone else's file")
    os.symlink(outside, local / "link-to-elsewhere")
    # As the router before this fix left them, and as a copy or an unpacked backup may.
    for path in (local, local / "static", local / "static" / "admin"):
        os.chmod(path, 0o755)
    for path in (db, local / "db.sqlite3-wal", local / "secret_key",
                 local / "static" / "admin" / "base.css", outside):
        os.chmod(path, 0o644)

    router = procs.Proc("router", [procs.PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", "0",
                                   "idleclaw_site.asgi:application"],
                        env={**router_env(local), "IDLECLAW_SQLITE_PATH": str(db)})
    try:
        port = router.wait_for_line(r"Listening on TCP address 127\.0\.0\.1:(\d+)").group(1)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        found = modes_below(local)
    finally:
        router.stop()
    repaired = router.wait_for_line(r"WARNING idleclaw\.local_files made the router's private "
                                    r"files private again.*").group(0)
    for name in ("", "/db.sqlite3", "/db.sqlite3-wal", "/secret_key", "/static/admin/base.css"):
        assert f"{local}{name} " in repaired
    found.pop("link-to-elsewhere")  # a link's own mode means nothing; it was not followed:
    assert mode(outside) == 0o644
    assert found == {name: 0o700 if name in (".", "static", "static/admin") else 0o600
                     for name in found}


def test_a_database_created_later_is_private_from_its_first_connection(
    tmp_path, usual_umask, django_db_blocker
):
    # A test database, or one deleted and made again while the router runs: SQLite creates it
    # with the umask's mode (0644 here) and its -wal and -shm with the database's.
    path = tmp_path / "later.sqlite3"
    wrapper = DatabaseWrapper({
        "NAME": str(path), "ENGINE": "django.db.backends.sqlite3", "TIME_ZONE": None,
        "CONN_MAX_AGE": 0, "CONN_HEALTH_CHECKS": False, "AUTOCOMMIT": True,
        "ATOMIC_REQUESTS": False, "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL;"},
    })
    with django_db_blocker.unblock():
        try:
            with wrapper.cursor() as cursor:
                cursor.execute("CREATE TABLE t (x INTEGER)")
                cursor.execute("INSERT INTO t VALUES (1)")
                files = {p.name: mode(p) for p in tmp_path.iterdir()}
        finally:
            wrapper.close()
    assert files == {"later.sqlite3": 0o600, "later.sqlite3-wal": 0o600,
                     "later.sqlite3-shm": 0o600}


def test_repair_only_takes_permissions_away_and_skips_links_fifos_and_sockets(tmp_path):
    local = tmp_path / "local"
    local.mkdir(mode=0o755)
    os.chmod(local, 0o755)
    (local / "read-only").write_text("x")
    os.chmod(local / "read-only", 0o444)
    (local / "script").write_text("x")
    os.chmod(local / "script", 0o775)
    os.mkfifo(local / "fifo", 0o666)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(local / "sock"))
        target = tmp_path / "target"
        target.write_text("x")
        os.chmod(target, 0o666)
        os.symlink(target, local / "link")
        changed = local_files.secure_local_dir(local)
        assert mode(local) == 0o700
        assert mode(local / "read-only") == 0o400  # never made writable
        assert mode(local / "script") == 0o700
        assert mode(local / "fifo") == 0o600  # opened without waiting for a writer
        assert mode(target) == 0o666  # the link was not followed
    assert sorted(line.split(" ")[0] for line in changed) == sorted(
        str(local / name) for name in ("", "read-only", "script", "fifo")
    )
    assert local_files.secure_local_dir(local) == []  # nothing left to repair
