"""contribute.py: the request/answer whitelists, and the node against a fake router and the
Ollama emulator."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime

import contribute
import pytest
import requests

from tests.procs import http_json, wait_until

from .conftest import (
    OLLAMA_VERSION,
    PLAIN_MODEL,
    PLAIN_MODEL_SIZE,
    SLOW_MODEL,
    THINKING_MODEL,
    THINKING_MODEL_SIZE,
    Emulator,
    ScriptProcess,
    closed_port,
    run_script,
    script_env,
)
from .fakes import FakeRouter

MODELS = frozenset({"tiny:1b"})


def _params(**overrides):
    params = {"model": "tiny:1b", "messages": [{"role": "user", "content": "hi"}]}
    params.update(overrides)
    return params


# --------------------------------------------------------------------------- sanitize_params


def test_params_keep_only_the_whitelisted_keys_and_force_stream():
    clean = contribute.sanitize_params(
        _params(
            stream=False,
            think=True,
            keep_alive="5m",
            options={"temperature": 0.2},
            tools=[{"type": "function", "function": {"name": "f"}}],
            format="json",
            raw=True,
            template="{{ .Prompt }}",
            system="evil",
            images=["x"],
            suffix="s",
        ),
        MODELS,
    )
    assert set(clean) == {
        "model",
        "messages",
        "stream",
        "think",
        "keep_alive",
        "options",
        "tools",
        "format",
    }
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


@pytest.mark.parametrize(
    "params",
    [
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
    ],
)
def test_params_outside_the_protocol_limits_are_invalid(params):
    with pytest.raises(contribute.InvalidRequest):
        contribute.sanitize_params(params, MODELS)


def test_params_at_the_limits_are_accepted():
    messages = [
        {"role": r, "content": "x" * 10_000} for r in ("system", "user", "assistant", "tool")
    ] * 12 + [{"role": "user", "content": ""}, {"role": "user", "content": "y"}]
    assert len(messages) == 50
    clean = contribute.sanitize_params(_params(messages=messages), MODELS)
    assert len(clean["messages"]) == 50


# --------------------------------------------------------------------------- build_chunk


def test_chunk_keeps_only_the_answer_fields():
    line = {
        "model": "tiny:1b",
        "created_at": "now",
        "message": {
            "role": "assistant",
            "content": "Hi",
            "thinking": "hm",
            "images": ["x"],
            "tool_calls": [{"function": {"name": "f", "arguments": {}}}],
            "extra": 1,
        },
        "done": False,
        "context": [1, 2],
        "eval_count": 9,
    }
    assert contribute.build_chunk(line) == {
        "message": {
            "role": "assistant",
            "content": "Hi",
            "thinking": "hm",
            "tool_calls": [{"function": {"name": "f", "arguments": {}}}],
        },
        "done": False,
    }


def test_final_chunk_carries_done_reason_and_stats_only():
    line = {
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "stop",
        "total_duration": 10,
        "load_duration": 1,
        "prompt_eval_count": 3,
        "prompt_eval_duration": 2,
        "eval_count": 4,
        "eval_duration": 5,
        "context": [1, 2, 3],
        "model": "tiny:1b",
    }
    chunk = contribute.build_chunk(line)
    assert chunk == {
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "stop",
        "total_duration": 10,
        "load_duration": 1,
        "prompt_eval_count": 3,
        "prompt_eval_duration": 2,
        "eval_count": 4,
        "eval_duration": 5,
    }


def _text_chunk(content: str, done: bool = False) -> dict:
    return {"message": {"role": "assistant", "content": content}, "done": done}


def test_chunks_are_packed_in_order_into_frames_of_at_most_256_chunks():
    chunks = [_text_chunk(f"{i} ") for i in range(600)] + [_text_chunk("", done=True)]
    frames, oversized = contribute.pack_chunks("r-1", chunks, batched=True)
    decoded = [json.loads(frame) for frame in frames]
    assert [len(frame["chunks"]) for frame in decoded] == [256, 256, 89]
    assert {(frame["type"], frame["request_id"]) for frame in decoded} == {
        ("inference_chunks", "r-1")
    }
    assert [chunk for frame in decoded for chunk in frame["chunks"]] == chunks
    assert oversized == []


def test_a_batch_over_100000_bytes_is_split_and_a_chunk_too_big_for_any_frame_is_left_out():
    big = [_text_chunk("é" * 15_000 + str(i)) for i in range(5)]  # 30 kB each in UTF-8
    huge = _text_chunk("x" * 100_000)
    chunks = [*big[:3], huge, *big[3:]]
    frames, oversized = contribute.pack_chunks("r", chunks, batched=True)
    assert [len(json.loads(frame)["chunks"]) for frame in frames] == [3, 2]
    assert all(len(frame.encode("utf-8")) <= 100_000 for frame in frames)
    assert [chunk for frame in frames for chunk in json.loads(frame)["chunks"]] == big
    assert oversized == [huge]


def test_a_batch_of_exactly_100000_bytes_is_one_frame():
    def frames_for(extra: int) -> list[str]:
        empty = len(contribute.pack_chunks("r", [_text_chunk("")], batched=True)[0][0])
        # Two chunks of equal size whose frame is 100,000 bytes plus ``extra``.
        filler = (
            100_000
            - 2 * empty
            + len('{"type":"inference_chunks","request_id":"r","chunks":[]}')
            - 1
            + extra
        )
        chunks = [_text_chunk("a" * (filler // 2)), _text_chunk("b" * (filler - filler // 2))]
        return contribute.pack_chunks("r", chunks, batched=True)[0]

    assert [len(frame.encode()) for frame in frames_for(0)] == [100_000]
    assert len(frames_for(1)) == 2


def test_without_batching_each_chunk_is_its_own_inference_chunk_frame():
    chunks = [_text_chunk("a"), _text_chunk("x" * 100_000), _text_chunk("", done=True)]
    frames, oversized = contribute.pack_chunks("r", chunks, batched=False)
    assert [json.loads(frame) for frame in frames] == [
        {"type": "inference_chunk", "request_id": "r", "chunk": chunks[0]},
        {"type": "inference_chunk", "request_id": "r", "chunk": chunks[2]},
    ]
    assert oversized == [chunks[1]]


def test_frames_over_100000_bytes_are_not_encoded():
    small = {"type": "inference_chunk", "request_id": "r", "chunk": {"message": {}}}
    big = {
        "type": "inference_chunk",
        "request_id": "r",
        "chunk": {"message": {"content": "é" * 50_000}},
    }
    assert json.loads(contribute.encode_frame(small)) == small
    assert contribute.encode_frame(big) is None


# --------------------------------------------------------------------------- embeddings


def _embed_params(**overrides):
    return {"model": "tiny:1b", "input": ["a", "b"], **overrides}


def test_embed_params_keep_only_the_whitelisted_keys():
    params = _embed_params(
        truncate=False,
        dimensions=64,
        keep_alive="5m",
        stream=True,
        options={"num_ctx": 512, "num_gpu": 99},
        format="json",
    )
    assert contribute.sanitize_embed_params(params, MODELS) == {
        "model": "tiny:1b",
        "input": ["a", "b"],
        "truncate": False,
        "dimensions": 64,
        "keep_alive": "5m",
        "options": {"num_ctx": 512},
    }


@pytest.mark.parametrize(
    "params",
    [
        _embed_params(model="other:1b"),
        _embed_params(input="a"),
        _embed_params(input=[]),
        _embed_params(input=["a"] * 257),
        _embed_params(input=["a", 1]),
        _embed_params(truncate="yes"),
        _embed_params(dimensions=0),
        _embed_params(dimensions=8193),
        _embed_params(dimensions=True),
        _embed_params(keep_alive="x" * 33),
        _embed_params(options=[]),
        None,
    ],
)
def test_embed_params_outside_the_protocol_limits_are_invalid(params):
    with pytest.raises(contribute.InvalidRequest):
        contribute.sanitize_embed_params(params, MODELS)


def _joined(frames: list[str]) -> tuple[list[list[float]], dict]:
    """The vectors of ``embed_vectors`` frames put together as the router does."""
    vectors: list[list[float]] = []
    last: dict = {}
    for index, frame in enumerate(frames):
        assert len(frame.encode()) <= 100_000
        last = json.loads(frame)
        assert last["done"] is (index == len(frames) - 1)
        parts = last["embeddings"]
        if last["continued"]:
            vectors[-1].extend(parts.pop(0))
        vectors.extend(parts)
    return vectors, last


def test_vectors_are_packed_in_order_into_frames_of_at_most_100000_bytes():
    batch = [[(i * 1024 + j) / 7e6 - 0.07 for j in range(1024)] for i in range(16)]
    frames = contribute.pack_vectors("r-1", batch, {"prompt_eval_count": 9})
    vectors, last = _joined(frames)
    assert vectors == batch
    assert len(frames) > 2
    assert not any(json.loads(frame)["continued"] for frame in frames)
    assert last["prompt_eval_count"] == 9
    assert {json.loads(frame)["request_id"] for frame in frames} == {"r-1"}


def test_a_vector_too_long_for_one_frame_is_split_and_continued():
    wide = [[-0.0123456789 + j * 1e-9 for j in range(8192)] for _ in range(3)]
    frames = contribute.pack_vectors("r", wide, {})
    vectors, _ = _joined(frames)
    assert vectors == wide
    assert any(json.loads(frame)["continued"] for frame in frames)
    assert len(contribute.pack_vectors("r", [[0.5]], {})) == 1


def test_ollamas_vectors_are_checked_and_cut_to_the_dimensions_asked():
    check = contribute.embeddings_of
    assert check({"embeddings": [[3.0, 4.0, 1.0]]}, 1, 2) == ([[0.6, 0.8]], None)
    assert check({"embeddings": [[1.0, 2.0]]}, 1, None) == ([[1.0, 2.0]], None)
    for answer, inputs in [
        ({"embeddings": [[1.0]]}, 2),
        ({"embeddings": [[1.0], [1.0, 2.0]]}, 2),
        ({"embeddings": [[float("nan")]]}, 1),
        ({"embeddings": [[True]]}, 1),
        ({"embeddings": [[0.0] * 8193]}, 1),
        ({"error": "x"}, 1),
    ]:
        vectors, problem = check(answer, inputs, None)
        assert vectors == [] and problem is not None


def test_node_serves_an_embed_request_from_ollamas_api_embed(node):
    proc, router, ollama, _ = node
    texts = ["one", "two", "three", "four"]
    router.send(
        {
            "type": "embed_request",
            "request_id": "emb-1",
            "embed_params": {
                "model": PLAIN_MODEL,
                "input": texts,
                "dimensions": 1500,
                "stream": True,
            },
        }
    )
    frames = []
    while not frames or not frames[-1]["done"]:
        frames.append(router.recv())
    assert {(f["type"], f["request_id"]) for f in frames} == {("embed_vectors", "emb-1")}
    vectors, last = _joined([json.dumps(frame) for frame in frames])
    direct = requests.post(
        f"{ollama.url}/api/embed",
        timeout=10,
        json={"model": PLAIN_MODEL, "input": texts, "dimensions": 1500},
    ).json()
    assert vectors == direct["embeddings"]
    assert last["prompt_eval_count"] == direct["prompt_eval_count"]
    assert ollama.stats()["requests"][0] == {
        "model": PLAIN_MODEL,
        "input": texts,
        "dimensions": 1500,
    }
    line = proc.wait_for("embed request emb-1 finished")
    assert "vectors=4 of 1500" in line and "one" not in line


def test_node_refuses_an_embed_request_it_cannot_serve(node):
    _, router, ollama, _ = node
    router.send(
        {
            "type": "embed_request",
            "request_id": "emb-2",
            "embed_params": {"model": "huge:70b", "input": ["x"]},
        }
    )
    assert router.recv() == {
        "type": "inference_error",
        "request_id": "emb-2",
        "error": "invalid_request",
    }
    # Ollama's HTTP 400 refuses the request, not the node: another node would refuse it too.
    router.send(
        {
            "type": "embed_request",
            "request_id": "emb-3",
            "embed_params": {"model": PLAIN_MODEL, "input": ["x" * 20_000], "truncate": False},
        }
    )
    assert router.recv() == {
        "type": "inference_error",
        "request_id": "emb-3",
        "error": "invalid_request",
    }
    assert ollama.stats()["rejected"] == 0  # Ollama refused it only after loading the model


@pytest.fixture
def keep_alive_node(started_scripts, ollama):
    """A registered contributor that passes the consumer's keep_alive on to Ollama."""
    yield from _registered_node(started_scripts, ollama, args=("--allow-keep-alive",))


