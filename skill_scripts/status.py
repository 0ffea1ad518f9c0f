"""Show the status of the IdleClaw network: health, uptime, nodes and the models on offer.

Reads the router's ``/health`` and ``/api/models`` (docs/protocol.md §2), and
``/network.json`` when the router offers it (this router's measured speeds; others answer 404,
which only leaves that column empty). Every field shown comes from the router (model names from
its nodes), so control characters and escape sequences are removed from each, and each stays on
its line (``--raw`` shows them as received). ``--watch`` redraws the report every few seconds.

Exit codes: 0 shown, 1 the router is unreachable or answered with something other than a JSON
object (an OFFLINE banner says why), 2 bad configuration or arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import idleclaw_config as config
import requests

TIMEOUT = (5.0, 10.0)
# Most of one answer that is read; this router's answers for a thousand models are ~200 KB.
MAX_ANSWER_BYTES = 5_000_000
DEFAULT_WATCH_S = 5.0
MIN_WATCH_S = 1.0
# Cursor home and clear screen: a watched report is redrawn in place on a terminal.
CLEAR_SCREEN = "\x1b[H\x1b[2J"
# Figures above this are shown as ">999999": a router's 10**100 nodes would fill the screen.
MAX_FIGURE = 999_999
MAX_UPTIME_DAYS = 999_999

OK = 0
OFFLINE = 1
USAGE = 2


class StatusError(Exception):
    """The router could not be asked; the message is shown to the user."""


def format_uptime(seconds: Any) -> str:
    """Human-readable duration: ``45s``, ``3m 5s``, ``2h 3m``, ``4d 1h``."""
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds < 0
    ):
        return "unknown"
    if seconds >= (MAX_UPTIME_DAYS + 1) * 86_400:
        return f">{MAX_UPTIME_DAYS}d"
    total = int(seconds)
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def fetch_json(
    session: requests.Session, server: str, path: str, *, accept: tuple[int, ...] = (200,)
) -> dict[str, Any]:
    """GET ``server + path`` and return its JSON object; raises ``StatusError``.

    ``accept`` lists the statuses whose JSON body is still an answer (``/health`` says 503
    ``draining`` while the router shuts down)."""
    url = f"{server}{path}"
    try:
        response = session.get(
            url,
            timeout=TIMEOUT,
            stream=True,
            headers={"Accept": "application/json", "User-Agent": config.CLIENT_NAME},
            # Only the configured router is asked (SKILL.md): a redirect is reported instead.
            allow_redirects=False,
        )
    except requests.ConnectionError as exc:
        reason = "connection refused" if "refused" in str(exc).lower() else "connection failed"
        if isinstance(exc, requests.ConnectTimeout):
            reason = "timed out"
        raise StatusError(f"cannot reach the IdleClaw router at {server} ({reason})") from None
    except requests.Timeout:
        raise StatusError(f"no answer from the IdleClaw router at {server} (timed out)") from None
    except requests.RequestException as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise StatusError(f"cannot ask the IdleClaw router at {server}: {reason}") from None
    try:
        if 300 <= response.status_code < 400:
            location = response.headers.get("Location") or "nowhere"
            raise StatusError(
                f"{url} answered HTTP {response.status_code}, a redirect to {location[:200]}, "
                "which is not followed"
            )
        if response.status_code not in accept:
            raise StatusError(f"{url} answered HTTP {response.status_code}")
        try:
            # NaN and Infinity become None: --json prints strict JSON, and no figure is NaN.
            data = config.read_json(response, MAX_ANSWER_BYTES, finite=True)
        except requests.RequestException as exc:
            raise StatusError(f"the answer of {url} broke off ({type(exc).__name__})") from None
        except ValueError as exc:
            why = "answered over 5 MB" if "more than" in str(exc) else "did not answer JSON"
            raise StatusError(f"{url} {why}") from None
    finally:
        response.close()
    if not isinstance(data, dict):
        raise StatusError(f"{url} did not answer a JSON object")
    return data


@dataclass
class Snapshot:
    """What the router said, or why it could not be asked (``error``)."""

    server: str
    health: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    network: dict[str, Any] | None = None  # /network.json, only on routers that offer it
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"server": self.server, "offline": True, "error": self.error}
        return {
            "server": self.server,
            "health": self.health,
            "models": self.models,
            "network": self.network,
        }


def take_snapshot(session: requests.Session, server: str) -> Snapshot:
    """Ask the router for its health, its models and (if it offers them) its figures."""
    snapshot = Snapshot(server)
    try:
        snapshot.health = fetch_json(session, server, "/health", accept=(200, 503))
        snapshot.models = fetch_json(session, server, "/api/models")
    except StatusError as exc:
        snapshot.error = str(exc)
        return snapshot
    try:
        snapshot.network = fetch_json(session, server, "/network.json")
    except StatusError:
        snapshot.network = None  # an extension: a router without it is not broken
    return snapshot


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _speed(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return None  # not a number, negative, or NaN
    # float() of a 400-digit int overflows; such a speed is shown as ">999999" anyway.
    return float(min(value, 10 * MAX_FIGURE))


@dataclass
class ModelRow:
    """One model of the table; None where the router does not say."""

    name: str
    nodes: int | None = None
    free_slots: int | None = None
    queued: int | None = None
    tokens_per_s: float | None = None
    capabilities: list[str] = field(default_factory=list)


def model_rows(models: dict[str, Any], network: dict[str, Any] | None = None) -> list[ModelRow]:
    """A row per model of an ``/api/models`` answer, in its order.

    The base protocol gives names and ``capabilities``; per-model figures come from the
    extension fields when the router sends them: ``nodes``, ``free_slots``, ``queued`` in the
    entries of ``models`` or in a per-model object under any top-level key (this router's
    ``details``), and ``tokens_per_s`` from ``/network.json``'s ``models``.
    """
    names: dict[str, None] = {}  # ordered, and a name is looked up in O(1)
    per_model: dict[str, dict[str, Any]] = {}
    entries = models.get("models")
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, str):
            name = entry
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            name = entry["name"]
            per_model.setdefault(name, {}).update(entry)
        else:
            continue
        names.setdefault(name)
    for key, value in models.items():
        if key == "models" or not isinstance(value, dict):
            continue
        for name, info in value.items():
            if not isinstance(name, str) or name not in names:
                continue
            if isinstance(info, dict):
                per_model.setdefault(name, {}).update(info)
            elif key in ("nodes", "free_slots", "queued"):  # {"nodes": {"llama3.2:3b": 2}}
                per_model.setdefault(name, {})[key] = info
    measured_entries = network.get("models") if network is not None else None
    if isinstance(measured_entries, list):
        for entry in measured_entries:
            if (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and (entry["name"] in names)
            ):
                measured = per_model.setdefault(entry["name"], {})
                for key in ("nodes", "free_slots", "queued", "tokens_per_s"):
                    measured.setdefault(key, entry.get(key))
                if entry.get("tools") is True:
                    measured.setdefault("tools", True)
    rows = []
    for name in names:
        info = per_model.get(name, {})
        capabilities = []
        if info.get("thinking") is True:
            capabilities.append("thinking")
        if info.get("tool_calls") is True or info.get("tools") is True:
            capabilities.append("tools")
        rows.append(
            ModelRow(
                name=name,
                nodes=_count(info.get("nodes")),
                free_slots=_count(info.get("free_slots")),
                queued=_count(info.get("queued")),
                tokens_per_s=_speed(info.get("tokens_per_s")),
                capabilities=capabilities,
            )
        )
    return rows


def _as_received(text: str) -> str:
    return text


def _figure(value: int | float | None) -> str:
    if value is None:
        return "-"
    if value > MAX_FIGURE:
        return f">{MAX_FIGURE}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def table(rows: list[ModelRow], shown: Callable[[str], str]) -> list[str]:
    """The models as aligned columns; ``-`` where the router does not say."""
    header = ("MODEL", "NODES", "FREE", "QUEUED", "TOKENS/S", "CAPABILITIES")
    cells = [
        (
            shown(row.name),
            _figure(row.nodes),
            _figure(row.free_slots),
            _figure(row.queued),
            _figure(row.tokens_per_s),
            ", ".join(row.capabilities) or "-",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = []
    for line in [header, *cells]:
        name, *numbers, capabilities = line
        middle = "  ".join(text.rjust(widths[i + 1]) for i, text in enumerate(numbers))
        lines.append(f"  {name.ljust(widths[0])}  {middle}  {capabilities}".rstrip())
    return lines


def render(snapshot: Snapshot, raw: bool = False) -> str:
    """The human-readable report; unless ``raw``, every field from the router is made printable
    and kept to one line."""
    shown: Callable[[str], str] = _as_received if raw else config.printable_line
    if snapshot.error is not None:
        return "\n".join(
            [
                f"IdleClaw router {snapshot.server}",
                f"OFFLINE: {config.printable_line(snapshot.error)}",
            ]
        )
    health, network = snapshot.health, snapshot.network or {}
    nodes = _count(health.get("node_count"))
    nodes_text = "unknown" if nodes is None else f"{_figure(nodes)} online"
    slots, free = _count(network.get("slots")), _count(network.get("free_slots"))
    if slots is not None and free is not None:
        nodes_text += f", {_figure(free)} of {_figure(slots)} slots free"
    active = _count(health.get("active_requests"))
    queued = _count(health.get("queued_requests"))
    requests_text = ", ".join(
        text
        for text in (
            None if active is None else f"{_figure(active)} in flight",
            None if queued is None else f"{_figure(queued)} waiting",
        )
        if text
    )
    lines = [
        f"IdleClaw router {snapshot.server}",
        f"status:    {shown(str(health.get('status', 'unknown')))}",
        f"uptime:    {format_uptime(health.get('uptime_seconds'))}",
        f"nodes:     {nodes_text}",
    ]
    if requests_text:
        lines.append(f"requests:  {requests_text}")
    rows = model_rows(snapshot.models, snapshot.network)
    if not rows:
        lines.append("models:    none on offer right now")
        if not nodes:
            lines += [
                "",
                "No node is connected. Share your Ollama with this router:",
                f"  IDLECLAW_SERVER={snapshot.server} python3 contribute.py",
            ]
        return "\n".join(lines)
    lines.append(f"models:    {len(rows)}")
    lines += table(rows, shown)
    return "\n".join(lines)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not MIN_WATCH_S <= value <= 3600:
        raise argparse.ArgumentTypeError(f"give {MIN_WATCH_S:g} to 3600 seconds")
    return value


def positive_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("give at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="status.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show the status of the IdleClaw network: nodes, uptime and the models on "
        "offer. Uses IDLECLAW_SERVER (default https://api.idleclaw.com).",
        epilog="exit codes:\n  0  shown\n  1  OFFLINE: the router cannot be reached or answered "
        "something else than JSON\n  2  bad arguments or IDLECLAW_SERVER\nWith --watch, the "
        "code of the last report (0 after Ctrl+C).",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"server", "health", "models", "network"} as raw JSON (non-ASCII and '
        'control characters are \\u-escaped); offline: {"server", "offline", "error"}',
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="show the router's fields exactly as received; by default control "
        "characters, terminal escape sequences and bidi overrides are removed "
        "and each field is kept on its line",
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        const=DEFAULT_WATCH_S,
        type=positive_seconds,
        metavar="SECONDS",
        help=f"report again every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl+C; on a "
        "terminal the report is redrawn in place",
    )
    parser.add_argument(
        "--count",
        type=positive_count,
        metavar="N",
        help="with --watch: stop after N reports",
    )
    return parser


def show(snapshot: Snapshot, args: argparse.Namespace, *, redraw: bool) -> None:
    if args.json:
        # Strict JSON: fetch_json turned NaN and Infinity into None.
        text = json.dumps(snapshot.as_json(), indent=None if args.watch else 2, allow_nan=False)
    else:
        text = render(snapshot, raw=args.raw)
        if args.watch:
            text += f"\nupdated {time.strftime('%H:%M:%S')}, every {args.watch:g} s; Ctrl+C stops"
    if redraw:
        text = CLEAR_SCREEN + text
    elif args.watch and not args.json:
        text += "\n"  # reports one after another, a blank line between them
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the network status (once, or every ``--watch`` seconds); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count is not None and args.watch is None:
        parser.error("--count goes with --watch")
    # A field the terminal's encoding cannot take (a lone surrogate shown with --raw) becomes
    # "?" instead of a crash or, with surrogateescape, a raw byte (as consume.py does).
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        server = config.server_from_env()
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    # Clearing the screen is for a person watching a terminal, never for a file or a pipe.
    redraw = bool(args.watch) and not args.json and sys.stdout.isatty()
    shown = 0
    code = OK
    with requests.Session() as session:
        try:
            while True:
                snapshot = take_snapshot(session, server)
                code = OFFLINE if snapshot.error is not None else OK
                show(snapshot, args, redraw=redraw)
                shown += 1
                if args.watch is None or (args.count is not None and shown >= args.count):
                    return code
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return OK if args.watch else 130
        except BrokenPipeError:
            # stdout closed by the reader (e.g. `| head`): point it at devnull so the
            # interpreter's final flush does not complain again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return code


if __name__ == "__main__":
    sys.exit(main())
