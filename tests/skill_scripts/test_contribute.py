"""contribute.py: the request/answer whitelists, and the node against a fake router and Ollama."""

from __future__ import annotations

import json
import signal
import time
import uuid

import contribute
import pytest

from .conftest import ScriptProcess, closed_port, run_script, script_env
from .fakes import FakeOllama, FakeRouter

MODELS = frozenset({"tiny:1b"})


def _params(**overrides):
    params = {"model": "tiny:1b", "messages": [{"role": "user", "content": "hi"}]}
    params.update(overrides)
    return params


# --------------------------------------------------------------------------- sanitize_params


def test_params_keep_only_the_whitelisted_keys_and_force_stream():
    clean = contribute.sanitize_params(
        _params(stream=False, think=True, keep_alive="5m", options={"temperature": 0.2},
                tools=[{"type": "function", "function": {"name": "f"}}], format="json",
                raw=True, template="{{ .Prompt }}", system="evil", images=["x"], suffix="s"),
        MODELS,
    )
    assert set(clean) == {"model", "messages", "stream", "think", "keep_alive", "options",
                          "tools", "format"}
    assert clean["stream"] is True


def test_params_drop_message_keys_other_than_the_chat_ones():
    message = {"role": "user", "content": "hi", "images": ["aGVsbG8="], "extra": 1}
    clean = contribute.sanitize_params(_params(messages=[message]), MODELS)
    assert clean["messages"] == [{"role": "user", "content": "hi"}]


def test_params_drop_options_that_control_the_contributors_hardware():
    clean = contribute.sanitize_params(
        _params(options={"temperature": 0.1, "num_gpu": 99, "use_mlock": True, "num_thread": 64}),
        MODELS,
    )
    assert clean["options"] == {"temperature": 0.1}


@pytest.mark.parametrize("params", [
    None,
    [],
    _params(model="other:7b"),
    _params(model=None),
    _params(messages="hi"),
    _params(messages=[{"role": "user", "content": "x"}] * 51),
    _params(messages=[{"role": "root", "content": "x"}]),
    _params(messages=[{"role": "user", "content": "x" * 10_001}]),
    _params(messages=[{"role": "user", "content": 5}]),
    _params(messages=[{"role": "user"}]),
    _params(messages=["hi"]),
    _params(think="very"),
    _params(options="fast"),
    _params(tools="all"),
    _params(format=5),
])
def test_params_outside_the_protocol_limits_are_invalid(params):
    with pytest.raises(contribute.InvalidRequest):
        contribute.sanitize_params(params, MODELS)


def test_params_at_the_limits_are_accepted():
    messages = [{"role": r, "content": "x" * 10_000}
                for r in ("system", "user", "assistant", "tool")] * 12 + [
        {"role": "user", "content": ""}, {"role": "user", "content": "y"}]
    assert len(messages) == 50
    clean = contribute.sanitize_params(_params(messages=messages), MODELS)
    assert len(clean["messages"]) == 50


# --------------------------------------------------------------------------- build_chunk


