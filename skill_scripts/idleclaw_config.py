"""Configuration shared by the IdleClaw skill scripts (docs/protocol.md §4).

The scripts run standalone (``python skill_scripts/contribute.py``), so this module sits next to
them and is imported as ``idleclaw_config`` through ``sys.path[0]``. It depends on the standard
library only, except ``iter_lines`` which works on a ``requests`` response.
"""

from __future__ import annotations

import json
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


# Longest escape sequence the terminal filter swallows. Real ones are a few dozen characters (a
# hyperlink's URL a few hundred); past this an unfinished sequence is abandoned and what follows
# is shown again as text, so a node cannot hide the rest of an answer behind one opening ESC ].
MAX_SEQUENCE_CHARS = 4096


class ConfigError(ValueError):
    """A setting from the environment that the scripts cannot use; the message says which."""


def valid_model_name(name: object) -> bool:
    """Whether ``name`` is an acceptable model name (docs/protocol.md §4): ≤ 64 chars, no ``..``."""
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
    """The node WebSocket URL for a router base URL (docs/protocol.md §1): https→wss, http→ws."""
    base = server.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + "/ws/node"
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :] + "/ws/node"
    raise ConfigError(f"not an http:// or https:// URL: {server!r}")


def read_json(response: Any, limit: int, *, finite: bool = False) -> Any:
    """The JSON body of a ``requests`` response opened with ``stream=True``, read no further
    than ``limit`` bytes: a router could otherwise make a script hold any amount of memory.
    With ``finite``, ``NaN`` and ``Infinity`` (which Python's decoder takes, though JSON has
    neither) become None. Raises ``ValueError`` when the body is longer or not JSON."""
    body = bytearray()
    for data in response.iter_content(chunk_size=65536):
        body += data
        if len(body) > limit:
            raise ValueError(f"more than {limit} bytes")
    if finite:
        return json.loads(body, parse_constant=lambda _name: None)
    return json.loads(body)


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


# ---- Terminal safety ------------------------------------------------------------------------
#
# Text from a node or a router must not drive the user's terminal: set its title, clear it,
# plant a hyperlink, colour it, or move the cursor to overwrite what was shown. Everything the
# scripts print from the network passes a TerminalFilter (``--raw`` turns it off).

ESC = "\x1b"
# Characters never printed: C0 controls except \t and \n, DEL, the C1 controls U+0080-U+009F,
# and the bidi embeddings, overrides and isolates that reorder what a terminal shows (Trojan
# Source, CVE-2021-42574). \r goes too: a lone one returns the cursor so that what follows
# overwrites the line, and without it \r\n is just \n. Lone surrogates go too: JSON may carry
# "\udc9b", and a stdout with surrogateescape (the C.UTF-8 locale's) writes it as the raw byte
# 0x9B, the 8-bit CSI; a strict stdout fails on it instead.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# What ends a control string (OSC, DCS, SOS, PM, APC): BEL, ST as ESC \ or U+009C; CAN and SUB
# cancel it (ECMA-48 and xterm's ctlseqs).
_STRING_END = re.compile("[\x07\x18\x1a\x1b\x9c]")
_CSI_BODY = re.compile("[\x20-\x3f]*")  # parameter and intermediate bytes
_INTERMEDIATES = re.compile("[\x20-\x2f]*")
# 8-bit forms of the introducers: U+009B CSI; U+0090 DCS, U+0098 SOS, U+009D OSC, U+009E PM and
# U+009F APC open a control string.
_C1_CSI = "\x9b"
_C1_STRINGS = "\x90\x98\x9d\x9e\x9f"
_ESC_STRINGS = "P]X^_"  # ESC P (DCS), ESC ] (OSC), ESC X (SOS), ESC ^ (PM), ESC _ (APC)

_TEXT, _ESC, _NF, _CSI, _STRING, _STRING_ESC = range(6)


class TerminalFilter:
    """Removes control characters and whole escape sequences from a stream of text pieces.

    A sequence may be split over pieces (an ESC ending one SSE event, its ``]0;title`` in the
    next), so the filter keeps its state between calls to ``feed``: use one per output stream.
    It holds no text, only where it is in a sequence; a sequence longer than
    ``MAX_SEQUENCE_CHARS`` is abandoned and the text after that point is shown.
    """

    def __init__(self) -> None:
        self._state = _TEXT
        self._length = 0  # characters of the current sequence so far

    def feed(self, text: str) -> str:
        """The printable part of ``text``, given everything fed before."""
        if self._state == _TEXT and _UNSAFE.search(text) is None:
            return text  # nearly every piece of a real answer
        shown: list[str] = []
        i, end = 0, len(text)
        while i < end:
            state = self._state
            if state == _TEXT:
                match = _UNSAFE.search(text, i)
                if match is None:
                    shown.append(text[i:])
                    break
                shown.append(text[i : match.start()])
                i = match.end()
                char = match.group()
                if char == ESC:
                    self._begin(_ESC)
                elif char == _C1_CSI:
                    self._begin(_CSI)
                elif char in _C1_STRINGS:
                    self._begin(_STRING)
                continue  # any other control character is dropped alone
            if state == _STRING:
                match = _STRING_END.search(text, i)
                stop = match.start() if match else end
                if self._grow(stop - i):
                    i = stop - (self._length - MAX_SEQUENCE_CHARS)
                    self._state = _TEXT
                    continue
                if match is None:
                    break
                i = match.end()
                self._state = _STRING_ESC if match.group() == ESC else _TEXT
                continue
            char = text[i]
            if state == _STRING_ESC:
                if char == "\\":  # ESC \ is ST: the string is over
                    self._state = _TEXT
                    i += 1
                else:  # an ESC that is not ST cancels the string and starts a new sequence
                    self._begin(_ESC)
                continue
            if state == _ESC:
                i += 1
                if char == "[":
                    self._begin(_CSI)
                elif char in _ESC_STRINGS:
                    self._begin(_STRING)
                elif "\x20" <= char <= "\x2f":  # ESC ( B and the like: intermediates, then a final
                    self._begin(_NF)
                elif "\x30" <= char <= "\x7e":  # two-character sequences: ESC c, ESC 7, ESC =
                    self._state = _TEXT
                elif char != ESC:  # not a sequence: drop the ESC, look at the character again
                    self._state = _TEXT
                    i -= 1
                continue
            # _CSI and _NF: bytes of the body, then one final byte.
            body = _CSI_BODY if state == _CSI else _INTERMEDIATES
            stop = body.match(text, i).end()
            if self._grow(stop - i):
                i = stop - (self._length - MAX_SEQUENCE_CHARS)
                self._state = _TEXT
                continue
            i = stop
            if i == end:
                break
            self._state = _TEXT
            final_low = "\x40" if state == _CSI else "\x30"
            if final_low <= text[i] <= "\x7e":
                i += 1
            # anything else ends the sequence unfinished and is looked at again as text
        return "".join(shown)

    def _begin(self, state: int) -> None:
        self._state = state
        self._length = 0

    def _grow(self, count: int) -> bool:
        """Count ``count`` more characters of the sequence; True when it is now too long."""
        self._length += count
        return self._length > MAX_SEQUENCE_CHARS


def printable(text: str) -> str:
    """``text`` without control characters and escape sequences (see ``TerminalFilter``)."""
    return TerminalFilter().feed(text)


def printable_line(text: str) -> str:
    """``printable(text)`` on one line: runs of whitespace, newlines included, become a space,
    so a field from the network cannot start lines of its own in a report."""
    return " ".join(printable(text).split())
