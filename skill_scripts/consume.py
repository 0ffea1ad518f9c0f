"""Ask the IdleClaw network a question and stream the answer to stdout.

POSTs to the router's ``/api/chat`` (docs/protocol.md §2) and prints the answer as
it arrives. Waiting notices, reasoning (with ``--show-thinking``) and errors go to stderr, so
stdout holds the answer only. Control characters and escape sequences in what the network sends
are removed before anything is printed (``idleclaw_config.TerminalFilter``); ``--raw`` prints the
answer and reasoning exactly as received, ``--json`` the events themselves, \\u-escaped.

The prompt comes from ``--prompt``, from standard input (``--prompt -``, or whenever standard
input is not a terminal and no ``--prompt`` is given), or line by line in a chat (``-i``) that
keeps the conversation. Exit codes: see ``EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any, TextIO

import idleclaw_config as config
import requests
import urllib3

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0
# Most of a router's error answer or model list that is read; real ones are a few hundred bytes.
MAX_ERROR_BYTES = 65_536
MAX_MODELS_BYTES = 1_000_000
# The network's limits on one request (docs/protocol.md): a chat keeps its conversation inside
# them by forgetting its oldest turns.
MAX_PROMPT_CHARS = 10_000
MAX_MESSAGES = 50
MAX_TOTAL_CHARS = 100_000
# Most of one SSE event (its data: lines joined) that is held: the protocol's 1 MB per line.
MAX_EVENT_BYTES = config.MAX_LINE_BYTES

OK = 0
FAILED = 1  # the router or the network failed, or the answer stream broke
USAGE = 2  # bad arguments or configuration, or a request the router refused as invalid
NO_NODE = 3  # no node can take the model now: none serves it, or all are busy
RATE_LIMITED = 4  # too many requests from this address
INTERRUPTED = 130  # Ctrl+C, as shells report SIGINT

EXIT_CODES = """\
exit codes:
  0    the answer was printed (-i: the chat ended and every turn was answered)
  1    server or network error: the router could not be reached, failed or redirected
       elsewhere (redirects are not followed), or the answer stream broke off
  2    usage error: bad arguments or IDLECLAW_SERVER, an empty or too long prompt, or a
       request the router refused as invalid (HTTP 4xx)
  3    no node can take the model now: no node serves it (run status.py to see the models on
       offer), or all of them are busy (HTTP 503; try again after the time shown)
  4    rate limited: too many requests from this address (HTTP 429; try again after the time
       shown)
  130  interrupted with Ctrl+C; the router sees the hang-up and the node stops generating
With -i a failed turn is reported and the chat goes on; the exit code is then that of the last
failed turn."""

CHAT_HELP = """\
commands: /reset forgets the conversation, /model NAME asks another model from now on (the
conversation is kept), /exit (or Ctrl+D) ends the chat, /help shows this."""

_ERROR_TEXT = re.compile(r"\s*\[Error:\s*(.*?)\]\s*", re.DOTALL)


class ChatFailed(Exception):
    """The request failed; ``str()`` is shown to the user, ``code`` is the exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


# ---- errors before the stream -----------------------------------------------------------------


def retry_after_seconds(response: requests.Response) -> int | None:
    """The server's ``Retry-After`` in seconds (delta-seconds or an HTTP date), if any."""
    value = (response.headers.get("Retry-After") or "").strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() too, which int() refuses
        return min(int(value), 86_400)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0, min(86_400, int(when.timestamp() - time.time())))


def _retry_after(response: requests.Response) -> str:
    seconds = retry_after_seconds(response)
    return "retry later" if seconds is None else f"retry in {seconds} s"


def _detail(response: requests.Response) -> str:
    try:
        body = config.read_json(response, MAX_ERROR_BYTES)
    except (ValueError, requests.RequestException, urllib3.exceptions.HTTPError):
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if detail is None and isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"].get("message")  # a router that answers in OpenAI's shape
    if isinstance(detail, list):  # validation errors: a list of {"loc", "msg"} objects
        parts = [str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail]
        detail = "; ".join(parts)
    if not detail:
        return response.reason or "no detail"
    return " ".join(str(detail).split())[:300]