def test_chunk_keeps_only_the_answer_fields():
    line = {"model": "tiny:1b", "created_at": "now", "message": {
        "role": "assistant", "content": "Hi", "thinking": "hm", "images": ["x"],
        "tool_calls": [{"function": {"name": "f", "arguments": {}}}], "extra": 1},
        "done": False, "context": [1, 2], "eval_count": 9}
    assert contribute.build_chunk(line) == {
        "message": {"role": "assistant", "content": "Hi", "thinking": "hm",
                    "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
        "done": False,
    }


def test_final_chunk_carries_done_reason_and_stats_only():
    line = {"message": {"role": "assistant", "content": ""}, "done": True,
            "done_reason": "stop", "total_duration": 10, "load_duration": 1,
            "prompt_eval_count": 3, "prompt_eval_duration": 2, "eval_count": 4,
            "eval_duration": 5, "context": [1, 2, 3], "model": "tiny:1b"}
    chunk = contribute.build_chunk(line)
    assert chunk == {"message": {"role": "assistant", "content": ""}, "done": True,
                     "done_reason": "stop", "total_duration": 10, "load_duration": 1,
                     "prompt_eval_count": 3, "prompt_eval_duration": 2, "eval_count": 4,
                     "eval_duration": 5}


def test_frames_over_100000_bytes_are_not_encoded():
    small = {"type": "inference_chunk", "request_id": "r", "chunk": {"message": {}}}
    big = {"type": "inference_chunk", "request_id": "r", "chunk": {"message": {
        "content": "é" * 50_000}}}
    assert json.loads(contribute.encode_frame(small)) == small
    assert contribute.encode_frame(big) is None


# --------------------------------------------------------------------------- helpers


def test_backoff_doubles_from_one_to_sixty_seconds_with_jitter_and_resets():
    backoff = contribute.Backoff(rng=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    backoff.reset()
    assert backoff.next_delay() == 1
    low = contribute.Backoff(rng=lambda: 0.0)
    assert [low.next_delay() for _ in range(3)] == [0.5, 1, 2]


def test_close_frame_payload_is_parsed():
    assert contribute.parse_close(b"\x03\xf0banned") == (1008, "banned")
    assert contribute.parse_close(b"") == (None, "")


def test_selecting_more_than_twenty_models_keeps_the_twenty_largest():
    local = [contribute.LocalModel(name=f"m{i}:1b", size=i) for i in range(25)]
    chosen = contribute.select_models(local, None)
    assert len(chosen) == 20
    assert chosen[0].size == 24 and chosen[-1].size == 5


def test_selecting_models_by_name_accepts_the_latest_tag_and_refuses_unknown_names():
    local = [contribute.LocalModel(name="llama3.2:latest", size=1),
             contribute.LocalModel(name="qwen3:8b", size=2)]
    assert [m.name for m in contribute.select_models(local, ["llama3.2"])] == ["llama3.2:latest"]
    with pytest.raises(contribute.StartupError, match="not a local model: nope") as info:
        contribute.select_models(local, ["qwen3:8b", "nope"])
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------- the script


def test_exits_1_with_advice_when_ollama_is_not_running():
    env = script_env(OLLAMA_HOST=f"127.0.0.1:{closed_port()}",
                     IDLECLAW_SERVER=f"http://127.0.0.1:{closed_port()}")
    result = run_script("contribute.py", env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "cannot reach Ollama" in lines[0] and "ollama serve" in lines[0]
    assert "Traceback" not in result.stderr


def test_exits_2_for_a_server_that_is_not_http():
    result = run_script("contribute.py", env=script_env(IDLECLAW_SERVER="ftp://x"))
    assert result.returncode == 2
    assert "IDLECLAW_SERVER must be an http" in result.stderr


def test_exits_2_for_a_model_that_is_not_local():
    with FakeOllama() as ollama:
        env = script_env(OLLAMA_HOST=ollama.url, IDLECLAW_SERVER="http://127.0.0.1:1")
        result = run_script("contribute.py", "--models", "tiny:1b,huge:70b", env=env)
    assert result.returncode == 2
    assert "not a local model: huge:70b" in result.stderr


@pytest.fixture
def node(started_scripts):
    """A contributor connected to a fake router and a fake Ollama, registered."""
    with FakeOllama() as ollama, FakeRouter() as router:
        proc = ScriptProcess("contribute.py", "--max-concurrent", "1",
                             env=script_env(OLLAMA_HOST=ollama.url, IDLECLAW_SERVER=router.url))
        started_scripts.append(proc)
        router.accept()
        register = router.recv()
        router.send({"type": "registered", "node_id": register["node_id"],
                     "heartbeat_interval": 1, "resume_token": "tok-1"})
        proc.wait_for("registered")
        yield proc, router, ollama, register


def test_node_registers_its_models_with_capabilities(node):
    _, router, _, register = node
    assert router.paths == ["/ws/node"]
    assert register["type"] == "register"
    uuid.UUID(register["node_id"])
    assert register["models"] == [
        {"name": "slow:1b", "size": 2000, "capabilities": ["completion", "thinking"]},
        {"name": "tiny:1b", "size": 1000, "capabilities": ["completion", "thinking"]},
    ]
    assert register["max_concurrent"] == 1
    assert register["ollama_version"] == "0.12.3"
    assert register["protocol"] == 2
    assert register["client"] == "idleclaw-skill/0.3"
    assert "resume_token" not in register


def test_node_streams_whitelisted_chunks_and_logs_no_text(node):
    proc, router, ollama, _ = node
    router.send({"type": "inference_request", "request_id": "req-1", "ollama_params": {
        "model": "tiny:1b", "messages": [{"role": "user", "content": "secret prompt"}],
        "stream": False, "raw": True, "options": {"num_gpu": 1, "seed": 7}}})
    chunks = []
    while not chunks or not chunks[-1]["done"]:
        frame = router.recv()
        assert frame["type"] == "inference_chunk" and frame["request_id"] == "req-1"
        chunks.append(frame["chunk"])
    assert ollama.chat_bodies == [{
        "model": "tiny:1b", "messages": [{"role": "user", "content": "secret prompt"}],
        "stream": True, "options": {"seed": 7}}]
    assert "".join(c["message"]["content"] for c in chunks) == "Hello world"
    assert chunks[0]["message"] == {"role": "assistant", "content": "", "thinking": "hmm"}
    assert set(chunks[1]) == {"message", "done"}
    assert chunks[-1]["eval_count"] == 2 and chunks[-1]["done_reason"] == "stop"
    assert "context" not in chunks[-1]
    finished = proc.wait_for("request req-1 finished")
    assert "model=tiny:1b tokens=2" in finished
    assert not any("secret" in line or "Hello" in line for line in proc.lines)


def test_node_refuses_a_model_it_did_not_register(node):
    _, router, ollama, _ = node
    router.send({"type": "inference_request", "request_id": "req-2",
                 "ollama_params": {"model": "huge:70b", "messages": []}})
    assert router.recv() == {"type": "inference_error", "request_id": "req-2",
                             "error": "invalid_request"}
    assert ollama.chat_bodies == []


def test_node_sends_heartbeats_and_ignores_unknown_frames(node):
    _, router, _, register = node
    router.send({"type": "something_new", "x": 1})
    heartbeat = router.recv(timeout=3, skip=())
    assert heartbeat == {"type": "heartbeat", "node_id": register["node_id"],
                         "active_requests": 0, "available": True}


def test_cancel_closes_the_ollama_stream_and_nothing_more_is_sent(node):
    proc, router, ollama, _ = node
    params = {"model": "slow:1b", "messages": [{"role": "user", "content": "go"}]}
    router.send({"type": "inference_request", "request_id": "slow-1", "ollama_params": params})
    assert router.recv()["request_id"] == "slow-1"
    # max_concurrent is 1: a second request is refused while the first runs.
    router.send({"type": "inference_request", "request_id": "slow-2", "ollama_params": params})
    refused = router.recv(skip=("heartbeat", "inference_chunk"))
    assert refused["type"] == "inference_error" and refused["request_id"] == "slow-2"
    router.send({"type": "cancel_request", "request_id": "slow-1"})
    assert ollama.disconnected.wait(3), "Ollama's stream was not closed"
    proc.wait_for("request slow-1 stopped")
    time.sleep(0.3)
    late = []
    while not router.frames.empty():
        frame = router.frames.get()
        if frame.get("type") != "heartbeat":
            late.append(frame)
    # Chunks already on the wire when the cancel was sent may arrive, but no error, and
    # nothing at all once the node has stopped the request.
    assert all(f.get("request_id") == "slow-1" and f["type"] == "inference_chunk" for f in late)
    time.sleep(0.5)
    assert [f for f in list(router.frames.queue) if f.get("type") != "heartbeat"] == []
    # The slot is free again.
    router.send({"type": "inference_request", "request_id": "tiny-3", "ollama_params": {
        "model": "tiny:1b", "messages": [{"role": "user", "content": "hi"}]}})
    frame = router.recv()
    assert frame["request_id"] == "tiny-3" and frame["type"] == "inference_chunk"


def test_node_reconnects_with_its_resume_token(node):
    proc, router, _, register = node
    router.close(1001, "going away")
    router.accept(timeout=5)
    again = router.recv(skip=("heartbeat", "_closed"))
    assert again["type"] == "register"
    assert again["node_id"] == register["node_id"]
    assert again["resume_token"] == "tok-1"
    proc.wait_for("reconnecting in")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_node_promptly_during_a_request(node, sig):
    proc, router, ollama, _ = node
    router.send({"type": "inference_request", "request_id": "slow-9", "ollama_params": {
        "model": "slow:1b", "messages": [{"role": "user", "content": "go"}]}})
    router.recv()
    code, took = proc.stop(sig)
    assert code == 0
    assert took < 2.5
    assert ollama.disconnected.wait(2)
    proc.wait_for("stopped; goodbye", timeout=2)
    assert not any("Traceback" in line for line in proc.lines)


def test_permanent_refusal_exits_1_with_the_reason(started_scripts):
    with FakeOllama() as ollama, FakeRouter() as router:
        proc = ScriptProcess("contribute.py",
                             env=script_env(OLLAMA_HOST=ollama.url, IDLECLAW_SERVER=router.url))
        started_scripts.append(proc)
        router.accept()
        router.recv()
        router.close(1008, "banned")
        assert proc.proc.wait(timeout=5) == 1
        proc.wait_for("the router refused this node: banned")
