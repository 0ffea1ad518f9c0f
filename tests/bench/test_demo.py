"""``python -m bench.demo`` as the README pastes it: the emulator, a router and contribute.py
start, consume.py prints one answer, and nothing is left running or on disk."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from bench.emulator import reply_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_demo_prints_one_answer_and_stops_everything(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("idleclaw-demo-*"))
    # An operator's settings in the environment: the demo keeps to its own database and layer.
    elsewhere = {
        "DATABASE_URL": "postgres://nobody@127.0.0.1:1/nothing",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "IDLECLAW_SQLITE_PATH": str(tmp_path / "operators.sqlite3"),
        "IDLECLAW_SERVER": "http://127.0.0.1:1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "bench.demo", "hello", "there"],
        cwd=ROOT,
        env={**os.environ, **elsewhere},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = reply_for("llama3.2:3b", messages=[{"role": "user", "content": "hello there"}])
    assert result.stdout.strip() == expected.text
    assert "llama3.2:3b is on offer" in result.stderr
    assert result.stderr.rstrip().endswith("done")
    router = re.search(r"router at (http://\S+)", result.stderr).group(1)
    with pytest.raises(requests.ConnectionError):  # the router is gone
        requests.get(f"{router}/health", timeout=5)
    assert set(Path(tempfile.gettempdir()).glob("idleclaw-demo-*")) == before
    assert list(tmp_path.iterdir()) == []