def served_models(session: requests.Session, server: str) -> list[str] | None:
    """The models the router says at least one node serves, or None if it cannot be asked."""
    try:
        with session.get(
            f"{server}/api/models",
            timeout=(5.0, 10.0),
            stream=True,
            allow_redirects=False,
            headers={"Accept": "application/json", "User-Agent": config.CLIENT_NAME},
        ) as response:
            body = config.read_json(response, MAX_MODELS_BYTES)
            names = body.get("models") if response.status_code == 200 else None
    except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError, AttributeError):
        return None
    if not isinstance(names, list):
        return None
    # Extension routers may list objects with a name instead of bare names.
    return [
        n.get("name") if isinstance(n, dict) else n
        for n in names
        if isinstance(n, str) or isinstance(n, dict) and isinstance(n.get("name"), str)
    ]


def http_error(
    response: requests.Response, model: str, *, system: bool, session: requests.Session, server: str
) -> ChatFailed:
    """What a router answer other than 200 means for the user."""
    status = response.status_code
    if 300 <= status < 400:
        # Requests go only to the configured router (SKILL.md): a redirect is not followed.
        location = config.printable_line(response.headers.get("Location") or "nowhere")[:200]
        return ChatFailed(
            f"the router answered HTTP {status}, a redirect to {location}, which is not "
            "followed; set IDLECLAW_SERVER to the router's own URL"
        )
    detail = _detail(response)
    if status == 503:
        served = served_models(session, server)
        if served is not None and model not in served:
            return ChatFailed(
                f"no node serves {model} on this network; {_retry_after(response)}"
                ", or run status.py to see the models on offer",
                NO_NODE,
            )
        hint = "" if served else " (status.py shows the models on offer)"
        return ChatFailed(f"{detail}; {_retry_after(response)}{hint}", NO_NODE)
    if status == 429:
        return ChatFailed(
            f"rate or concurrency limit reached: {detail}; {_retry_after(response)}", RATE_LIMITED
        )
    if system and status in (400, 422) and "role" in detail:
        return ChatFailed(
            "this router does not take a system prompt on /api/chat; ask "
            f"without --system (it said: {detail})",
            USAGE,
        )
    if 400 <= status < 500:
        return ChatFailed(f"the router refused the request (HTTP {status}): {detail}", USAGE)
    return ChatFailed(f"the router failed (HTTP {status}); try again later")


def error_text(content: Any) -> str:
    """The message of an error chunk: ``"\\n\\n[Error: the node failed]"`` → ``the node
    failed``."""
    if not isinstance(content, str) or not content.strip():
        return "the answer failed"
    match = _ERROR_TEXT.fullmatch(content)
    return (match.group(1) if match else content).strip() or "the answer failed"


# ---- the answer stream ------------------------------------------------------------------------


class SseReader:
    """Turns the lines of a Server-Sent Events body into ``data`` payloads.

    Follows the SSE rules the router relies on: ``data:`` lines accumulate until a blank line,
    lines starting with ``:`` are comments, other fields are ignored.
    """

    def __init__(self, max_event: int = MAX_EVENT_BYTES) -> None:
        self._data: list[str] = []
        self._size = 0
        self._max_event = max_event

    def feed(self, line: str) -> tuple[str, str] | None:
        """One line in; ``("data", payload)``, ``("comment", text)`` or None. Raises
        ``ValueError`` when the ``data`` of one event grows past ``max_event`` characters."""
        if line == "":
            if not self._data:
                return None
            payload = "\n".join(self._data)
            self._data = []
            self._size = 0
            return "data", payload
        if line.startswith(":"):
            return "comment", line[1:].strip()
        field, _, value = line.partition(":")
        if field == "data":
            data = value[1:] if value.startswith(" ") else value
            self._size += len(data) + 1
            if self._size > self._max_event:
                raise ValueError("event too long")
            self._data.append(data)
        return None

    def flush(self) -> tuple[str, str] | None:
        """The last event of a body that ended without a blank line."""
        return self.feed("")


