"""The slot and queue services are hand-written SQL: they must behave the same on PostgreSQL."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests import procs

pytestmark = pytest.mark.scaleout


def test_routing_services_pass_their_tests_on_postgresql(database_url):
    # The same test module, in a pytest of its own whose Django is configured for PostgreSQL
    # (pytest-django creates its test database next to this test's database).
    result = subprocess.run(
        [procs.PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "tests/routing/test_services.py"],
        cwd=procs.ROOT, env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "database: postgresql" in result.stdout
    assert " passed" in result.stdout and "skipped" not in result.stdout
