"""One Redis connection pool per process for Django's cache, however many cache objects exist.

Django keeps its cache objects in a context-local (``CacheHandler`` is not thread-critical), so
under ASGI every request's context builds a new ``RedisCache``, whose client builds a new
connection pool on first use: each rate-limit check opened a new TCP connection to Redis
(connect, ``CLIENT SETINFO``, DNS lookup), 5 % of a scale-out worker's CPU in a profile under
load (issue 14). ``from_url`` here hands every cache object the same pool for the same URL and
options; redis-py's pools are thread-safe, and a worker never forks after start.
"""

from __future__ import annotations

import threading
from typing import Any

import redis

_pools: dict[tuple[str, str], redis.ConnectionPool] = {}
_lock = threading.Lock()


class SharedConnectionPool(redis.ConnectionPool):
    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> redis.ConnectionPool:
        key = (url, repr(sorted(kwargs.items())))
        with _lock:
            pool = _pools.get(key)
            if pool is None:
                pool = _pools[key] = super().from_url(url, **kwargs)
            return pool
