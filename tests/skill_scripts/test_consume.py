"""consume.py against a tiny local HTTP server speaking the router's consumer API."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading

import consume
import pytest

from .conftest import SCRIPTS, run_script, script_env
from .fakes import FakeHTTPServer, send_json, start_chunked, write_chunk


def _event(content: str, *, reasoning: bool = False, finish: str | None = None) -> bytes:
    delta: dict = {"content": content}
    if reasoning:
        delta["reasoning"] = True
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1764000000,
        "model": "llama3.2:3b",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
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
    parts = (
        b": queued position=2\n\n",
        b": keepalive\n\n",
        _event("Hel"),
        _event("lo, "),
        _event("world"),
        b"data: [DONE]\n\n",
    )
    with sse_server(*parts) as server:
        result = run_script(
            "consume.py", "--model", "llama3.2:3b", "--prompt", "hi", env=consume_env(server.url)
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello, world\n"
    assert "waiting for a free node (position 2)" in result.stderr
    method, path, body = server.requests[0]
    assert (method, path) == ("POST", "/api/chat")
    assert body == {
        "model": "llama3.2:3b",
        "messages": [{"role": "user", "content": "hi"}],
        "think": False,
    }


def test_stdin_that_is_not_a_terminal_is_the_prompt_and_an_empty_one_exits_2():
    with sse_server(_event("ok"), b"data: [DONE]\n\n") as server:
        piped = run_script(
            "consume.py", "--model", "m", stdin="from a pipe\n", env=consume_env(server.url)
        )
        empty = run_script("consume.py", "--model", "m", stdin="  \n", env=consume_env(server.url))
    assert piped.returncode == 0, piped.stderr
    assert server.requests[0][2]["messages"] == [{"role": "user", "content": "from a pipe"}]
    assert empty.returncode == 2
    assert empty.stderr == "error: the prompt is empty\n"
    assert len(server.requests) == 1


def test_prompt_dash_reads_stdin_and_thinking_goes_to_stderr_only_when_asked():
    parts = (_event("let me see", reasoning=True), _event("42"), b"data: [DONE]\n\n")
    with sse_server(*parts) as server:
        shown = run_script(
            "consume.py",
            "--model",
            "qwen3:8b",
            "--prompt",
            "-",
            "--show-thinking",
            stdin="what is it?\n",
            env=consume_env(server.url),
        )
        hidden = run_script(
            "consume.py",
            "--model",
            "qwen3:8b",
            "--prompt",
            "q",
            "--think",
            env=consume_env(server.url),
        )
    assert shown.returncode == 0 and hidden.returncode == 0
    assert shown.stdout == hidden.stdout == "42\n"
    assert "let me see" in shown.stderr
    assert "let me see" not in hidden.stderr
    bodies = [r[2] for r in server.requests]
    assert bodies[0]["messages"] == [{"role": "user", "content": "what is it?"}]
    assert bodies[0]["think"] is True and bodies[1]["think"] is True


def busy_router(offered: list[str], retry_after: str = "7") -> FakeHTTPServer:
    """A router that answers every chat with a 503 and lists ``offered`` on /api/models."""

    def handle(h):
        if h.path == "/api/models":
            send_json(h, 200, {"models": offered, "capabilities": {}})
        else:
            send_json(
                h,
                503,
                {"detail": "all nodes serving llama3.2:3b are busy"},
                {"Retry-After": retry_after},
            )

    return FakeHTTPServer(handle)


def test_503_for_a_busy_model_exits_3_with_the_routers_reason_and_retry_after():
    # Retry-After may also be an HTTP date; one in the past means now.
    with busy_router(["llama3.2:3b"], retry_after="Wed, 21 Oct 2015 07:28:00 GMT") as server:
        result = run_script(
            "consume.py", "--model", "llama3.2:3b", "--prompt", "hi", env=consume_env(server.url)
        )
    assert result.returncode == 3
    assert result.stderr == "error: all nodes serving llama3.2:3b are busy; retry in 0 s\n"
    assert result.stdout == ""


def test_429_exits_4_and_a_refused_request_exits_2():
    with FakeHTTPServer(
        lambda h: send_json(h, 429, {"detail": "too many requests"}, {"Retry-After": "30"})
    ) as server:
        limited = run_script(
            "consume.py", "--model", "m", "--prompt", "hi", env=consume_env(server.url)
        )
    with FakeHTTPServer(lambda h: send_json(h, 422, {"detail": "prompt too long"})) as server:
        invalid = run_script(
            "consume.py", "--model", "m", "--prompt", "hi", env=consume_env(server.url)
        )
    with FakeHTTPServer(lambda h: send_json(h, 500, {"detail": "boom"})) as server:
        failed = run_script(
            "consume.py", "--model", "m", "--prompt", "hi", env=consume_env(server.url)
        )
    assert (limited.returncode, invalid.returncode, failed.returncode) == (4, 2, 1)
    assert limited.stderr.strip() == (
        "error: rate or concurrency limit reached: too many requests; retry in 30 s"
    )
    assert invalid.stderr.strip() == (
        "error: the router refused the request (HTTP 422): prompt too long"
    )
    assert failed.stderr.strip() == "error: the router failed (HTTP 500); try again later"


def test_system_prompt_is_sent_first():
    with sse_server(_event("ok"), b"data: [DONE]\n\n") as server:
        result = run_script(
            "consume.py",
            "--model",
            "m",
            "--prompt",
            "hi",
            "--system",
            "answer in French",
            env=consume_env(server.url),
        )
    assert result.returncode == 0, result.stderr
    assert server.requests[0][2]["messages"] == [
        {"role": "system", "content": "answer in French"},
        {"role": "user", "content": "hi"},
    ]


def test_error_chunk_is_shown_as_its_message_and_exits_1():
    parts = (
        _event("Partial"),
        _event("\n\n[Error: node disconnected]", finish="error"),
        b"data: [DONE]\n\n",
    )
    with sse_server(*parts) as server:
        result = run_script(
            "consume.py", "--model", "m", "--prompt", "hi", env=consume_env(server.url)
        )
    assert result.returncode == 1
    assert result.stdout == "Partial\n"
    assert result.stderr == "error: node disconnected\n"


def test_ctrl_c_hangs_up_and_exits_130():
    hung_up = threading.Event()

    def stream_until_hang_up(h):
        start_chunked(h, "text/event-stream")
        write_chunk(h, _event("first words"))
        h.connection.settimeout(10)
        try:  # the client sends nothing more: a read returns b"" once it has hung up
            hung_up.set() if h.connection.recv(1) == b"" else None
        except OSError:
            hung_up.set()

    with FakeHTTPServer(stream_until_hang_up) as server:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "consume.py"), "--model", "m", "--prompt", "hi"],
            env=consume_env(server.url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.read(len("first words")) == "first words"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert hung_up.wait(5), "the server never saw the hang-up"
    assert proc.returncode == 130
    assert out == "\n"
    assert err == "interrupted\n"


def test_conversation_forgets_its_oldest_turns_to_stay_within_the_limits():
    history = []
    for turn in range(30):
        history += [
            {"role": "user", "content": f"q{turn}"},
            {"role": "assistant", "content": f"a{turn}"},
        ]
    messages, forgotten = consume.fit_conversation("be brief", history, "last")
    assert len(messages) == consume.MAX_MESSAGES
    assert messages[0] == {"role": "system", "content": "be brief"}
    assert messages[1] == {"role": "user", "content": "q6"}
    assert messages[-1] == {"role": "user", "content": "last"}
    assert forgotten == 12
    long_turns = [
        {"role": "user", "content": "x" * 9000},
        {"role": "assistant", "content": "y" * 9000},
    ] * 6
    messages, forgotten = consume.fit_conversation(None, long_turns, "z" * 9000)
    assert sum(len(m["content"]) for m in messages) <= consume.MAX_TOTAL_CHARS
    assert (len(messages), forgotten) == (11, 2)


def test_stream_without_done_is_reported_as_ended_early():
    with sse_server(_event("Partial")) as server:
        result = run_script(
            "consume.py", "--model", "m", "--prompt", "hi", env=consume_env(server.url)
        )
    assert result.returncode == 1
    assert result.stderr == "error: the answer stream ended early\n"


def test_invalid_model_name_exits_2_before_any_request():
    with FakeHTTPServer(lambda h: send_json(h, 200, {})) as server:
        result = run_script(
            "consume.py", "--model", "../etc", "--prompt", "hi", env=consume_env(server.url)
        )
    assert result.returncode == 2
    assert "invalid model name" in result.stderr
    assert server.requests == []


def test_server_that_is_not_http_exits_2():
    result = run_script(
        "consume.py", "--model", "m", "--prompt", "hi", env=script_env(IDLECLAW_SERVER="ftp://x")
    )
    assert result.returncode == 2
    assert "IDLECLAW_SERVER must be an http" in result.stderr


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["data: a", "", "data: [DONE]", ""], [("data", "a"), ("data", "[DONE]")]),
        (["data:a", "data: b", ""], [("data", "a\nb")]),
        ([": queued position=1", "event: x", "id: 3", ""], [("comment", "queued position=1")]),
    ],
)
def test_sse_reader_follows_the_event_stream_rules(lines, expected):
    reader = consume.SseReader()
    events = [e for e in (reader.feed(line) for line in lines) if e is not None]
    assert events == expected


def test_queue_notice_is_printed_once_per_position():
    err = io.StringIO()
    printer = consume.AnswerPrinter(io.StringIO(), err, show_thinking=False)
    for text in ("queued position=3", "queued position=3", "ping", "queued position=1"):
        printer.comment(text)
    assert err.getvalue().splitlines() == [
        "waiting for a free node (position 3)...",
        "waiting for a free node (position 1)...",
    ]


def test_a_redirect_is_not_followed_and_exits_1_naming_the_status_and_location():
    with sse_server(_event("stolen"), b"data: [DONE]\n\n") as elsewhere:
        targets = [f"{elsewhere.url}/steal", "file:///etc/passwd"]
        with FakeHTTPServer(
            lambda h: send_json(h, 307, {}, {"Location": targets[len(redirecting.requests) - 1]})
        ) as redirecting:
            results = [
                run_script(
                    "consume.py", "--model", "m", "--prompt", "hi", env=consume_env(redirecting.url)
                )
                for _ in targets
            ]
    assert elsewhere.requests == []
    for result, target in zip(results, targets, strict=True):
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip() == (
            f"error: the router answered HTTP 307, a redirect to {target}, which is not "
            "followed; set IDLECLAW_SERVER to the router's own URL"
        )
        assert result.stdout == ""


def test_a_503_with_a_retry_after_of_non_ascii_digits_still_exits_3():
    with busy_router(["llama3.2:3b"], retry_after="\u00b2") as server:
        result = run_script(
            "consume.py", "--model", "llama3.2:3b", "--prompt", "hi", env=consume_env(server.url)
        )
    assert result.returncode == 3, result.stderr
    assert result.stderr == "error: all nodes serving llama3.2:3b are busy; retry later\n"


def test_data_lines_without_a_blank_line_past_1_mb_end_the_stream_with_an_error():
    line = b"data: " + b"y" * 8000 + b"\n"
    with sse_server(*[line * 8] * 20) as server:  # 1.28 MB of one event
        result = run_script(
            "consume.py", "--model", "m", "--prompt", "hi", env=consume_env(server.url)
        )
    assert result.returncode == 1
    assert "(an event of over 1 MB)" in result.stderr


def test_a_long_answer_is_printed_without_being_held_in_memory():
    """64 MB of answer; the script's peak memory stays near that of a short one."""
    part = _event("x" * 8000) * 16  # 128 KB
    runner = (
        "import resource, runpy, sys\n"
        "sys.argv = ['consume.py', '--model', 'm', '--prompt', 'hi']\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPTS / 'consume.py')!r}, run_name='__main__')\n"
        "finally:\n"
        "    print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    peaks = {}
    for parts in (1, 512):
        with sse_server(*[part] * parts, b"data: [DONE]\n\n") as server:
            result = subprocess.run(
                [sys.executable, "-c", runner],
                env=consume_env(server.url),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                timeout=30,
                cwd=str(SCRIPTS),
            )
        assert "maxrss" in result.stderr, result.stderr
        peaks[parts] = int(result.stderr.split("maxrss")[1].split()[0])  # KiB on Linux
    assert peaks[512] - peaks[1] < 8_000, peaks