def test_an_embed_request_ollama_refuses_is_invalid_and_its_words_are_logged_escaped(
    keep_alive_node,
):
    proc, router, ollama, _ = keep_alive_node
    router.send(
        {
            "type": "embed_request",
            "request_id": "emb-4",
            "embed_params": {"model": PLAIN_MODEL, "input": ["x"], "keep_alive": "\x1b[31mred"},
        }
    )
    assert router.recv() == {
        "type": "inference_error",
        "request_id": "emb-4",
        "error": "invalid_request",
    }
    line = proc.wait_for("embed request emb-4 failed")
    assert "HTTP 400" in line and "invalid duration" in line
    assert "\x1b" not in line and "\\x1b[31mred" in line


def test_an_embed_answer_is_read_up_to_25_bytes_a_number_of_8192_per_input():
    assert contribute.embed_answer_limit(1) == 8192 * 25 + contribute.EMBED_ANSWER_SLACK_BYTES
    assert contribute.embed_answer_limit(256) < 64 * 1024 * 1024
    widest = json.dumps(
        {
            "embeddings": [[-0.012345678901234567e-05] * 8192] * 3,
            "total_duration": 10**15,
            "prompt_eval_count": 10**6,
        }
    )
    assert len(widest) <= contribute.embed_answer_limit(3)


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
    local = [
        contribute.LocalModel(name="llama3.2:latest", size=1),
        contribute.LocalModel(name="qwen3:8b", size=2),
    ]
    assert [m.name for m in contribute.select_models(local, ["llama3.2"])] == ["llama3.2:latest"]
    with pytest.raises(contribute.StartupError, match="not a local model: nope") as info:
        contribute.select_models(local, ["qwen3:8b", "nope"])
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------- the script


