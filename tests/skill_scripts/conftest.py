"""Helpers for the skill-script tests: import the scripts, run them as the user would, and
give them the Ollama emulator (``bench/emulator.py``) as their Ollama."""

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
from typing import Any

import pytest

from tests.procs import http_json, start_emulator, wait_until

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


def run_script(
    name: str,
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 20,
) -> subprocess.CompletedProcess:
    """Run ``python skill_scripts/<name> args`` to completion."""
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        env=env or script_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
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
            [sys.executable, str(SCRIPTS / name), *args],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
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


# The emulator's models, as ``ollama pull`` would have left them on a contributor's machine.
THINKING_MODEL = "qwen3:0.6b"
THINKING_MODEL_SIZE = 522_653_767
PLAIN_MODEL = "smollm2:135m"
PLAIN_MODEL_SIZE = 270_898_672
SLOW_MODEL = "llama3.2:3b"
OLLAMA_VERSION = "0.12.3"


class Emulator:
    """The Ollama emulator as a subprocess, and what it reports about the requests it got."""

    def __init__(self, *args: str) -> None:
        self.proc, self.url = start_emulator("--version", OLLAMA_VERSION, *args)

    def stats(self) -> dict[str, Any]:
        """Counts (``chat_started``, ``chat_cancelled``, ``active``, ...) and ``requests``,
        the bodies received on /api/chat, oldest first."""
        status, stats = http_json(f"{self.url}/_emulator/stats", timeout=5)
        assert status == 200, stats
        return stats

    def reset(self) -> None:
        """Forget earlier requests, once the streams of earlier tests have ended."""
        wait_until(
            lambda: self.stats()["active"] == 0,
            timeout=5,
            what="the emulator's streams from an earlier test to end",
        )
        status, _ = http_json(f"{self.url}/_emulator/reset", {}, timeout=5)
        assert status == 200

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """What Ollama answers to a chat ``body`` asked directly, without streaming."""
        status, reply = http_json(f"{self.url}/api/chat", {**body, "stream": False}, timeout=20)
        assert status == 200, reply
        return reply


@pytest.fixture(scope="module")
def _ollama_process():
    emulator = Emulator(
        "--model",
        f"{THINKING_MODEL},size={THINKING_MODEL_SIZE},caps=completion+tools+thinking",
        "--model",
        f"{PLAIN_MODEL},size={PLAIN_MODEL_SIZE},caps=completion",
    )
    yield emulator
    emulator.proc.stop()


@pytest.fixture(scope="module")
def _slow_ollama_process():
    emulator = Emulator(
        "--token-delay",
        "0.05",
        "--reply-tokens",
        "200",
        "--model",
        f"{SLOW_MODEL},size=2019393189,caps=completion+tools",
    )
    yield emulator
    emulator.proc.stop()


@pytest.fixture(scope="module")
def _long_ollama_process():
    emulator = Emulator(
        "--reply-tokens", "300", "--model", f"{PLAIN_MODEL},size={PLAIN_MODEL_SIZE},caps=completion"
    )
    yield emulator
    emulator.proc.stop()


@pytest.fixture
def long_ollama(_long_ollama_process: Emulator) -> Emulator:
    """A zero-delay emulator whose answers are 300 tokens: its lines arrive faster than a
    node sends them. No requests logged yet."""
    _long_ollama_process.reset()
    return _long_ollama_process


@pytest.fixture
def ollama(_ollama_process: Emulator) -> Emulator:
    """A fast emulator serving a thinking and a plain model, with no requests logged yet."""
    _ollama_process.reset()
    return _ollama_process


@pytest.fixture
def slow_ollama(_slow_ollama_process: Emulator) -> Emulator:
    """An emulator whose answers take 10 s (200 tokens, 50 ms apart): long enough to
    interrupt. No requests logged yet."""
    _slow_ollama_process.reset()
    return _slow_ollama_process
