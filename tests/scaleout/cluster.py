"""Router workers for the scale-out tests: several daphne processes sharing one Redis and one
PostgreSQL, as an operator runs them, plus the few database and HTTP reads the tests assert on.
"""

from __future__ import annotations

import os
import runpy
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
import pytest
import requests

from tests import procs

MODEL = "llama3.2:3b"
# Quick enough for tests, slow enough that a live worker on a busy 2-core machine is never
# taken for dead: a worker beats every 0.5 s and counts as dead after 5 s of silence.
WORKER_BEAT = 0.5
WORKER_TIMEOUT = 5
LISTENING = r"Listening on TCP address 127\.0\.0\.1:(\d+)"


def database_url(server_url: str, name: str) -> str:
    """``server_url`` pointed at database ``name`` (credentials, host and options kept)."""
    parts = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def spawn_worker(name: str, env: dict[str, str], port: int = 0) -> procs.Proc:
    """Start one daphne worker; call ``wait_listening`` for its URL."""
    return procs.Proc(
        name,
        [procs.PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
         "idleclaw_site.asgi:application"],
        env={**procs.FAST_STOP_ENV, **env},
    )


def wait_listening(worker: procs.Proc, timeout: float = 30.0) -> str:
    port = worker.wait_for_line(LISTENING, timeout=timeout).group(1)
    worker.url = f"http://127.0.0.1:{port}"
    return worker.url


def start_workers(env: dict[str, str], names: Sequence[str]) -> list[procs.Proc]:
    """Start several workers at once (each takes a second or two to import Django)."""
    workers = [spawn_worker(name, env) for name in names]
    try:
        for worker in workers:
            wait_listening(worker)
    except BaseException:
        stop_all(workers)
        raise
    return workers


def stop_all(processes: Iterable[procs.Proc]) -> None:
    for proc in processes:
        proc.stop()


def contributor_on(worker: procs.Proc, ollama: procs.Proc, *args: str) -> procs.Proc:
    """The real ``contribute.py`` sharing ``ollama`` through ``worker``, once registered."""
    node = procs.start_contributor(worker.url, ollama.url, *args)
    node.wait_for_line("registered")
    return node


class Balancer(procs.TcpRelay):
    """One public URL in front of several workers, as an operator's load balancer: each TCP
    connection goes to the next worker in turn. Contributors reach the network by one URL (a
    contributor key is derived per router origin), and still land on different workers."""

    def __init__(self, workers: Sequence[procs.Proc]) -> None:
        super().__init__(*(worker.url for worker in workers))


def get_json(url: str) -> Any:
    return requests.get(url, timeout=5).json()


def node_count(worker_url: str) -> int:
    return get_json(f"{worker_url}/health")["node_count"]


def advertised_models(worker_url: str) -> list[str]:
    return get_json(f"{worker_url}/api/models")["models"]


def wait_for_nodes(worker_url: str, count: int, timeout: float = 20.0) -> None:
    procs.wait_until(lambda: node_count(worker_url) == count, timeout=timeout,
                     what=f"{worker_url}/health to show {count} node(s)")


def emulator_stats(emulator_url: str) -> dict[str, Any]:
    return get_json(f"{emulator_url}/_emulator/stats")


def direct_answer(emulator_url: str, prompt: str, model: str = MODEL) -> str:
    """What Ollama itself answers, asked directly."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "stream": False, "think": False}
    reply = requests.post(f"{emulator_url}/api/chat", json=body, timeout=30)
    return reply.json()["message"]["content"]


def rows(url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def worker_id_of(url: str, pid: int) -> str:
    """The liveness row's id of the daphne process ``pid`` (one worker is one process)."""
    [(worker_id,)] = rows(url, "SELECT worker_id FROM nodes_routerworker WHERE pid = %s", [pid])
    return worker_id


def rows_of(url: str, worker_id: str) -> dict[str, int]:
    """Rows that still belong to worker ``worker_id``: its liveness row, the sessions of nodes
    connected to it, and requests whose consumer or node is on it."""
    queries = {
        "workers": "SELECT count(*) FROM nodes_routerworker WHERE worker_id = %(w)s",
        "sessions": "SELECT count(*) FROM nodes_nodesession WHERE worker_id = %(w)s",
        "requests": "SELECT count(*) FROM routing_inflightrequest WHERE worker_id = %(w)s OR "
                    "session_id IN (SELECT id FROM nodes_nodesession WHERE worker_id = %(w)s)",
    }
    return {name: rows(url, sql, {"w": worker_id})[0][0] for name, sql in queries.items()}


def load_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, Any]:
    """The settings module as a router worker would load it with only ``env`` configured."""
    for name in list(os.environ):
        if name.startswith("IDLECLAW_") or name in ("REDIS_URL", "DATABASE_URL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SECRET_KEY", "settings-test")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(procs.ROOT / "idleclaw_site" / "settings.py"))
