"""Contributor identity end to end (issue 20): real daphne, the Ollama emulator and contribute.py
with a key file. A contributor's record survives a restart and an address change, a node id
reused without the key takes nothing, names are kept, changed and refused when taken, and the
public node list shows names, never addresses or node ids. One router for the module; each
test's nodes share a model of their own, so no test sees another's node."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import sqlite3

import pytest
import requests
import websocket

from tests import procs
from tests.conftest import ROOMY_ENV

pytestmark = pytest.mark.e2e

RESTARTED = "restarted:1b"
STOLEN = "stolen:1b"
NAMED = "named:1b"
OPEN = "open:1b"
MODELS = [RESTARTED, STOLEN, NAMED, OPEN]


class Network:
    def __init__(self, router: str, emulator: str, log: procs.Proc | None = None) -> None:
        self.router = router
        self.emulator = emulator
        self.log = log  # the router's process, for its log

    def nodes(self) -> tuple[str, list[dict]]:
        """The public node list: its body as text, and its nodes."""
        response = requests.get(f"{self.router}/api/network/nodes", timeout=5)
        assert response.status_code == 200, response.text
        return response.text, response.json()["nodes"]

    def nodes_serving(self, model: str) -> list[dict]:
        return [node for node in self.nodes()[1] if model in [m["name"] for m in node["models"]]]

    def ask(self, model: str) -> None:
        response = requests.post(
            f"{self.router}/ollama/api/chat",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.json()["message"]["content"]

    def contributor(self, *args: str, server: str | None = None, **env: str) -> procs.Proc:
        return procs.Proc(
            "contribute.py",
            [procs.PYTHON, "skill_scripts/contribute.py", *args],
            env={"IDLECLAW_SERVER": server or self.router, "OLLAMA_HOST": self.emulator, **env},
        )


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    db = tmp_path_factory.mktemp("identity") / "router.sqlite3"
    router, router_url = procs.start_router(db, ROOMY_ENV)
    emulator, emulator_url = procs.start_emulator(
        "--reply-tokens", "5", *[arg for model in MODELS for arg in ("--model", model)]
    )
    try:
        yield Network(router_url, emulator_url)
    finally:
        emulator.stop()
        router.stop()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _router_key(key: str, origin: str) -> str:
    """The router key of docs/node-protocol-extensions.md ``contributor``, written out."""
    message = b"idleclaw router key v1|" + origin.encode("ascii")
    return hmac.new(bytes.fromhex(key), message, hashlib.sha256).hexdigest()


@pytest.fixture
def one_node_per_address(network, tmp_path):
    """A router of its own that takes one node per address: whether a node registers there
    says whether the router saw it come from an address already in use."""
    router, url = procs.start_router(
        tmp_path / "router.sqlite3", {**ROOMY_ENV, "IDLECLAW_MAX_NODES_PER_IP": "1"}
    )
    try:
        yield Network(url, network.emulator, router)
    finally:
        router.stop()


def _raw_register(router: str, node_id: str, model: str) -> websocket.WebSocket:
    ws = websocket.create_connection(router.replace("http", "ws", 1) + "/ws/node", timeout=10)
    ws.send(
        json.dumps(
            {
                "type": "register",
                "node_id": node_id,
                "models": [{"name": model}],
                "max_concurrent": 1,
            }
        )  # fmt: skip
    )
    return ws


def _closed_with(ws: websocket.WebSocket) -> tuple[int, str]:
    opcode, frame = ws.recv_data_frame(True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    return int.from_bytes(frame.data[:2], "big"), frame.data[2:].decode()


def test_the_record_survives_a_restart_and_an_address_change(one_node_per_address, tmp_path):
    network = one_node_per_address
    key_file = tmp_path / "contributor.key"
    # Both runs use one router URL (the relay's: a node's key is derived per router origin);
    # the relay's outgoing address changes between them.
    relay = procs.TcpRelay(network.router, source="127.0.0.1")
    first = network.contributor("--models", RESTARTED, "--key-file", str(key_file),
                                server=relay.url)  # fmt: skip
    try:
        name = first.wait_for_line(r"contributing as (\S+) ").group(1)
        node_id = first.wait_for_line(r"as node (\S+):").group(1)
        network.ask(RESTARTED)
        procs.wait_until(
            lambda: [n["served"] for n in network.nodes_serving(RESTARTED)] == [1],
            what="one request served",
        )
    finally:
        first.stop()
    procs.wait_until(lambda: not network.nodes_serving(RESTARTED), what="the node gone")

    # 127.0.0.1 now has its one node (a stranger's, anonymous): the contributor can only come
    # back from elsewhere, here 127.0.0.2 through the relay.
    blocker = _raw_register(network.router, "someone-else", OPEN)
    assert json.loads(blocker.recv())["type"] == "registered"
    refused = _raw_register(network.router, "a-second-one", OPEN)
    assert _closed_with(refused) == (1008, "too many nodes from this IP")
    relay.source = "127.0.0.2"
    second = network.contributor(
        "--models", RESTARTED, "--key-file", str(key_file), server=relay.url
    )
    try:
        assert second.wait_for_line(r"contributing as (\S+) ").group(1) == name
        second_id = second.wait_for_line(r"as node (\S+):").group(1)
        assert second_id != node_id  # a new process is a new node, with the same contributor
        network.ask(RESTARTED)
        procs.wait_until(
            lambda: [n["served"] for n in network.nodes_serving(RESTARTED)] == [2],
            what="the record's count to continue",
        )
        body, nodes = network.nodes()
        (listed,) = network.nodes_serving(RESTARTED)
        assert listed["contributor"] == name
        assert listed["reputation"] == "new"
        assert listed["draining"] is False
        (model,) = listed["models"]
        assert model["name"] == RESTARTED and model["ttft_ms"] > 0 and model["tokens_per_s"] > 0
        assert sorted(n["contributor"] for n in nodes) == sorted([name, "anonymous"])
        # What would let someone find or impersonate a node is never public.
        secrets = ["127.0.0.1", "127.0.0.2", node_id, second_id, "someone-else"]
        for secret in [*secrets, key_file.read_text().strip()]:
            assert secret not in body
        assert set(listed) == {"contributor", "models", "reputation", "served", "draining"}
        # The key reaches no log; the name does.
        key = key_file.read_text().strip()
        for log in (first.output, second.output, network.log.output):
            assert key not in log
        assert f"contributor {name}" in network.log.output
        # The router was sent its own derivation of the key, never the key (red-team F6 of
        # issue 20), and computes the token contribute.py prints for its URL.
        printed = procs.run_script(
            "contribute.py", "--print-token", "--key-file", str(key_file), server=relay.url
        )
        assert printed.returncode == 0, printed.stderr
        token = printed.stdout.strip()
        with contextlib.closing(sqlite3.connect(tmp_path / "router.sqlite3")) as db:
            stored = db.execute("SELECT key_hash, token_hash FROM nodes_contributor").fetchall()
        assert stored == [(_sha256(_router_key(key, relay.url)), _sha256(token))]
        assert _sha256(key) not in {hashed for row in stored for hashed in row}
    finally:
        second.stop()
        relay.close()
        blocker.close()


def test_a_node_id_reused_without_the_key_takes_neither_name_nor_record(network, tmp_path):
    keyed = network.contributor(
        "--models", STOLEN, "--key-file", str(tmp_path / "key"), "--name", "honest-heron-1"
    )
    try:
        keyed.wait_for_line(r"contributing as honest-heron-1 ")
        node_id = keyed.wait_for_line(r"as node (\S+):").group(1)
        network.ask(STOLEN)
        procs.wait_until(lambda: network.nodes_serving(STOLEN), what="the node listed")
        # While the node is connected, its id is refused to anyone without its resume token.
        thief = _raw_register(network.router, node_id, STOLEN)
        assert _closed_with(thief) == (1008, "node_id in use")
        thief.close()
    finally:
        keyed.stop()
    procs.wait_until(lambda: not network.nodes_serving(STOLEN), what="the keyed node gone")
    thief = _raw_register(network.router, node_id, STOLEN)
    try:
        registered = json.loads(thief.recv())
        assert registered["type"] == "registered" and "contributor" not in registered
        (listed,) = procs.wait_until(lambda: network.nodes_serving(STOLEN), what="the thief")
        assert listed["contributor"] == "anonymous" and listed["served"] == 0
        assert "honest-heron-1" not in network.nodes()[0]
    finally:
        thief.close()


def test_names_are_kept_changed_and_a_taken_one_refused(network, tmp_path):
    ada = network.contributor(
        "--models", NAMED, "--key-file", str(tmp_path / "ada.key"), "--name", "ada-l"
    )
    try:
        ada.wait_for_line(r"contributing as ada-l ")
        other = network.contributor(
            "--models", NAMED, "--key-file", str(tmp_path / "other.key"), "--name", "ADA-L"
        )
        try:
            other.wait_for_line(r"the router says: name not changed: ADA-L is another")
            generated = other.wait_for_line(r"contributing as (\S+) ").group(1)
            assert generated.lower() != "ada-l"
            names = procs.wait_until(
                lambda: sorted(n["contributor"] for n in network.nodes_serving(NAMED))
                if len(network.nodes_serving(NAMED)) == 2 else None,
                what="both nodes listed",
            )  # fmt: skip
            assert names == sorted(["ada-l", generated])
        finally:
            other.stop()
    finally:
        ada.stop()
    # Without --name the record's name stays; with one, it changes.
    again = network.contributor("--models", NAMED, "--key-file", str(tmp_path / "ada.key"))
    try:
        again.wait_for_line(r"contributing as ada-l ")
    finally:
        again.stop()
    renamed = network.contributor(
        "--models", NAMED, "--key-file", str(tmp_path / "ada.key"), "--name", "ada-lovelace"
    )
    try:
        renamed.wait_for_line(r"contributing as ada-lovelace ")
    finally:
        renamed.stop()


def test_an_anonymous_node_is_listed_as_anonymous_and_makes_no_key(network, tmp_path):
    node = network.contributor("--models", OPEN, "--anonymous", "--key-file", "unused")
    assert node.wait(20) == 2
    assert "--anonymous is without a key" in node.output
    node = network.contributor("--models", OPEN, "--anonymous", XDG_CONFIG_HOME=str(tmp_path))
    try:
        node.wait_for_line(r"registered with")
        (listed,) = procs.wait_until(lambda: network.nodes_serving(OPEN), what="the node")
        assert listed["contributor"] == "anonymous"
        assert "contributing as" not in node.output
        assert not (tmp_path / "idleclaw").exists()
    finally:
        node.stop()
