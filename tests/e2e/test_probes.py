"""Probes (issue 20) end to end: a real router, real ``contribute.py`` nodes in front of Ollama
emulators (honest ones, and ones that lie with ``--answer-as`` or ``--garble``), and the real
``manage.py probe_nodes`` as a subprocess talking to the router over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import urllib.parse
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from nodes.probes import SEEDS
from routing.probes import probe_token
from tests import procs

pytestmark = pytest.mark.e2e

MODEL = "smollm2:135m"  # completion only: the text probe
CAPABLE = "qwen3:0.6b"  # completion, tools and thinking: every probe
CAPABLE_SPEC = f"{CAPABLE},caps=completion+tools+thinking"
# Probes sent at once: the random pauses between a model's nodes only slow the suite.
NO_STAGGER = {"IDLECLAW_PROBE_STAGGER": "0"}


def probe_nodes(router: procs.Proc, db: Path, *args: str) -> subprocess.CompletedProcess:
    """``manage.py probe_nodes`` against ``router``, on the router's database."""
    return subprocess.run(
        [procs.PYTHON, "manage.py", "probe_nodes", "--router", router.url, *args],
        cwd=procs.ROOT,
        env={**os.environ, **procs.FAST_STOP_ENV, **NO_STAGGER, "IDLECLAW_SQLITE_PATH": str(db)},
        capture_output=True,
        text=True,
        timeout=180,
    )


def query(db: Path, sql: str, *params: Any) -> list[tuple]:
    with closing(sqlite3.connect(db)) as connection:
        return connection.execute(sql, params).fetchall()


def reputations(db: Path) -> dict[str, float]:
    return dict(query(db, "SELECT node_id, reputation FROM nodes_nodesession"))


def emulator_stats(url: str) -> dict[str, Any]:
    return requests.get(f"{url}/_emulator/stats", timeout=5).json()


def new_key(stack: ExitStack) -> Path:
    """Where a contributor key will be made: one contributor."""
    keys = Path(tempfile.mkdtemp(prefix="idleclaw-probe-key-"))
    stack.callback(shutil.rmtree, keys, True)
    return keys / "key"


def start_node(
    stack: ExitStack, router_url: str, *emulator_args: str, key: Path | None = None
) -> tuple[str, str]:
    """An emulator and a real contributor in front of it: (node id, emulator URL)."""
    emulator, emulator_url = procs.start_emulator(*emulator_args)
    stack.callback(emulator.stop)
    # A key of its own unless given: nodes of one key are one contributor, one reputation.
    key = key or new_key(stack)
    node = procs.start_contributor(
        router_url, emulator_url, "--max-concurrent", "2", "--key-file", str(key)
    )
    stack.callback(node.stop)
    node_id = node.wait_for_line(r"registered with \S+ as node (\S+):").group(1)
    return node_id, emulator_url


def ask(router_url: str, model: str, prompt: str) -> str:
    response = requests.post(
        f"{router_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": prompt}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_an_honest_pair_agrees_passes_every_probe_and_gains_reputation(router, tmp_path):
    db = tmp_path / "router.sqlite3"
    with ExitStack() as stack:
        first, first_url = start_node(stack, router.url, "--model", CAPABLE_SPEC)
        second, second_url = start_node(stack, router.url, "--model", CAPABLE_SPEC)
        procs.wait_until(lambda: len(reputations(db)) == 2, what="both sessions")

        result = probe_nodes(router, db)

        assert result.returncode == 0, result.stdout + result.stderr
        # Each node: the text probe (they agree), the thinking probe and the tool probe.
        assert "nodes passed 2, failed 0" in result.stdout
        assert "probes passed 6, failed 0" in result.stdout
        after = reputations(db)
        assert after[first] > 0.5 and after[second] > 0.5
        # The probes reached the nodes' Ollama as ordinary requests, temperature 0, a fixed
        # seed: the same for both nodes.
        seeds = []
        for url in (first_url, second_url):
            bodies = emulator_stats(url)["requests"]
            assert len(bodies) == 3
            assert all(b["options"]["temperature"] == 0 for b in bodies)
            seeds.append(sorted(b["options"]["seed"] for b in bodies))
            assert any(b.get("think") is True for b in bodies)
            assert any(b.get("tools") for b in bodies)
        assert seeds[0] == seeds[1] and set(seeds[0]) <= set(SEEDS)
        # Counted for no consumer, and not in the nodes' own records of real traffic.
        assert query(db, "SELECT COUNT(*) FROM routing_requestcount") == [(0,)]
        assert query(db, "SELECT SUM(completed), SUM(failed) FROM nodes_nodesession") == [(0, 0)]
        # Nothing of a prompt or an answer in the prober's output.
        assert "?" not in result.stdout


