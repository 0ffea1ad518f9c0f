"""What a contributor decides about its own node (``contribute.py``): the limits it puts on the
requests its Ollama serves, when it serves (hours, and pausing while named programs run), and
how it logs.

Standard library only, like ``idleclaw_config``; imported by ``contribute.py`` from its folder.
Nothing here touches the network.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, time
from typing import Any

# The largest cap a node may set on num_ctx or num_predict: as much as any model's context
# (and what a router believes, docs/node-protocol-extensions.md).
MAX_LIMIT = 2**27

# ---- Limits on requests ---------------------------------------------------------------------

# A Go duration as Ollama's keep_alive takes it: "10m", "1h30m", "0", "-1m", "2.5s".
_GO_DURATION = re.compile(r"-?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|ms|s|m|h))+|-?0")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")


def parse_keep_alive(text: str) -> str | int | float:
    """A ``--keep-alive`` value as Ollama takes it: a duration such as ``10m`` or ``1h`` (sent
    as a string), or a number of seconds (sent as a number; negative keeps the model loaded for
    good). Raises ``ValueError`` for anything else."""
    value = text.strip()
    if _NUMBER.fullmatch(value):
        number = float(value)
        return int(number) if number.is_integer() else number
    if _GO_DURATION.fullmatch(value):
        return value
    raise ValueError(f"not a duration: {text!r} (for example 10m, 1h, 30s, or -1 for ever)")


@dataclass(frozen=True)
class RequestPolicy:
    """The contributor's say over what a request may ask of its Ollama: ``keep_alive`` (how
    long a model stays loaded after a request; None leaves Ollama's default), whether a
    consumer's own ``keep_alive`` counts, and caps on ``num_ctx`` (context) and
    ``num_predict`` (answer length)."""

    keep_alive: str | int | float | None = None
    allow_keep_alive: bool = False
    max_ctx: int | None = None
    max_predict: int | None = None

    def limits(self) -> dict[str, int]:
        """The caps as ``register.limits`` states them (docs/node-protocol-extensions.md)."""
        caps = {"num_ctx": self.max_ctx, "num_predict": self.max_predict}
        return {option: cap for option, cap in caps.items() if cap is not None}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def apply_policy(
    params: Mapping[str, Any], policy: RequestPolicy
) -> tuple[dict[str, Any], list[str]]:
    """A request's Ollama parameters (already whitelisted) under the contributor's policy, and
    what was changed, in words (no content) for the log.

    - ``keep_alive``: the consumer's is dropped unless ``allow_keep_alive``; the node's own
      (``policy.keep_alive``) is used when there is none.
    - ``num_ctx`` above ``max_ctx`` is lowered to it (one that is not a number is dropped); a
      request without one keeps the model's default.
    - ``num_predict`` is held to ``max_predict``: above it, unset, or 0 or less (Ollama's "no
      limit") it becomes ``max_predict``.
    """
    clean = dict(params)
    changes: list[str] = []
    if "keep_alive" in clean and not policy.allow_keep_alive:
        del clean["keep_alive"]
        changes.append("its keep_alive ignored")
    if policy.keep_alive is not None and "keep_alive" not in clean:
        clean["keep_alive"] = policy.keep_alive
    options = dict(clean.get("options") or {})
    if policy.max_ctx is not None and "num_ctx" in options:
        value = options["num_ctx"]
        if not _number(value):
            del options["num_ctx"]
            changes.append("num_ctx that is not a number dropped")
        elif value > policy.max_ctx:
            options["num_ctx"] = policy.max_ctx
            changes.append(f"num_ctx {value} lowered to {policy.max_ctx}")
    if policy.max_predict is not None:
        value = options.get("num_predict")
        if not _number(value) or value <= 0 or value > policy.max_predict:
            options["num_predict"] = policy.max_predict
            shown = "unset" if value is None else value
            changes.append(f"num_predict {shown} set to {policy.max_predict}")
    if options:
        clean["options"] = options
    return clean, changes


# ---- Serving hours --------------------------------------------------------------------------

_HOURS = re.compile(r"(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})")


@dataclass(frozen=True)
class ServingHours:
    """A daily window of local time, ``start`` included and ``end`` excluded, in minutes after
    midnight; it wraps past midnight when ``end`` is before ``start`` (22:00-08:00)."""

    start: int
    end: int

    def __contains__(self, moment: time) -> bool:
        minute = moment.hour * 60 + moment.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return (
            f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"
        )


def parse_hours(text: str) -> ServingHours:
    """``HH:MM-HH:MM`` in local time (``22:00-08:00`` wraps past midnight). Raises
    ``ValueError`` for another shape, a time that does not exist or an empty window."""
    match = _HOURS.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not HH:MM-HH:MM: {text!r} (for example 22:00-08:00)")
    start_h, start_m, end_h, end_m = (int(group) for group in match.groups())
    if start_h > 23 or end_h > 23 or start_m > 59 or end_m > 59:
        raise ValueError(f"not a time of day in {text!r}")
    hours = ServingHours(start=start_h * 60 + start_m, end=end_h * 60 + end_m)
    if hours.start == hours.end:
        raise ValueError(f"{text!r} is an empty window; leave --hours out to serve all day")
    return hours


def outside_hours(hours: ServingHours | None, now: datetime | None = None) -> str | None:
    """Why the node must not serve now because of ``hours``, or None."""
    if hours is None or (now or datetime.now()).time() in hours:
        return None
    return f"outside the serving hours {hours}"


# ---- Pausing while programs run -------------------------------------------------------------

# Linux truncates a process's name (/proc/PID/comm) to 15 characters.
COMM_CHARS = 15


def _basename(path: str) -> str:
    # Windows programs under Wine carry backslashed paths in argv[0].
    return re.split(r"[/\\]", path.rstrip("/\\"))[-1]


def _linux_process_names(own_pid: int) -> set[str]:
    names: set[str] = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return names
    for entry in entries:
        if not entry.isdigit() or int(entry) == own_pid:
            continue
        try:
            with open(f"/proc/{entry}/comm", "rb") as comm:
                names.add(comm.read(256).decode("utf-8", "replace").strip())
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv0 = cmdline.read(4096).split(b"\0", 1)[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if argv0:
            names.add(_basename(argv0.decode("utf-8", "replace")))
    return names


def _macos_process_names(own_pid: int) -> set[str]:
    # libproc (part of libSystem) lists processes without running ps.
    libproc = ctypes.CDLL("/usr/lib/libproc.dylib", use_errno=True)
    count = libproc.proc_listallpids(None, 0)
    if count <= 0:
        return set()
    pids = (ctypes.c_int * (count + 64))()
    count = libproc.proc_listallpids(pids, ctypes.sizeof(pids))
    name = ctypes.create_string_buffer(256)
    path = ctypes.create_string_buffer(4096)
    names: set[str] = set()
    for pid in pids[: max(count, 0)]:
        if pid <= 0 or pid == own_pid:
            continue
        if libproc.proc_name(pid, name, ctypes.sizeof(name)) > 0:
            names.add(name.value.decode("utf-8", "replace"))
        if libproc.proc_pidpath(pid, path, ctypes.sizeof(path)) > 0:
            names.add(_basename(path.value.decode("utf-8", "replace")))
    return names


def process_names() -> set[str] | None:
    """The names of the other processes running on this machine (each one's name and the file
    name it was started as), or None where they cannot be read: ``/proc`` on Linux, libproc on
    macOS, nothing else."""
    own = os.getpid()
    if os.path.exists("/proc/self/comm"):
        return _linux_process_names(own)
    if sys.platform == "darwin":
        try:
            return _macos_process_names(own)
        except (OSError, AttributeError):
            return None
    return None


def running_programs(wanted: Iterable[str], names: Collection[str]) -> list[str]:
    """Those of ``wanted`` that are among the process ``names`` (case-insensitive; a name
    longer than Linux's 15-character process names also matches its first 15)."""
    seen = {name.casefold() for name in names}
    found = []
    for program in wanted:
        key = program.casefold()
        if key in seen or (len(key) > COMM_CHARS and key[:COMM_CHARS] in seen):
            found.append(program)
    return found


# ---- The log --------------------------------------------------------------------------------

# What is escaped in a log line: control characters (C0 but \t, DEL, C1), the bidi controls
# that reorder a line (CVE-2021-42574) and lone surrogates. Text from the router, from Ollama
# or from a request id could otherwise drive the terminal reading the log.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def escaped(text: str) -> str:
    """``text`` with every unsafe character written as a Python escape (``\\x1b``)."""
    return _UNSAFE.sub(lambda match: ascii(match.group())[1:-1], text)


def event(name: str, **fields: Any) -> dict[str, Any]:
    """``extra`` for a log call: the event's name and fields, which ``--json-log`` writes
    (``log.info("...", extra=event("request", id=rid))``)."""
    return {"event": name, "fields": fields}


class TextFormatter(logging.Formatter):
    """``2026-01-02 03:04:05 INFO message``, the message escaped."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escaped(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (local, with its UTC offset), ``level``, ``event``
    (a name such as ``request`` or ``pause``, or null), ``message``, then the event's fields.
    ASCII only, so nothing in it can drive a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat("T", "seconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update((key, value) for key, value in fields.items() if key not in line)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=True, default=str)


def setup_logging(*, quiet: bool = False, verbose: bool = False, json_lines: bool = False) -> None:
    """Log to stderr: warnings and errors only with ``quiet``, debugging details too with
    ``verbose``, one JSON object a line with ``json_lines``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    for name in ("urllib3", "websocket"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
