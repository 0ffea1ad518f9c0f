"""Event-loop lag probe: how late a 10 ms timer fires on this router's event loop (issue 13).

Off unless ``IDLECLAW_LOOP_LAG_FILE`` is set (the benchmark sets it; operators never need
to). When it is, a task on the router's loop sleeps 10 ms again and again, and writes how late
each wake-up came. A late timer is a late everything: a node's frame, a consumer's first token
and a heartbeat all wait behind the same loop turn. The lag is measured inside the process,
because from outside only the sum of every hop can be seen.

Each process appends to ``<IDLECLAW_LOOP_LAG_FILE>.<pid>`` (several daphne workers never share
a file), one line per wake-up: ``<CLOCK_MONOTONIC seconds> <lag in ms>``. CLOCK_MONOTONIC is
one clock for every process of a machine, so the benchmark slices the samples by the start and
end of its own phases. Lines are buffered and written twice a second, in one ``write``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

logger = logging.getLogger("idleclaw.loop_lag")

ENV = "IDLECLAW_LOOP_LAG_FILE"
INTERVAL_S = 0.010
FLUSH_EVERY_S = 0.5

_task: asyncio.Task[None] | None = None


def install() -> bool:
    """Start the probe with the router's loop when ``IDLECLAW_LOOP_LAG_FILE`` is set.

    Returns whether it was started or scheduled. Without the variable it returns at once and
    the router runs exactly as without this module. On a running loop it starts at once.
    Under daphne the application is imported before the reactor runs, so the start is
    scheduled with Twisted's public ``callLater``: the asyncio reactor hands it to its asyncio
    loop, and it runs in the loop's first turns, before the first request or node connection.
    """
    prefix = os.environ.get(ENV)
    if not prefix:
        return False
    path = f"{prefix}.{os.getpid()}"
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        start(path)
        return True
    # Never import twisted.internet.reactor here: that would install Twisted's default
    # reactor in a process (a test, a management command) that has none.
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is not None:
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor

        if isinstance(reactor, AsyncioSelectorReactor):
            reactor.callLater(0, start, path)
            return True
    logger.warning("%s is set but there is no asyncio loop to probe", ENV)
    return False


def start(path: str) -> None:
    """Run the probe on the running loop, appending to ``path`` (idempotent per loop)."""
    global _task
    loop = asyncio.get_running_loop()
    if _task is not None and not _task.done() and _task.get_loop() is loop:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    _task = loop.create_task(_probe(fd))


async def stop() -> None:
    """Stop the probe and write what it still holds (tests)."""
    global _task
    task, _task = _task, None
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _probe(fd: int) -> None:
    loop = asyncio.get_running_loop()  # its time() is time.monotonic()
    lines: list[str] = []
    flush_at = loop.time() + FLUSH_EVERY_S
    try:
        while True:
            due = loop.time() + INTERVAL_S
            await asyncio.sleep(INTERVAL_S)
            now = loop.time()
            # asyncio may run a timer up to its clock resolution early: that is no lag.
            lines.append(f"{now:.4f} {max(0.0, now - due) * 1000:.3f}\n")
            if now >= flush_at:
                # A few kilobytes into the page cache twice a second: one system call of
                # microseconds, cheaper than the thread hop it would take to move it off the loop.
                os.write(fd, "".join(lines).encode("ascii"))
                lines.clear()
                flush_at = now + FLUSH_EVERY_S
    finally:
        if lines:
            os.write(fd, "".join(lines).encode("ascii"))
        os.close(fd)
