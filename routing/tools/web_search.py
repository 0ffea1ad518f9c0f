"""``web_search``: the router searches the web for a model, through a SearXNG instance.

The router asks ``IDLECLAW_SEARXNG_URL`` with SearXNG's JSON API (``GET /search?q=…&format=json``;
the instance must have ``json`` among its ``search.formats``) and gives the model the top
``MAX_RESULTS`` results as plain text: title, URL and a snippet of at most
``MAX_SNIPPET_CHARS`` characters each, with control and formatting characters removed.

What the search backend learns is the query text and the router's address, nothing about the
consumer or the node. Queries are never logged or stored here: a failure is logged by its kind
only.

Everything about the backend's answer is bounded: the whole exchange takes at most the tool
timeout (``routing.tools.rounds``), the body is read incrementally and abandoned past
``MAX_BODY_BYTES``, redirects are not followed, and the JSON is decoded off the event loop.
Whatever goes wrong, the model reads ``search failed: <why>`` and the answer goes on.
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from typing import Any

import aiohttp
from django.conf import settings

from nodes.protocol import strict_loads
from routing.tools import Tool

logger = logging.getLogger("idleclaw.routing")

MAX_RESULTS = 5
# Results looked at to find those five: the cleaning is per character, on the event loop.
MAX_RESULTS_READ = 50
MAX_SNIPPET_CHARS = 200
MAX_TITLE_CHARS = 150
MAX_URL_CHARS = 300
MAX_QUERY_CHARS = 500
# A SearXNG page of results is tens of kilobytes; more is not an answer worth reading.
MAX_BODY_BYTES = 1_000_000
READ_SIZE = 64 * 1024
# Characters that never reach the model: controls (C0, C1, DEL), format characters (bidi
# overrides, zero-width joiners and marks), private use and lone surrogates.
_INVISIBLE = frozenset({"Cc", "Cf", "Co", "Cs"})


class SearchFailed(Exception):
    """The backend gave no usable answer; the message says why, for the model to read."""


def plain(text: Any, limit: int) -> str:
    """``text`` as one line of at most ``limit`` characters without control or formatting
    characters; "" for anything that is not a string."""
    if not isinstance(text, str):
        return ""
    # Bounded before the per-character work: a snippet of a megabyte costs no more than this.
    text = text[: limit * 4]
    kept = "".join(
        " " if char.isspace() else char
        for char in text
        if char.isspace() or unicodedata.category(char) not in _INVISIBLE
    )
    line = " ".join(kept.split())
    if len(line) > limit:
        line = line[: limit - 1].rstrip() + "…"
    return line


def _url(value: Any) -> str:
    url = plain(value, MAX_URL_CHARS * 2)
    if not url.lower().startswith(("http://", "https://")) or " " in url:
        return ""
    return url if len(url) <= MAX_URL_CHARS else ""


def results_text(data: Any) -> str:
    """The model's view of a SearXNG JSON answer: numbered results, one field a line."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise SearchFailed("the search backend's answer has no results list")
    lines: list[str] = []
    found = 0
    for result in data["results"][:MAX_RESULTS_READ]:
        if found == MAX_RESULTS:
            break
        if not isinstance(result, dict):
            continue
        url = _url(result.get("url"))
        title = plain(result.get("title"), MAX_TITLE_CHARS) or url
        if not url:
            continue
        found += 1
        lines.append(f"{found}. {title}")
        lines.append(f"   {url}")
        snippet = plain(result.get("content"), MAX_SNIPPET_CHARS)
        if snippet:
            lines.append(f"   {snippet}")
    if not found:
        return "no results"
    return "\n".join(lines)


async def search(query: str, *, base_url: str) -> str:
    """Ask SearXNG at ``base_url``; the results as text. Raises ``SearchFailed``. The caller
    bounds the time."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{base_url}/search",
                params={"q": query, "format": "json"},
                headers={"Accept": "application/json"},
                allow_redirects=False,
            ) as response,
        ):
            if response.status != 200:
                raise SearchFailed(f"the search backend answered HTTP {response.status}")
            if (response.content_length or 0) > MAX_BODY_BYTES:
                raise SearchFailed("the search backend's answer is over 1 MB")
            body = bytearray()
            async for piece in response.content.iter_chunked(READ_SIZE):
                body += piece
                if len(body) > MAX_BODY_BYTES:
                    raise SearchFailed("the search backend's answer is over 1 MB")
    except aiohttp.ClientError as error:
        raise SearchFailed("the search backend could not be reached") from error
    try:
        # A megabyte of JSON is milliseconds of parsing: not on the event loop.
        data = await asyncio.to_thread(strict_loads, bytes(body))
    except (ValueError, RecursionError):
        raise SearchFailed("the search backend's answer is not JSON") from None
    return results_text(data)


class WebSearch(Tool):
    name = "web_search"
    description = (
        "Search the web. Returns the top results, each with its title, URL and a short snippet. "
        "Use it for recent events or facts you are not sure of."
    )
    parameters = {
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "description": "What to search for, as you would type it into a search engine "
                f"(1-{MAX_QUERY_CHARS} characters).",
            },
        },
        "required": ["query"],
        "additionalProperties": False,
    }

    def check(self, arguments: dict[str, Any]) -> str | None:
        refusal = super().check(arguments)
        if refusal is not None:
            return f'{refusal}: {{"query": "<text>"}} is expected'
        query = arguments["query"].strip()
        if not 1 <= len(query) <= MAX_QUERY_CHARS:
            return f"the query must be 1-{MAX_QUERY_CHARS} characters"
        if any(unicodedata.category(char) == "Cc" for char in query):
            return "the query must not contain control characters"
        return None

    def failed(self, reason: str) -> str:
        return f"search failed: {reason}"

    async def run(self, arguments: dict[str, Any]) -> str:
        try:
            return await search(arguments["query"].strip(), base_url=settings.IDLECLAW_SEARXNG_URL)
        except SearchFailed as error:
            logger.info("web_search failed: %s", error)
            return self.failed(str(error))
