"""Ask the IdleClaw network a question and stream the answer to stdout.

POSTs to the router's ``/api/chat`` (PROTOCOL.md §2) and prints the answer as it arrives.
Waiting notices, reasoning (with ``--show-thinking``) and errors go to stderr, so stdout holds
the answer only. Control characters and escape sequences in what the network sends are removed
before anything is printed (``idleclaw_config.TerminalFilter``); ``--raw`` prints the answer and
reasoning exactly as received. Exit codes: 0 answered, 1 the network could not answer (HTTP
error, no node, connection failure, error in the stream), 2 bad configuration or arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import idleclaw_config as config
import requests
import urllib3

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0
MAX_PROMPT_CHARS = 10_000


class StreamFailed(Exception):
    """The answer stream failed; the message is shown to the user."""


def _retry_after(response: requests.Response) -> str:
    value = (response.headers.get("Retry-After") or "").strip()
    if value.isdigit():
        return f"retry in {int(value)} s"
    return "retry later"


def _detail(response: requests.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):  # validation errors: a list of {"loc", "msg"} objects
        parts = [str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail]
        detail = "; ".join(parts)
    if not detail:
        return response.reason or "no detail"
    return " ".join(str(detail).split())[:300]


def http_error_message(response: requests.Response, model: str) -> str:
    """The one-line message for a router answer other than 200."""
    status = response.status_code
    if status == 503:
        return f"no node is serving {model} right now; {_retry_after(response)}"
    if status == 429:
        return f"rate or concurrency limit reached: {_detail(response)}; {_retry_after(response)}"
    if 400 <= status < 500:
        return f"the router refused the request (HTTP {status}): {_detail(response)}"
    return f"the router failed (HTTP {status}); try again later"


class SseReader:
    """Turns the lines of a Server-Sent Events body into ``data`` payloads.

    Follows the SSE rules the router relies on: ``data:`` lines accumulate until a blank line,
    lines starting with ``:`` are comments, other fields are ignored.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        """One line in; ``("data", payload)``, ``("comment", text)`` or None."""
        if line == "":
            if not self._data:
                return None
            payload = "\n".join(self._data)
            self._data = []
            return "data", payload
        if line.startswith(":"):
            return "comment", line[1:].strip()
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> tuple[str, str] | None:
        """The last event of a body that ended without a blank line."""
        return self.feed("")


class AnswerPrinter:
    """Writes answer deltas to stdout and reasoning to stderr (or nowhere).

    Unless ``raw``, each of the two streams passes its own ``TerminalFilter``: an escape
    sequence split over deltas of one stream is removed whole.
    """

    def __init__(self, out: TextIO, err: TextIO, show_thinking: bool, raw: bool = False) -> None:
        self.out = out
        self.err = err
        self.show_thinking = show_thinking
        self.raw = raw
        self.answer_filter = config.TerminalFilter()
        self.thinking_filter = config.TerminalFilter()
        self.wrote_answer = False
        self.wrote_thinking = False
        self.queue_notice = ""

    def comment(self, text: str) -> None:
        # Only queue positions are news for the user; other comments are keep-alives.
        if text.startswith("queued") and text != self.queue_notice:
            self.queue_notice = text
            position = text.partition("position=")[2].split()[0] if "position=" in text else ""
            position = config.printable_line(position)
            where = f" (position {position})" if position else ""
            print(f"waiting for a free node{where}...", file=self.err, flush=True)

    def delta(self, content: str, reasoning: bool) -> None:
        if reasoning:
            if self.show_thinking:
                self.err.write(content if self.raw else self.thinking_filter.feed(content))
                self.err.flush()
                self.wrote_thinking = True
            return
        if self.wrote_thinking and not self.wrote_answer:
            self.err.write("\n")
            self.err.flush()
        self.out.write(content if self.raw else self.answer_filter.feed(content))
        self.out.flush()
        self.wrote_answer = True

    def finish(self) -> None:
        if self.wrote_thinking and not self.wrote_answer:
            self.err.write("\n")
        self.out.write("\n")
        self.out.flush()


def handle_event(payload: str, printer: AnswerPrinter) -> bool:
    """Apply one ``data`` payload; True when it is ``[DONE]``. Raises ``StreamFailed``."""
    if payload.strip() == "[DONE]":
        return True
    try:
        event = json.loads(payload)
    except ValueError:
        raise StreamFailed("the router sent an unreadable event") from None
    if not isinstance(event, dict):
        return False
    if "error" in event and "choices" not in event:
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise StreamFailed(str(message)[:300])
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return False
    choice = choices[0]
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    if choice.get("finish_reason") == "error":
        text = content.strip() if isinstance(content, str) and content.strip() else "[Error]"
        raise StreamFailed(text)
    if isinstance(content, str) and content:
        printer.delta(content, reasoning=bool(delta.get("reasoning")))
    return False


