"""Redis, PostgreSQL and router workers for the scale-out tests.

``REDIS_URL`` and ``DATABASE_URL`` (a PostgreSQL URL) name servers to use when they are set;
they must be disposable: each test empties the Redis database, and databases named
``idleclaw_scaleout_*`` are created and dropped on the PostgreSQL server. Without them the
session starts its own servers from ``bench/servers.py`` (about half a second).

PostgreSQL is migrated once per session into a template; each test gets a fresh copy of it.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis

from bench import servers
from tests import procs
from tests.scaleout import cluster


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    with servers.start_redis() as server:
        yield server.url


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    given = os.environ.get("DATABASE_URL", "")
    if given.startswith(("postgres://", "postgresql://")):
        yield given
        return
    with servers.start_postgres() as server:
        yield server.url


def _admin(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(statement)


@pytest.fixture(scope="session")
def template_database(postgres_server_url: str) -> Iterator[str]:
    """A database migrated once with ``manage.py migrate``; tests copy it."""
    name = f"idleclaw_scaleout_template_{uuid.uuid4().hex[:8]}"
    _admin(postgres_server_url, f'CREATE DATABASE "{name}"')
    try:
        subprocess.run(
            [procs.PYTHON, "manage.py", "migrate", "--noinput", "-v0"],
            cwd=procs.ROOT,
            env={**os.environ, "DATABASE_URL": cluster.database_url(postgres_server_url, name)},
            check=True,
            timeout=120,
        )
        yield name
    finally:
        _admin(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(postgres_server_url: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test."""
    name = f"idleclaw_scaleout_{uuid.uuid4().hex[:12]}"
    _admin(postgres_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    try:
        yield cluster.database_url(postgres_server_url, name)
    finally:
        _admin(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """The Redis database, emptied: no channel messages or cache entries from earlier tests."""
    client = redis.Redis.from_url(redis_server_url, socket_timeout=10)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server_url


@pytest.fixture
def worker_env(router_env: dict[str, str], redis_url: str, database_url: str) -> dict[str, str]:
    """Environment of every router worker of one test: shared Redis and PostgreSQL."""
    return {
        **router_env,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "IDLECLAW_WORKERS": "2",
        "IDLECLAW_WORKER_BEAT": str(cluster.WORKER_BEAT),
        "IDLECLAW_WORKER_TIMEOUT": str(cluster.WORKER_TIMEOUT),
        # Several workers must share one key (README); a fixed one keeps .local/ out of it.
        "SECRET_KEY": "scaleout-tests-" + "x" * 40,
    }


@pytest.fixture
def workers(worker_env: dict[str, str]) -> Iterator[tuple[procs.Proc, procs.Proc]]:
    """Two daphne workers, A and B, on the same Redis and PostgreSQL."""
    started = cluster.start_workers(worker_env, ["worker A", "worker B"])
    try:
        yield started[0], started[1]
    finally:
        cluster.stop_all(started)


@pytest.fixture
def long_emulator() -> Iterator[procs.Proc]:
    """2,000 tokens as fast as the emulator can send them, far faster than any GPU: with
    channels-redis's default capacity of 100 this stream fails ("not read fast enough")."""
    proc, url = procs.start_emulator("--reply-tokens", "2000")
    proc.url = url
    yield proc
    proc.stop()
