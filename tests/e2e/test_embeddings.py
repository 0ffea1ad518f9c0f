"""Embeddings through the network as real clients meet them: the official ``openai`` and
``ollama`` clients and LangChain's ``OpenAIEmbeddings`` and ``OllamaEmbeddings``, against a live
router, a real contribute.py and the emulator's ``/api/embed``."""

from __future__ import annotations

import base64
import contextlib
import time
from array import array

import ollama
import openai
import pytest
import requests

from tests import procs
from tests.conftest import ROOMY_ENV

pytestmark = pytest.mark.e2e

EMBEDDER = "nomic-embed-text:latest"  # 768 numbers a vector
WIDE = "wide-embed:latest"  # 8192 numbers: more than one frame's worth
TEXTS = [
    f"document number {i} about {topic}"
    for i, topic in enumerate(["cats", "dogs", "rivers", "stars"] * 4)
]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """One router, one emulator serving embedding models and one contributor."""
    db = tmp_path_factory.mktemp("embeddings") / "router.sqlite3"
    router, router_url = procs.start_router(db, ROOMY_ENV)
    emulator, emulator_url = procs.start_emulator(
        "--embedding-models",
        "--model",
        "llama3.2:3b",
        "--model",
        f"{WIDE},size=1000,caps=embedding,dims=8192",
    )
    node = procs.start_contributor(router_url, emulator_url)
    try:
        node.wait_for_line("registered")
        procs.wait_until(
            lambda: (
                EMBEDDER in requests.get(f"{router_url}/api/models", timeout=5).json()["models"]
            ),
            what="the node's models",
        )
        yield router_url, emulator_url
    finally:
        node.stop()
        emulator.stop()
        router.stop()




@pytest.fixture
def direct(network):
    """The emulator itself through the official client: what Ollama answers without us."""
    with contextlib.closing(ollama.Client(host=network[1])) as client:
        yield client


def float32(vector):
    return array("f", vector).tolist()


def test_openai_batch_and_single_match_ollama(oai, direct):
    # The SDK asks for base64 unless told otherwise, and decodes it to float32 itself.
    batch = oai.embeddings.create(model=EMBEDDER, input=TEXTS)
    single = oai.embeddings.create(model=EMBEDDER, input=TEXTS[5])
    expected = direct.embed(model=EMBEDDER, input=TEXTS)
    assert [item.index for item in batch.data] == list(range(16))
    assert [item.embedding for item in batch.data] == [float32(v) for v in expected.embeddings]
    assert single.data[0].embedding == float32(expected.embeddings[5])
    assert batch.model == EMBEDDER
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == expected.prompt_eval_count


def test_openai_float_base64_and_dimensions(oai, direct):
    plain = oai.embeddings.create(model=EMBEDDER, input=["a", "b"], encoding_format="float")
    assert [item.embedding for item in plain.data] == list(
        map(list, direct.embed(model=EMBEDDER, input=["a", "b"]).embeddings)
    )
    packed = oai.embeddings.create(model=EMBEDDER, input="a", encoding_format="base64")
    decoded = array("f", base64.b64decode(packed.data[0].embedding)).tolist()
    assert decoded == float32(plain.data[0].embedding)
    short = oai.embeddings.create(
        model=EMBEDDER, input="a", dimensions=256, encoding_format="float"
    )
    assert short.data[0].embedding == list(
        direct.embed(model=EMBEDDER, input="a", dimensions=256).embeddings[0]
    )


def test_ollama_embed_and_embeddings_match_ollama(olc, direct):
    through = olc.embed(model=EMBEDDER, input=TEXTS[:3], truncate=True)
    expected = direct.embed(model=EMBEDDER, input=TEXTS[:3], truncate=True)
    assert through.embeddings == expected.embeddings
    assert through.prompt_eval_count == expected.prompt_eval_count
    assert through.total_duration > 0
    older = olc.embeddings(model=EMBEDDER, prompt="a dog")
    assert older.embedding == direct.embed(model=EMBEDDER, input="a dog").embeddings[0]


def test_vectors_too_wide_for_one_frame_arrive_whole(olc, direct):
    through = olc.embed(model=WIDE, input=["x", "y", "z"])
    assert [len(v) for v in through.embeddings] == [8192] * 3
    assert through.embeddings == direct.embed(model=WIDE, input=["x", "y", "z"]).embeddings


def test_langchain_ollama_and_openai_embeddings(network, direct):
    # Imported here: LangChain takes a second to import, which collection should not pay.
    from langchain_ollama import OllamaEmbeddings
    from langchain_openai import OpenAIEmbeddings

    router_url, _ = network
    expected = [list(v) for v in direct.embed(model=EMBEDDER, input=TEXTS[:4]).embeddings]
    # It sends every option it knows, most of them null, as Ollama takes them.
    by_ollama = OllamaEmbeddings(model=EMBEDDER, base_url=f"{router_url}/ollama")
    assert by_ollama.embed_documents(TEXTS[:4]) == expected
    assert by_ollama.embed_query(TEXTS[0]) == expected[0]
    # Without check_embedding_ctx_length=False it would send token ids (and fetch tiktoken's
    # vocabulary from the internet first); the router's 400 says so.
    by_openai = OpenAIEmbeddings(
        model=EMBEDDER,
        base_url=f"{router_url}/v1",
        api_key="ignored",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    assert by_openai.embed_documents(TEXTS[:4]) == [float32(v) for v in expected]
    assert by_openai.embed_query(TEXTS[1]) == float32(expected[1])


def test_an_unknown_model_is_not_found_at_once_despite_the_sdks_retries(network):
    client = openai.OpenAI(base_url=f"{network[0]}/v1", api_key="ignored")  # 2 retries
    started = time.monotonic()
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="nobody-embeds:1b", input="x")
    assert time.monotonic() - started < 1
    assert missing.value.code == "model_not_found"
    client.close()
