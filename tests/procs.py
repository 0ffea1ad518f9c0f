"""Real processes for end-to-end tests: the router under daphne, the Ollama emulator and the
skill scripts. Each is a subprocess whose output is collected so a test can wait for a line and
show the logs when it fails."""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


class Proc:
    """A subprocess with its merged stdout/stderr kept in memory."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait until a line matches ``pattern``; fail with the process's output if not."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                exited = self.popen.poll() is not None and not self._reader.is_alive()
                if remaining <= 0 or exited:
                    raise AssertionError(
                        f"{self.name}: no line matching {pattern!r} within {timeout}s "
                        f"(exit code {self.popen.poll()}). Output:\n{self.output}"
                    )
                self._changed.wait(min(remaining, 0.2))

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and for its last lines to be read; return its exit code."""
        self.popen.wait(timeout)
        self._reader.join(5)
        return self.popen.returncode

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signum)

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        self._reader.join(5)
        return self.popen.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(5)


def http_json(url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def wait_until(
    check: Callable[[], Any], timeout: float = 20.0, what: str = "condition", every: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


class TcpRelay:
    """A TCP relay on a loopback port of its own (``url``): each connection it accepts goes on,
    byte for byte, to the next of ``targets`` (URLs) in turn, from the local address ``source``
    (which a test may change between connections; None: the system's choice). In front of
    several router workers it is an operator's load balancer; with ``source`` set, a node
    behind it reaches the router from another address."""

    def __init__(self, *targets: str, source: str | None = None) -> None:
        self.targets = itertools.cycle(
            [(parts.hostname, parts.port) for parts in map(urllib.parse.urlsplit, targets)]
        )
        self.source = source
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            source = None if self.source is None else (self.source, 0)
            upstream = socket.create_connection(next(self.targets), source_address=source)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


def start_emulator(*args: str) -> tuple[Proc, str]:
    proc = Proc("emulator", [PYTHON, "-m", "bench.emulator", "--port", "0", *args])
    url = proc.wait_for_line(r"listening on (http://\S+)").group(1)
    return proc, url


# Test routers stop within a second or two even with a stream left open (SIGTERM drains first,
# idleclaw_site/shutdown.py); tests of the shutdown itself set their own grace.
FAST_STOP_ENV = {"IDLECLAW_SHUTDOWN_GRACE": "1"}


_migrated: list[Path] = []
_migrated_lock = threading.Lock()


def _migrate(db_path: Path, env: dict[str, str]) -> None:
    subprocess.run(
        [PYTHON, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=ROOT,
        env={**os.environ, **env, "IDLECLAW_SQLITE_PATH": str(db_path)},
        check=True,
    )


def _fresh_database(db_path: Path, env: dict[str, str]) -> None:
    """A freshly migrated SQLite file at ``db_path``: a copy of one migrated in this session.

    Migrating costs a Django start per router (a second or more on two busy cores), and the
    suite starts routers by the dozen. The copy is the same bytes ``migrate`` would write, made
    private as the router makes its own files.
    """
    if db_path.exists() or not db_path.parent.is_dir():
        _migrate(db_path, env)
        return
    with _migrated_lock:
        if not _migrated:
            folder = Path(tempfile.mkdtemp(prefix="idleclaw-migrated-"))
            atexit.register(shutil.rmtree, folder, True)
            _migrate(folder / "template.sqlite3", env)
            _migrated.append(folder / "template.sqlite3")
    shutil.copyfile(_migrated[0], db_path)
    db_path.chmod(0o600)


def migrate_database(db_path: Path) -> None:
    """A freshly migrated SQLite file at ``db_path``, as ``manage.py migrate`` writes it."""
    _fresh_database(db_path, {**FAST_STOP_ENV, "IDLECLAW_SQLITE_PATH": str(db_path)})


def start_router(db_path: Path, env: dict[str, str] | None = None) -> tuple[Proc, str]:
    """Serve the router on a free port from a freshly migrated SQLite file."""
    base_env = {**FAST_STOP_ENV, "IDLECLAW_SQLITE_PATH": str(db_path), **(env or {})}
    if not (env or {}).get("DATABASE_URL"):
        _fresh_database(db_path, base_env)
    proc = Proc(
        "router",
        [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", "0", "idleclaw_site.asgi:application"],
        env=base_env,
    )
    port = proc.wait_for_line(r"Listening on TCP address 127\.0\.0\.1:(\d+)").group(1)
    return proc, f"http://127.0.0.1:{port}"


def start_contributor(server: str, ollama: str, *args: str) -> Proc:
    """The real ``contribute.py``. Unless ``args`` choose a key (``--key-file``) or none
    (``--anonymous``), each one is a contributor of its own, as nodes on different machines
    are: a fresh key file, so no test's reputation or record leaks into another's."""
    if "--key-file" not in args and "--anonymous" not in args:
        folder = Path(tempfile.mkdtemp(prefix="idleclaw-key-"))
        atexit.register(shutil.rmtree, folder, True)
        args = (*args, "--key-file", str(folder / "contributor.key"))
    return Proc(
        "contribute.py",
        [PYTHON, "skill_scripts/contribute.py", *args],
        env={"IDLECLAW_SERVER": server, "OLLAMA_HOST": ollama},
    )


def start_consumer(server: str, model: str, prompt: str) -> Proc:
    """consume.py asking ``model`` through ``server``, left running so a test can interrupt."""
    return Proc(
        "consume.py",
        [PYTHON, "skill_scripts/consume.py", "--model", model, "--prompt", prompt],
        env={"IDLECLAW_SERVER": server},
    )


def run_script(script: str, *args: str, server: str, timeout: float = 60.0, **kw: Any):
    return subprocess.run(
        [PYTHON, f"skill_scripts/{script}", *args],
        cwd=ROOT,
        env={**os.environ, "IDLECLAW_SERVER": server},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )
