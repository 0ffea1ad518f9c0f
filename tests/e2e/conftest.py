"""Clients shared by the end-to-end modules: each module's ``network`` fixture gives the router
they talk to (its URL first)."""

from __future__ import annotations

import contextlib

import ollama
import openai
import pytest


@pytest.fixture
def oai(network):
    """The official openai client on the router's /v1, without retries."""
    client = openai.OpenAI(base_url=f"{network[0]}/v1", api_key="ignored", max_retries=0)
    yield client
    client.close()


@pytest.fixture
def olc(network):
    """The official ollama client on the router's /ollama."""
    with contextlib.closing(ollama.Client(host=f"{network[0]}/ollama")) as client:
        yield client
