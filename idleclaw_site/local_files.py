"""The router's private files: the local folder, the embedded database and the secret key.

The local folder (``IDLECLAW_LOCAL_DIR``, ``.local/`` of the checkout by default) holds the
generated secret key and the SQLite database with its ``-wal`` and ``-shm`` files. Anyone who
reads them owns the router: a ``session_key`` from ``django_session`` opens ``/admin/`` as the
superuser, and the secret key signs anything. So the folder is 0700 and every file in it 0600
(issue 12, defect 10):

- **On creation.** The folder is made with ``make_private_dir``; the secret key is written with
  ``os.open(..., 0o600)`` (settings). SQLite creates the database itself, with mode 0644 minus
  the umask, and gives the ``-wal``, ``-shm`` and ``-journal`` files it creates later the mode of
  the database file (``findCreateFileMode`` and ``unixOpenSharedMemory`` in SQLite's
  ``os_unix.c``). ``secure_sqlite_files`` runs for every new SQLite connection (the
  ``connection_created`` signal, ``idleclaw_site.apps``): it takes group and other bits off the
  database file before any ``-wal`` or ``-shm`` exists, so those are born 0600 too; a database
  created later (a test database, a database deleted and made again) is caught the same way.
  No process umask is changed: the router's other files (logs, collected static files) are the
  operator's business.
- **Repaired at start.** ``repair_at_start`` runs when the settings are imported, so in every
  process (``manage.py``, daphne, the tests) before the database is opened: it takes group and
  other bits off the folder and everything in it, and off the database files wherever
  ``IDLECLAW_SQLITE_PATH`` puts them. What it changed is logged as a warning once logging is
  configured (``log_repairs``, from the app's ``ready``).

Permissions are only ever taken away, never added, and links are never followed (a link inside
the folder is left alone, and so is what it points to). A file that cannot be changed (owned by
another user, and we are not root) is reported, not fatal.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger("idleclaw.local_files")

PRIVATE_DIR_MODE = 0o700
# Bits nobody but the owner may have on anything in the local folder.
NOT_OWNER = 0o077
# The files SQLite keeps next to a database.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")

# Changes made while the settings were imported, before logging was configured; ``log_repairs``
# reports them. Startup facts of this one process, not shared state.
_repairs: list[str] = []
_failures: list[str] = []


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) if needed, and make it 0700."""
    path.mkdir(parents=True, exist_ok=True)
    # mkdir's mode is cut by the umask; the folder must be exactly rwx for its owner.
    os.chmod(path, PRIVATE_DIR_MODE)


def repair_at_start(local_dir: Path, database: str | None) -> list[str]:
    """Take group and other permissions off ``local_dir`` and everything below it, and off the
    SQLite ``database`` and its companions wherever they are (``IDLECLAW_SQLITE_PATH`` may point
    elsewhere). Missing paths are skipped.

    Returns one line per file or folder changed, and remembers them for ``log_repairs``.
    """
    changed = secure_local_dir(local_dir)
    if database:
        changed += _sqlite_files(database, _failures)  # nothing left to change if inside
    _repairs.extend(changed)
    return changed


def secure_local_dir(path: Path) -> list[str]:
    """Take group and other permissions off ``path`` and everything below it, if it exists;
    one line per file or folder changed."""
    try:
        top = path.resolve(strict=True)  # the folder itself may be a link the operator made
    except (FileNotFoundError, NotADirectoryError):
        return []
    changed = []
    # Top down: once a folder is private, nobody else can swap what is inside it.
    for folder, dirs, files in os.walk(top, onerror=_walk_error):
        for entry in (Path(folder), *(Path(folder) / name for name in (*dirs, *files))):
            line = _restrict(entry, _failures)
            if line:
                changed.append(line)
    return changed


def secure_sqlite_files(database: str | os.PathLike[str]) -> list[str]:
    """Take group and other permissions off a SQLite database and its -wal, -shm and -journal
    files, those that exist, while the router runs (each new connection). Changes are routine
    there (SQLite has just created the database with the umask's mode) and logged at debug
    level; a file that cannot be changed is a warning."""
    failures: list[str] = []
    changed = _sqlite_files(database, failures)
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


def _sqlite_files(database: str | os.PathLike[str], failures: list[str]) -> list[str]:
    name = os.fspath(database)
    if not name or name == ":memory:" or name.startswith("file:"):
        return []  # in memory, or a URI naming its own options
    changed = []
    for suffix in ("", *SQLITE_COMPANIONS):
        line = _restrict(Path(name + suffix), failures)
        if line:
            changed.append(line)
    return changed


def _restrict(path: Path, failures: list[str]) -> str | None:
    """Drop group and other bits of one file or folder, without following a link; a line
    saying what changed, or None (a failure is added to ``failures``)."""
    try:
        # O_NOFOLLOW: a link is refused (ELOOP), never followed; O_NONBLOCK: a FIFO does not
        # wait for a writer. The change is made on the descriptor, so a file swapped after the
        # check is not the one changed.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # gone meanwhile (SQLite removes -wal and -shm on the last close)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):  # links and sockets are not ours
            failures.append(f"cannot check the permissions of {path}: {exc.strerror}")
        return None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if not mode & NOT_OWNER:
            return None
        try:
            os.fchmod(fd, mode & ~NOT_OWNER)
        except PermissionError:
            failures.append(f"cannot make {path} private (mode {mode:04o}): not its owner")
            return None
        return f"{path} {mode:04o} -> {mode & ~NOT_OWNER:04o}"
    finally:
        os.close(fd)


def _walk_error(exc: OSError) -> None:
    _failures.append(f"cannot check the permissions under {exc.filename}: {exc.strerror}")
