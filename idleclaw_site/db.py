"""The router's database calls from async code.

Django's ASGI handler gives every request its own thread for thread-sensitive sync code, so a
burst of requests became a burst of threads, each with its own connection, fighting over
SQLite's write lock (bench/RESULTS.md). Instead all ORM work runs on a small fixed pool that
keeps its connections open: one thread on SQLite, which takes one writer at a time anyway, and
``IDLECLAW_DB_THREADS`` on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from django.conf import settings
from django.db import Error as DatabaseError
from django.db import connection

P = ParamSpec("P")
R = TypeVar("R")

_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        sqlite = settings.DATABASES["default"]["ENGINE"].endswith("sqlite3")
        threads = 1 if sqlite else settings.IDLECLAW_DB_THREADS
        _executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="idleclaw-db")
    return _executor


def _guarded(func: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except DatabaseError:
            # A broken connection (a database restart, a network cut) must not stay in the
            # pool: close it, and the next call on this thread connects afresh.
            connection.close()
            raise

    return run


def db(func: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """``await db(service)(**kwargs)``: run a synchronous ORM function off the event loop.

    A plain ``run_in_executor`` rather than asgiref's ``sync_to_async``, whose context
    bookkeeping the database functions do not need and which doubled the cost of the hop. As with
    ``sync_to_async``, a cancelled caller stops waiting: a function already running runs to its
    end, one still queued does not run at all. Clean-up calls that must happen are shielded
    (``asyncio.shield``) by their callers.
    """
    guarded = _guarded(func)

    @functools.wraps(func)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_pool(), functools.partial(guarded, *args, **kwargs))

    return call