def stream_answer(response: requests.Response, printer: AnswerPrinter) -> None:
    """Print the SSE answer of ``response``; raises ``StreamFailed`` unless it ends in
    ``[DONE]``."""
    reader = SseReader()
    for raw in config.iter_lines(response):
        event = reader.feed(raw.decode("utf-8", errors="replace"))
        if event is None:
            continue
        kind, text = event
        if kind == "comment":
            printer.comment(text)
        elif handle_event(text, printer):
            return
    event = reader.flush()
    if event is not None and event[0] == "data" and handle_event(event[1], printer):
        return
    raise StreamFailed("stream ended early")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="consume.py",
        description="Ask a model on the IdleClaw network and print the answer as it streams. "
        "Uses IDLECLAW_SERVER (default https://api.idleclaw.com).",
    )
    parser.add_argument("--model", required=True, help="model name, e.g. llama3.2:3b")
    parser.add_argument("--prompt", required=True, help="the question; '-' reads it from stdin")
    parser.add_argument("--think", action="store_true",
                        help="ask a reasoning model to think first; the reasoning is hidden "
                        "unless --show-thinking")
    parser.add_argument("--show-thinking", action="store_true",
                        help="implies --think; print the reasoning to stderr as it streams, "
                        "so stdout still holds only the answer")
    parser.add_argument("--raw", action="store_true",
                        help="print the answer and reasoning exactly as the network sent them; "
                        "by default control characters and terminal escape sequences (which "
                        "could retitle, clear or recolour your terminal or plant links), \\r "
                        "and bidi overrides are removed. Messages about errors are always "
                        "cleaned")
    return parser


def _read_prompt(value: str, stdin: TextIO) -> str:
    return stdin.read() if value == "-" else value


def main(argv: Sequence[str] | None = None) -> int:
    """Run one question; returns the exit code."""
    args = build_parser().parse_args(argv)
    err = sys.stderr
    if not config.valid_model_name(args.model):
        print(f"error: invalid model name {args.model[:80]!r}: use letters, digits and . _ : / -,"
              f" at most {config.MAX_MODEL_NAME_CHARS} chars, no '..'", file=err)
        return 2
    try:
        server = config.server_from_env()
    except config.ConfigError as exc:
        print(f"error: {exc}", file=err)
        return 2
    prompt = _read_prompt(args.prompt, sys.stdin).strip()
    if not prompt:
        print("error: the prompt is empty", file=err)
        return 2
    if len(prompt) > MAX_PROMPT_CHARS:
        print(f"error: the prompt is {len(prompt)} chars; the network takes at most "
              f"{MAX_PROMPT_CHARS}", file=err)
        return 2
    # An answer with characters the terminal cannot show should not crash the output.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")

    think = args.think or args.show_thinking
    body: dict[str, Any] = {"model": args.model,
                            "messages": [{"role": "user", "content": prompt}],
                            "think": think}
    printer = AnswerPrinter(sys.stdout, err, show_thinking=args.show_thinking, raw=args.raw)
    response: requests.Response | None = None
    try:
        response = requests.post(
            f"{server}/api/chat", json=body, stream=True,
            timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            headers={"Accept": "text/event-stream", "User-Agent": config.CLIENT_NAME},
        )
        if response.status_code != 200:
            message = config.printable_line(http_error_message(response, args.model))
            print(f"error: {message}", file=err)
            return 1
        stream_answer(response, printer)
        printer.finish()
        return 0
    except StreamFailed as exc:
        if printer.wrote_answer:
            sys.stdout.write("\n")
            sys.stdout.flush()
        print(f"error: {config.printable_line(str(exc))}", file=err)
        return 1
    except requests.ConnectionError as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else "connection failed"
        if isinstance(exc, requests.ConnectTimeout):
            reason = "timed out"
        print(f"error: cannot reach the IdleClaw router at {server} ({reason})", file=err)
        return 1
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            # stdout closed by the reader (e.g. `| head`): nothing left to do. Point stdout at
            # devnull so the interpreter's final flush does not complain again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        timed_out = isinstance(exc, requests.Timeout | urllib3.exceptions.ReadTimeoutError |
                               TimeoutError)
        what = "no data for 120 s" if timed_out else "connection lost"
        print(f"error: the answer stream from {server} failed ({what})", file=err)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=err)
        return 130
    finally:
        if response is not None:
            response.close()


if __name__ == "__main__":
    sys.exit(main())
