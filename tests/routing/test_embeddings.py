"""Embeddings through the real ASGI application: the consumer APIs (``/v1/embeddings``,
``/ollama/api/embed``, ``/ollama/api/embeddings``) with scripted nodes speaking the
``embeddings`` extension (docs/node-protocol-extensions.md), honest and hostile."""

from __future__ import annotations

import asyncio
import base64
import json
from array import array
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from nodes.models import NodeSession
from nodes.protocol import FrameType
from tests.routing.test_views import HttpClient, inflight_count
from tests.scripted_node import ScriptedNode

pytestmark = [pytest.mark.django_db(transaction=True)]

EMBEDDER = "nomic-embed-text:latest"
EMBED_OFFER = {"name": EMBEDDER, "size": 274302450, "capabilities": ["embedding"]}
CHAT_OFFER = {"name": "llama3.2:3b", "size": 2019393189, "capabilities": ["completion", "tools"]}


async def embed_node(node_id: str = "embedder", ip: str = "10.0.0.1", **overrides: Any):
    node = ScriptedNode(ip=ip)
    overrides.setdefault("features", ["embeddings"])
    overrides.setdefault("models", [EMBED_OFFER])
    reply = await node.register(node_id=node_id, **overrides)
    return node, reply


async def ask(path: str, body: Any = None, method: str = "POST") -> HttpClient:
    """Send a request without waiting for its answer: the node has to act first."""
    client = HttpClient(method, path, body)
    await client.app.send_input({"type": "http.request", "body": client.body})
    return client


async def answer_of(client: HttpClient) -> tuple[int, dict[str, str], Any]:
    start = await client.app.receive_output(5)
    assert start["type"] == "http.response.start"
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(await client.read_all())


async def vectors(node: ScriptedNode, request_id: str, embeddings: Any, **extra: Any) -> None:
    await node.send(
        {
            "type": FrameType.EMBED_VECTORS,
            "request_id": request_id,
            "embeddings": embeddings,
            **extra,
        }
    )


async def session(node_id: str) -> NodeSession:
    return await sync_to_async(NodeSession.objects.get)(node_id=node_id)


# --- registration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "declared, stored",
    [
        (["embeddings"], ["embeddings"]),
        (["embeddings", "teleport", 7, None], ["embeddings"]),
        ("embeddings", []),  # not a list
        ([], []),
    ],
)
async def test_a_node_declares_embeddings_in_register(channel_layer, declared, stored):
    node, reply = await embed_node(features=declared)
    assert "embeddings" in reply["features"]  # the router offers it to every node
    assert (await session("embedder")).features == stored
    await node.disconnect()


# --- the answer on each front end --------------------------------------------------------------


async def test_openai_batch_put_together_from_frames_and_a_split_vector(channel_layer):
    node, _ = await embed_node()
    client = await ask(
        "/v1/embeddings",
        {
            "model": EMBEDDER,
            "input": ["a", "b", "c"],
            "encoding_format": "float",
            "user": "ignored",
        },
    )
    request = await node.recv()
    assert request["type"] == FrameType.EMBED_REQUEST
    assert request["embed_params"] == {"model": EMBEDDER, "input": ["a", "b", "c"]}
    rid = request["request_id"]
    # The second vector is split over the two frames; its second part says ``continued``.
    await vectors(node, rid, [[0.5, -0.5, 0], [0.25, 1e-05]])
    await vectors(
        node,
        rid,
        [[-3], [1, 2, 3]],
        continued=True,
        done=True,
        prompt_eval_count=7,
        total_duration=99,
    )
    status, headers, body = await answer_of(client)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert body == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.5, -0.5, 0.0]},
            {"object": "embedding", "index": 1, "embedding": [0.25, 1e-05, -3.0]},
            {"object": "embedding", "index": 2, "embedding": [1.0, 2.0, 3.0]},
        ],
        "model": EMBEDDER,
        "usage": {"prompt_tokens": 7, "total_tokens": 7},
    }
    assert await inflight_count() == 0
    assert (await session("embedder")).completed == 1
    await node.disconnect()