@pytest.mark.parametrize(
    "lie", [("--answer-as", "llama3.2:3b"), ("--garble",)], ids=["answer-as", "garble"]
)
def test_a_lying_node_loses_reputation_and_then_all_consumer_traffic(router, tmp_path, lie):
    db = tmp_path / "router.sqlite3"
    with ExitStack() as stack:
        honest = [start_node(stack, router.url, "--model", MODEL) for _ in range(2)]
        liar, liar_url = start_node(stack, router.url, "--model", MODEL, *lie)
        procs.wait_until(lambda: len(reputations(db)) == 3, what="three sessions")

        first = probe_nodes(router, db)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "nodes passed 2, failed 1" in first.stdout
        after_one = reputations(db)
        assert after_one[liar] < 0.5
        assert all(after_one[node] > 0.5 for node, _ in honest)

        second = probe_nodes(router, db)
        assert "nodes passed 2, failed 1" in second.stdout
        assert reputations(db)[liar] < 0.25  # IDLECLAW_REPUTATION_FLOOR

        # Below the floor: consumers are served by the honest nodes only.
        served_before = emulator_stats(liar_url)["chat_started"]
        honest_before = sum(emulator_stats(url)["chat_started"] for _, url in honest)
        for i in range(8):
            assert ask(router.url, MODEL, f"question {i}")
        assert emulator_stats(liar_url)["chat_started"] == served_before
        assert sum(emulator_stats(url)["chat_started"] for _, url in honest) == honest_before + 8

        # Probes still reach it: a third round fails it again (and the others pass).
        third = probe_nodes(router, db)
        assert "nodes passed 2, failed 1" in third.stdout
        assert emulator_stats(liar_url)["chat_started"] == served_before + 1


def test_one_key_with_two_lying_nodes_cannot_outvote_an_honest_node(router, tmp_path):
    # Red team F2a: the two nodes of one key are one voice, so this is a split, not 2 to 1.
    db = tmp_path / "router.sqlite3"
    with ExitStack() as stack:
        honest, honest_url = start_node(stack, router.url, "--model", MODEL)
        key = new_key(stack)
        for _ in range(2):
            start_node(stack, router.url, "--model", MODEL, "--answer-as", "llama3.2:3b", key=key)
        procs.wait_until(lambda: len(reputations(db)) == 3, what="three sessions")
        for _ in range(2):
            result = probe_nodes(router, db)
            assert "nodes passed 0, failed 0" in result.stdout, result.stdout + result.stderr
            assert "split 3" in result.stdout
        assert reputations(db)[honest] >= 0.5
        before = emulator_stats(honest_url)["chat_started"]
        for i in range(6):
            ask(router.url, MODEL, f"question {i}")
        assert emulator_stats(honest_url)["chat_started"] > before


def test_a_contributor_lying_on_one_model_is_not_saved_by_its_node_passing_on_another(
    router, tmp_path
):
    # Red team F2b: a failure on one model and a pass on another, in one round, is a failure.
    db = tmp_path / "router.sqlite3"
    other = "tinyllama:1.1b"
    with ExitStack() as stack:
        for model in (MODEL, MODEL, other):
            start_node(stack, router.url, "--model", model)
        key = new_key(stack)
        liar, liar_url = start_node(
            stack, router.url, "--model", MODEL, "--answer-as", "llama3.2:3b", key=key
        )
        start_node(stack, router.url, "--model", other, key=key)
        procs.wait_until(lambda: len(reputations(db)) == 5, what="five sessions")
        for _ in range(2):
            result = probe_nodes(router, db)
            assert "2 models probed" in result.stdout, result.stdout + result.stderr
        assert reputations(db)[liar] < 0.25  # IDLECLAW_REPUTATION_FLOOR
        before = emulator_stats(liar_url)["chat_started"]
        for i in range(4):
            ask(router.url, MODEL, f"question {i}")
        assert emulator_stats(liar_url)["chat_started"] == before


class RecordingNode:
    """A node written by hand: records each ``inference_request`` frame and answers it with a
    fixed text, so probes of two such nodes agree. Anonymous, so each connects from its own
    loopback address (``127.0.0.<host>``): probes count one voice per address."""

    def __init__(
        self,
        router_url: str,
        node_id: str,
        model: str,
        capabilities: tuple[str, ...] = (),
        *,
        host: int,
    ) -> None:
        target = urllib.parse.urlsplit(router_url)
        sock = socket.create_connection(
            (target.hostname, target.port), timeout=30, source_address=(f"127.0.0.{host}", 0)
        )
        self.ws = websocket.create_connection(
            router_url.replace("http", "ws", 1) + "/ws/node", timeout=30, socket=sock
        )
        offer: dict[str, Any] = {"name": model}
        if capabilities:
            offer["capabilities"] = list(capabilities)
        self.ws.send(json.dumps({"type": "register", "node_id": node_id,
                                 "models": [offer], "max_concurrent": 2}))
        assert json.loads(self.ws.recv())["type"] == "registered"
        self.frames: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                frame = json.loads(self.ws.recv())
                if frame.get("type") != "inference_request":
                    continue
                self.frames.append(frame)
                for text, done in (("The answer ", False), ("is the same.", True)):
                    chunk: dict[str, Any] = {
                        "message": {"role": "assistant", "content": text}, "done": done}
                    if done:
                        chunk["done_reason"] = "stop"
                    self.ws.send(json.dumps({"type": "inference_chunk",
                                             "request_id": frame["request_id"], "chunk": chunk}))
        except (websocket.WebSocketException, OSError, ValueError):
            return

    def close(self) -> None:
        self.ws.close()


