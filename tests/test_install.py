"""install.sh as a newcomer runs it: its usage, a usage error, and ``--scripts`` in a fresh clone
that sits in a directory other users cannot enter (the README's lean install for the skill)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.procs import ROOT

# What pip says when it cannot reach a package index; anything else is a real failure.
REGISTRY_DOWN = (
    "Could not find a version that satisfies",
    "No matching distribution",
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
)


def install(*args: str, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "install.sh", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_help_prints_the_usage():
    result = install("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: bash install.sh [--dev | --scripts | --help]")
    assert "--scripts" in result.stdout and result.stderr == ""


@pytest.mark.parametrize("args", [("--bogus",), ("--dev", "--scripts")])
def test_an_unknown_option_is_a_usage_error(args):
    result = install(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"install.sh: unknown option: {' '.join(args)}\nUsage: ")
    assert result.stdout == ""


@pytest.mark.e2e
def test_scripts_installs_only_what_the_scripts_need_in_a_fresh_clone(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    clone = private / "idleclaw"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=60)
    # No ollama on PATH: the install warns and goes on.
    env = {**os.environ, "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    result = install("--scripts", cwd=clone, env=env)
    if result.returncode != 0 and any(s in result.stderr for s in REGISTRY_DOWN):
        pytest.skip(f"the package registry cannot be reached: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stderr
    assert "warning: ollama is not on PATH" in result.stderr
    assert "Next steps" in result.stdout
    python = str(clone / ".venv" / "bin" / "python")
    modules = (
        "import importlib.util as u; print([m for m in ('django', 'requests', 'websocket')"
        " if u.find_spec(m)])"
    )
    found = subprocess.run([python, "-c", modules], capture_output=True, text=True, timeout=30)
    assert found.stdout.strip() == "['requests', 'websocket']"
    assert not (clone / ".local").exists()  # no database was made
    for script in ("contribute.py", "consume.py", "status.py"):
        shown = subprocess.run(
            [python, f"skill_scripts/{script}", "--help"],
            cwd=clone,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(f"usage: {script}")