async def test_a_nodes_prompt_count_is_believed_only_as_far_as_the_input_explains(
    channel_layer,
):
    """A node must not inflate the usage a consumer (or a bill computed from it) sees."""
    node, _ = await embed_node()
    client = await ask("/v1/embeddings", {"model": EMBEDDER, "input": ["ab"]})
    request = await node.recv()
    await vectors(node, request["request_id"], [[1.0]], done=True, prompt_eval_count=10**15)
    status, _, body = await answer_of(client)
    assert status == 200
    assert 0 < body["usage"]["prompt_tokens"] <= 8192 + 4 * len('["ab"]')
    await node.disconnect()


async def test_openai_base64_is_little_endian_float32(channel_layer):
    node, _ = await embed_node()
    client = await ask(
        "/v1/embeddings",
        {"model": EMBEDDER, "input": "one", "encoding_format": "base64", "dimensions": 3},
    )
    request = await node.recv()
    assert request["embed_params"]["dimensions"] == 3
    await vectors(node, request["request_id"], [[0.1, -2.5, 3]], done=True)
    status, _, body = await answer_of(client)
    assert status == 200
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert raw == array("f", [0.1, -2.5, 3.0]).tobytes()  # x86: little-endian
    await node.disconnect()


async def test_ollama_embed_and_the_older_embeddings(channel_layer):
    node, _ = await embed_node()
    client = await ask(
        "/ollama/api/embed",
        {
            "model": EMBEDDER,
            "input": ["x", "y"],
            "truncate": False,
            "dimensions": 2,
            "keep_alive": "1m",
            "options": {"num_ctx": 512},
        },
    )
    request = await node.recv()
    assert request["embed_params"] == {
        "model": EMBEDDER,
        "input": ["x", "y"],
        "truncate": False,
        "dimensions": 2,
        "keep_alive": "1m",
        "options": {"num_ctx": 512},
    }
    await vectors(
        node,
        request["request_id"],
        [[1, 0], [0, 1]],
        done=True,
        total_duration=5000,
        load_duration=10,
        prompt_eval_count=2,
    )
    status, _, body = await answer_of(client)
    assert status == 200
    assert body == {
        "model": EMBEDDER,
        "embeddings": [[1.0, 0.0], [0.0, 1.0]],
        "total_duration": 5000,
        "load_duration": 10,
        "prompt_eval_count": 2,
    }

    client = await ask("/ollama/api/embeddings", {"model": EMBEDDER, "prompt": "z"})
    request = await node.recv()
    assert request["embed_params"] == {"model": EMBEDDER, "input": ["z"]}
    await vectors(node, request["request_id"], [[0.6, 0.8]], done=True)
    status, _, body = await answer_of(client)
    assert (status, body) == (200, {"embedding": [0.6, 0.8]})
    await node.disconnect()


async def test_ollama_empty_input_only_loads_like_ollama(channel_layer):
    node, _ = await embed_node()
    for path, body, expected in [
        ("/ollama/api/embed", {"model": EMBEDDER}, {"model": EMBEDDER, "embeddings": []}),
        (
            "/ollama/api/embed",
            {"model": EMBEDDER, "input": []},
            {"model": EMBEDDER, "embeddings": []},
        ),
        ("/ollama/api/embeddings", {"model": EMBEDDER, "prompt": ""}, {"embedding": []}),
        ("/ollama/api/embed", {"model": "nobody:1b"}, {"error": "model 'nobody:1b' not found"}),
    ]:
        status, _, answer = await answer_of(await ask(path, body))
        assert answer == expected
        assert status == (404 if "error" in expected else 200)
    assert await node.nothing_sent()
    await node.disconnect()


# --- who gets a request ------------------------------------------------------------------------