def shape(value: Any) -> Any:
    """A value's structure: the keys of objects in order and the types of everything else."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def test_a_probe_cannot_be_told_from_a_consumer_request_of_the_same_shape(router, tmp_path):
    db = tmp_path / "router.sqlite3"
    model = "recorded:1b"
    nodes = [RecordingNode(router.url, f"recording-{i}", model, host=2 + i) for i in range(2)]
    try:
        procs.wait_until(lambda: len(reputations(db)) == 2, what="both sessions")
        result = probe_nodes(router, db)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "nodes passed 2, failed 0" in result.stdout
        probes = [node.frames[0] for node in nodes]
        assert all(len(node.frames) == 1 for node in nodes)
        # A consumer sends the same shape: the probe's own messages and options, as /v1 takes
        # them.
        options = probes[0]["ollama_params"]["options"]
        body = {
            "model": model,
            "messages": probes[0]["ollama_params"]["messages"],
            "max_tokens": options["num_predict"],
            "temperature": options["temperature"],
            "seed": options["seed"],
        }
        response = requests.post(f"{router.url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 200
        consumer = next(node.frames[-1] for node in nodes if len(node.frames) == 2)
    finally:
        for node in nodes:
            node.close()

    # A fixed seed as API users pick one.
    assert options["seed"] in SEEDS
    # Both nodes got the same probe; field by field it is what the consumer's request became:
    # the same keys in the same order, values of the same types, the same parameters ...
    assert probes[0]["ollama_params"] == probes[1]["ollama_params"]
    for probe in probes:
        assert shape(probe) == shape(consumer)
        assert probe["ollama_params"] == consumer["ollama_params"]
    # ... and request ids of one format: the 32 hexadecimal digits of an API request's id.
    for frame in (*probes, consumer):
        assert len(frame["request_id"]) == 32
        int(frame["request_id"], 16)
    assert len({frame["request_id"] for frame in (*probes, consumer)}) == 3
    assert consumer["request_id"] == response.headers["x-request-id"]


def test_the_probe_endpoint_is_not_found_without_its_token_and_refuses_bad_bodies(router):
    url = f"{router.url}/api/internal/probe?session=1"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert requests.post(url, json=body, timeout=5).status_code == 404
    wrong = {"Authorization": "Bearer " + "0" * 64}
    assert requests.post(url, json=body, headers=wrong, timeout=5).status_code == 404
    basic = {"Authorization": f"Basic {probe_token()}"}
    assert requests.post(url, json=body, headers=basic, timeout=5).status_code == 404

    good = {"Authorization": f"Bearer {probe_token()}"}
    for bad_url, bad_body in [
        (url, b"not json"),
        (url, b"[]"),
        (url, json.dumps({"model": "", "messages": []}).encode()),
        (url, json.dumps({**body, "temperature": "hot"}).encode()),
        (f"{router.url}/api/internal/probe", json.dumps(body).encode()),
        (f"{router.url}/api/internal/probe?session=x", json.dumps(body).encode()),
        (f"{router.url}/api/internal/probe?session=0", json.dumps(body).encode()),
    ]:
        response = requests.post(bad_url, data=bad_body, headers=good, timeout=5)
        assert response.status_code == 400, (bad_url, bad_body, response.text)
        assert "detail" in response.json()
    # A well-formed probe for a session that does not exist is not sent anywhere.
    response = requests.post(url, json=body, headers=good, timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "gone"
    assert requests.get(url, headers=good, timeout=5).status_code == 405


def test_probe_nodes_exits_with_an_error_when_the_router_cannot_be_reached(router, tmp_path):
    db = tmp_path / "router.sqlite3"
    nodes = [
        RecordingNode(router.url, f"unreached-{i}", "recorded:1b", host=2 + i) for i in range(2)
    ]
    try:
        procs.wait_until(lambda: len(reputations(db)) == 2, what="both sessions")
        before = reputations(db)
        result = subprocess.run(
            [procs.PYTHON, "manage.py", "probe_nodes", "--router", "http://127.0.0.1:9"],
            cwd=procs.ROOT,
            env={**os.environ, "IDLECLAW_SQLITE_PATH": str(db)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert "could not be reached" in result.stderr
        assert reputations(db) == before
        assert not any(node.frames for node in nodes)
    finally:
        for node in nodes:
            node.close()


def test_probe_nodes_every_runs_rounds_until_sigterm_and_then_exits_cleanly(router, tmp_path):
    db = tmp_path / "router.sqlite3"
    nodes = [RecordingNode(router.url, f"looped-{i}", "recorded:1b", host=2 + i) for i in range(2)]
    prober = procs.Proc(
        "probe_nodes",
        [procs.PYTHON, "manage.py", "probe_nodes", "--router", router.url, "--every", "0.5"],
        env={"IDLECLAW_SQLITE_PATH": str(db), **NO_STAGGER},
    )
    try:
        procs.wait_until(lambda: len(reputations(db)) == 2, what="both sessions")
        procs.wait_until(
            lambda: sum("1 models probed" in line for line in prober.lines) >= 2,
            what="two rounds",
        )
        prober.signal(signal.SIGTERM)
        assert prober.wait(30) == 0, prober.output
        rounds = sum("1 models probed" in line for line in prober.lines)
        # One probe per node per round, never more.
        assert [len(node.frames) for node in nodes] == [rounds, rounds]
        assert all(value > 0.5 for value in reputations(db).values())
    finally:
        prober.stop()
        for node in nodes:
            node.close()


def test_probe_nodes_every_outlives_a_database_it_cannot_open_for_a_while(router, tmp_path):
    """A round that fails on the database (here: the file cannot be opened) is lost, not the
    prober: it says so on stderr and probes again once the database is back."""
    db = tmp_path / "router.sqlite3"
    link = tmp_path / "through.sqlite3"
    link.symlink_to(tmp_path / "missing" / "router.sqlite3")
    nodes = [RecordingNode(router.url, f"later-{i}", "recorded:1b", host=2 + i) for i in range(2)]
    prober = procs.Proc(
        "probe_nodes",
        [procs.PYTHON, "manage.py", "probe_nodes", "--router", router.url, "--every", "0.5"],
        env={"IDLECLAW_SQLITE_PATH": str(link), **NO_STAGGER},
    )
    try:
        procs.wait_until(lambda: len(reputations(db)) == 2, what="both sessions")
        procs.wait_until(
            lambda: sum("failed on the database" in line for line in prober.lines) >= 2,
            what="two lost rounds",
        )
        assert not any(node.frames for node in nodes)
        link.unlink()
        link.symlink_to(db)
        procs.wait_until(
            lambda: any("1 models probed" in line for line in prober.lines), what="a round"
        )
        prober.signal(signal.SIGTERM)
        assert prober.wait(30) == 0, prober.output
        assert all(node.frames for node in nodes)
        assert "Traceback" not in prober.output
    finally:
        prober.stop()
        for node in nodes:
            node.close()


def test_two_probers_at_once_probe_each_node_once_per_round_they_ran(router, tmp_path):
    db = tmp_path / "router.sqlite3"
    nodes = [RecordingNode(router.url, f"shared-{i}", "recorded:1b", host=2 + i) for i in range(2)]
    try:
        procs.wait_until(lambda: len(reputations(db)) == 2, what="both sessions")
        command = [procs.PYTHON, "manage.py", "probe_nodes", "--router", router.url]
        env = {**os.environ, "IDLECLAW_SQLITE_PATH": str(db), **NO_STAGGER}
        running = [
            subprocess.Popen(command, cwd=procs.ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outputs = [proc.communicate(timeout=120) for proc in running]
        assert [proc.returncode for proc in running] == [0, 0], outputs
        probed = sum(out.count("1 models probed") for out, _ in outputs)
        held = sum(out.count("(1 held by another prober)") for out, _ in outputs)
        assert probed >= 1 and probed + held == 2
        # Each round that ran sent each node exactly one probe, and judged it once.
        assert [len(node.frames) for node in nodes] == [probed, probed]
        expected = {1: 0.625, 2: 0.71875}[probed]
        assert list(reputations(db).values()) == [pytest.approx(expected, abs=1e-3)] * 2
    finally:
        for node in nodes:
            node.close()


def test_nodes_that_declare_thinking_and_tools_they_do_not_have_fail_those_probes(router, tmp_path):
    db = tmp_path / "router.sqlite3"
    declared = ("completion", "tools", "thinking")
    nodes = [
        RecordingNode(router.url, f"boastful-{i}", "recorded:1b", declared, host=2 + i)
        for i in range(2)
    ]
    try:
        procs.wait_until(lambda: len(reputations(db)) == 2, what="both sessions")
        result = probe_nodes(router, db)
        assert result.returncode == 0, result.stdout + result.stderr
        # They agree with each other (the text probe), but neither thinks nor calls the tool.
        assert "nodes passed 0, failed 2" in result.stdout
        assert "probes passed 2, failed 4" in result.stdout
        assert all(value < 0.5 for value in reputations(db).values())
        frames = [frame["ollama_params"] for frame in nodes[0].frames]
        assert any(params.get("think") is True for params in frames)
        assert any(params.get("tools") for params in frames)
    finally:
        for node in nodes:
            node.close()
