from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from channels.layers import get_channel_layer
from django.core.cache import cache

from nodes import worker
from tests import procs

# contribute.py keeps its contributor key in $XDG_CONFIG_HOME/idleclaw: the suite's nodes (all
# started from this environment) share a key of their own, never the tester's.
_CONFIG_HOME = tempfile.mkdtemp(prefix="idleclaw-test-config-")
atexit.register(shutil.rmtree, _CONFIG_HOME, True)
os.environ["XDG_CONFIG_HOME"] = _CONFIG_HOME

# Limits loose enough for tests that run many nodes and consumers on 127.0.0.1.
ROOMY_ENV = {
    "IDLECLAW_MAX_NODES_PER_IP": "1000",
    "IDLECLAW_RATE_NODE_REGISTER": "10000/m",
    "IDLECLAW_RATE_CHAT": "10000/m",
    "IDLECLAW_RATE_DEFAULT": "10000/m",
    "IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP": "1000",
}



def pytest_report_header(config) -> str:
    from django.conf import settings

    return f"database: {settings.DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}"

@pytest.fixture(autouse=True)
def _empty_cache():
    """Rate-limit counters live in the cache; each test starts with none."""
    cache.clear()


@pytest.fixture(autouse=True)
def _roomy_limits(settings):
    """In-process tests send many requests from one address; the tests of the limits
    themselves set them back."""
    settings.IDLECLAW_RATE_CHAT = "10000/m"
    settings.IDLECLAW_RATE_DEFAULT = "10000/m"
    settings.IDLECLAW_MAX_CONCURRENT_CHATS_PER_IP = 1000


@pytest.fixture
async def channel_layer():
    """The process's channel layer, emptied before and after the test."""
    layer = get_channel_layer()
    await layer.flush()
    yield layer
    await _end_open_exchanges()
    await worker.stop()
    await layer.flush()


async def _end_open_exchanges() -> None:
    """Hang up every HTTP exchange and socket a test left open, and wait for the router's side
    to finish, so nothing runs on into the next test's database."""
    from tests.scripted_node import OPEN

    for communicator in OPEN:
        if communicator.future.done():
            continue
        scope_type = communicator.scope["type"]
        kind = "http.disconnect" if scope_type == "http" else "websocket.disconnect"
        message = {"type": kind} if scope_type == "http" else {"type": kind, "code": 1000}
        await communicator.send_input(message)
        try:
            await communicator.wait(5)
        except Exception:  # the test already failed if its exchange hangs
            pass
    OPEN.clear()


@pytest.fixture
def router_env() -> dict[str, str]:
    """Environment for a router subprocess: room for several nodes on loopback."""
    return dict(ROOMY_ENV)


@pytest.fixture
def router(tmp_path: Path, router_env: dict[str, str]):
    """A real daphne serving the router on SQLite and the in-memory layer."""
    proc, url = procs.start_router(tmp_path / "router.sqlite3", router_env)
    proc.url = url
    yield proc
    proc.stop()


@pytest.fixture
def emulator():
    proc, url = procs.start_emulator()
    proc.url = url
    yield proc
    proc.stop()


@pytest.fixture
def five_second_emulator():
    """100 tokens at 50 ms each: an answer still streaming when a router is told to stop."""
    proc, url = procs.start_emulator("--token-delay", "0.05", "--reply-tokens", "100")
    proc.url = url
    yield proc
    proc.stop()


@pytest.fixture
def slow_emulator():
    """An emulator that streams 200 tokens at 50 ms each: long enough to interrupt."""
    proc, url = procs.start_emulator("--token-delay", "0.05", "--reply-tokens", "200")
    proc.url = url
    yield proc
    proc.stop()
