"""Configuration shared by the IdleClaw skill scripts (PROTOCOL.md §4).

The scripts run standalone (``python skill_scripts/contribute.py``), so this module sits next to
them and is imported as ``idleclaw_config`` through ``sys.path[0]``. It depends on the standard
library only, except ``iter_lines`` which works on a ``requests`` response.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

CLIENT_NAME = "idleclaw-skill/0.3"
PROTOCOL_VERSION = 2

DEFAULT_SERVER = "https://api.idleclaw.com"
DEFAULT_OLLAMA_HOST = "http://localhost:11434"
OLLAMA_DEFAULT_PORT = 11434

MAX_MODEL_NAME_CHARS = 64
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")

# Longest line a script buffers from a streamed response. Real lines are a few hundred bytes;
# the cap keeps a misbehaving peer from growing one line without end.
MAX_LINE_BYTES = 1_000_000


class ConfigError(ValueError):
    """A setting from the environment that the scripts cannot use; the message says which."""


def valid_model_name(name: object) -> bool:
    """Whether ``name`` is an acceptable model name (PROTOCOL §4): ≤ 64 chars, no ``..``."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_MODEL_NAME_CHARS
        and ".." not in name
        and MODEL_NAME_RE.fullmatch(name) is not None
    )


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_server_url(value: str | None) -> str:
    """Return the router base URL from an ``IDLECLAW_SERVER`` value, without trailing slash.

    An empty or missing value means the public network. Anything that is not an http/https URL
    with a host raises ``ConfigError``.
    """
    raw = (value or "").strip() or DEFAULT_SERVER
    shown = raw if len(raw) <= 80 else raw[:77] + "..."
    problem = f"IDLECLAW_SERVER must be an http:// or https:// URL with a host, got {shown!r}"
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(problem) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(problem)
    if parts.query or parts.fragment or any(c.isspace() for c in raw):
        raise ConfigError(problem)
    return f"{parts.scheme.lower()}://{parts.netloc}{parts.path}".rstrip("/")


def parse_ollama_host(value: str | None) -> str:
    """Return the Ollama base URL from an ``OLLAMA_HOST`` value, without trailing slash.

    Accepts what Ollama's own client accepts: a full URL, ``host``, ``host:port`` or ``:port``.
    Without a scheme the scheme is http and the port defaults to 11434.
    """
    raw = (value or "").strip() or DEFAULT_OLLAMA_HOST
    shown = raw if len(raw) <= 80 else raw[:77] + "..."
    problem = f"OLLAMA_HOST must be host:port or an http:// or https:// URL, got {shown!r}"
    has_scheme = "://" in raw
    try:
        parts = urlsplit(raw if has_scheme else f"http://{raw}")
        port = parts.port
    except ValueError:
        raise ConfigError(problem) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or parts.query or parts.fragment:
        raise ConfigError(problem)
    if any(c.isspace() for c in raw) or "@" in parts.netloc:
        raise ConfigError(problem)
    host = parts.hostname or "localhost"
    # OLLAMA_HOST=0.0.0.0 is how people make the server listen everywhere; as a client
    # address it means this machine.
    if host in ("0.0.0.0", "::"):
        host = "localhost"
    if port is None and not has_scheme:
        port = OLLAMA_DEFAULT_PORT
    netloc = _bracket(host) + (f":{port}" if port is not None else "")
    return f"{scheme}://{netloc}{parts.path}".rstrip("/")


def server_from_env(environ: Mapping[str, str] | None = None) -> str:
    """``IDLECLAW_SERVER`` from the environment, checked (raises ``ConfigError``)."""
    env = os.environ if environ is None else environ
    return parse_server_url(env.get("IDLECLAW_SERVER"))


def ollama_host_from_env(environ: Mapping[str, str] | None = None) -> str:
    """``OLLAMA_HOST`` from the environment, checked (raises ``ConfigError``)."""
    env = os.environ if environ is None else environ
    return parse_ollama_host(env.get("OLLAMA_HOST"))


def ws_url(server: str) -> str:
    """The node WebSocket URL for a router base URL (PROTOCOL §1): https→wss, http→ws."""
    base = server.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):] + "/ws/node"
    if base.startswith("http://"):
        return "ws://" + base[len("http://"):] + "/ws/node"
    raise ConfigError(f"not an http:// or https:// URL: {server!r}")


def iter_lines(response: Any, max_line: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """Yield the lines of a streamed ``requests`` response as soon as each one is complete.

    ``Response.iter_lines`` reads fixed-size blocks, and on a body that is not chunk-encoded
    urllib3 waits for the whole block, which would hold tokens back. ``read1`` returns whatever
    has arrived (on a chunk-encoded body, no further than the end of the current HTTP chunk:
    http.client's ``_read1_chunked``). Lines are yielded without their ``\\n``/``\\r\\n``.
    Raises ``ValueError`` when a line grows past ``max_line`` bytes.
    """
    pending = b""
    for data in _read_chunks(response):
        pending += data
        if b"\n" in data:
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line[:-1] if line.endswith(b"\r") else line
        if len(pending) > max_line:
            raise ValueError("line too long")
    if pending:
        yield pending[:-1] if pending.endswith(b"\r") else pending


def _read_chunks(response: Any) -> Iterator[bytes]:
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 < 2.3 has no read1; one-byte reads are slow but never stall
        yield from response.iter_content(chunk_size=1)
        return
    while True:
        data = read1(65536)
        if not data:  # b"" at the end of the body, None once the response is closed
            return
        yield data
