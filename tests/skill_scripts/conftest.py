"""Helpers for the skill-script tests: import the scripts, run them as the user would."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "skill_scripts"
# The scripts import their shared module as ``idleclaw_config`` from their own folder.
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def script_env(**overrides: str) -> dict[str, str]:
    """The environment for a script: no proxies (everything here is on 127.0.0.1)."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env.update(NO_PROXY="*", no_proxy="*", PYTHONUNBUFFERED="1", **overrides)
    return env


def run_script(name: str, *args: str, env: dict[str, str] | None = None,
               stdin: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run ``python skill_scripts/<name> args`` to completion."""
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args], env=env or script_env(), input=stdin,
        capture_output=True, text=True, timeout=timeout,
    )


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ScriptProcess:
    """A long-running script whose stderr lines are collected as they come."""

    def __init__(self, name: str, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / name), *args], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 10) -> str:
        """The first new stderr line containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} in stderr: {self.lines}") from None
            self.lines.append(line)
            if text in line:
                return line

    def stop(self, sig: int = signal.SIGINT, timeout: float = 5) -> tuple[int, float]:
        """Send ``sig``; return the exit code and how long the exit took."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def started_scripts():
    """Long-running scripts started by a test; killed at the end whatever happened."""
    procs: list[ScriptProcess] = []
    yield procs
    for proc in procs:
        proc.kill()
