"""HTTPS mode (``IDLECLAW_HTTPS=1``): secure cookies, HSTS and the redirect for the operator's
pages, ``X-Forwarded-Proto`` believed only from a trusted proxy, and a clean
``manage.py check --deploy``."""

from __future__ import annotations

import http.client
import os
import re
import secrets
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from tests import procs
from tests.conftest import ROOMY_ENV

HOST = "router.example.org"


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([procs.PYTHON, "manage.py", *args], cwd=procs.ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


def deploy_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A production setup: DEBUG off, a real secret key, HTTPS, the router's host named."""
    return {
        "IDLECLAW_LOCAL_DIR": str(tmp_path / "local"),
        "IDLECLAW_SQLITE_PATH": str(tmp_path / "router.sqlite3"),
        "IDLECLAW_DEBUG": "0",
        "SECRET_KEY": secrets.token_urlsafe(60),
        "IDLECLAW_HTTPS": "1",
        "IDLECLAW_ALLOWED_HOSTS": HOST,
        **extra,
    }


def test_check_deploy_is_clean_in_https_mode(tmp_path):
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=deploy_env(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "System check identified no issues" in output
    assert "WARNINGS" not in output


def test_https_mode_with_any_host_warns(tmp_path):
    env = deploy_env(tmp_path, IDLECLAW_ALLOWED_HOSTS="*")
    https = manage("check", "--fail-level", "WARNING", env=env)
    plain = manage("check", "--fail-level", "WARNING", env={**env, "IDLECLAW_HTTPS": "0"})
    assert https.returncode == 1
    assert "idleclaw.W010" in https.stderr and "IDLECLAW_ALLOWED_HOSTS" in https.stderr
    assert plain.returncode == 0, plain.stderr


def request(port: int, method: str, path: str, *, source: str = "127.0.0.1",
            headers: dict[str, str] | None = None, body: str | None = None):
    """One request to the router from the local address ``source``: a proxy on this machine
    (127.0.0.1, trusted here) or a stranger (127.0.0.2, any other loopback address)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers={"Host": HOST, **(headers or {})})
        response = conn.getresponse()
        response.read()
        return response
    finally:
        conn.close()


def cookies(response) -> dict[str, str]:
    """Set-Cookie lines by cookie name."""
    return {line.split("=", 1)[0]: line for line in response.headers.get_all("Set-Cookie") or []}


@pytest.mark.e2e
def test_admin_login_behind_a_trusted_proxy_gets_secure_cookies_and_hsts(tmp_path):
    env = {**ROOMY_ENV, **deploy_env(tmp_path), "IDLECLAW_TRUSTED_PROXIES": "127.0.0.1/32"}
    router, url = procs.start_router(tmp_path / "router.sqlite3", env)
    try:
        password = secrets.token_urlsafe(16)
        created = manage("createsuperuser", "--noinput", env={
            **env, "DJANGO_SUPERUSER_USERNAME": "operator",
            "DJANGO_SUPERUSER_EMAIL": "operator@example.org",
            "DJANGO_SUPERUSER_PASSWORD": password})
        assert created.returncode == 0, created.stderr
        port = int(url.rsplit(":", 1)[1])
        via_proxy = {"X-Forwarded-Proto": "https"}

        page = request(port, "GET", "/admin/login/", headers=via_proxy)
        assert page.status == 200
        csrf_cookie = cookies(page)["csrftoken"]
        assert "; Secure" in csrf_cookie
        assert page.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"

        token = re.match(r"csrftoken=([^;]+)", csrf_cookie).group(1)
        login = request(port, "POST", "/admin/login/?next=/admin/", headers={
            **via_proxy, "Cookie": f"csrftoken={token}", "Origin": f"https://{HOST}",
            "Content-Type": "application/x-www-form-urlencoded",
        }, body=urllib.parse.urlencode({"csrfmiddlewaretoken": token, "username": "operator",
                                        "password": password, "next": "/admin/"}))
        assert login.status == 302, login.headers
        session_cookie = cookies(login)["sessionid"]
        assert "; Secure" in session_cookie and "; HttpOnly" in session_cookie

        # The same header from a peer that is not a trusted proxy is not believed: plain
        # HTTP, so a redirect to HTTPS and no HSTS.
        stranger = request(port, "GET", "/admin/login/", source="127.0.0.2", headers=via_proxy)
        assert stranger.status == 301
        assert stranger.headers["Location"] == f"https://{HOST}/admin/login/"
        assert "Strict-Transport-Security" not in stranger.headers
        # And the APIs are not redirected: nodes and consumers are not the admin's business.
        health = request(port, "GET", "/health", source="127.0.0.2")
        assert health.status == 200
    finally:
        router.stop()