def test_exits_1_with_advice_when_ollama_is_not_running():
    env = script_env(
        OLLAMA_HOST=f"127.0.0.1:{closed_port()}",
        IDLECLAW_SERVER=f"http://127.0.0.1:{closed_port()}",
    )
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


def test_exits_2_for_a_model_that_is_not_local(ollama):
    env = script_env(OLLAMA_HOST=ollama.url, IDLECLAW_SERVER="http://127.0.0.1:1")
    result = run_script("contribute.py", "--models", f"{PLAIN_MODEL},huge:70b", env=env)
    assert result.returncode == 2
    assert "not a local model: huge:70b" in result.stderr


def _registered_node(
    started_scripts: list[ScriptProcess], ollama: Emulator, args: tuple[str, ...] = (), **registered
):
    with FakeRouter() as router:
        proc = ScriptProcess(
            "contribute.py",
            "--max-concurrent",
            "1",
            *args,
            env=script_env(OLLAMA_HOST=ollama.url, IDLECLAW_SERVER=router.url),
        )
        started_scripts.append(proc)
        router.accept()
        register = router.recv()
        router.send(
            {
                "type": "registered",
                "node_id": register["node_id"],
                "heartbeat_interval": 1,
                "resume_token": "tok-1",
                **registered,
            }
        )
        proc.wait_for("registered")
        yield proc, router, ollama, register


