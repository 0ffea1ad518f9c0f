"""The pages' scripts, stylesheet and icon, served under a path named by their content.

Static files came with no ``Cache-Control``, so a browser guessed how long to keep them: after an
upgrade it could run a new ``chat.js`` with the ``markdown.js`` it kept from before (issue 16, red
team F5). The ES modules import each other by relative URL, so a version query on the page's one
``<script>`` would not reach them; a version in the path does: ``/assets/<version>/chat.js``
imports ``/assets/<version>/markdown.js``. The version is a digest of every file, computed once
when the router starts, so those URLs can be kept for good, and a new release has new ones.

The files stay under ``static/`` as well, where ``collectstatic`` and ``/static/`` find them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent / "static" / "webchat"
CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    """One file of the pages, read once."""

    body: bytes
    content_type: str


def _load() -> tuple[str, dict[str, Asset]]:
    files = {}
    digest = hashlib.sha256()
    for path in sorted(DIRECTORY.iterdir()):
        if path.suffix not in CONTENT_TYPES:
            continue
        body = path.read_bytes()
        files[path.name] = Asset(body, CONTENT_TYPES[path.suffix])
        digest.update(path.name.encode() + b"\0" + body + b"\0")
    return digest.hexdigest()[:16], files


VERSION, FILES = _load()
# Where the pages find their files: {{ assets }}/chat.js.
URL_PREFIX = f"/assets/{VERSION}"
