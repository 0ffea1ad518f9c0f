"""The rate limits' cache on Redis reuses its connections (``idleclaw_site/cache.py``): a
worker answering many requests does not open a new Redis connection for each (issue 14)."""

from __future__ import annotations

import pytest
import redis
import requests

pytestmark = [pytest.mark.scaleout, pytest.mark.e2e]


def connections_received(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


def test_requests_share_the_workers_redis_connections(workers, redis_url):
    a, _ = workers
    requests.get(f"{a.url}/health", timeout=5)  # the pools are made
    before = connections_received(redis_url)
    for _ in range(40):
        assert requests.get(f"{a.url}/health", timeout=5).status_code == 200
    opened = connections_received(redis_url) - before - 1  # the one that asks
    assert opened <= 4, f"{opened} Redis connections for 40 requests"
