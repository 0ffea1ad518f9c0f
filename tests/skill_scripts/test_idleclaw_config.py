"""The shared configuration module: URLs from the environment and model names."""

from __future__ import annotations

import idleclaw_config as config
import pytest


def test_server_defaults_to_the_public_network():
    assert config.server_from_env({}) == "https://api.idleclaw.com"
    assert config.server_from_env({"IDLECLAW_SERVER": "  "}) == "https://api.idleclaw.com"


@pytest.mark.parametrize(("value", "expected"), [
    ("http://localhost:8000/", "http://localhost:8000"),
    ("https://router.example.com", "https://router.example.com"),
    ("HTTPS://Router.example.com/idleclaw//", "https://Router.example.com/idleclaw"),
    ("http://[::1]:8000", "http://[::1]:8000"),
])
def test_server_url_is_accepted_without_trailing_slash(value, expected):
    assert config.parse_server_url(value) == expected


@pytest.mark.parametrize("value", [
    "ftp://x", "localhost:8000", "ws://localhost:8000", "http://", "https:///path",
    "http://host:99999", "http://host/?q=1", "http://ho st", "javascript:alert(1)",
])
def test_server_url_that_is_not_http_is_refused_with_the_variable_name(value):
    with pytest.raises(config.ConfigError, match="IDLECLAW_SERVER must be an http"):
        config.parse_server_url(value)


@pytest.mark.parametrize(("value", "expected"), [
    (None, "http://localhost:11434"),
    ("", "http://localhost:11434"),
    ("localhost", "http://localhost:11434"),
    ("127.0.0.1:11500", "http://127.0.0.1:11500"),
    (":11434", "http://localhost:11434"),
    ("0.0.0.0", "http://localhost:11434"),
    ("http://gpu-box:11434/", "http://gpu-box:11434"),
    ("https://ollama.example.com", "https://ollama.example.com"),
    ("http://router:8000/ollama/", "http://router:8000/ollama"),
])
def test_ollama_host_accepts_what_ollama_accepts(value, expected):
    assert config.parse_ollama_host(value) == expected


@pytest.mark.parametrize("value", ["ftp://host", "host:notaport", "http://host?x=1"])
def test_ollama_host_that_is_not_usable_is_refused(value):
    with pytest.raises(config.ConfigError, match="OLLAMA_HOST"):
        config.parse_ollama_host(value)


@pytest.mark.parametrize(("server", "expected"), [
    ("https://api.idleclaw.com", "wss://api.idleclaw.com/ws/node"),
    ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/ws/node"),
    ("http://127.0.0.1:8000/", "ws://127.0.0.1:8000/ws/node"),
    ("https://example.com/prefix", "wss://example.com/prefix/ws/node"),
])
def test_ws_url_switches_scheme_and_appends_the_node_path(server, expected):
    assert config.ws_url(server) == expected


@pytest.mark.parametrize("name", [
    "llama3.2:3b", "qwen3:0.6b", "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
    "my_model:latest", "a" * 64,
])
def test_real_model_names_are_valid(name):
    assert config.valid_model_name(name)


@pytest.mark.parametrize("name", [
    "", "../etc", "a..b", ".hidden", "-flag", "a" * 65, "llama 3", "llama3;rm", "m\n", None, 3,
    "módel",
])
def test_bad_model_names_are_invalid(name):
    assert not config.valid_model_name(name)


def test_protocol_constants():
    assert config.CLIENT_NAME == "idleclaw-skill/0.3"
    assert config.PROTOCOL_VERSION == 2
