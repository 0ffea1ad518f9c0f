"""HTTP intake under a real daphne (issue 12): static paths that climb out of the static
directories.

Everything here talks to the router through raw sockets, so nothing between the test and daphne
tidies a path, frames a body or completes a head on the test's behalf.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import procs
from tests.conftest import ROOMY_ENV

pytestmark = pytest.mark.e2e

def start(tmp_path: Path, **env: str) -> procs.Proc:
    proc, url = procs.start_router(tmp_path / "router.sqlite3", {**ROOMY_ENV, **env})
    proc.url = url
    proc.port = int(url.rsplit(":", 1)[1])
    return proc


@pytest.fixture
def router(tmp_path: Path) -> Iterator[procs.Proc]:
    proc = start(tmp_path)
    yield proc
    proc.stop()


# --- Raw HTTP --------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the end of the head to the first byte of the answer
    closed: bool  # the router closed the connection after answering
    body_sent: int = 0  # bytes of body (with chunk framing) the router let the test send


def parse(raw: bytes) -> tuple[int | None, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body (chunked framing removed) of a response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/"):
        return None, {}, b""
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return int(lines[0].split()[1]), headers, body


def dechunk(framed: bytes) -> bytes:
    """The body of a chunked response, as far as it has arrived."""
    body = b""
    while b"\r\n" in framed:
        size_line, _, rest = framed.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0 or len(rest) < size:
            break
        body += rest[:size]
        framed = rest[size + 2:]
    return body


def exchange(port: int, request: bytes, *, timeout: float = 10.0) -> Answer:
    """Send ``request`` as it is and read until the router closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        sent_at = time.monotonic()
        raw, first = b"", None
        while True:
            data = sock.recv(65536)
            if not data:
                break
            first = first or time.monotonic()
            raw += data
    status, headers, body = parse(raw)
    return Answer(status, headers, body, (first or time.monotonic()) - sent_at, closed=True)



# --- Defect 11: static paths outside the static files ---------------------------------------


@pytest.mark.parametrize("path", [
    "/static/../../../../etc/passwd",
    "/static/..%2f..%2fetc%2fpasswd",
    "/static/%2e%2e/%2e%2e/etc/passwd",
    "/static/admin/../../../../../../etc/passwd",
])
def test_a_static_path_outside_the_static_files_is_a_400_at_once(router, path):
    answer = exchange(router.port, f"GET {path} HTTP/1.1\r\nHost: router\r\n"
                                   "Connection: close\r\n\r\n".encode(), timeout=5)
    assert answer.status == 400
    assert answer.headers["content-type"] == "application/json"
    assert json.loads(answer.body) == {"detail": "bad request"}
    assert b"root:" not in answer.body
    assert "Exception inside application" not in router.output


def test_an_admin_static_file_is_still_served(router):
    answer = exchange(router.port, b"GET /static/admin/css/base.css HTTP/1.1\r\nHost: router\r\n"
                                   b"Connection: close\r\n\r\n")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/css")
    assert b"body" in answer.body