async def test_a_node_that_did_not_declare_embeddings_never_gets_one(channel_layer):
    node, _ = await embed_node(features=None)  # a base-protocol node serving the same model
    status, headers, body = await answer_of(
        await ask("/v1/embeddings", {"model": EMBEDDER, "input": "x"})
    )
    assert status == 404
    assert "retry-after" not in headers
    assert body == {
        "error": {
            "message": f"The model '{EMBEDDER}' is not served by any node right now",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    status, _, body = await answer_of(
        await ask("/ollama/api/embed", {"model": EMBEDDER, "input": "x"})
    )
    assert (status, body) == (404, {"error": f"model '{EMBEDDER}' not found"})
    assert await node.nothing_sent()
    await node.disconnect()


async def test_a_full_queue_is_a_503_with_retry_after(channel_layer, settings):
    settings.IDLECLAW_MAX_QUEUE = 0
    node, _ = await embed_node(max_concurrent=1)
    first = await ask("/v1/embeddings", {"model": EMBEDDER, "input": "first"})
    rid = (await node.recv())["request_id"]
    status, headers, body = await answer_of(
        await ask("/v1/embeddings", {"model": EMBEDDER, "input": "second"})
    )
    assert status == 503
    assert int(headers["retry-after"]) > 0
    assert body["error"]["code"] == "model_unavailable"
    status, headers, body = await answer_of(
        await ask("/ollama/api/embed", {"model": EMBEDDER, "input": "third"})
    )
    assert status == 503 and "retry-after" in headers
    await vectors(node, rid, [[1.0]], done=True)
    assert (await answer_of(first))[0] == 200
    await node.disconnect()


async def test_consumer_hanging_up_cancels_the_node_and_frees_the_slot(channel_layer):
    node, _ = await embed_node(max_concurrent=1)
    client = await ask("/v1/embeddings", {"model": EMBEDDER, "input": "x"})
    rid = (await node.recv())["request_id"]
    assert await inflight_count() == 1
    await client.hang_up()
    assert await node.recv() == {"type": "cancel_request", "request_id": rid}
    assert await inflight_count() == 0
    await node.disconnect()


# --- consumer input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"model": EMBEDDER, "input": [1, 2, 3]}, "check_embedding_ctx_length=False"),
        ({"model": EMBEDDER, "input": [[1, 2], [3]]}, "check_embedding_ctx_length=False"),
        ({"model": EMBEDDER, "input": ""}, "empty string"),
        ({"model": EMBEDDER, "input": []}, "non-empty string or array"),
        ({"model": EMBEDDER, "input": ["a", ""]}, "input[1]: an empty string"),
        ({"model": EMBEDDER, "input": ["a"] * 257}, "at most 256 inputs"),
        ({"model": EMBEDDER, "input": ["a" * 50_000, "b" * 40_001]}, "at most 90000 characters"),
        # 102,000 bytes of UTF-8 in 34,000 characters: within the characters, not the frame.
        ({"model": EMBEDDER, "input": "界" * 34_000}, "bytes once encoded"),
        ({"model": EMBEDDER, "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": EMBEDDER, "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": EMBEDDER, "input": "x", "dimensions": True}, "dimensions"),
        ({"input": "x"}, "model"),
    ],
)
async def test_bad_openai_requests_get_a_400_naming_the_problem(channel_layer, body, fragment):
    status, _, answer = await answer_of(await ask("/v1/embeddings", body))
    assert status == 400
    assert fragment in answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"


async def test_the_limits_are_the_operators(channel_layer, settings):
    settings.IDLECLAW_EMBED_MAX_INPUTS = 2
    settings.IDLECLAW_EMBED_MAX_CHARS = 10
    status, _, answer = await answer_of(
        await ask("/ollama/api/embed", {"model": EMBEDDER, "input": ["a", "b", "c"]})
    )
    assert (status, answer) == (
        400,
        {"error": "input: at most 2 inputs in one request; send several"},
    )
    status, _, answer = await answer_of(
        await ask("/ollama/api/embeddings", {"model": EMBEDDER, "prompt": "x" * 11})
    )
    assert status == 400 and "at most 10 characters" in answer["error"]


@pytest.mark.parametrize(
    "body, error",
    [
        ({"model": EMBEDDER, "input": 5}, "invalid input type"),
        ({"model": EMBEDDER, "input": ["a", 5]}, "invalid input type"),
        ({"model": EMBEDDER, "input": "a", "truncate": "yes"}, "truncate: must be true or false"),
    ],
)
async def test_bad_ollama_requests_get_a_400(channel_layer, body, error):
    status, _, answer = await answer_of(await ask("/ollama/api/embed", body))
    assert (status, answer) == (400, {"error": error})


