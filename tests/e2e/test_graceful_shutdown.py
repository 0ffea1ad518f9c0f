"""A router told to stop finishes what it serves before it goes (issue 14,
``idleclaw_site/shutdown.py``): on SIGTERM it says it is draining, refuses new work, lets a
stream in flight end whole, sends its nodes away with the restart code, and exits 0; streams
still running when the grace period ends get an error event and ``[DONE]``, never a cut."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import websocket

from tests import procs
from tests.e2e.test_sanitizer_e2e import MODEL as HAND_MODEL
from tests.e2e.test_sanitizer_e2e import Node, sse
from tests.e2e.test_skeleton import MODEL, wait_for_model

pytestmark = pytest.mark.e2e


def stream_v1(url: str, model: str, prompt: str) -> list[Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True,
                       timeout=60) as response:
        assert response.status_code == 200, response.text
        return sse(response)


def content_of(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or ""
                   for e in events if e != "[DONE]" and e.get("choices"))


def test_sigterm_lets_the_answer_in_flight_finish_and_sends_the_node_to_reconnect(
    tmp_path, five_second_emulator, router_env
):
    db = tmp_path / "restart.sqlite3"
    env = {**router_env, "IDLECLAW_SHUTDOWN_GRACE": "30"}
    router, url = procs.start_router(db, env)
    node = procs.start_contributor(url, five_second_emulator.url)
    second = None
    try:
        node.wait_for_line("registered")
        wait_for_model(url)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(stream_v1, url, MODEL, "keep talking")
            procs.wait_until(
                lambda: requests.get(f"{url}/health", timeout=5).json()["active_requests"] == 1,
                what="the answer to start",
            )
            time.sleep(0.5)  # some tokens are out
            router.signal(signal.SIGTERM)
            procs.wait_until(lambda: requests.get(f"{url}/health", timeout=5).status_code == 503,
                             what="/health to say draining")
            health = requests.get(f"{url}/health", timeout=5)
            assert health.json()["status"] == "draining"
            refused = requests.post(f"{url}/api/chat", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
            assert refused.status_code == 503
            assert "restarting" in refused.json()["detail"]
            assert refused.headers.get("Retry-After")
            events = answer.result(timeout=60)
        # The answer arrived whole, ended as usual.
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
        # Whole and in order: the emulator's tokens carry their index.
        assert re.findall(r"[a-z]+(\d+)", content_of(events)) == [str(n) for n in range(100)]
        assert router.popen.wait(timeout=15) == 0
        # Daphne had nothing left to kill (it may still log "Killed 0 pending ...").
        assert not re.search(r"Killed [1-9]", router.output)
        node.wait_for_line("the router is restarting; reconnecting at once")
        # The same port again: the contributor is back without waiting out a backoff.
        port = url.rsplit(":", 1)[1]
        second = procs.Proc(
            "router",
            [procs.PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", port,
             "idleclaw_site.asgi:application"],
            env={"IDLECLAW_SQLITE_PATH": str(db), **env},
        )
        second.wait_for_line("Listening on TCP")
        started = time.monotonic()
        wait_for_model(url)
        assert time.monotonic() - started < 5
    finally:
        node.stop()
        router.stop()
        if second is not None:
            second.stop()


def test_streams_left_when_the_grace_period_ends_get_an_error_event_and_done(
    tmp_path, router_env
):
    router, url = procs.start_router(tmp_path / "grace.sqlite3",
                                     {**router_env, "IDLECLAW_SHUTDOWN_GRACE": "1"})
    node = Node(url)
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(stream_v1, url, HAND_MODEL, "never ends")
            request_id = node.request_id()
            node.chunk(request_id, "Half an ans")
            time.sleep(0.3)
            router.signal(signal.SIGTERM)
            # The node gets no new work and, once the grace period is over, its cancel and the
            # restart code.
            frames = []
            node.ws.settimeout(10)
            while True:
                # recv_frame does not answer the close frame (recv_data does, into a socket
                # the stopping router may have dropped already).
                frame = node.ws.recv_frame()
                if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                    code = int.from_bytes(frame.data[:2], "big")
                    reason = frame.data[2:].decode()
                    break
                if frame.opcode == websocket.ABNF.OPCODE_TEXT:
                    frames.append(json.loads(frame.data))
            events = answer.result(timeout=30)
        assert [f["type"] for f in frames] == ["cancel_request"]
        assert (code, reason) == (1012, "router restarting")
        assert events[-1] == "[DONE]"
        assert content_of(events) == "Half an ans"
        error = events[-2]
        assert "restarting" in json.dumps(error)
        assert router.popen.wait(timeout=15) == 0
    finally:
        node.close()
        router.stop()


# Guards: what idleclaw_site/shutdown.py relies on in daphne and Twisted.

def test_daphne_still_kills_its_applications_from_a_before_shutdown_trigger():
    import inspect

    from daphne.server import Server
    from twisted.internet import base

    run = inspect.getsource(Server.run)
    assert 'addSystemEventTrigger("before", "shutdown", self.kill_all_applications)' in run
    create = inspect.getsource(Server.create_application)
    assert 'self.connections[protocol]["application_instance"] = ' in create
    # Twisted waits for a Deferred that a "before" trigger returns before it goes on.
    phase = inspect.getsource(base._ThreePhaseEvent)
    assert "DeferredList" in phase and "_continueFiring" in phase


def test_a_locked_database_does_not_hold_the_shutdown_or_the_last_event(tmp_path, router_env):
    # The database may be why the router is being restarted: a stream still gets its error
    # event and [DONE] when the grace period ends, and the router exits soon after.
    db_path = tmp_path / "locked.sqlite3"
    router, url = procs.start_router(db_path, {**router_env, "IDLECLAW_SHUTDOWN_GRACE": "1"})
    node = Node(url)
    lock = None
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(stream_v1, url, HAND_MODEL, "never ends")
            request_id = node.request_id()
            node.chunk(request_id, "Half")
            time.sleep(0.3)
            lock = sqlite3.connect(db_path, timeout=1, isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
            stopped = time.monotonic()
            router.signal(signal.SIGTERM)
            events = answer.result(timeout=30)
            assert router.popen.wait(timeout=30) == 0
            took = time.monotonic() - stopped
        assert events[-1] == "[DONE]"
        assert "restarting" in json.dumps(events[-2])
        assert took < 12, f"exited {took:.1f} s after SIGTERM"
    finally:
        if lock is not None:
            lock.close()  # rolls the exclusive transaction back
        node.close()
        router.stop()
