"""Show the status of the IdleClaw network: health, uptime, nodes and the models on offer.

Reads the router's ``/health`` and ``/api/models`` (PROTOCOL.md §2). Every field shown comes
from the router (model names from its nodes), so control characters and escape sequences are
removed from each, and each stays on its line (``--raw`` shows them as received). Exit codes:
0 shown, 1 the router is unreachable or answered with something other than a 200 JSON object,
2 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import idleclaw_config as config
import requests

TIMEOUT = (5.0, 10.0)


class StatusError(Exception):
    """The router could not be asked; the message is shown to the user."""


def format_uptime(seconds: Any) -> str:
    """Human-readable duration: ``45s``, ``3m 5s``, ``2h 3m``, ``4d 1h``."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        return "unknown"
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


def fetch_json(server: str, path: str) -> dict[str, Any]:
    """GET ``server + path`` and return its JSON object; raises ``StatusError``."""
    url = f"{server}{path}"
    try:
        response = requests.get(url, timeout=TIMEOUT,
                                headers={"Accept": "application/json",
                                         "User-Agent": config.CLIENT_NAME})
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
    if response.status_code != 200:
        raise StatusError(f"{url} answered HTTP {response.status_code}")
    try:
        data = response.json()
    except ValueError:
        raise StatusError(f"{url} did not answer JSON") from None
    if not isinstance(data, dict):
        raise StatusError(f"{url} did not answer a JSON object")
    return data


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def model_rows(models: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, details) per model of an ``/api/models`` answer.

    Details use the extension fields when the router sends them: ``nodes`` and ``free_slots``,
    either in the entries of ``models`` or in a per-model object under any top-level key.
    """
    names: list[str] = []
    per_model: dict[str, dict[str, Any]] = {}
    for entry in models.get("models") or []:
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            names.append(entry["name"])
            per_model.setdefault(entry["name"], {}).update(entry)
    for key, value in models.items():
        if key == "models" or not isinstance(value, dict):
            continue
        for name, info in value.items():
            if name not in names:
                continue
            if isinstance(info, dict):
                per_model.setdefault(name, {}).update(info)
            elif key in ("nodes", "free_slots"):  # {"nodes": {"llama3.2:3b": 2}}
                per_model.setdefault(name, {})[key] = info
    rows = []
    for name in names:
        info = per_model.get(name, {})
        parts = []
        nodes = _count(info.get("nodes"))
        if nodes is not None:
            parts.append(f"{nodes} node{'' if nodes == 1 else 's'}")
        free = _count(info.get("free_slots"))
        if free is not None:
            parts.append(f"{free} free slot{'' if free == 1 else 's'}")
        if info.get("thinking") is True:
            parts.append("thinking")
        if info.get("tool_calls") is True or info.get("tools") is True:
            parts.append("tools")
        rows.append((name, ", ".join(parts)))
    return rows


def _as_received(text: str) -> str:
    return text


def render(server: str, health: dict[str, Any], models: dict[str, Any], raw: bool = False) -> str:
    """The human-readable status report; unless ``raw``, every field from the router is made
    printable and kept to one line."""
    shown: Callable[[str], str] = _as_received if raw else config.printable_line
    rows = [(shown(name), shown(details)) for name, details in model_rows(models)]
    nodes = _count(health.get("node_count"))
    lines = [
        f"IdleClaw router {server}",
        f"status:  {shown(str(health.get('status', 'unknown')))}",
        f"uptime:  {format_uptime(health.get('uptime_seconds'))}",
        f"nodes:   {nodes if nodes is not None else 'unknown'}",
    ]
    active = _count(health.get("active_requests"))
    if active is not None:
        lines.append(f"active:  {active} requests")
    lines.append(f"models:  {len(rows) if rows else 'none on offer right now'}")
    width = max((len(name) for name, _ in rows), default=0)
    for name, details in rows:
        lines.append(f"  {name:<{width}}  {details}".rstrip())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="status.py",
        description="Show the status of the IdleClaw network. "
        "Uses IDLECLAW_SERVER (default https://api.idleclaw.com).",
    )
    parser.add_argument("--json", action="store_true",
                        help='print {"server", "health", "models"} as raw JSON (non-ASCII and '
                        "control characters are \\u-escaped)")
    parser.add_argument("--raw", action="store_true",
                        help="show the router's fields exactly as received; by default control "
                        "characters, terminal escape sequences and bidi overrides are removed "
                        "and each field is kept on its line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the network status; returns the exit code."""
    args = build_parser().parse_args(argv)
    # A field the terminal's encoding cannot take (a lone surrogate shown with --raw) becomes
    # "?" instead of a crash or, with surrogateescape, a raw byte (as consume.py does).
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        server = config.server_from_env()
    except config.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        health = fetch_json(server, "/health")
        models = fetch_json(server, "/api/models")
    except StatusError as exc:
        print(f"error: {config.printable_line(str(exc))}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"server": server, "health": health, "models": models}, indent=2))
    else:
        print(render(server, health, models, raw=args.raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