@pytest.fixture
def node(started_scripts, ollama):
    """A contributor connected to a fake router and the emulator, registered."""
    yield from _registered_node(started_scripts, ollama)


@pytest.fixture
def slow_node(started_scripts, slow_ollama):
    """A registered contributor whose Ollama takes 10 s to answer."""
    yield from _registered_node(started_scripts, slow_ollama)


@pytest.fixture
def batching_node(started_scripts, long_ollama):
    """A registered contributor whose router offers inference_chunks, and whose Ollama answers
    300 tokens at once."""
    yield from _registered_node(started_scripts, long_ollama, features=["inference_chunks"])


def _direct_chunks(ollama: Emulator, params: dict) -> list[dict]:
    """What Ollama streams for ``params``, asked directly, reduced as a node reduces it, without
    the timings of the last chunk (they differ from run to run)."""
    with requests.post(
        f"{ollama.url}/api/chat", json={**params, "stream": True}, stream=True, timeout=20
    ) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    return [(chunk["message"], chunk["done"]) for chunk in map(contribute.build_chunk, lines)]


def _frames(router: FakeRouter, request_id: str) -> list[dict]:
    """The frames of one request, up to the one that ends it."""
    frames: list[dict] = []
    while True:
        frame = router.recv()
        assert frame["request_id"] == request_id, frame
        frames.append(frame)
        chunks = frame["chunks"] if frame["type"] == "inference_chunks" else [frame["chunk"]]
        if chunks[-1]["done"]:
            return frames


def test_node_sends_the_chunks_that_arrived_together_in_one_frame(batching_node):
    proc, router, ollama, _ = batching_node
    params = {"model": PLAIN_MODEL, "messages": [{"role": "user", "content": "a long one"}]}
    router.send({"type": "inference_request", "request_id": "long-1", "ollama_params": params})
    frames = _frames(router, "long-1")
    assert {frame["type"] for frame in frames} == {"inference_chunks"}
    chunks = [chunk for frame in frames for chunk in frame["chunks"]]
    # Every token, in order, each its own chunk, as Ollama sent them.
    assert [(chunk["message"], chunk["done"]) for chunk in chunks] == _direct_chunks(ollama, params)
    assert len(chunks) == 301
    assert len(frames) < len(chunks)
    assert all(1 <= len(frame["chunks"]) <= 256 for frame in frames)
    proc.wait_for(f"({len(chunks)} chunks in {len(frames)} frames)")


@pytest.mark.parametrize(
    "registered",
    [
        pytest.param({}, id="no-features"),
        pytest.param({"features": ["some_other_extension"]}, id="other-features"),
        pytest.param({"features": "inference_chunks"}, id="features-not-a-list"),
    ],
)
def test_node_sends_only_inference_chunk_to_a_router_without_the_feature(
    started_scripts, long_ollama, registered
):
    proc, router, ollama, _ = next(_registered_node(started_scripts, long_ollama, **registered))
    params = {"model": PLAIN_MODEL, "messages": [{"role": "user", "content": "a long one"}]}
    router.send({"type": "inference_request", "request_id": "old-1", "ollama_params": params})
    frames = _frames(router, "old-1")
    assert {frame["type"] for frame in frames} == {"inference_chunk"}
    assert [(f["chunk"]["message"], f["chunk"]["done"]) for f in frames] == _direct_chunks(
        ollama, params
    )
    proc.wait_for("(301 chunks in 301 frames)")


def _answer(router: FakeRouter, request_id: str) -> list[dict]:
    """The chunks of one request, up to the one with ``done``."""
    chunks: list[dict] = []
    while not chunks or not chunks[-1]["done"]:
        frame = router.recv()
        assert frame["type"] == "inference_chunk" and frame["request_id"] == request_id, frame
        chunks.append(frame["chunk"])
    return chunks


def _late_frames(router: FakeRouter) -> list[dict]:
    frames = []
    while not router.frames.empty():
        frame = router.frames.get()
        if frame.get("type") != "heartbeat":
            frames.append(frame)
    return frames


def test_node_registers_its_models_with_capabilities_and_details(node):
    _, router, _, register = node
    assert router.paths == ["/ws/node"]
    assert register["type"] == "register"
    uuid.UUID(register["node_id"])
    assert register["models"] == [
        {
            "name": THINKING_MODEL,
            "size": THINKING_MODEL_SIZE,
            "capabilities": ["completion", "tools", "thinking"],
            "details": {
                "format": "gguf",
                "family": "qwen3",
                "families": ["qwen3"],
                "parameter_size": "0.6B",
                "quantization_level": "Q4_K_M",
            },
            "context_length": 40960,
        },
        {
            "name": PLAIN_MODEL,
            "size": PLAIN_MODEL_SIZE,
            "capabilities": ["completion"],
            "details": {
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "135M",
                "quantization_level": "Q8_0",
            },
            "context_length": 8192,
        },
    ]
    assert register["max_concurrent"] == 1
    assert register["ollama_version"] == OLLAMA_VERSION
    assert register["protocol"] == 2
    assert register["client"] == "idleclaw-skill/0.3"
    assert register["features"] == ["embeddings"]
    assert "resume_token" not in register


