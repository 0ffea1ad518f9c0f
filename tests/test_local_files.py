"""The router's local folder, embedded database and secret key are readable by their owner only,
and are the router's own.

A real router is started as ``tests/procs.py`` starts one (``manage.py migrate``, then daphne)
with a local folder of its own, and its files are looked at with ``stat`` while it serves: mode
bits, not access attempts, because root can read anything and the tests may run as root. A
folder or file "of another user" is made with ``chown``, so those tests need root.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.sqlite3.base import DatabaseWrapper

from idleclaw_site import local_files
from tests import procs
from tests.conftest import ROOMY_ENV

# A user that owns nothing on this machine: the "other user".
STRANGER = 12345
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user "
                                "(chown) needs root")
A_KEY = "k" * 50  # a SECRET_KEY from the environment, so no key file is involved


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


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``manage.py args`` as an operator runs it; its output as text."""
    return subprocess.run([procs.PYTHON, "manage.py", *args], cwd=procs.ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def refusal(result: subprocess.CompletedProcess) -> str:
    """The ImproperlyConfigured message a failed ``manage.py`` printed last."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if "ImproperlyConfigured: " in line]
    assert lines, result.stderr
    return lines[-1].split("ImproperlyConfigured: ", 1)[1]


def a_tree(top: Path) -> dict[str, int]:
    """A folder that is not the router's, with the modes such a tree has; returns them."""
    (top / "sub").mkdir(parents=True)
    (top / "readme.txt").write_text("x")
    (top / "sub" / "app.conf").write_text("x")
    (top / "secret_key").write_text("someone-elses-" + "k" * 40)
    for path in (top, top / "sub"):
        os.chmod(path, 0o755)
    for path in (top / "readme.txt", top / "sub" / "app.conf", top / "secret_key"):
        os.chmod(path, 0o644)
    return modes_below(top)


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
def test_the_router_keeps_seeing_what_another_process_writes_to_its_database(tmp_path):
    # Regression: checking the files' modes opened and closed them for every new connection,
    # and closing a descriptor drops all of the process's POSIX locks on the file, SQLite's
    # among them. A writer in another process (manage.py, an operator's script) then took
    # itself for the last connection, checkpointed and removed the WAL, and the router never
    # saw a later write again.
    import contextlib
    import sqlite3

    local = tmp_path / "local"
    db_path = local / "db.sqlite3"
    router, url = procs.start_router(db_path, {**router_env(local), **ROOMY_ENV})
    seen = []
    try:
        for n in range(4):
            with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as db, db:
                db.execute(
                    "INSERT INTO routing_queuedrequest (request_id, model, worker_id,"
                    " reply_channel, arrived_at) VALUES (?, 'other:1b', 'elsewhere', 'x',"
                    " '2026-01-01 00:00:00')",
                    (f"written-elsewhere-{n}",),
                )
            # A request between writes opens the router's connections.
            requests.post(f"{url}/api/chat", json={"model": "none:1b", "messages": [
                {"role": "user", "content": "hi"}]}, timeout=10)
            seen.append(requests.get(f"{url}/health", timeout=10).json()["queued_requests"])
    finally:
        router.stop()
    assert seen == [1, 2, 3, 4]


@pytest.mark.e2e
def test_loose_modes_are_repaired_at_start_and_the_repair_is_logged(tmp_path, usual_umask):
    local = tmp_path / "local"
    db = local / "db.sqlite3"
    procs.start_router(db, router_env(local))[0].stop()  # a router that ran here before
    (local / "static" / "admin").mkdir(parents=True)
    (local / "static" / "admin" / "base.css").write_text("body {}")
    (local / "db.sqlite3-wal").write_bytes(b"")  # as a crash would leave it
    (local / "test-4242.sqlite3").write_bytes(b"")  # a test run's leftover
    outside = tmp_path / "not-ours.txt"
    outside.write_text("someone else's file")
    os.symlink(outside, local / "link-to-elsewhere")
    # As the router before issue 12 left them, and as a copy or an unpacked backup may.
    for path in (local, local / "static", local / "static" / "admin"):
        os.chmod(path, 0o755)
    for path in (db, local / "db.sqlite3-wal", local / "secret_key", local / "test-4242.sqlite3",
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
    private = ("db.sqlite3", "db.sqlite3-wal", "secret_key", "test-4242.sqlite3")
    for name in ("", *(f"/{name}" for name in private)):
        assert f"{local}{name} " in repaired
    assert "static" not in repaired
    found.pop("link-to-elsewhere")  # a link's own mode means nothing; it was not followed:
    assert mode(outside) == 0o644
    # The router's own files are private; the rest of the folder is not walked (nobody else
    # can reach it through the 0700 folder anyway).
    assert found == {".": 0o700, **dict.fromkeys(private, 0o600), "db.sqlite3-shm": 0o600,
                     "static": 0o755, "static/admin": 0o755, "static/admin/base.css": 0o644}


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


def test_repair_touches_only_the_routers_own_files_takes_permissions_away_and_follows_no_link(
    tmp_path
):
    local = tmp_path / "local"
    local.mkdir()
    os.chmod(local, 0o755)
    db = local / "db.sqlite3"
    db.write_text("x")
    os.chmod(db, 0o444)
    (local / "secret_key").write_text("k")
    os.chmod(local / "secret_key", 0o640)
    for name in ("test-77.sqlite3", "test-77_1.sqlite3-wal", "notes.txt", "script"):
        (local / name).write_text("x")
    for name in ("test-77.sqlite3", "test-77_1.sqlite3-wal", "notes.txt"):
        os.chmod(local / name, 0o644)
    os.chmod(local / "script", 0o775)
    (local / "sub").mkdir()
    (local / "sub" / "test-1.sqlite3").write_text("x")
    for path in (local / "sub", local / "sub" / "test-1.sqlite3"):
        os.chmod(path, 0o755)
    os.mkfifo(local / "db.sqlite3-wal", 0o666)
    os.chmod(local / "db.sqlite3-wal", 0o666)
    target = tmp_path / "target"
    target.write_text("x")
    os.chmod(target, 0o666)
    os.symlink(target, local / "db.sqlite3-shm")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(local / "db.sqlite3-journal"))
        failures: list[str] = []
        changed = local_files.secure_private_files(local, str(db), failures)
        modes = modes_below(local)
    assert failures == []
    assert mode(target) == 0o666  # the link was not followed
    modes.pop("db.sqlite3-shm")
    modes.pop("db.sqlite3-journal")  # a socket is not the router's
    assert modes == {
        ".": 0o700, "db.sqlite3": 0o400,  # never made writable
        "secret_key": 0o600, "test-77.sqlite3": 0o600, "test-77_1.sqlite3-wal": 0o600,
        "db.sqlite3-wal": 0o600,  # a FIFO: opened without waiting for a writer
        "notes.txt": 0o644, "script": 0o775, "sub": 0o755, "sub/test-1.sqlite3": 0o755,
    }
    assert sorted(line.split(" ")[0] for line in changed) == sorted(
        str(local / name) for name in ("", "db.sqlite3", "secret_key", "test-77.sqlite3",
                                       "test-77_1.sqlite3-wal", "db.sqlite3-wal")
    )
    assert local_files.secure_private_files(local, str(db), failures) == []  # nothing left


# ---- the folder and the key must be the router's own (red-team finding F6)


@pytest.mark.parametrize("key", [A_KEY, ""], ids=["SECRET_KEY set", "key file"])
def test_a_local_folder_that_is_a_link_is_refused_and_nothing_behind_it_is_changed(tmp_path,
                                                                                   key):
    tree = tmp_path / "victim-tree"
    before = a_tree(tree)
    link = tmp_path / "evil-link"
    os.symlink(tree, link)
    result = manage("check", env={"IDLECLAW_LOCAL_DIR": str(link), "SECRET_KEY": key,
                                  "IDLECLAW_SQLITE_PATH": str(link / "db.sqlite3")})
    assert refusal(result) == (
        f"The router's local folder {link} (IDLECLAW_LOCAL_DIR) is a symbolic link; it holds "
        "the secret key and the database, and must be a real folder. Set IDLECLAW_LOCAL_DIR "
        f"to the folder the link points to ({tree}) if that is the one meant.")
    assert modes_below(tree) == before
    assert not (tree / "db.sqlite3").exists()


def test_a_local_folder_is_never_walked(tmp_path):
    # IDLECLAW_LOCAL_DIR pointed at a tree of the operator's own by mistake (/srv/www, $HOME):
    # only the folder itself and the router's own files lose permissions.
    tree = tmp_path / "www"
    before = a_tree(tree)
    result = manage("check", env={"IDLECLAW_LOCAL_DIR": str(tree), "SECRET_KEY": A_KEY})
    assert result.returncode == 0, result.stderr
    assert modes_below(tree) == {**before, ".": 0o700, "secret_key": 0o600, "db.sqlite3": 0o600}


def test_a_local_folder_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(ImproperlyConfigured, match="is not a folder"):
        local_files.read_secret_key(path)


@needs_root
@pytest.mark.parametrize("key", [A_KEY, ""], ids=["SECRET_KEY set", "key file"])
def test_a_local_folder_of_another_user_is_refused_even_for_root(tmp_path, key):
    # The red team's reproduction: a world-writable folder of uid 12345 with a key they chose.
    shared = tmp_path / "shared-local"
    shared.mkdir()
    (shared / "secret_key").write_text("attacker-chosen-secret-key-" + "x" * 30)
    for path in (shared, shared / "secret_key"):
        os.chown(path, STRANGER, STRANGER)
    os.chmod(shared, 0o777)
    env = {"IDLECLAW_LOCAL_DIR": str(shared), "SECRET_KEY": key,
           "IDLECLAW_SQLITE_PATH": str(shared / "db.sqlite3")}
    result = manage("migrate", "--noinput", env=env)
    assert refusal(result) == (
        f"The router's local folder {shared} (IDLECLAW_LOCAL_DIR) belongs to uid {STRANGER}, but "
        "the router runs as root (uid 0). The folder holds the secret key and the database, and "
        "its owner could read or replace them. Run the router as the folder's owner, or set "
        "IDLECLAW_LOCAL_DIR to a folder of root (uid 0)'s own (a missing one is created, "
        "private).")
    assert mode(shared) == 0o777  # not "made private" while it stays theirs
    assert sorted(os.listdir(shared)) == ["secret_key"]


@needs_root
def test_a_secret_key_file_of_another_user_is_refused(tmp_path):
    local = tmp_path / "local"
    local.mkdir(mode=0o700)
    (local / "secret_key").write_text("attacker-chosen")
    os.chown(local / "secret_key", STRANGER, STRANGER)
    os.chmod(local / "secret_key", 0o600)
    result = manage("check", env={"IDLECLAW_LOCAL_DIR": str(local), "SECRET_KEY": ""})
    assert refusal(result) == (
        f"The secret key file {local}/secret_key belongs to uid {STRANGER}, not to root (uid 0) "
        "that the router runs as: its owner may have chosen the key and can sign admin sessions "
        "with it. Delete the file (a new key is generated; whoever is signed in to the admin "
        "signs in again) or set SECRET_KEY.")


@pytest.mark.parametrize("loose", [0o666, 0o620, 0o602])
def test_a_secret_key_file_others_may_write_is_refused(tmp_path, loose):
    local = tmp_path / "local"
    local.mkdir(mode=0o700)
    (local / "secret_key").write_text("maybe-not-ours")
    os.chmod(local / "secret_key", loose)
    with pytest.raises(ImproperlyConfigured) as refused:
        local_files.read_secret_key(local)
    assert str(refused.value) == (
        f"The secret key file {local}/secret_key may be written by other users (mode "
        f"{loose:04o}), so the key in it may not be the one generated here. Delete the file (a "
        "new key is generated; whoever is signed in to the admin signs in again), or, if you "
        f"know the key is yours, make the file private: chmod 600 {local}/secret_key.")
    assert mode(local / "secret_key") == loose


def test_a_secret_key_that_is_a_link_is_refused_and_not_read(tmp_path):
    local = tmp_path / "local"
    local.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("a-key-planted-elsewhere")
    os.chmod(elsewhere, 0o600)
    os.symlink(elsewhere, local / "secret_key")
    with pytest.raises(ImproperlyConfigured, match="secret_key is a symbolic link"):
        local_files.read_secret_key(local)


def test_a_readable_secret_key_of_our_own_is_made_private_and_used(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    os.chmod(local, 0o755)
    (local / "secret_key").write_text("our-own-key\n")
    os.chmod(local / "secret_key", 0o644)
    assert local_files.read_secret_key(local) == "our-own-key"
    assert (mode(local), mode(local / "secret_key")) == (0o700, 0o600)
    local_files.log_repairs()  # what this test repaired is not left for another to see


def test_a_new_secret_key_is_generated_private_in_a_new_folder(tmp_path, usual_umask):
    local = tmp_path / "new" / "local"
    key = local_files.read_secret_key(local)
    assert len(key) >= 50
    assert (local / "secret_key").read_text() == key
    assert (mode(local), mode(local / "secret_key")) == (0o700, 0o600)
    assert local_files.read_secret_key(local) == key


@needs_root
def test_a_database_file_of_another_user_is_refused(tmp_path):
    outside = tmp_path / "srv"
    outside.mkdir()
    db = outside / "db.sqlite3"
    db.write_bytes(b"")
    os.chown(db, STRANGER, STRANGER)
    os.chmod(db, 0o666)
    result = manage("check", env={"IDLECLAW_LOCAL_DIR": str(tmp_path / "local"),
                                  "SECRET_KEY": A_KEY, "IDLECLAW_SQLITE_PATH": str(db)})
    assert refusal(result) == (
        f"{db} belongs to uid {STRANGER}, not to root (uid 0) that the router runs as: its owner "
        "could read the admin's sessions in it or replace it. Run the router as its owner, or "
        "give the file to this user (chown) if it is the router's own.")
    assert mode(db) == 0o666


# ---- a new database is private from its creation (red-team finding F7)

# Run in a fresh process: Django set up as the router sets it up, then the database's mode is
# read before any connection. The guard on connection_created is then disconnected, so that
# what SQLite creates (the -wal and -shm; the -journal follows the same rule) can only be
# private because the database file already was.
BEFORE_FIRST_CONNECTION = """
import json, os, stat, sys
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "idleclaw_site.settings")
django.setup()
from django.core.management import call_command
from django.db import connection
from django.db.backends.signals import connection_created

path = sys.argv[1]
def state(name):
    try:
        info = os.lstat(name)
    except FileNotFoundError:
        return None
    return [stat.S_IMODE(info.st_mode), info.st_size, info.st_ino]
report = {"before": state(path), "connected": connection.connection is not None}
report["guard"] = connection_created.disconnect(dispatch_uid="idleclaw-private-files")
call_command("migrate", verbosity=0)
report["after"] = {suffix: state(path + suffix) for suffix in ("", "-wal", "-shm")}
print(json.dumps(report))
"""


def test_a_new_database_outside_the_local_folder_is_0600_before_django_opens_it(
    tmp_path, usual_umask
):
    outside = tmp_path / "srv"
    outside.mkdir()
    os.chmod(outside, 0o755)  # where other users can look
    db = outside / "db.sqlite3"
    result = subprocess.run(
        [procs.PYTHON, "-c", BEFORE_FIRST_CONNECTION, str(db)], cwd=procs.ROOT,
        env={**os.environ, "IDLECLAW_LOCAL_DIR": str(tmp_path / "local"), "SECRET_KEY": A_KEY,
             "IDLECLAW_SQLITE_PATH": str(db)},
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["before"] is not None, "Django was set up and the database did not exist"
    before_mode, before_size, inode = report["before"]
    assert (before_mode, before_size, report["connected"], report["guard"]) == (
        0o600, 0, False, True)
    after = report["after"]
    assert after[""][2] == inode  # SQLite used that file and never made another
    assert {suffix: found[0] for suffix, found in after.items()} == {
        "": 0o600, "-wal": 0o600, "-shm": 0o600}


def test_migrate_of_a_fresh_database_outside_the_local_folder_leaves_it_private(
    tmp_path, usual_umask
):
    outside = tmp_path / "srv"
    outside.mkdir()
    os.chmod(outside, 0o755)
    db = outside / "db.sqlite3"
    result = manage("migrate", "--noinput", "-v0",
                    env={"IDLECLAW_LOCAL_DIR": str(tmp_path / "local"), "SECRET_KEY": A_KEY,
                         "IDLECLAW_SQLITE_PATH": str(db)})
    assert result.returncode == 0, result.stderr
    assert {path.name: mode(path) for path in outside.iterdir()} == {"db.sqlite3": 0o600}
