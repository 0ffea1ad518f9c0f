"""consume.py and status.py never let a node or a router drive the user's terminal.

Escape sequences in an answer could retitle the window, clear the screen, plant a hyperlink to
another site, recolour the text or overwrite lines; bidi overrides reorder what is shown. The
scripts run as the user runs them and their output is checked byte for byte: no ESC, no BEL, no
C1 control, no other control but newline and tab, and the text around the sequences kept.
``--raw`` prints the answer as received.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import uuid
from typing import Any

import idleclaw_config
import pytest
import requests
import websocket

from tests import procs

from .conftest import SCRIPTS, script_env
from .fakes import FakeHTTPServer, send_json, start_chunked, write_chunk

MODEL = "evil:1b"

# One entry per kind of sequence: the deltas a node streams and the text a user must see. Each
# delta becomes an SSE event of its own, so a sequence split over deltas is split over events.
CASES: dict[str, tuple[list[str], str]] = {
    "osc title, BEL": (["before ", "\x1b]0;PWNED-TITLE\x07", "after"], "before after"),
    "osc title, ST": (["a\x1b]2;PWNED-TITLE\x1b\\b"], "ab"),
    "clear screen, cursor home": (["\x1b[2J\x1b[Hcleared?"], "cleared?"),
    "osc 8 hyperlink": (
        ["see \x1b]8;;https://evil.example/\x1b\\this\x1b]8;;\x1b\\ link"],
        "see this link",
    ),
    "colours": (["\x1b[31;1mred\x1b[0m and \x1b[38;5;196mmore\x1b[m"], "red and more"),
    "dcs": (["x\x1bPq#0;2;0;0;0#0~~\x1b\\y"], "xy"),
    "sos, pm, apc": (["1\x1bXsos\x1b\\2\x1b^pm\x1b\\3\x1b_apc\x1b\\4"], "1234"),
    "two-character and charset sequences": (["\x1bcR\x1b7S\x1b(0T\x1b#8U\x1b=V"], "RSTUV"),
    "8-bit csi, osc, dcs, apc": (["a\x9b2Jb\x9d0;PWNED\x07c\x90q\x9cd\x9fapc\x9ce\x85f"], "abcdef"),
    "c0 controls, DEL and carriage returns": (
        ["one\r\ntwo\rthree\x08\x00\x7f\x1a\tfour\n"],
        "one\ntwothree\tfour\n",
    ),
    "bidi overrides and isolates": (
        ["\u202eevil\u202c \u2066isolated\u2069 \u202aembed"],
        "evil isolated embed",
    ),
    "ESC alone at the end of a delta": (["a\x1b", "]0;PWNED-", "TITLE\x07b"], "ab"),
    "csi split byte by byte": (["x\x1b", "[", "2", "J", "y"], "xy"),
    "8-bit osc split before its ST": (["p\x9d0;", "PWNED\x1b", "\\q"], "pq"),
    "osc 8 split inside its url": (
        ["\x1b]8;;https://ev", "il.example/\x1b", "\\click", "\x1b]8;;\x1b\\"],
        "click",
    ),
}

C1 = re.compile("[\x80-\x9f]")
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def assert_terminal_safe(data: bytes) -> str:
    """``data`` holds no ESC, BEL, C1 or other control but newline and tab; returns its text."""
    assert b"\x1b" not in data and b"\x07" not in data
    text = data.decode()
    assert not C1.search(text), text
    assert not UNSAFE.search(text), text
    return text


def sse_event(content: str, *, reasoning: bool = False, finish: str | None = None) -> bytes:
    delta: dict[str, Any] = {"content": content}
    if reasoning:
        delta["reasoning"] = True
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1764000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def sse_router(*parts: bytes) -> FakeHTTPServer:
    """A router whose /api/chat streams ``parts``, one HTTP chunk each."""

    def handle(handler):
        start_chunked(handler, "text/event-stream")
        for part in parts:
            write_chunk(handler, part)
        write_chunk(handler, b"")

    return FakeHTTPServer(handle)


def run_bytes(script: str, *args: str, server: str) -> subprocess.CompletedProcess:
    """Run a script as the user would; stdout and stderr as the bytes a terminal receives."""
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        env=script_env(IDLECLAW_SERVER=server),
        capture_output=True,
        timeout=30,
    )


def consume(server: str, *extra: str) -> subprocess.CompletedProcess:
    return run_bytes("consume.py", "--model", MODEL, "--prompt", "hi", *extra, server=server)


# ---- consume.py against a router streaming what a hostile node sent


@pytest.mark.parametrize("case", CASES)
def test_answer_and_reasoning_reach_the_terminal_without_escape_sequences(case):
    deltas, visible = CASES[case]
    parts = [sse_event(d, reasoning=True) for d in deltas]
    parts += [sse_event(d) for d in deltas] + [b"data: [DONE]\n\n"]
    with sse_router(*parts) as server:
        result = consume(server.url, "--show-thinking")
    assert result.returncode == 0, result.stderr
    assert assert_terminal_safe(result.stdout) == visible + "\n"
    assert visible.strip() in assert_terminal_safe(result.stderr)


def test_raw_prints_the_answer_and_reasoning_as_received():
    deltas = [d for case in CASES.values() for d in case[0]]
    parts = [sse_event(d, reasoning=True) for d in deltas]
    parts += [sse_event(d) for d in deltas] + [b"data: [DONE]\n\n"]
    with sse_router(*parts) as server:
        result = consume(server.url, "--show-thinking", "--raw")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "".join(deltas) + "\n"
    assert "".join(deltas) in result.stderr.decode()


def test_an_osc_that_never_ends_hides_a_bounded_part_of_the_answer():
    cap = idleclaw_config.MAX_SEQUENCE_CHARS
    body = "0;" + "x" * (cap + 1000)
    # Far more than the cap after the opening ESC ]: the filter neither buffers it nor hides
    # the rest of the answer.
    parts = [sse_event("start "), sse_event("\x1b]" + body[:100])]
    parts += [sse_event(body[i : i + 500]) for i in range(100, len(body), 500)]
    parts += [sse_event(" end\x1b]0;never closed"), b"data: [DONE]\n\n"]
    with sse_router(*parts) as server:
        result = consume(server.url)
    assert result.returncode == 0, result.stderr
    assert assert_terminal_safe(result.stdout) == ("start " + body[cap:] + " end\n")


def test_error_messages_from_the_stream_are_cleaned():
    error_chunk = sse_event("\n\n[Error: \x1b]0;PWNED\x07node \x1b[2Jfailed]", finish="error")
    with sse_router(sse_event("ok"), error_chunk, b"data: [DONE]\n\n") as server:
        in_stream = consume(server.url)
    error_object = (
        b"data: "
        + json.dumps(
            {"error": {"message": "\x1b]8;;https://evil.example/\x07bad\x9b31m request"}}
        ).encode()
        + b"\n\n"
    )
    with sse_router(error_object) as server:
        error_event = consume(server.url)
    assert in_stream.returncode == error_event.returncode == 1
    assert assert_terminal_safe(in_stream.stderr) == "error: node failed\n"
    assert assert_terminal_safe(error_event.stderr) == "error: bad request\n"


def test_refusals_and_queue_notices_from_the_router_are_cleaned():
    def refuse(handler):
        send_json(handler, 422, {"detail": "\x1b]0;PWNED\x07prompt\x1b[31m too\nlong\u202e"})

    with FakeHTTPServer(refuse) as server:
        refused = consume(server.url)

    def queue_then_answer(handler):
        start_chunked(handler, "text/event-stream")
        write_chunk(handler, b": queued position=\x1b[2J4\x07\n\n")
        write_chunk(handler, sse_event("fine"))
        write_chunk(handler, b"data: [DONE]\n\n")
        write_chunk(handler, b"")

    with FakeHTTPServer(queue_then_answer) as server:
        queued = consume(server.url)
    assert refused.returncode == 2
    assert assert_terminal_safe(refused.stderr) == (
        "error: the router refused the request (HTTP 422): prompt too long\n"
    )
    assert queued.returncode == 0
    assert assert_terminal_safe(queued.stderr) == "waiting for a free node (position 4)...\n"


# ---- status.py against a router whose fields carry escape sequences


def hostile_status_router() -> FakeHTTPServer:
    def handle(handler):
        if handler.path == "/health":
            send_json(
                handler,
                200,
                {"status": "\x1b]0;PWNED\x07healthy\x1b[2J", "uptime_seconds": 65, "node_count": 1},
            )
        else:
            send_json(
                handler,
                200,
                {
                    "models": ["\x1b[31mevil\x1b[0m:1b\u202e", "fake\nmodels:  line\x9b2J"],
                    "capabilities": {"\x1b[31mevil\x1b[0m:1b\u202e": {"thinking": True}},
                },
            )

    return FakeHTTPServer(handle)


def test_status_fields_are_cleaned_and_kept_on_their_line():
    with hostile_status_router() as server:
        result = run_bytes("status.py", server=server.url)
    assert result.returncode == 0, result.stderr
    lines = assert_terminal_safe(result.stdout).splitlines()
    width = len("fake models: line")
    assert lines[1:] == [
        "status:    healthy",
        "uptime:    1m 5s",
        "nodes:     1 online",
        "models:    2",
        "  " + "MODEL".ljust(width) + "  NODES  FREE  QUEUED  TOKENS/S  CAPABILITIES",
        "  " + "evil:1b".ljust(width) + "      -     -       -         -  thinking",
        "  " + "fake models: line".ljust(width) + "      -     -       -         -  -",
    ]


def test_status_raw_shows_the_fields_as_received():
    with hostile_status_router() as server:
        result = run_bytes("status.py", "--raw", server=server.url)
    assert result.returncode == 0, result.stderr
    shown = result.stdout.decode()
    assert "status:    \x1b]0;PWNED\x07healthy\x1b[2J\n" in shown
    assert "\x1b[31mevil\x1b[0m:1b\u202e" in shown


# ---- lone surrogates: JSON may carry "\udc9b", and a surrogateescape stdout writes it as the
# raw byte 0x9B, the 8-bit CSI (red-team finding F10)

# The locale this machine and many containers give (C.UTF-8): stdout encodes UTF-8 with
# surrogateescape, so "\udc9b" becomes the single byte 0x9B. Set here so that the test does not
# depend on the locale it runs under; the strict handler is the other usual one.
SURROGATEESCAPE = {"PYTHONIOENCODING": "utf-8:surrogateescape", "LC_ALL": "C.UTF-8"}
STRICT = {"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}
EIGHT_BIT_C1 = re.compile(b"[\x80-\x9f]")


def surrogate_status_router() -> FakeHTTPServer:
    """Fields with low surrogates only (U+DC80-U+DCFF), which surrogateescape writes as bytes;
    any other lone surrogate makes it fail like the strict handler."""

    def handle(handler):
        if handler.path == "/health":  # json.dumps writes them as \udc9b escapes
            send_json(
                handler,
                200,
                {"status": "healthy\udc9b2J\udc9c", "uptime_seconds": 5, "node_count": 1},
            )
        else:
            send_json(
                handler,
                200,
                {"models": ["m\udc9b[2J:1b", "n\udc9d0;T\udc9c:1b"], "capabilities": {}},
            )

    return FakeHTTPServer(handle)


def run_status(*args: str, server: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "status.py"), *args],
        env=script_env(IDLECLAW_SERVER=server, **env),
        capture_output=True,
        timeout=30,
    )


def test_lone_surrogates_in_status_fields_never_reach_the_terminal_as_c1_bytes():
    with surrogate_status_router() as server:
        result = run_status(server=server.url, env=SURROGATEESCAPE)
    assert result.returncode == 0, result.stderr
    assert not EIGHT_BIT_C1.search(result.stdout), result.stdout
    assert assert_terminal_safe(result.stdout).splitlines()[1:] == [
        "status:    healthy2J",
        "uptime:    5s",
        "nodes:     1 online",
        "models:    2",
        "  MODEL    NODES  FREE  QUEUED  TOKENS/S  CAPABILITIES",
        "  m[2J:1b      -     -       -         -  -",
        "  n0;T:1b      -     -       -         -  -",
    ]


@pytest.mark.parametrize("env", [SURROGATEESCAPE, STRICT], ids=["surrogateescape", "strict"])
def test_status_raw_with_lone_surrogates_neither_writes_c1_bytes_nor_crashes(env):
    with surrogate_status_router() as server:
        result = run_status("--raw", server=server.url, env=env)
    assert result.returncode == 0, result.stderr
    assert not EIGHT_BIT_C1.search(result.stdout), result.stdout
    # As consume.py does: what the terminal cannot be given is shown as "?".
    assert "status:    healthy?2J?\n" in result.stdout.decode()


def test_lone_surrogates_in_an_answer_are_removed():
    deltas = ["A\udc9b2J", "\udc1bB\ud800", "\udfff C"]
    parts = [sse_event(d) for d in deltas] + [b"data: [DONE]\n\n"]
    with sse_router(*parts) as server:
        result = subprocess.run(
            [sys.executable, str(SCRIPTS / "consume.py"), "--model", MODEL, "--prompt", "hi"],
            env=script_env(IDLECLAW_SERVER=server.url, **SURROGATEESCAPE),
            capture_output=True,
            timeout=30,
        )
    assert result.returncode == 0, result.stderr
    assert assert_terminal_safe(result.stdout) == "A2JB C\n"


# ---- end to end: a hostile node on a real router, consume.py as a consumer


class EscapingNode:
    """A node on a real WebSocket that answers its one request with the given chunks."""

    def __init__(self, router_url: str) -> None:
        self.ws = websocket.create_connection(
            router_url.replace("http", "ws", 1) + "/ws/node", timeout=20
        )
        self.ws.send(
            json.dumps(
                {
                    "type": "register",
                    "node_id": f"escaping-{uuid.uuid4().hex[:8]}",
                    "models": [{"name": MODEL, "capabilities": ["completion", "thinking"]}],
                    "max_concurrent": 1,
                    "protocol": 2,
                }
            )
        )
        reply = json.loads(self.ws.recv())
        assert reply["type"] == "registered", reply
        self.error: BaseException | None = None

    def serve(self, messages: list[dict[str, Any]]) -> threading.Thread:
        """Answer the next inference_request with ``messages`` then a done chunk."""

        def run() -> None:
            try:
                while True:
                    frame = json.loads(self.ws.recv())
                    if frame.get("type") == "inference_request":
                        break
                for message in messages:
                    self._chunk(frame["request_id"], {"role": "assistant", **message}, False)
                self._chunk(frame["request_id"], {"role": "assistant", "content": ""}, True)
            except BaseException as exc:  # reported by the test, not lost in the thread
                self.error = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def _chunk(self, request_id: str, message: dict[str, Any], done: bool) -> None:
        chunk: dict[str, Any] = {"message": message, "done": done}
        if done:
            chunk["done_reason"] = "stop"
        self.ws.send(
            json.dumps({"type": "inference_chunk", "request_id": request_id, "chunk": chunk})
        )


@pytest.mark.e2e
def test_escape_sequences_from_a_node_on_a_real_router_never_reach_the_terminal(router):
    deltas = [d for case in CASES.values() for d in case[0]]
    visible = "".join(case[1] for case in CASES.values())
    node = EscapingNode(router.url)
    try:
        procs.wait_until(
            lambda: MODEL in requests.get(f"{router.url}/api/models", timeout=5).json()["models"],
            what="the node's model",
        )
        messages = [{"content": "", "thinking": d} for d in deltas]
        messages += [{"content": d} for d in deltas]
        served = node.serve(messages)
        result = consume(router.url, "--show-thinking")
        served.join(10)
    finally:
        node.ws.close()
    assert node.error is None, node.error
    assert result.returncode == 0, result.stderr
    assert assert_terminal_safe(result.stdout) == visible + "\n"
    assert assert_terminal_safe(result.stderr).strip() == visible.strip()


# ---- the filter on its own: state across pieces, and its bound


def test_a_sequence_split_at_every_character_is_removed_whole():
    text = "".join(d for case in CASES.values() for d in case[0])
    terminal = idleclaw_config.TerminalFilter()
    shown = "".join(terminal.feed(char) for char in text)
    assert shown == "".join(case[1] for case in CASES.values())


def test_the_filter_removes_lone_surrogates_even_inside_a_split_sequence():
    text = "a\udc9b2Jb\ud800\x1b[\udfff31mc\x1b]0;\udc07t\x07d"
    terminal = idleclaw_config.TerminalFilter()
    assert "".join(terminal.feed(char) for char in text) == "a2Jb31mcd"
    assert idleclaw_config.printable(text) == "a2Jb31mcd"


def test_plain_text_is_left_alone():
    text = "Ünïcödé, emoji 🦀, CJK 漢字, Arabic مرحبا, tabs\tand\nnewlines, 3 < 4 & [1]"
    assert idleclaw_config.printable(text) == text
