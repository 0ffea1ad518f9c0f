"""A real headless Chromium (Debian's ``chromium`` package, driven by Playwright) against one real
router for the whole directory: daphne, the Ollama emulator behind ``contribute.py``, and nodes
written by hand on websocket-client where a test needs to say exactly what a node sends.

The router, the emulator, ``contribute.py`` and the browser start once for the directory (each
start costs a second or more); every test gets a fresh browser context, so no page shares
storage with another."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from bench.emulator import OllamaEmulator, Reply
from tests import procs
from tests.conftest import ROOMY_ENV

try:
    from playwright import sync_api
except ImportError:  # a dev requirement; without it the browser tests say so and skip
    sync_api = None

# The emulator answers 40 tokens, one every 40 ms: slow enough to see an answer grow and to
# stop it halfway, quick enough that a whole one takes under two seconds.
TOKEN_DELAY = "0.04"
REPLY_TOKENS = "40"
ROUTER_ENV = {
    **ROOMY_ENV,
    # A queued stream opens (and shows its position) after half a second, not three.
    "IDLECLAW_QUEUE_NOTICE_INTERVAL": "0.5",
    # The 503 countdown runs for two seconds.
    "IDLECLAW_RETRY_AFTER": "2",
}


class Network:
    """The router under test and the emulator its contributor serves."""

    def __init__(self, router: procs.Proc, url: str, emulator: procs.Proc, emulator_url: str):
        self.router = router
        self.url = url
        self.emulator = emulator
        self.emulator_url = emulator_url

    def models(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/api/models", timeout=5).json()["details"]

    def emulator_stats(self) -> dict[str, Any]:
        return requests.get(f"{self.emulator_url}/_emulator/stats", timeout=5).json()

    def reply_to(self, prompt: str) -> Reply:
        """The emulator's reply to the request it got whose last message is ``prompt``,
        computed from that request as the emulator computes it."""
        bodies = [body for body in self.emulator_stats()["requests"]
                  if body["messages"][-1]["content"] == prompt]
        assert bodies, f"the emulator got no request ending with {prompt!r}"
        reply = OllamaEmulator(reply_tokens=int(REPLY_TOKENS)).expected_reply(
            "/api/chat", bodies[-1])
        assert reply is not None
        return reply


@pytest.fixture(scope="package")
def network(tmp_path_factory) -> Iterator[Network]:
    db = tmp_path_factory.mktemp("webchat-router") / "router.sqlite3"
    emulator, emulator_url = procs.start_emulator(
        "--token-delay", TOKEN_DELAY, "--reply-tokens", REPLY_TOKENS, "--embedding-models"
    )
    router, url = procs.start_router(db, ROUTER_ENV)
    contributor = procs.start_contributor(url, emulator_url, "--max-concurrent", "2")
    try:
        contributor.wait_for_line("registered")
        procs.wait_until(lambda: "llama3.2:3b" in Network(router, url, emulator, emulator_url)
                         .models(), what="the contributor's models")
        yield Network(router, url, emulator, emulator_url)
    finally:
        contributor.stop()
        router.stop()
        emulator.stop()


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    if sync_api is None:
        pytest.skip("the browser tests need Playwright: pip install -r requirements-dev.txt")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("the browser tests need Chromium: install Debian's package `chromium` "
                    "(apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


class Console:
    """What the page reported: console errors, uncaught exceptions, dialogs, and requests to
    anywhere but the router."""

    def __init__(self, page: Any, origin: str) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.foreign_requests: list[str] = []
        # Console errors a test expects (the browser logs every 4xx/5xx a fetch gets).
        self.expected: list[str] = []
        self.origin = origin
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("dialog", self._dialog)
        page.on("request", self._request)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _request(self, request: Any) -> None:
        if not request.url.startswith(self.origin + "/"):
            self.foreign_requests.append(request.url)

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(part in e for part in self.expected)]


@pytest.fixture
def context(browser, network) -> Iterator[Any]:
    context = browser.new_context(
        base_url=network.url, viewport={"width": 1000, "height": 800},
        permissions=["clipboard-read", "clipboard-write"],
    )
    context.set_default_timeout(15_000)
    yield context
    context.close()


@pytest.fixture
def console(context, network) -> Console:
    page = context.new_page()
    return Console(page, network.url)


@pytest.fixture
def page(context, console):
    """The page of ``console`` (one per test). A test ends with no JavaScript errors in the
    console, no dialogs and no request to another host, unless it says otherwise."""
    page = context.pages[0]
    yield page
    assert console.unexpected() == [], "JavaScript errors in the console"
    assert console.dialogs == [], "the page opened a dialog"
    assert console.foreign_requests == [], "the page requested another host"


def open_chat(page: Any, *, understood: bool = True) -> None:
    """Open the chat page; ``understood`` dismisses the privacy notice."""
    page.goto("/")
    if understood:
        page.get_by_role("button", name="I understand").click()
    page.locator("#model option:not([disabled])").first.wait_for(state="attached")


def ask(page: Any, model: str, prompt: str) -> None:
    page.get_by_label("Model", exact=True).select_option(model)
    page.get_by_label("Your message").fill(prompt)
    page.get_by_label("Your message").press("Enter")


class HandNode:
    """A node written by hand on websocket-client: it says exactly what a test tells it."""

    def __init__(self, router_url: str, model: str, *, max_concurrent: int = 2) -> None:
        self.model = model
        self.ws = websocket.create_connection(
            router_url.replace("http", "ws", 1) + "/ws/node", timeout=30
        )
        self.send({"type": "register", "node_id": f"hand-{uuid.uuid4()}",
                   "models": [{"name": model, "size": 1}], "max_concurrent": max_concurrent})
        assert json.loads(self.ws.recv())["type"] == "registered"
        procs.wait_until(
            lambda: model in requests.get(f"{router_url}/api/models", timeout=5).json()["models"],
            what=f"the hand-written node's {model}",
        )

    def send(self, frame: dict[str, Any]) -> None:
        self.ws.send(json.dumps(frame))

    def next_frame(self, kind: str) -> dict[str, Any]:
        while True:
            frame = json.loads(self.ws.recv())
            if frame["type"] == kind:
                return frame

    def request(self) -> dict[str, Any]:
        return self.next_frame("inference_request")

    def chunk(self, request_id: str, content: str = "", *, done: bool = False) -> None:
        chunk: dict[str, Any] = {"message": {"role": "assistant", "content": content},
                                 "done": done}
        if done:
            chunk["done_reason"] = "stop"
        self.send({"type": "inference_chunk", "request_id": request_id, "chunk": chunk})

    def answer(self, request_id: str, text: str) -> None:
        self.chunk(request_id, text)
        self.chunk(request_id, done=True)

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def hand_node(network) -> Iterator[Any]:
    """``hand_node(model, max_concurrent=2)`` connects a HandNode; all are closed afterwards."""
    nodes: list[HandNode] = []

    def connect(model: str, **kwargs: Any) -> HandNode:
        nodes.append(HandNode(network.url, model, **kwargs))
        return nodes[-1]

    yield connect
    for node in nodes:
        node.close()


@pytest.fixture(scope="package")
def artifacts(tmp_path_factory) -> Path:
    """Where screenshots go (printed with -s, kept by pytest's tmp directory retention)."""
    return tmp_path_factory.mktemp("webchat-artifacts")