def test_node_streams_whitelisted_chunks_and_logs_no_text(node):
    proc, router, ollama, _ = node
    messages = [{"role": "user", "content": "secret prompt"}]
    router.send(
        {
            "type": "inference_request",
            "request_id": "req-1",
            "ollama_params": {
                "model": THINKING_MODEL,
                "messages": messages,
                "stream": False,
                "raw": True,
                "options": {"num_gpu": 1, "seed": 7},
            },
        }
    )
    chunks = _answer(router, "req-1")
    assert ollama.stats()["requests"] == [
        {"model": THINKING_MODEL, "messages": messages, "stream": True, "options": {"seed": 7}}
    ]
    expected = ollama.answer(
        {"model": THINKING_MODEL, "messages": messages, "options": {"seed": 7}}
    )
    assert expected["message"]["thinking"] and expected["message"]["content"]
    assert "".join(c["message"]["content"] for c in chunks) == expected["message"]["content"]
    assert (
        "".join(c["message"].get("thinking", "") for c in chunks)
        == (expected["message"]["thinking"])
    )
    # Ollama's model and created_at stay on this machine.
    assert all(set(c) == {"message", "done"} for c in chunks[:-1])
    assert all(set(c["message"]) <= {"role", "content", "thinking"} for c in chunks)
    assert set(chunks[-1]) == {
        "message",
        "done",
        "done_reason",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    }
    assert chunks[-1]["done_reason"] == "stop"
    assert chunks[-1]["eval_count"] == expected["eval_count"]
    finished = proc.wait_for("request req-1 finished")
    assert f"model={THINKING_MODEL} tokens={expected['eval_count']}" in finished
    words = [
        piece.strip()
        for c in chunks
        for piece in (c["message"]["content"], c["message"].get("thinking", ""))
        if piece.strip()
    ]
    assert not any("secret" in line or any(w in line for w in words) for line in proc.lines)


def test_node_forwards_tool_calls_and_logs_ollamas_token_count(node):
    proc, router, ollama, _ = node
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    params = {
        "model": THINKING_MODEL,
        "think": False,
        "tools": [tool],
        "messages": [{"role": "user", "content": "weather in Oslo?"}],
    }
    router.send({"type": "inference_request", "request_id": "req-5", "ollama_params": params})
    chunks = _answer(router, "req-5")
    expected = ollama.answer(params)
    calls = [c["message"]["tool_calls"] for c in chunks if "tool_calls" in c["message"]]
    assert calls == [expected["message"]["tool_calls"]]
    # A tool call is no text chunk, yet Ollama counts its tokens: the log shows Ollama's count.
    finished = proc.wait_for("request req-5 finished")
    assert f"tokens={expected['eval_count']} " in finished


def test_node_refuses_a_model_it_did_not_register(node):
    _, router, ollama, _ = node
    router.send(
        {
            "type": "inference_request",
            "request_id": "req-2",
            "ollama_params": {"model": "huge:70b", "messages": []},
        }
    )
    assert router.recv() == {
        "type": "inference_error",
        "request_id": "req-2",
        "error": "invalid_request",
    }
    assert ollama.stats()["requests"] == []


def test_node_reports_invalid_request_when_ollama_refuses_the_request_with_400(node):
    proc, router, ollama, _ = node
    router.send(
        {
            "type": "inference_request",
            "request_id": "req-4",
            "ollama_params": {
                "model": PLAIN_MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "think": True,
            },
        }
    )
    assert router.recv() == {
        "type": "inference_error",
        "request_id": "req-4",
        "error": "invalid_request",
    }
    assert ollama.stats()["rejected"] == 1
    failed = proc.wait_for("request req-4 failed")
    assert "HTTP 400" in failed and "does not support thinking" in failed


def test_node_sends_heartbeats_and_ignores_unknown_frames(node):
    _, router, _, register = node
    router.send({"type": "something_new", "x": 1})
    heartbeat = router.recv(timeout=3, skip=())
    assert heartbeat == {
        "type": "heartbeat",
        "node_id": register["node_id"],
        "active_requests": 0,
        "available": True,
    }


def test_show_and_ps_answers_are_reduced_to_what_the_router_reads():
    details = contribute.show_details(
        {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama", 5, "x" * 40],
            "license": "MIT",
            "parameter_size": "3.2B",
            "quantization_level": 4,
        }
    )
    assert details == {
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "3.2B",
    }
    assert contribute.show_details("gguf") is None
    info = {
        "general.architecture": "qwen3",
        "qwen3.context_length": 40960,
        "llama.context_length": 8,
    }
    assert contribute.context_length_of(info) == 40960
    assert contribute.context_length_of({"general.architecture": "x"}) is None
    ps = {
        "models": [
            {
                "name": "mine:1b",
                "model": "mine:1b",
                "size": 5,
                "size_vram": 4,
                "expires_at": "2030-01-01T00:00:00Z",
                "digest": "d",
                "details": {},
            },
            {"name": "not-shared:1b", "size": 1},
            "junk",
        ]
    }
    assert contribute.loaded_entries(ps, {"mine:1b"}) == [
        {"name": "mine:1b", "size": 5, "size_vram": 4, "expires_at": "2030-01-01T00:00:00Z"}
    ]
    assert contribute.loaded_entries({"models": None}, {"mine:1b"}) == []


