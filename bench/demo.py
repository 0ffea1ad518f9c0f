"""``python -m bench.demo``: the whole network on one machine, asked one question.

Starts the Ollama emulator (``bench/emulator.py``, standing in for Ollama), a router (daphne,
with its own SQLite database and secret key in a temporary folder) and ``contribute.py`` sharing
the emulator's models; waits until each is ready and the model is on offer; then streams one
answer with ``consume.py``. Everything it started is stopped when it ends, fails, or is
interrupted with Ctrl+C, and the temporary folder is removed. Progress goes to stderr, the answer
to stdout; the exit code is ``consume.py``'s (0 answered), or 1 if the network did not start.

    .venv/bin/python -m bench.demo
    .venv/bin/python -m bench.demo --model qwen3:0.6b "Why is the sky blue?"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.emulator import DEFAULT_MODELS
from bench.servers import _die_with_parent

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEFAULT_PROMPT = "Hello! What can the IdleClaw network do for me?"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


# Settings of the environment that would point the demo's router at another database, channel
# layer or configuration (the operator's own, say): the demo uses its own, thrown away after.
FOREIGN_SETTINGS = ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE")


def demo_environ(**extra: str) -> dict[str, str]:
    """This process's environment without ``FOREIGN_SETTINGS`` and every ``IDLECLAW_*``
    setting (``IDLECLAW_SQLITE_PATH``, ``IDLECLAW_SERVER``...), plus ``extra``."""
    clean = {
        name: value
        for name, value in os.environ.items()
        if name not in FOREIGN_SETTINGS and not name.startswith("IDLECLAW_")
    }
    return {**clean, **extra}


class DemoError(Exception):
    """A part of the network did not start; the message says which and shows its log."""


class Part:
    """One process of the demo, its output kept in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name.replace(' ', '-').replace('.', '-')}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=demo_environ(PYTHONUNBUFFERED="1", **env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: Ctrl+C reaches the demo alone, which then stops every part
                # in order; the kernel stops it if the demo dies without doing so.
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid(), signal.SIGTERM),
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, pattern: str, what: str) -> re.Match[str]:
        """The first match of ``pattern`` in the log; ``DemoError`` if the process ends or
        nothing matches in time."""
        regex = re.compile(pattern)
        return wait_until(lambda: regex.search(self.log()), what, self)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def wait_until(check: Callable[[], Any], what: str, part: Part) -> Any:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        value = check()
        if value:
            return value
        if part.process.poll() is not None:
            raise DemoError(
                f"{part.name} exited (code {part.process.returncode}) before "
                f"{what}:\n{tail(part.log())}"
            )
        if time.monotonic() > deadline:
            raise DemoError(f"no {what} within {READY_TIMEOUT_S:.0f} s:\n{tail(part.log())}")
        time.sleep(0.1)


def tail(text: str, lines: int = 20) -> str:
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def offered_models(router: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{router}/api/models", timeout=5) as response:
            models = json.load(response).get("models", [])
    except (OSError, ValueError, AttributeError, urllib.error.URLError):
        return []
    return [m for m in models if isinstance(m, str)] if isinstance(models, list) else []


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_demo(model: str, prompt: str, work: Path, parts: list[Part]) -> int:
    """Start the parts (appended to ``parts`` for the caller to stop), ask, return the code."""
    say("starting the Ollama emulator (stands in for Ollama and its models)...")
    emulator = Part("emulator", [PYTHON, "-m", "bench.emulator", "--port", "0"], work, {})
    parts.append(emulator)
    router_env = {
        "IDLECLAW_LOCAL_DIR": str(work / "local"),  # database and secret key, thrown away
        "IDLECLAW_SHUTDOWN_GRACE": "2",
    }
    say("starting a router (daphne, SQLite in a temporary folder)...")
    migrate = subprocess.run(
        [PYTHON, "manage.py", "migrate", "--noinput", "-v0"],
        cwd=ROOT,
        env=demo_environ(**router_env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if migrate.returncode != 0:
        raise DemoError(f"manage.py migrate failed:\n{tail(migrate.stdout + migrate.stderr)}")
    daphne = [
        PYTHON,
        "-m",
        "daphne",
        "-b",
        "127.0.0.1",
        "-p",
        "0",
        "idleclaw_site.asgi:application",
    ]
    router_part = Part("router", daphne, work, router_env)
    parts.append(router_part)
    port = router_part.wait_for(
        r"Listening on TCP address 127\.0\.0\.1:(\d+)", "router listening"
    ).group(1)
    router = f"http://127.0.0.1:{port}"
    say(f"  router at {router}")
    ollama = emulator.wait_for(r"listening on (http://\S+)", "emulator listening").group(1)

    say("starting contribute.py (shares the emulator's models with the router)...")
    node = Part(
        "contribute.py",
        [PYTHON, "skill_scripts/contribute.py"],
        work,
        {"IDLECLAW_SERVER": router, "OLLAMA_HOST": ollama},
    )
    parts.append(node)
    node.wait_for(r"registered with", "node registered")
    wait_until(lambda: model in offered_models(router), f"{model} on offer", node)
    say(f"  {model} is on offer")

    say(f"asking {model} with consume.py: {prompt}\n")
    consumer = subprocess.Popen(
        [PYTHON, "skill_scripts/consume.py", "--model", model, "--prompt", prompt],
        cwd=ROOT,
        env=demo_environ(IDLECLAW_SERVER=router),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        code = consumer.wait()
    except KeyboardInterrupt:
        consumer.send_signal(signal.SIGINT)  # consume.py hangs up; the node stops generating
        consumer.wait(STOP_TIMEOUT_S)
        raise
    say("")
    return code


def build_parser() -> argparse.ArgumentParser:
    names = [m.name for m in DEFAULT_MODELS]
    parser = argparse.ArgumentParser(
        prog="python -m bench.demo",
        description="Start the Ollama emulator, a router and contribute.py on this machine, "
        "ask one question with consume.py, and stop them all.",
    )
    parser.add_argument(
        "--model",
        default=names[0],
        choices=names,
        help=f"the emulated model to ask (default {names[0]})",
    )
    parser.add_argument("prompt", nargs="*", help=f"the question (default: {DEFAULT_PROMPT!r})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompt = " ".join(args.prompt).strip() or DEFAULT_PROMPT
    work = Path(tempfile.mkdtemp(prefix="idleclaw-demo-"))
    parts: list[Part] = []
    # SIGTERM and SIGHUP (a closed terminal) stop the demo as Ctrl+C does.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    code = 1
    try:
        code = run_demo(args.model, prompt, work, parts)
    except DemoError as exc:
        say(f"demo failed: {exc}")
    except KeyboardInterrupt:
        say("\ninterrupted")
        code = 130
    finally:
        say("stopping the contributor, the router and the emulator...")
        with contextlib.suppress(KeyboardInterrupt):
            for part in reversed(parts):
                # contribute.py says goodbye on SIGINT; the router drains on SIGTERM.
                part.stop(signal.SIGINT if part.name == "contribute.py" else signal.SIGTERM)
            shutil.rmtree(work, ignore_errors=True)
    say("done")
    return code


if __name__ == "__main__":
    sys.exit(main())