# --- hostile nodes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([{"embeddings": [[1, 2, 3]], "done": True}], id="longer-than-dimensions"),
        pytest.param([{"embeddings": [[1, 2], [1]], "done": True}], id="mismatched-lengths"),
        pytest.param([{"embeddings": [[1], [2], [3]], "done": True}], id="too-many-vectors"),
        pytest.param([{"embeddings": [[1]], "done": True}], id="too-few-vectors"),
        pytest.param(
            [{"embeddings": [[1, 2]]}, {"embeddings": [[3]], "continued": True}],
            id="continued-past-the-length",
        ),
        pytest.param([{"embeddings": [[1]], "continued": True}], id="continued-from-nothing"),
        pytest.param([{"embeddings": "0.1,0.2", "done": True}], id="not-a-list"),
        pytest.param([{"embeddings": [["0.1", "0.2"], [1, 2]], "done": True}], id="strings"),
        pytest.param([{"embeddings": [[True, False], [1, 2]], "done": True}], id="booleans"),
        pytest.param([{"embeddings": [[[1], [2]], [1, 2]], "done": True}], id="nested"),
        pytest.param([{"embeddings": [[], []], "done": True}], id="empty-vectors"),
        pytest.param([{"embeddings": [[1, 2], [1, 2]], "done": "yes"}], id="done-not-bool"),
        pytest.param([{"embeddings": [[10**400, 1], [1, 2]], "done": True}], id="huge-integer"),
        # Finite as a double, an infinity as the float32 clients decode it into.
        pytest.param([{"embeddings": [[1e300, 1.0], [1.0, 2.0]], "done": True}], id="float32-inf"),
        pytest.param([{"embeddings": [[0.5, -1e39], [1.0, 2.0]], "done": True}], id="float32-neg"),
        pytest.param([{"embeddings": [[10**39, 1], [1, 2]], "done": True}], id="int-over-f32"),
    ],
)
async def test_invalid_vectors_are_a_node_error(channel_layer, frames):
    node, _ = await embed_node()
    client = await ask("/v1/embeddings", {"model": EMBEDDER, "input": ["a", "b"], "dimensions": 2})
    rid = (await node.recv())["request_id"]
    for frame in frames:
        await vectors(node, rid, **frame)
    status, _, body = await answer_of(client)
    assert status == 502
    assert body["error"] == {
        "message": "the node sent invalid embeddings",
        "type": "server_error",
        "param": None,
        "code": "bad_embeddings",
    }
    assert await node.recv() == {"type": "cancel_request", "request_id": rid}
    assert (await session("embedder")).failed == 1
    assert await inflight_count() == 0
    # The node is still connected and gets the next request.
    await ask("/v1/embeddings", {"model": EMBEDDER, "input": "again"})
    assert (await node.recv())["type"] == FrameType.EMBED_REQUEST
    await node.disconnect()


async def test_a_vector_longer_than_any_allowed_is_cut_off_at_once(channel_layer):
    node, _ = await embed_node()
    client = await ask("/v1/embeddings", {"model": EMBEDDER, "input": "a"})
    rid = (await node.recv())["request_id"]
    await vectors(node, rid, [[0] * 8000])
    await vectors(node, rid, [[0] * 193], continued=True)  # 8193 numbers: one too many
    status, _, body = await answer_of(client)
    assert status == 502 and body["error"]["code"] == "bad_embeddings"
    await node.disconnect()


async def test_nan_is_not_json_and_closes_the_node(channel_layer):
    node, _ = await embed_node()
    client = await ask("/ollama/api/embed", {"model": EMBEDDER, "input": "a"})
    rid = (await node.recv())["request_id"]
    # Python's json writes NaN when asked; a strict peer never would.
    frame = json.dumps(
        {"type": "embed_vectors", "request_id": rid, "embeddings": [[float("nan")]], "done": True}
    )
    assert "NaN" in frame
    await node.communicator.send_to(text_data=frame)
    assert await node.closed() == (1008, "invalid frame")
    await node.disconnect()  # the node's side of the close
    status, _, body = await answer_of(client)
    assert (status, body) == (502, {"error": "the node serving this request disconnected"})
    assert await inflight_count() == 0


async def test_vectors_for_requests_never_sent_are_strikes(channel_layer, settings):
    settings.IDLECLAW_NODE_MAX_STRIKES = 2
    node, _ = await embed_node()
    for _ in range(3):
        await vectors(node, "never-sent", [[1.0]], done=True)
    assert await node.closed() == (1008, "too many frames for unknown requests")
    await node.disconnect()


