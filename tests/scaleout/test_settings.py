"""What REDIS_URL and DATABASE_URL switch on, the stream tuning, the dead-worker bound of the
defaults, and the deployment check as an operator runs it."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests import procs
from tests.scaleout.cluster import load_settings

pytestmark = pytest.mark.scaleout


def test_by_default_a_dead_worker_is_forgotten_within_60_seconds(monkeypatch):
    defaults = load_settings(monkeypatch)
    beat = defaults["IDLECLAW_WORKER_BEAT"]
    timeout = defaults["IDLECLAW_WORKER_TIMEOUT"]
    # A worker killed right after a beat is taken for dead `timeout` seconds after that beat:
    # from then on no survivor advertises or routes to its nodes (they are filtered on the
    # worker's last_seen). Its rows go at the next housekeeping round of a survivor, at most
    # one beat later, and that round sends the error events for its streams. The time to
    # spare covers a slow database round trip or a busy event loop.
    worst_case = timeout + beat
    assert worst_case < 60
    assert 60 - worst_case >= 15
    # Two missed beats in a row must not be enough to be taken for dead.
    assert timeout >= 3 * beat


def test_redis_url_puts_the_channel_layer_and_the_cache_on_redis(monkeypatch):
    loaded = load_settings(monkeypatch, REDIS_URL="redis://redis.internal:6379/2")
    layer = loaded["CHANNEL_LAYERS"]["default"]
    assert layer["BACKEND"] == "idleclaw_site.layers.RedisChannelLayer"
    [host] = layer["CONFIG"]["hosts"]
    assert host["address"] == "redis://redis.internal:6379/2"
    cache = loaded["CACHES"]["default"]
    assert cache["BACKEND"] == "django.core.cache.backends.redis.RedisCache"
    assert cache["LOCATION"] == "redis://redis.internal:6379/2"


def test_redis_connections_have_no_timeout_but_keepalive(monkeypatch):
    # redis/redis-py#4091: a read timeout of 5 s (redis-py 8's default) ends channels-redis's
    # 5 s BZPOPMIN wait with TimeoutError. Any timeout makes redis-py send through
    # asyncio.wait_for, which on Python 3.11 may swallow a cancellation (CPython gh-86296):
    # test_channel_layer.py shows what that breaks.
    loaded = load_settings(monkeypatch, REDIS_URL="redis://localhost:6379/0")
    [host] = loaded["CHANNEL_LAYERS"]["default"]["CONFIG"]["hosts"]
    assert host["socket_timeout"] is None
    assert host["socket_keepalive"] is True
    assert host["socket_keepalive_options"]
    assert host["socket_connect_timeout"] > 0


def test_channel_layer_holds_long_answers_and_outlives_a_stall(monkeypatch):
    loaded = load_settings(monkeypatch, REDIS_URL="redis://localhost:6379/0")
    config = loaded["CHANNEL_LAYERS"]["default"]["CONFIG"]
    # channels-redis defaults: capacity 100 and expiry 60 s.
    assert config["capacity"] >= 2000 > 100
    # Nothing a live stream still waits for may expire: a stream gives up after the stall
    # timeout without a chunk, so its newest undelivered message is never older than that.
    assert config["expiry"] > loaded["IDLECLAW_STALL_TIMEOUT"]
    embedded = load_settings(monkeypatch)["CHANNEL_LAYERS"]["default"]
    assert embedded["BACKEND"] == "idleclaw_site.layers.InProcessChannelLayer"
    assert embedded["CONFIG"] == {"capacity": config["capacity"], "expiry": config["expiry"]}


def test_database_url_switches_to_postgresql(monkeypatch):
    loaded = load_settings(
        monkeypatch, DATABASE_URL="postgres://router:secret@db.internal:5432/idleclaw"
    )
    database = loaded["DATABASES"]["default"]
    assert database["ENGINE"] == "django.db.backends.postgresql"
    assert (database["HOST"], database["PORT"], database["NAME"]) == (
        "db.internal", 5432, "idleclaw"
    )
    # Requests Django serves itself (the admin) run their database work in a thread of their
    # own, so persistent connections would pile up there, one per finished thread. (The
    # router's own work keeps its connections on a fixed pool, idleclaw_site/db.py.)
    assert database["CONN_MAX_AGE"] == 0


def manage_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("IDLECLAW_") and k not in ("REDIS_URL", "DATABASE_URL")}
    return subprocess.run(
        [procs.PYTHON, "manage.py", "check"],
        cwd=procs.ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )


def test_manage_check_warns_an_operator_running_several_workers_embedded(tmp_path):
    result = manage_check({"IDLECLAW_WORKERS": "3", "SECRET_KEY": "x",
                           "IDLECLAW_SQLITE_PATH": str(tmp_path / "db.sqlite3")})
    assert result.returncode == 0, result.stderr
    assert "idleclaw.W001" in result.stderr and "idleclaw.W002" in result.stderr
    assert "Set REDIS_URL" in result.stderr


def test_manage_check_passes_several_workers_on_redis_and_postgresql(redis_url, database_url):
    result = manage_check({"IDLECLAW_WORKERS": "3", "SECRET_KEY": "x",
                           "REDIS_URL": redis_url, "DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    assert "idleclaw.W00" not in result.stdout + result.stderr
    assert "no issues" in result.stdout