class AnswerPrinter:
    """Writes answer deltas to stdout and reasoning to stderr (or nowhere).

    Unless ``raw``, each of the two streams passes its own ``TerminalFilter``: an escape
    sequence split over deltas of one stream is removed whole. ``buffered`` (``--no-stream``)
    holds the answer back until ``finish``; ``events`` (``--json``) prints each event instead.
    ``answer`` collects the answer as received: all of it when ``buffered``, else its first
    ``keep`` characters (a chat's history), so a long stream is printed without being held.
    """

    def __init__(
        self,
        out: TextIO,
        err: TextIO,
        show_thinking: bool,
        raw: bool = False,
        buffered: bool = False,
        events: bool = False,
        keep: int = 0,
    ) -> None:
        self.out = out
        self.err = err
        self.show_thinking = show_thinking and not events
        self.raw = raw
        self.buffered = buffered
        self.events = events
        self.answer_filter = config.TerminalFilter()
        self.thinking_filter = config.TerminalFilter()
        self.answer: list[str] = []
        self.keep = keep
        self.kept = 0
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

    def event(self, event: Any) -> None:
        if self.events:
            # ASCII-only JSON: every control character and escape arrives as a \\u escape.
            self.out.write(json.dumps(event, ensure_ascii=True) + "\n")
            self.out.flush()

    def delta(self, content: str, reasoning: bool) -> None:
        if reasoning:
            if self.show_thinking:
                self.err.write(content if self.raw else self.thinking_filter.feed(content))
                self.err.flush()
                self.wrote_thinking = True
            return
        if self.buffered:
            self.answer.append(content)
        elif self.kept < self.keep:
            self.answer.append(content[: self.keep - self.kept])
            self.kept += len(self.answer[-1])
        if self.events or self.buffered:
            return
        self._end_thinking()
        # Set first: a Ctrl+C right after the write must still end the line (``abandon``).
        self.wrote_answer = True
        self.out.write(content if self.raw else self.answer_filter.feed(content))
        self.out.flush()

    def _end_thinking(self) -> None:
        if self.wrote_thinking and not self.wrote_answer:
            self.err.write("\n")
            self.err.flush()
            self.wrote_thinking = False

    def finish(self) -> None:
        """The answer is complete: end it with a newline (print it all, if buffered)."""
        if self.events:
            return
        self._end_thinking()
        if self.buffered:
            text = "".join(self.answer)
            self.out.write(text if self.raw else config.printable(text))
        self.out.write("\n")
        self.out.flush()

    def abandon(self) -> None:
        """The answer broke off: end what was shown of it (a buffered one is not shown)."""
        self._end_thinking()
        if self.wrote_answer:
            self.out.write("\n")
            self.out.flush()


def handle_event(payload: str, printer: AnswerPrinter) -> bool:
    """Apply one ``data`` payload; True when it is ``[DONE]``. Raises ``ChatFailed``."""
    if payload.strip() == "[DONE]":
        return True
    try:
        event = json.loads(payload)
    except ValueError:
        raise ChatFailed("the router sent an unreadable event") from None
    printer.event(event)
    if not isinstance(event, dict):
        return False
    if "error" in event and "choices" not in event:
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise ChatFailed(str(message)[:300])
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return False
    choice = choices[0]
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    if choice.get("finish_reason") == "error":
        raise ChatFailed(error_text(content)[:300])
    if isinstance(content, str) and content:
        printer.delta(content, reasoning=bool(delta.get("reasoning")))
    return False


