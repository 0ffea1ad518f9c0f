"""The benchmark harness (``python -m bench``) must keep working: run its smoke mode end to end
(emulators, daphne, simulated nodes, consumers) and check what it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.load import check_tokens

ROOT = Path(__file__).resolve().parents[2]
HEADLINE_KEYS = (
    "direct_ttft_ms_p50",
    "router_ttft_ms_p50",
    "router_ttft_ms_p99",
    "direct_tokens_per_s",
    "router_tokens_per_s",
    "router_rss_mb",
    "nodes_held",
)


@pytest.mark.e2e
def test_smoke_run_reports_every_headline_figure_without_token_errors(tmp_path: Path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--quiet", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(out.read_text())
    for key in HEADLINE_KEYS:
        assert isinstance(report[key], int | float), (key, report[key])
    assert report["token_errors"] == 0
    assert report["errors"] == 0, [p["error_kinds"] for p in report["phases"] if p.get("errors")]
    assert report["nodes_held"] == report["parameters"]["node_counts"][-1]
    assert report["router_tokens_per_s"] > 0 and report["direct_tokens_per_s"] > 0
    assert report["parameters"]["mode"] == "smoke"
    assert "| target | goal | measured | met |" in result.stdout


EXPECTED = ["sky0", " lamp1", " river2", " stone3"]


@pytest.mark.parametrize(
    ("received", "verdict"),
    [
        (EXPECTED, None),
        (["sky0 lamp1", " river2 stone3"], None),  # a relay may batch tokens into one delta
        (["sky0", " river2", " stone3"], "lost"),
        (["sky0", " lamp1", " lamp1", " river2", " stone3"], "duplicated"),
        (["sky0", " river2", " lamp1", " stone3"], "reordered"),
        (["sky0", " lamp1", " cloud2", " stone3"], "foreign"),
        (["sky0", " lamp1", " riv", " stone3"], "garbled"),
    ],
)
def test_token_check_names_the_damage(received, verdict):
    assert check_tokens(received, EXPECTED) == verdict
