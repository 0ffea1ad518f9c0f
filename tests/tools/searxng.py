"""A stand-in for SearXNG's JSON API (``GET /search?q=…&format=json``), for the router's
``web_search`` tool: it answers like SearXNG, counts the searches it gets, and can be slow,
fail, or answer with garbage or a huge body.

On the test's own event loop: ``async with FakeSearxng() as searx``. For a router in another
process, from a synchronous test: ``with FakeSearxng().in_thread() as searx``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

from aiohttp import web

# Eight results, one of them not a web link (skipped), so the router's cut at five shows; one
# with control and formatting characters, one with a snippet far over 200 characters.
RESULTS = [
    {"title": "Hyperion (tree)", "url": "https://example.org/hyperion",
     "content": "Hyperion is a coast redwood in California, the tallest known living tree."},
    {"title": "Coast redwood", "url": "https://example.org/redwood", "content": "Sequoia " * 60},
    {"title": "A page\x1b[31m with\u202e escapes", "url": "https://example.org/escapes",
     "content": "line one\nline two\x00\u200b end"},
    {"title": "Not a web link", "url": "javascript:alert(1)", "content": "dropped"},
    {"title": "Centurion", "url": "https://example.org/centurion", "content": "A eucalyptus."},
    {"title": "Menara", "url": "https://example.org/menara", "content": "A yellow meranti."},
    {"title": "Sixth", "url": "https://example.org/sixth", "content": "cut"},
    {"title": "Seventh", "url": "https://example.org/seventh", "content": "cut"},
]


class FakeSearxng:
    """``mode``: ``ok`` (``RESULTS``), ``slow`` (answers after ``delay`` seconds), ``error``
    (HTTP 500), ``garbage`` (200 with HTML), ``huge`` (a JSON body over 1 MB, streamed without
    a length). ``queries`` holds every query received, in order."""

    def __init__(self, mode: str = "ok", delay: float = 30.0) -> None:
        self.mode = mode
        self.delay = delay
        self.queries: list[str] = []
        self.formats: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _search(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(request.query.get("q", ""))
        self.formats.append(request.query.get("format", ""))
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        if self.mode == "error":
            return web.Response(status=500, text="Internal Server Error")
        if self.mode == "garbage":
            return web.Response(text="<html><body>Too many requests</body></html>",
                                content_type="text/html")
        if self.mode == "huge":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b'{"results": [')
            item = json.dumps({"title": "x" * 1000, "url": "https://example.org/x",
                               "content": "y"}).encode()
            try:
                for _ in range(2000):  # 2 MB
                    await response.write(item + b",")
                await response.write(b'{}]}')
                await response.write_eof()
            except ConnectionError:
                pass  # the router stopped reading, as it should
            return response
        results = RESULTS
        if self.mode == "emoji":  # every result as long as the router keeps, all emoji
            results = [{"title": "\U0001f332" * 200, "url": f"https://example.org/{i}",
                        "content": "\U0001f333" * 400} for i in range(8)]
        body: dict[str, Any] = {"query": request.query.get("q", ""), "number_of_results": 0,
                                "results": results, "answers": [], "suggestions": []}
        return web.json_response(body)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/search", self._search)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeSearxng:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[FakeSearxng]:
        """Serve from a thread of its own, for routers in other processes."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        thread = threading.Thread(target=serve, name="fake-searxng", daemon=True)
        thread.start()
        assert ready.wait(10), "the SearXNG stand-in did not start"
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