def stream_answer(response: requests.Response, printer: AnswerPrinter) -> None:
    """Print the SSE answer of ``response``; raises ``ChatFailed`` unless it ends in
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
    raise ChatFailed("the answer stream ended early")


class Client:
    """Asks one router; shared by the turns of a chat (one connection, kept alive)."""

    def __init__(self, server: str, args: argparse.Namespace) -> None:
        self.server = server
        self.args = args
        self.session = requests.Session()

    def ask(self, model: str, messages: list[dict[str, str]]) -> str:
        """Ask ``model``, print the answer as ``args`` say; return the answer as received (all of
        it with ``--no-stream``, its first ``MAX_PROMPT_CHARS`` chars in a chat, else nothing).

        Raises ``ChatFailed``, or ``KeyboardInterrupt`` after closing the connection (which is
        how the router learns that nobody is listening any more).
        """
        args = self.args
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "think": args.think or args.show_thinking,
        }
        printer = AnswerPrinter(
            sys.stdout,
            sys.stderr,
            show_thinking=args.show_thinking,
            raw=args.raw,
            buffered=args.no_stream,
            events=args.json,
            keep=MAX_PROMPT_CHARS if args.interactive else 0,
        )
        response: requests.Response | None = None
        try:
            response = self.session.post(
                f"{self.server}/api/chat",
                json=body,
                stream=True,
                timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                headers={"Accept": "text/event-stream", "User-Agent": config.CLIENT_NAME},
                allow_redirects=False,
            )
            if response.status_code != 200:
                raise http_error(
                    response,
                    model,
                    system=bool(args.system),
                    session=self.session,
                    server=self.server,
                )
            stream_answer(response, printer)
            printer.finish()
            return "".join(printer.answer)
        except ChatFailed:
            printer.abandon()
            raise
        except KeyboardInterrupt:
            printer.abandon()
            raise
        except requests.ConnectionError as exc:
            printer.abandon()
            reason = "connection refused" if "refused" in str(exc).lower() else "connection failed"
            if isinstance(exc, requests.ConnectTimeout):
                reason = "timed out"
            raise ChatFailed(
                f"cannot reach the IdleClaw router at {self.server} ({reason})"
            ) from None
        except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL) as exc:
            printer.abandon()
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "invalid URL"
            raise ChatFailed(
                f"cannot ask the IdleClaw router at {self.server}: {config.printable_line(reason)}"
            ) from None
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            ValueError,
            OSError,
        ) as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            printer.abandon()
            timed_out = isinstance(
                exc, requests.Timeout | urllib3.exceptions.ReadTimeoutError | TimeoutError
            )
            what = f"no data for {READ_TIMEOUT_S:.0f} s" if timed_out else "connection lost"
            if isinstance(exc, ValueError):  # a line without end, or data without a blank line
                what = "an event of over 1 MB"
            raise ChatFailed(f"the answer stream from {self.server} failed ({what})") from None
        finally:
            if response is not None:
                response.close()


# ---- conversation -----------------------------------------------------------------------------


def fit_conversation(
    system: str | None, history: list[dict[str, str]], prompt: str
) -> tuple[list[dict[str, str]], int]:
    """The messages to send: ``system``, as much of ``history`` as the network's limits leave
    room for (oldest turns forgotten first, a turn being a question and its answer), then
    ``prompt``. Returns them and how many old messages were left out."""
    head = [{"role": "system", "content": system}] if system else []
    question = [{"role": "user", "content": prompt}]
    kept = list(history)

    def fits() -> bool:
        messages = head + kept + question
        total = sum(len(m["content"]) for m in messages)
        return len(messages) <= MAX_MESSAGES and total <= MAX_TOTAL_CHARS

    while kept and not fits():
        del kept[:2]
    return head + kept + question, len(history) - len(kept)


def check_prompt(prompt: str) -> str | None:
    """Why ``prompt`` cannot be sent, or None."""
    if not prompt:
        return "the prompt is empty"
    if len(prompt) > MAX_PROMPT_CHARS:
        return f"the prompt is {len(prompt)} chars; the network takes at most {MAX_PROMPT_CHARS}"
    return None


def _model_problem(name: str) -> str | None:
    if config.valid_model_name(name):
        return None
    return (
        f"invalid model name {name[:80]!r}: use letters, digits and . _ : / -, at most "
        f"{config.MAX_MODEL_NAME_CHARS} chars, no '..'"
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ask_once(client: Client, model: str, prompt: str) -> int:
    messages, _ = fit_conversation(client.args.system, [], prompt)
    try:
        client.ask(model, messages)
    except ChatFailed as exc:
        _say(f"error: {config.printable_line(str(exc))}")
        return exc.code
    except KeyboardInterrupt:
        _say("interrupted")
        return INTERRUPTED
    return OK


def _read_line(prompt: str, stdin: TextIO) -> str:
    if stdin is sys.stdin and stdin.isatty() and sys.stdout.isatty():
        return input(prompt)  # lets readline redraw the prompt while editing
    if prompt:
        sys.stderr.write(prompt)
        sys.stderr.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def chat(client: Client, model: str, stdin: TextIO) -> int:
    """``-i``: one turn per line of input, the conversation kept until ``/reset``."""
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - arrow keys and history for input(), in memory only
        except ImportError:  # not on every platform; the chat works without it
            pass
        _say(f"chatting with {model} on {client.server}\n{CHAT_HELP}")
    history: list[dict[str, str]] = []
    code = OK
    while True:
        try:
            line = _read_line(f"{model}> " if interactive else "", stdin)
        except EOFError:
            if interactive:
                _say("")
            return code
        except KeyboardInterrupt:
            _say("\n(/exit or Ctrl+D ends the chat)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            argument = argument.strip()
            if command in ("/exit", "/quit", "/bye"):
                return code
            if command == "/reset":
                history.clear()
                _say("(conversation forgotten)")
            elif command == "/model" and argument:
                problem = _model_problem(argument)
                if problem:
                    _say(f"error: {problem}")
                else:
                    model = argument
                    _say(f"(now asking {model})")
            elif command == "/help":
                _say(CHAT_HELP)
            else:
                _say(f"unknown command {config.printable_line(text)[:40]!r}; /help lists them")
            continue
        problem = check_prompt(text)
        if problem:
            _say(f"error: {problem}")
            code = USAGE
            continue
        messages, forgotten = fit_conversation(client.args.system, history, text)
        if forgotten:
            del history[:forgotten]
            _say(
                f"(the oldest {forgotten} messages were forgotten: the network takes at most "
                f"{MAX_MESSAGES} messages and {MAX_TOTAL_CHARS} chars)"
            )
        try:
            answer = client.ask(model, messages)
        except ChatFailed as exc:
            _say(f"error: {config.printable_line(str(exc))}")
            code = exc.code
            continue
        except KeyboardInterrupt:
            _say("(stopped; this question is forgotten)")
            continue
        if answer.strip():  # the network takes no empty message
            history += [
                {"role": "user", "content": text},
                {"role": "assistant", "content": answer[:MAX_PROMPT_CHARS]},
            ]


# ---- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="consume.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask a model on the IdleClaw network and print the answer as it streams. "
        "Uses IDLECLAW_SERVER (default https://api.idleclaw.com). The prompt is --prompt, or "
        "standard input when it is not a terminal, or one line per turn with -i.",
        epilog=EXIT_CODES,
    )
    parser.add_argument("--model", required=True, help="model name, e.g. llama3.2:3b")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the question; '-' reads it from standard input")
    source.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="chat: read one question per line, keep the conversation; /reset, /model NAME, /exit",
    )
    parser.add_argument(
        "--system",
        metavar="TEXT",
        help="a system prompt sent first (only routers that accept it on "
        "/api/chat; others refuse the request, exit 2)",
    )
    parser.add_argument(
        "--think",
        action="store_true",
        help="ask a reasoning model to think first; the reasoning is hidden unless --show-thinking",
    )
    parser.add_argument(
        "--show-thinking",
        action="store_true",
        help="implies --think; print the reasoning to stderr as it streams, "
        "so stdout still holds only the answer",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--json",
        action="store_true",
        help="print the stream's events, one JSON object a line, instead of "
        "the answer (non-ASCII and control characters \\u-escaped)",
    )
    output.add_argument(
        "--no-stream",
        action="store_true",
        help="print the answer once it is complete instead of as it streams",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="print the answer and reasoning exactly as the network sent them; "
        "by default control characters and terminal escape sequences (which "
        "could retitle, clear or recolour your terminal or plant links), \\r "
        "and bidi overrides are removed. Messages about errors are always "
        "cleaned",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one question or a chat; returns the exit code."""
    args = build_parser().parse_args(argv)
    problem = _model_problem(args.model)
    if problem:
        _say(f"error: {problem}")
        return USAGE
    try:
        server = config.server_from_env()
    except config.ConfigError as exc:
        _say(f"error: {exc}")
        return USAGE
    if args.system is not None:
        args.system = args.system.strip()
        if not args.system or len(args.system) > MAX_PROMPT_CHARS:
            _say(f"error: --system must be 1 to {MAX_PROMPT_CHARS} chars")
            return USAGE
    # An answer with characters the terminal cannot show should not crash the output.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    client = Client(server, args)
    try:
        if args.interactive:
            return chat(client, args.model, sys.stdin)
        if args.prompt is None and sys.stdin.isatty():
            _say("error: no prompt: give --prompt TEXT, pipe it on standard input, or chat with -i")
            return USAGE
        try:
            prompt = (sys.stdin.read() if args.prompt in (None, "-") else args.prompt).strip()
        except KeyboardInterrupt:
            return INTERRUPTED
        problem = check_prompt(prompt)
        if problem:
            _say(f"error: {problem}")
            return USAGE
        return ask_once(client, args.model, prompt)
    except BrokenPipeError:
        # stdout closed by the reader (e.g. `| head`): nothing left to do. Point stdout at
        # devnull so the interpreter's final flush does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK
    finally:
        client.session.close()


if __name__ == "__main__":
    sys.exit(main())
