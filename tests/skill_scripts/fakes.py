"""Small fakes for the skill-script tests: an HTTP server and a router's node WebSocket.

They speak the real wire formats (HTTP/1.1 with chunked bodies, RFC 6455 frames) with the
standard library only, so the scripts run against them unchanged. Ollama is never faked here:
the tests run the Ollama emulator (``bench/emulator.py``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handler = Callable[[BaseHTTPRequestHandler], None]


class FakeHTTPServer:
    """A threaded HTTP server on 127.0.0.1 whose every request goes to ``handle``.

    It exists for router answers a real router will not give on cue but a script must handle (a
    stream that ends without ``[DONE]``, a body that is not JSON, a chosen ``Retry-After``);
    tests/e2e runs consume.py and status.py against the real router."""

    def __init__(self, handle: Handler) -> None:
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.requests.append((self.command, self.path, None))
                handle(self)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                self.body = json.loads(body) if body else None
                outer.requests.append((self.command, self.path, self.body))
                handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.requests: list[tuple[str, str, Any]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True)

    def __enter__(self) -> FakeHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def send_json(handler: BaseHTTPRequestHandler, status: int, data: Any,
              headers: dict[str, str] | None = None) -> None:
    """Answer a request with a JSON body."""
    body = json.dumps(data).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def start_chunked(handler: BaseHTTPRequestHandler, content_type: str) -> None:
    """Start a streamed 200 answer with chunked transfer encoding."""
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()


def write_chunk(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    """One HTTP chunk (an empty ``data`` ends the body)."""
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()


WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class FakeRouter:
    """A node WebSocket endpoint (``/ws/node``): records every frame a node sends and lets the
    test send frames to the current connection. One connection at a time, like one node.

    It exists to check contribute.py against the base protocol (PROTOCOL §1) frame by frame,
    with frames a test chooses and the real router will not send on cue (a given
    ``resume_token``, a 1008 refusal, an unknown frame type)."""

    def __init__(self) -> None:
        self.frames: queue.Queue[dict[str, Any]] = queue.Queue()
        self.connections: queue.Queue[socket.socket] = queue.Queue()
        self.paths: list[str] = []
        self.conn: socket.socket | None = None
        outer = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True)

    def __enter__(self) -> FakeRouter:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- test side

    def accept(self, timeout: float = 5.0) -> socket.socket:
        """Wait for the next node connection and make it the current one."""
        self.conn = self.connections.get(timeout=timeout)
        return self.conn

    def recv(self, timeout: float = 5.0, skip: tuple[str, ...] = ("heartbeat",)) -> dict:
        """The next frame from the node, skipping the given types."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.frames.get(timeout=max(0.01, deadline - time.monotonic()))
            if frame.get("type") not in skip:
                return frame

    def send(self, frame: dict[str, Any]) -> None:
        """Send a text frame to the current connection."""
        assert self.conn is not None
        self.conn.sendall(_frame(0x1, json.dumps(frame).encode()))

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame to the current connection."""
        assert self.conn is not None
        self.conn.sendall(_frame(0x8, struct.pack("!H", code) + reason.encode()))

    # ---- server side

    def _serve(self, sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        request_line = reader.readline().decode()
        self.paths.append(request_line.split()[1])
        headers = {}
        while (line := reader.readline().decode().strip()):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(
            hashlib.sha1((headers["sec-websocket-key"] + WS_GUID).encode()).digest()
        ).decode()
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
        )
        self.connections.put(sock)
        try:
            while True:
                opcode, payload = _read_frame(reader)
                if opcode == 0x1:
                    self.frames.put(json.loads(payload))
                elif opcode == 0x9:
                    sock.sendall(_frame(0xA, payload))
                elif opcode == 0x8:
                    try:
                        sock.sendall(_frame(0x8, payload[:2]))
                    except OSError:
                        pass
                    self.frames.put({"type": "_closed", "payload": payload.hex()})
                    return
        except (OSError, ConnectionError, struct.error, ValueError):
            self.frames.put({"type": "_closed"})


def _frame(opcode: int, payload: bytes) -> bytes:
    header = bytes([0x80 | opcode])
    if len(payload) < 126:
        header += bytes([len(payload)])
    elif len(payload) < 65536:
        header += bytes([126]) + struct.pack("!H", len(payload))
    else:
        header += bytes([127]) + struct.pack("!Q", len(payload))
    return header + payload


def _read_exact(reader: Any, n: int) -> bytes:
    data = reader.read(n)
    if len(data) < n:
        raise ConnectionError("connection closed")
    return data


def _read_frame(reader: Any) -> tuple[int, bytes]:
    b1, b2 = _read_exact(reader, 2)
    opcode = b1 & 0x0F
    length = b2 & 0x7F
    if length == 126:
        length = struct.unpack("!H", _read_exact(reader, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", _read_exact(reader, 8))[0]
    mask = _read_exact(reader, 4) if b2 & 0x80 else b"\0\0\0\0"
    data = _read_exact(reader, length)
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))
