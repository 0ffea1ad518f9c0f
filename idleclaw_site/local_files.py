"""The router's private files: the local folder, the embedded database and the secret key.

The local folder (``IDLECLAW_LOCAL_DIR``, ``.local/`` of the checkout by default) holds the
generated secret key and the SQLite database with its ``-wal`` and ``-shm`` files. Anyone who
reads them owns the router: a ``session_key`` from ``django_session`` opens ``/admin/`` as the
superuser, and the secret key signs anything. Whoever owns them can do more: replace the
database with one holding their own superuser, or choose the key. So (issue 12, defect 10, and
the red team's F6 and F7):

- **Ours, or the router does not start.** The folder must be a real folder (not a link) owned
  by the user the router runs as, and so must the secret key file and the database files: a
  folder or file of another user's is refused with ``ImproperlyConfigured``, which says what to
  do. That holds for root too: root owns what it creates, and a folder another user owns is
  still theirs to change back after root has made it private. A secret key file that others may
  write is refused as well (the key in it may not be the one generated here).
- **Private on creation.** The folder is created 0700 and the secret key 0600. SQLite would
  create a new database with mode 0644 minus the umask, and the ``-journal``, ``-wal`` and
  ``-shm`` files it creates later get the database's mode (``findCreateFileMode`` and
  ``unixOpenSharedMemory`` in SQLite's ``os_unix.c``); so ``repair_at_start`` creates a missing
  database file itself, empty and 0600 (SQLite takes an empty file for an empty database),
  before Django first opens it, and every file SQLite makes beside it is born 0600.
  ``secure_sqlite_files`` also runs for every new SQLite connection (the ``connection_created``
  signal, ``idleclaw_site.apps``), for a database made later: a test database (created in the
  0700 folder) or one deleted and made again.
- **Repaired at start.** ``repair_at_start`` runs when the settings are imported, so in every
  process (``manage.py``, daphne, the tests) before the database is opened: it takes group and
  other bits off the folder itself, the secret key, the database and its companions (wherever
  ``IDLECLAW_SQLITE_PATH`` puts them) and the test databases Django leaves in the folder, and
  off nothing else: the folder is never walked, so a wrong ``IDLECLAW_LOCAL_DIR`` cannot strip
  the permissions of a tree that is not the router's. What it changed is logged as a warning
  once logging is configured (``log_repairs``, from the app's ``ready``).

Permissions are only ever taken away, never added, and links are never followed. No process
umask is changed: the router's other files (logs, collected static files) are the operator's
business.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import re
import secrets
import stat
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger("idleclaw.local_files")

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# Bits nobody but the owner may have on the router's private files.
NOT_OWNER = 0o077
# Bits that let someone else change a file's contents.
WRITABLE_BY_OTHERS = 0o022
SECRET_KEY_FILE = "secret_key"
# The files SQLite keeps next to a database.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
# Test databases Django makes in the folder (settings: DATABASES TEST NAME, ``test-<pid>``, with
# ``_<n>`` for parallel clones), and what SQLite keeps beside them.
TEST_DATABASE = re.compile(r"test-[\w-]*\.sqlite3(-wal|-shm|-journal)?")

_OPEN_NO_FOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# Changes made while the settings were imported, before logging was configured; ``log_repairs``
# reports them. Startup facts of this one process, not shared state.
_repairs: list[str] = []
_failures: list[str] = []


def use_local_dir(path: Path, *, create: bool) -> bool:
    """Check that the local folder ``path`` is a real folder owned by this process's user and
    make it 0700 if it is looser (remembered for ``log_repairs``); with ``create``, create it
    (0700) if it is missing.

    Returns whether the folder exists. Raises ``ImproperlyConfigured`` when it is a link, not a
    folder, or another user's.
    """
    exists, changed = _local_dir(path, create, _failures)
    _repairs.extend(changed)
    return exists


def _local_dir(path: Path, create: bool, failures: list[str]) -> tuple[bool, list[str]]:
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, PRIVATE_DIR_MODE)  # cut by the umask, and set exactly below
        except FileExistsError:
            pass  # checked below like any folder found
    try:
        # O_NOFOLLOW: a link is refused here, never followed; what is checked and changed is
        # the folder this descriptor holds, even if the path is swapped meanwhile.
        fd = os.open(path, _OPEN_NO_FOLLOW | os.O_DIRECTORY)
    except FileNotFoundError:
        return False, []
    except OSError:
        raise ImproperlyConfigured(_unusable_dir(path)) from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise ImproperlyConfigured(_not_our_dir(path, info.st_uid))
        line = _take_away(fd, path, info.st_mode, failures)
    finally:
        os.close(fd)
    return True, [line] if line else []


def read_secret_key(local_dir: Path) -> str:
    """The secret key kept in ``local_dir``, generated (0600) on first use.

    The key file must be a regular file of this process's user that no one else may write;
    group and other read bits are taken away (and logged). Raises ``ImproperlyConfigured``
    otherwise, saying what to do.
    """
    use_local_dir(local_dir, create=True)
    path = local_dir / SECRET_KEY_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    key = secrets.token_urlsafe(50)
    # O_EXCL: two workers starting at once agree on the first key written (and a link in its
    # place is not followed).
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     PRIVATE_FILE_MODE)
    except FileExistsError:
        return _read_key(path)
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key


def repair_at_start(local_dir: Path, database: str | None) -> list[str]:
    """Check the router's private files and take group and other permissions off them: the
    local folder itself, the secret key and test databases in it, and the SQLite ``database``
    and its companions wherever they are (``None`` when the database is not SQLite). A missing
    database file is created empty and 0600 before Django opens it.

    Raises ``ImproperlyConfigured`` when the folder or a database file is another user's, or
    the folder is a link. Returns one line per file or folder changed, and remembers them for
    ``log_repairs``.
    """
    failures: list[str] = []
    changed = secure_private_files(local_dir, database, failures)
    _repairs.extend(changed)
    _failures.extend(failures)
    return changed


def secure_private_files(local_dir: Path, database: str | None,
                         failures: list[str]) -> list[str]:
    """What ``repair_at_start`` does, without remembering it: one line per change; files that
    could not be checked or changed are added to ``failures``."""
    if database is None:
        # PostgreSQL: the folder holds a secret key only if the settings generated one, and
        # ``read_secret_key`` has checked it then.
        return []
    exists, changed = _local_dir(local_dir, _inside(database, local_dir), failures)
    if exists:
        # In use, the key has been checked more closely by ``read_secret_key``.
        changed += _restrict(local_dir / SECRET_KEY_FILE, failures, must_own=False)
        with os.scandir(local_dir) as entries:  # the folder's own entries, never below
            names = sorted(entry.name for entry in entries if TEST_DATABASE.fullmatch(entry.name))
        for name in names:
            changed += _restrict(local_dir / name, failures, must_own=False)
    if _is_file_name(database):
        _create_private(Path(database))
        for suffix in ("", *SQLITE_COMPANIONS):
            changed += _restrict(Path(database + suffix), failures, must_own=True)
    return changed


def secure_sqlite_files(database: str | os.PathLike[str]) -> list[str]:
    """Take group and other permissions off a SQLite database and its -wal, -shm and -journal
    files, those that exist, while the router runs (each new connection). Changes are routine
    there (SQLite has just created a test database with the umask's mode) and logged at debug
    level; a file that cannot be changed is a warning."""
    failures: list[str] = []
    name = os.fspath(database)
    changed: list[str] = []
    if _is_file_name(name):
        for suffix in ("", *SQLITE_COMPANIONS):
            changed += _restrict(Path(name + suffix), failures, must_own=False)
    for line in changed:
        logger.debug("made private: %s", line)
    for failure in failures:
        logger.warning("%s", failure)
    return changed


def log_repairs() -> None:
    """Log the changes ``repair_at_start`` made, which ran before logging was configured."""
    if _repairs:
        logger.warning(
            "made the router's private files private again (other users could read them): %s",
            "; ".join(_repairs),
        )
    for failure in _failures:
        logger.warning("%s", failure)
    _repairs.clear()
    _failures.clear()


def _is_file_name(database: str) -> bool:
    # Not in memory, and not a URI naming its own options.
    return bool(database) and database != ":memory:" and not database.startswith("file:")


def _inside(database: str, folder: Path) -> bool:
    return _is_file_name(database) and (
        os.path.dirname(os.path.abspath(database)) == os.path.abspath(folder))


def _create_private(path: Path) -> None:
    """Create the database file empty and 0600 if it does not exist, so that SQLite never
    creates it (nor, after it, a -journal, -wal or -shm) with the umask's mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     PRIVATE_FILE_MODE)
    except OSError:
        # There already (checked by the caller), or a folder that is missing or not writable:
        # SQLite will say so in its own words when Django opens it.
        return
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # an unusual umask (0277) could have taken more
    finally:
        os.close(fd)


def _read_key(path: Path) -> str:
    try:
        fd = os.open(path, _OPEN_NO_FOLLOW)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise  # generated by the caller
        raise ImproperlyConfigured(_unusable_key(path)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImproperlyConfigured(_unusable_key(path))
        if info.st_uid != os.geteuid():
            raise ImproperlyConfigured(
                f"The secret key file {path} belongs to {_user(info.st_uid)}, not to "
                f"{_user(os.geteuid())} that the router runs as: its owner may have chosen the "
                "key and can sign admin sessions with it. Delete the file (a new key is "
                "generated; whoever is signed in to the admin signs in again) or set SECRET_KEY."
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & WRITABLE_BY_OTHERS:
            raise ImproperlyConfigured(
                f"The secret key file {path} may be written by other users (mode {mode:04o}), "
                "so the key in it may not be the one generated here. Delete the file (a new key "
                "is generated; whoever is signed in to the admin signs in again), or, if you "
                f"know the key is yours, make the file private: chmod 600 {path}."
            )
        line = _take_away(fd, path, info.st_mode, _failures)
        if line:
            _repairs.append(line)
        with os.fdopen(os.dup(fd), "r") as handle:
            return handle.read().strip()
    finally:
        os.close(fd)


def _restrict(path: Path, failures: list[str], *, must_own: bool) -> list[str]:
    """Drop group and other bits of one file, without following a link: a one-line list saying
    what changed, or an empty one (a failure is added to ``failures``). With ``must_own``, a
    file of another user's is refused with ``ImproperlyConfigured``."""
    try:
        seen = os.lstat(path)
    except FileNotFoundError:
        return []
    except OSError:
        pass  # the open below says why
    else:
        if (
            stat.S_ISREG(seen.st_mode)
            and not stat.S_IMODE(seen.st_mode) & NOT_OWNER
            and (not must_own or seen.st_uid == os.geteuid())
        ):
            # Already private: no descriptor is opened. Closing one would drop every POSIX lock
            # this process holds on the file (fcntl(2)), SQLite's locks of the process's other
            # connections on the database and its -wal and -shm among them; another process
            # closing its own connection would then take itself for the last one, checkpoint
            # and remove the WAL under them, and this process would stop seeing its writes.
            return []
    try:
        # O_NOFOLLOW: a link is refused (ELOOP), never followed; O_NONBLOCK: a FIFO does not
        # wait for a writer. The change is made on the descriptor, so a file swapped after the
        # check is not the one changed.
        fd = os.open(path, _OPEN_NO_FOLLOW)
    except FileNotFoundError:
        return []  # gone meanwhile (SQLite removes -wal and -shm on the last close)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):  # links and sockets are not ours
            failures.append(f"cannot check the permissions of {path}: {exc.strerror}")
        return []
    try:
        info = os.fstat(fd)
        if must_own and info.st_uid != os.geteuid():
            raise ImproperlyConfigured(
                f"{path} belongs to {_user(info.st_uid)}, not to {_user(os.geteuid())} that the "
                "router runs as: its owner could read the admin's sessions in it or replace it. "
                "Run the router as its owner, or give the file to this user (chown) if it is "
                "the router's own."
            )
        line = _take_away(fd, path, info.st_mode, failures)
    finally:
        os.close(fd)
    return [line] if line else []


def _take_away(fd: int, path: Path, st_mode: int, failures: list[str]) -> str | None:
    """Drop the group and other bits of the open file or folder ``fd``; a line saying what
    changed, or None."""
    mode = stat.S_IMODE(st_mode)
    if not mode & NOT_OWNER:
        return None
    try:
        os.fchmod(fd, mode & ~NOT_OWNER)
    except PermissionError:
        failures.append(f"cannot make {path} private (mode {mode:04o}): not its owner")
        return None
    return f"{path} {mode:04o} -> {mode & ~NOT_OWNER:04o}"


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _not_our_dir(path: Path, owner: int) -> str:
    me = _user(os.geteuid())
    return (
        f"The router's local folder {path} (IDLECLAW_LOCAL_DIR) belongs to {_user(owner)}, but "
        f"the router runs as {me}. The folder holds the secret key and the database, and its "
        "owner could read or replace them. Run the router as the folder's owner, or set "
        f"IDLECLAW_LOCAL_DIR to a folder of {me}'s own (a missing one is created, private)."
    )


def _unusable_dir(path: Path) -> str:
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"The router's local folder {path} (IDLECLAW_LOCAL_DIR) is unusable: {exc}"
    if stat.S_ISLNK(info.st_mode):
        return (
            f"The router's local folder {path} (IDLECLAW_LOCAL_DIR) is a symbolic link; it holds "
            "the secret key and the database, and must be a real folder. Set "
            f"IDLECLAW_LOCAL_DIR to the folder the link points to ({os.path.realpath(path)}) "
            "if that is the one meant."
        )
    if info.st_uid != os.geteuid():
        return _not_our_dir(path, info.st_uid)
    if not stat.S_ISDIR(info.st_mode):
        return (
            f"The router's local folder {path} (IDLECLAW_LOCAL_DIR) is not a folder. Set "
            "IDLECLAW_LOCAL_DIR to a folder of the router's own (a missing one is created)."
        )
    return f"The router's local folder {path} (IDLECLAW_LOCAL_DIR) cannot be opened."


def _unusable_key(path: Path) -> str:
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"The secret key file {path} cannot be read: {exc.strerror}."
    if info.st_uid != os.geteuid():
        return (f"The secret key file {path} belongs to {_user(info.st_uid)}, not to "
                f"{_user(os.geteuid())} that the router runs as. Delete it (a new key is "
                "generated) or set SECRET_KEY.")
    kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
    return (f"The secret key file {path} is {kind}. Replace it with the file itself, or delete "
            "it (a new key is generated; whoever is signed in to the admin signs in again).")