async def test_a_node_that_never_answers_times_out_and_is_cancelled(channel_layer, settings):
    settings.IDLECLAW_RESPONSE_TIMEOUT = 0.3
    node, _ = await embed_node()
    client = await ask("/v1/embeddings", {"model": EMBEDDER, "input": "a"})
    rid = (await node.recv())["request_id"]
    status, _, body = await answer_of(client)
    assert (status, body["error"]["code"]) == (502, "timeout")
    assert await node.recv() == {"type": "cancel_request", "request_id": rid}
    assert (await session("embedder")).timed_out == 1
    await node.disconnect()


async def test_chat_chunks_for_an_embedding_request_fail_it(channel_layer):
    node, _ = await embed_node()
    client = await ask("/v1/embeddings", {"model": EMBEDDER, "input": "a"})
    rid = (await node.recv())["request_id"]
    await node.chunk(rid, "not a vector", done=True)
    status, _, _ = await answer_of(client)
    assert status == 502
    await node.disconnect()


async def test_vectors_for_a_chat_request_fail_it(channel_layer):
    node, _ = await embed_node(models=[CHAT_OFFER])
    client = await ask(
        "/api/chat", {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "hi"}]}
    )
    rid = (await node.recv())["request_id"]
    await vectors(node, rid, [[1.0]], done=True)
    assert await node.recv() == {"type": "cancel_request", "request_id": rid}
    start = await client.app.receive_output(5)
    assert start["status"] == 200
    assert b"[Error: the node's model server failed]" in await client.read_all()
    await node.disconnect()


async def test_a_bad_node_fails_over_to_a_good_one(channel_layer):
    first, _ = await embed_node("node-a", ip="10.0.0.1")
    second, _ = await embed_node("node-b", ip="10.0.0.2")
    client = await ask("/v1/embeddings", {"model": EMBEDDER, "input": ["a", "b"]})
    receive = {asyncio.ensure_future(n.recv()): n for n in (first, second)}
    done, pending = await asyncio.wait(receive, return_when=asyncio.FIRST_COMPLETED)
    [task] = done
    bad = receive[task]
    good = second if bad is first else first
    for other in pending:
        other.cancel()
    await vectors(bad, task.result()["request_id"], [[1, 2], [1, 2, 3]], done=True)
    assert (await bad.recv())["type"] == "cancel_request"
    retry = await good.recv()
    await vectors(good, retry["request_id"], [[1, 0], [0, 1]], done=True)
    status, _, body = await answer_of(client)
    assert status == 200
    assert [item["embedding"] for item in body["data"]] == [[1.0, 0.0], [0.0, 1.0]]
    bad_id = "node-a" if bad is first else "node-b"
    assert (await session(bad_id)).failed == 1
    for node in (first, second):
        await node.disconnect()


# --- model lists -------------------------------------------------------------------------------


async def test_model_lists_show_embedding_models_with_their_capability(channel_layer):
    embedder, _ = await embed_node()
    chatter = ScriptedNode(ip="10.0.0.3")
    await chatter.register(node_id="chatter", models=[CHAT_OFFER])
    status, _, body = await answer_of(await ask("/v1/models", method="GET"))
    caps = {model["id"]: model["capabilities"] for model in body["data"]}
    assert caps == {"llama3.2:3b": ["completion", "tools"], EMBEDDER: ["embedding"]}
    _, _, body = await answer_of(await ask("/ollama/api/tags", method="GET"))
    assert {m["name"]: m["capabilities"] for m in body["models"]} == caps
    _, _, body = await answer_of(await ask("/ollama/api/show", {"model": EMBEDDER}))
    assert body["capabilities"] == ["embedding"]
    for node in (embedder, chatter):
        await node.disconnect()


async def test_an_embedding_model_named_without_its_tag_is_its_latest(channel_layer):
    node, _ = await embed_node()
    assert EMBEDDER.endswith(":latest")
    client = await ask("/ollama/api/embed", {"model": EMBEDDER.split(":")[0], "input": "hi"})
    request = await node.recv()
    assert request["embed_params"]["model"] == EMBEDDER
    await vectors(node, request["request_id"], [[0.5]], done=True)
    status, _, body = await answer_of(client)
    assert status == 200 and body["embeddings"] == [[0.5]]
    await node.disconnect()