def test_a_router_that_takes_loaded_models_hears_soon_after_a_request_loaded_one(
    started_scripts, ollama
):
    unloaded = http_json(f"{ollama.url}/api/generate", {"model": PLAIN_MODEL, "keep_alive": 0})
    assert unloaded[1]["done_reason"] == "unload"
    # Heartbeats every 30 s: the report below can only be the one a request brings forward.
    node = _registered_node(
        started_scripts, ollama, features=["loaded_models"], heartbeat_interval=30
    )
    _, router, _, _ = next(node)
    try:
        first = router.recv(skip=())
        assert first["type"] == "heartbeat"  # what is loaded, as soon as registered
        assert PLAIN_MODEL not in {entry["name"] for entry in first["loaded"]}
        router.send(
            {
                "type": "inference_request",
                "request_id": "load-1",
                "ollama_params": {
                    "model": PLAIN_MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            }
        )
        _answer(router, "load-1")
        report = router.recv(timeout=3, skip=())
        assert report["type"] == "heartbeat"
        [entry] = [entry for entry in report["loaded"] if entry["name"] == PLAIN_MODEL]
        assert entry["size"] == entry["size_vram"] == PLAIN_MODEL_SIZE
        assert datetime.fromisoformat(entry["expires_at"]) > datetime.now(UTC)
    finally:
        node.close()


def test_cancel_closes_the_ollama_stream_and_nothing_more_is_sent(slow_node):
    proc, router, ollama, _ = slow_node
    params = {"model": SLOW_MODEL, "messages": [{"role": "user", "content": "go"}]}
    router.send({"type": "inference_request", "request_id": "slow-1", "ollama_params": params})
    assert router.recv()["request_id"] == "slow-1"
    # max_concurrent is 1: a second request is refused while the first runs.
    router.send({"type": "inference_request", "request_id": "slow-2", "ollama_params": params})
    refused = router.recv(skip=("heartbeat", "inference_chunk"))
    assert refused["type"] == "inference_error" and refused["request_id"] == "slow-2"
    assert ollama.stats()["chat_started"] == 1
    router.send({"type": "cancel_request", "request_id": "slow-1"})
    wait_until(
        lambda: ollama.stats()["chat_cancelled"] == 1,
        timeout=3,
        what="Ollama to see its stream closed",
    )
    proc.wait_for("request slow-1 stopped")
    time.sleep(0.3)
    # Chunks already on the wire when the cancel was sent may arrive, but no error, and
    # nothing at all once the node has stopped the request.
    late = _late_frames(router)
    assert all(f.get("request_id") == "slow-1" and f["type"] == "inference_chunk" for f in late)
    time.sleep(0.5)
    assert _late_frames(router) == []
    # The slot is free again.
    router.send(
        {
            "type": "inference_request",
            "request_id": "slow-3",
            "ollama_params": {**params, "options": {"num_predict": 2}},
        }
    )
    assert _answer(router, "slow-3")[-1]["done_reason"] == "length"
    stats = ollama.stats()
    assert (stats["chat_started"], stats["chat_completed"]) == (2, 1)


@pytest.fixture
def loading_node(started_scripts):
    """A registered contributor whose Ollama spends 1 s loading the model for each request."""
    ollama = Emulator(
        "--load-delay", "1", "--token-delay", "0.05", "--model", f"{SLOW_MODEL},caps=completion"
    )
    try:
        yield from _registered_node(started_scripts, ollama)
    finally:
        ollama.proc.stop()


def test_cancel_while_ollama_loads_the_model_frees_the_slot_at_once(loading_node):
    proc, router, ollama, _ = loading_node
    params = {"model": SLOW_MODEL, "messages": [{"role": "user", "content": "go"}]}
    router.send({"type": "inference_request", "request_id": "load-1", "ollama_params": params})
    wait_until(
        lambda: ollama.stats()["chat_started"] == 1, timeout=3, what="the request to reach Ollama"
    )
    router.send({"type": "cancel_request", "request_id": "load-1"})
    proc.wait_for("request load-1 cancelled")
    # Ollama has sent nothing yet, but the router counts the slot as free: so does the node.
    router.send(
        {
            "type": "inference_request",
            "request_id": "load-2",
            "ollama_params": {**params, "options": {"num_predict": 2}},
        }
    )
    assert _answer(router, "load-2")[-1]["done_reason"] == "length"
    wait_until(
        lambda: ollama.stats()["chat_cancelled"] == 1,
        timeout=3,
        what="Ollama to see the cancelled stream closed",
    )
    assert _late_frames(router) == []


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
def test_a_first_signal_refuses_new_requests_and_a_second_stops_at_once(slow_node, sig):
    proc, router, ollama, _ = slow_node
    params = {"model": SLOW_MODEL, "messages": [{"role": "user", "content": "go"}]}
    router.send({"type": "inference_request", "request_id": "slow-9", "ollama_params": params})
    router.recv()
    proc.proc.send_signal(sig)
    proc.wait_for("stopping: finishing 1 request in flight first (Ctrl+C again stops at once)")
    # This router does not take drain: what it still sends is refused, and it tries elsewhere.
    router.send({"type": "inference_request", "request_id": "late-1", "ollama_params": params})
    assert router.recv(skip=("heartbeat", "inference_chunk")) == {
        "type": "inference_error",
        "request_id": "late-1",
        "error": "node paused: not taking requests",
    }
    assert ollama.stats()["chat_started"] == 1
    code, took = proc.stop(sig)
    assert code == 0
    assert took < 2.5
    wait_until(
        lambda: ollama.stats()["chat_cancelled"] == 1,
        timeout=2,
        what="Ollama to see its stream closed",
    )
    proc.wait_for("stopping at once: 1 request in flight cancelled", timeout=2)
    proc.wait_for("stopped; goodbye", timeout=2)
    assert not any("Traceback" in line for line in proc.lines)


def test_permanent_refusal_exits_1_with_the_reason(started_scripts, ollama):
    with FakeRouter() as router:
        proc = ScriptProcess(
            "contribute.py", env=script_env(OLLAMA_HOST=ollama.url, IDLECLAW_SERVER=router.url)
        )
        started_scripts.append(proc)
        router.accept()
        router.recv()
        router.close(1008, "banned")
        assert proc.proc.wait(timeout=5) == 1
        proc.wait_for("the router refused this node: banned")


@pytest.mark.e2e
def test_batched_answer_reaches_the_consumer_through_the_real_router_token_by_token(
    router, long_ollama, started_scripts
):
    proc = ScriptProcess(
        "contribute.py", env=script_env(OLLAMA_HOST=long_ollama.url, IDLECLAW_SERVER=router.url)
    )
    started_scripts.append(proc)
    proc.wait_for("registered")
    messages = [{"role": "user", "content": "tell me everything"}]
    expected = [
        message["content"]
        for message, done in _direct_chunks(
            long_ollama, {"model": PLAIN_MODEL, "messages": messages}
        )
        if message["content"]
    ]
    assert len(expected) == 300
    with requests.post(
        f"{router.url}/api/chat",
        json={"model": PLAIN_MODEL, "messages": messages},
        stream=True,
        timeout=30,
    ) as response:
        assert response.status_code == 200, router.output
        events = [
            line[len(b"data: ") :] for line in response.iter_lines() if line.startswith(b"data: ")
        ]
    assert events[-1] == b"[DONE]"
    deltas = [json.loads(event)["choices"][0] for event in events[:-1]]
    assert [d["delta"]["content"] for d in deltas if d["delta"].get("content")] == expected
    assert deltas[-1]["finish_reason"] == "stop"
    finished = proc.wait_for("finished")
    chunks, frames = map(int, re.search(r"\((\d+) chunks in (\d+) frames\)", finished).groups())
    assert chunks == 301
    assert frames < chunks, finished


def _read_answer(url: str, *, name: str):
    """A streamed answer from the emulator at ``url``, read by a contributor's line reader."""
    response = requests.post(
        f"{url}/api/chat",
        stream=True,
        timeout=10,
        json={"model": "m:1b", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    return response, contribute._LineReader(response, name=name).batches()


def test_a_node_reads_at_most_a_bounded_number_of_lines_ahead_of_the_router(monkeypatch):
    from tests import procs

    monkeypatch.setattr(contribute, "MAX_WAITING_LINES", 50)
    read = []
    real_iter_lines = contribute.config.iter_lines

    def counting_iter_lines(response):
        for line in real_iter_lines(response):
            read.append(line)
            yield line

    monkeypatch.setattr(contribute.config, "iter_lines", counting_iter_lines)
    proc, url = procs.start_emulator("--reply-tokens", "400", "--model", "m:1b")
    try:
        response, batches = _read_answer(url, name="test-reader")
        first = next(batches)
        time.sleep(0.5)  # the router is slow: nothing is taken for a while
        # The reader stopped reading Ollama: what it read is the first batch, a full queue and
        # the one line it holds while it waits.
        assert len(read) <= len(first) + 50 + 1 < 400
        lines = first + [line for batch in batches for line in batch]
        # Nothing was lost while the reader waited.
        assert json.loads(lines[-1])["done"] is True
        assert sum(1 for line in lines if json.loads(line)["message"]["content"]) == 400
    finally:
        proc.stop()


def test_a_request_that_stops_early_releases_its_reader(monkeypatch):
    from tests import procs

    monkeypatch.setattr(contribute, "MAX_WAITING_LINES", 5)
    proc, url = procs.start_emulator("--reply-tokens", "400", "--model", "m:1b")
    try:
        response, batches = _read_answer(url, name="test-reader-stop")
        next(batches)
        batches.close()  # the request ended (cancelled, or the router went away)
        wait_until(
            lambda: not any(t.name == "test-reader-stop" for t in threading.enumerate()), timeout=5
        )
        response.close()
    finally:
        proc.stop()


def test_the_routers_registration_warnings_are_shown_escaped(started_scripts, ollama):
    with FakeRouter() as router:
        proc = ScriptProcess(
            "contribute.py",
            "--max-concurrent",
            "1",
            env=script_env(OLLAMA_HOST=ollama.url, IDLECLAW_SERVER=router.url),
        )
        started_scripts.append(proc)
        router.accept()
        register = router.recv()
        router.send(
            {
                "type": "registered",
                "node_id": register["node_id"],
                "heartbeat_interval": 1,
                "warnings": ["model 'bad name\x1b]0;title\x07' dropped"],
            }
        )
        line = proc.wait_for("the router says")
        assert "model 'bad name\\x1b]0;title\\x07' dropped" in line
        assert "\x1b" not in line and "\x07" not in line


# --------------------------------------------------------------------------- routers without
# the drain and models_update extensions (docs/node-protocol-extensions.md)


def test_a_paused_node_leaves_a_router_without_drain_and_returns_when_the_program_ends(
    started_scripts, ollama
):
    game = "idleclaw-test-game"
    dummy = subprocess.Popen(["bash", "-c", f"exec -a {game} sleep 30"])
    try:
        with FakeRouter() as router:
            proc = ScriptProcess(
                "contribute.py",
                "--pause-while",
                f"other-game,{game}",
                "--recheck-seconds",
                "0.3",
                env=script_env(OLLAMA_HOST=ollama.url, IDLECLAW_SERVER=router.url),
            )
            started_scripts.append(proc)
            proc.wait_for(f"paused: {game} is running")
            router.accept()
            register = router.recv()
            assert register["draining"] is True  # for a router that knows the extension
            router.send({"type": "registered", "node_id": register["node_id"]})
            # This one does not (no "drain" in features): the node leaves it while paused.
            assert router.recv(skip=("heartbeat",))["type"] == "_closed"
            proc.wait_for("paused; disconnected from the router until serving again")
            assert router.connections.empty()
            dummy.kill()
            dummy.wait()
            router.accept()
            again = router.recv()
            assert again["node_id"] == register["node_id"]
            assert "draining" not in again
            proc.wait_for(f"resumed (was paused: {game} is running)")
    finally:
        dummy.kill()
        dummy.wait()


def test_warmup_loads_each_model_and_an_old_router_hears_of_new_models_by_a_new_register(
    started_scripts,
):
    ollama = Emulator(
        "--model", f"{PLAIN_MODEL},size={PLAIN_MODEL_SIZE}", "--model", "gone:1b,size=5"
    )
    try:
        with FakeRouter() as router:
            proc = ScriptProcess(
                "contribute.py",
                "--warmup",
                "--keep-alive",
                "3m",
                "--recheck-seconds",
                "0.3",
                env=script_env(OLLAMA_HOST=ollama.url, IDLECLAW_SERVER=router.url),
            )
            started_scripts.append(proc)
            router.accept()
            register = router.recv()
            # Both models were loaded before the node registered, with the node's keep_alive.
            assert ollama.stats()["requests"] == [
                {"model": PLAIN_MODEL, "stream": False, "keep_alive": "3m"},
                {"model": "gone:1b", "stream": False, "keep_alive": "3m"},
            ]
            assert [m["name"] for m in register["models"]] == [PLAIN_MODEL, "gone:1b"]
            router.send({"type": "registered", "node_id": register["node_id"], "resume_token": "t"})
            proc.wait_for("registered")
            status, _ = http_json(
                f"{ollama.url}/_emulator/models",
                {"models": [f"{PLAIN_MODEL},size={PLAIN_MODEL_SIZE}", "new:7b,size=7"]},
            )
            assert status == 200
            # No models_update in features: the node registers again, in the same name. (The
            # fake router reads each connection in a thread of its own: the old connection's
            # close and the new one's register may be queued in either order.)
            first, second = router.recv(skip=("heartbeat",)), router.recv(skip=("heartbeat",))
            assert {first["type"], second["type"]} == {"_closed", "register"}
            router.accept()
            again = first if first["type"] == "register" else second
            assert (again["node_id"], again["resume_token"]) == (register["node_id"], "t")
            assert [m["name"] for m in again["models"]] == [PLAIN_MODEL, "new:7b"]
            proc.wait_for(
                f"Ollama's models changed: sharing 2 models: {PLAIN_MODEL}, new:7b "
                "(added: new:7b; removed: gone:1b)"
            )
    finally:
        ollama.proc.stop()


def test_while_ollama_is_gone_the_node_drains_and_it_undrains_when_ollama_is_back(
    started_scripts,
):
    spec = f"{PLAIN_MODEL},size={PLAIN_MODEL_SIZE}"
    ollama = Emulator("--model", spec)
    port = ollama.url.rsplit(":", 1)[1]
    try:
        with FakeRouter() as router:
            proc = ScriptProcess(
                "contribute.py",
                "--recheck-seconds",
                "0.3",
                env=script_env(OLLAMA_HOST=ollama.url, IDLECLAW_SERVER=router.url),
            )
            started_scripts.append(proc)
            router.accept()
            register = router.recv()
            assert "draining" not in register
            router.send(
                {"type": "registered", "node_id": register["node_id"], "features": ["drain"]}
            )
            proc.wait_for("registered")
            ollama.proc.stop()
            assert router.recv() == {"type": "drain"}
            proc.wait_for(f"paused: cannot reach Ollama at {ollama.url} (connection refused)")
            ollama = Emulator("--port", port, "--model", spec)  # the same address
            assert router.recv() == {"type": "undrain"}
            proc.wait_for("resumed (was paused: cannot reach Ollama")
    finally:
        ollama.proc.stop()
