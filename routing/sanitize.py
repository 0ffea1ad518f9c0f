"""Markup is stripped from what nodes write before any consumer sees it.

Nodes are untrusted, and an answer rendered by a web client must not carry tags a node slipped
in. A tag may arrive split over several chunks, so stripping is stateful: text from a ``<`` that
may still become a tag is held back until the tag closes (dropped) or proves to be plain text
(released). Only what looks like a tag is removed: ``a < b`` stays.
"""

from __future__ import annotations

import re
from typing import Any

# <name ...>, </name>, <!-- ... -->, <!DOCTYPE ...>, <?xml ...?>
TAG = re.compile(r"<(?:/?[A-Za-z][A-Za-z0-9:-]*(?:[\s/][^<>]*)?|![^<>]*|\?[^<>]*)>")
# The start of something that may still become a TAG.
TAG_START = re.compile(r"<(?:/?(?:[A-Za-z][A-Za-z0-9:-]*(?:[\s/][^<>]*)?)?|![^<>]*|\?[^<>]*)\Z")
# Longest text held back waiting for a ``>``; past this it is plain text.
MAX_TAG_CHARS = 1024


def strip_tags(text: str) -> str:
    """Remove every tag, including ones that removing another tag brings together."""
    while True:
        cleaned = TAG.sub("", text)
        if cleaned == text:
            return cleaned
        text = cleaned


class TagStripper:
    """Strips tags from a stream of text pieces."""

    def __init__(self) -> None:
        self.held = ""

    def feed(self, piece: str) -> str:
        if not self.held and "<" not in piece:
            return piece  # no tag can start or end in it
        text = strip_tags(self.held + piece)
        self.held = ""
        start = text.rfind("<")
        if start != -1 and TAG_START.match(text, start):
            if len(text) - start <= MAX_TAG_CHARS:
                self.held = text[start:]
                return text[:start]
            # Too long to wait for: drop the "<" so that whatever follows can never close into
            # a tag, and release the rest as text.
            text = text[:start] + text[start + 1 :]
        return text

    def flush(self) -> str:
        """The held text at the end of the stream: it never became a tag, so it is text."""
        held, self.held = self.held, ""
        return held


# The parts of a message a consumer sees; a chunk without any of them shows nothing.
_SHOWN = ("content", "thinking", "tool_calls")


class ChunkSanitizer:
    """Strips markup from a node's chunks, across chunk boundaries."""

    def __init__(self) -> None:
        self.content = TagStripper()
        self.thinking = TagStripper()

    def clean(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk with markup removed, or None when nothing of it can be shown yet."""
        message = chunk["message"]
        if (
            not chunk["done"]
            and not self.content.held
            and not self.thinking.held
            and "<" not in message.get("content", "")
            and "<" not in message.get("thinking", "")
            and not message.keys().isdisjoint(_SHOWN)
        ):
            return chunk  # most chunks: nothing held, nothing to strip, something to show
        message = dict(message)
        for key, stripper in (("content", self.content), ("thinking", self.thinking)):
            text = stripper.feed(message.get(key, ""))
            if chunk["done"]:
                text += stripper.flush()
            if text:
                message[key] = text
            else:
                message.pop(key, None)
        if not chunk["done"] and message.keys().isdisjoint(_SHOWN):
            return None
        return {**chunk, "message": message}
