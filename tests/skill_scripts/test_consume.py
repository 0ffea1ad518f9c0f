"""consume.py against a tiny local HTTP server speaking the router's consumer API."""

from __future__ import annotations

import io
import json

import consume
import pytest

from .conftest import closed_port, run_script, script_env
from .fakes import FakeHTTPServer, send_json, start_chunked, write_chunk


def _event(content: str, *, reasoning: bool = False, finish: str | None = None) -> bytes:
    delta: dict = {"content": content}
    if reasoning:
        delta["reasoning"] = True
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1764000000,
             "model": "llama3.2:3b",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def sse_server(*parts: bytes) -> FakeHTTPServer:
    """A router whose /api/chat streams ``parts`` as one HTTP chunk each."""
    def handle(h):
        start_chunked(h, "text/event-stream")
        for part in parts:
            write_chunk(h, part)
        write_chunk(h, b"")
    return FakeHTTPServer(handle)


def consume_env(url: str) -> dict[str, str]:
    return script_env(IDLECLAW_SERVER=url)


def test_answer_is_streamed_to_stdout():
    parts = (b": queued position=2\n\n", b": keepalive\n\n", _event("Hel"), _event("lo, "),
             _event("world"), b"data: [DONE]\n\n")
    with sse_server(*parts) as server:
        result = run_script("consume.py", "--model", "llama3.2:3b", "--prompt", "hi",
                            env=consume_env(server.url))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello, world\n"
    assert "waiting for a free node (position 2)" in result.stderr
    method, path, body = server.requests[0]
    assert (method, path) == ("POST", "/api/chat")
    assert body == {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}],
                    "think": False}


def test_prompt_dash_reads_stdin_and_thinking_goes_to_stderr_only_when_asked():
    parts = (_event("let me see", reasoning=True), _event("42"), b"data: [DONE]\n\n")
    with sse_server(*parts) as server:
        shown = run_script("consume.py", "--model", "qwen3:8b", "--prompt", "-",
                           "--show-thinking", stdin="what is it?\n", env=consume_env(server.url))
        hidden = run_script("consume.py", "--model", "qwen3:8b", "--prompt", "q", "--think",
                            env=consume_env(server.url))
    assert shown.returncode == 0 and hidden.returncode == 0
    assert shown.stdout == hidden.stdout == "42\n"
    assert "let me see" in shown.stderr
    assert "let me see" not in hidden.stderr
    bodies = [r[2] for r in server.requests]
    assert bodies[0]["messages"] == [{"role": "user", "content": "what is it?"}]
    assert bodies[0]["think"] is True and bodies[1]["think"] is True


def test_503_says_no_node_serves_the_model_and_when_to_retry():
    with FakeHTTPServer(lambda h: send_json(h, 503, {"detail": "no node available"},
                                            {"Retry-After": "7"})) as server:
        result = run_script("consume.py", "--model", "llama3.2:3b", "--prompt", "hi",
                            env=consume_env(server.url))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: no node is serving llama3.2:3b right now; retry in 7 s")
    assert result.stdout == ""


def test_429_names_the_limit_and_4xx_shows_the_detail():
    with FakeHTTPServer(lambda h: send_json(h, 429, {"detail": "too many requests"},
                                            {"Retry-After": "30"})) as server:
        limited = run_script("consume.py", "--model", "m", "--prompt", "hi",
                             env=consume_env(server.url))
    with FakeHTTPServer(lambda h: send_json(h, 422, {"detail": "prompt too long"})) as server:
        invalid = run_script("consume.py", "--model", "m", "--prompt", "hi",
                             env=consume_env(server.url))
    assert limited.returncode == invalid.returncode == 1
    assert "limit reached" in limited.stderr and "retry in 30 s" in limited.stderr
    assert "HTTP 422" in invalid.stderr and "prompt too long" in invalid.stderr


def test_error_chunk_goes_to_stderr_and_exits_1():
    parts = (_event("Partial"), _event("\n\n[Error: node disconnected]", finish="error"),
             b"data: [DONE]\n\n")
    with sse_server(*parts) as server:
        result = run_script("consume.py", "--model", "m", "--prompt", "hi",
                            env=consume_env(server.url))
    assert result.returncode == 1
    assert result.stdout == "Partial\n"
    assert "[Error: node disconnected]" in result.stderr


def test_stream_without_done_is_reported_as_ended_early():
    with sse_server(_event("Partial")) as server:
        result = run_script("consume.py", "--model", "m", "--prompt", "hi",
                            env=consume_env(server.url))
    assert result.returncode == 1
    assert "stream ended early" in result.stderr


def test_invalid_model_name_exits_2_before_any_request():
    with FakeHTTPServer(lambda h: send_json(h, 200, {})) as server:
        result = run_script("consume.py", "--model", "../etc", "--prompt", "hi",
                            env=consume_env(server.url))
    assert result.returncode == 2
    assert "invalid model name" in result.stderr
    assert server.requests == []


def test_server_that_is_not_http_exits_2():
    result = run_script("consume.py", "--model", "m", "--prompt", "hi",
                        env=script_env(IDLECLAW_SERVER="ftp://x"))
    assert result.returncode == 2
    assert "IDLECLAW_SERVER must be an http" in result.stderr


def test_unreachable_router_exits_1_with_one_clear_line():
    result = run_script("consume.py", "--model", "m", "--prompt", "hi",
                        env=consume_env(f"http://127.0.0.1:{closed_port()}"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "cannot reach the IdleClaw router" in result.stderr
    assert "connection refused" in result.stderr


@pytest.mark.parametrize(("lines", "expected"), [
    (["data: a", "", "data: [DONE]", ""], [("data", "a"), ("data", "[DONE]")]),
    (["data:a", "data: b", ""], [("data", "a\nb")]),
    ([": queued position=1", "event: x", "id: 3", ""], [("comment", "queued position=1")]),
])
def test_sse_reader_follows_the_event_stream_rules(lines, expected):
    reader = consume.SseReader()
    events = [e for e in (reader.feed(line) for line in lines) if e is not None]
    assert events == expected


def test_queue_notice_is_printed_once_per_position():
    err = io.StringIO()
    printer = consume.AnswerPrinter(io.StringIO(), err, show_thinking=False)
    for text in ("queued position=3", "queued position=3", "ping", "queued position=1"):
        printer.comment(text)
    assert err.getvalue().splitlines() == ["waiting for a free node (position 3)...",
                                           "waiting for a free node (position 1)..."]
