"""The network page at ``/network`` and its figures, in a real Chromium against a real router
(issue 16)."""

from __future__ import annotations

import re
import threading

import pytest
import requests

from tests import procs
from tests.webchat.conftest import open_chat

pytestmark = pytest.mark.e2e
expect = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need Playwright (requirements-dev.txt)"
).expect


def chat(url: str, model: str, prompt: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True}
    with requests.post(f"{url}/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200


def test_the_network_page_shows_nodes_models_slots_queue_and_speed_live(
    page, network, hand_node
):
    chat(network.url, "smollm2:135m", "measure me")  # the contributor's node gets a speed
    node = hand_node("busy:1b", max_concurrent=1)
    waiting = [threading.Thread(target=chat, args=(network.url, "busy:1b", f"ask {n}"))
               for n in range(2)]
    waiting[0].start()
    held = node.request()
    waiting[1].start()
    def settled() -> bool:
        figures = requests.get(f"{network.url}/network.json", timeout=5).json()
        return figures["nodes_online"] == 2 and figures["queued_requests"] == 1

    procs.wait_until(settled, what="the contributor and busy:1b online, one request waiting")
    page.clock.install()
    open_chat(page)
    page.get_by_role("link", name="Network").click()
    expect(page).to_have_url(f"{network.url}/network")
    expect(page.locator("#nodes-online")).to_have_text("2")
    expect(page.locator("#queued-requests")).to_have_text("1")
    assert page.locator("#active-requests").inner_text() == "1"
    assert page.locator("#free-slots").inner_text() == "2 of 3"  # contributor 2, hand node 1
    busy = page.get_by_role("row", name=re.compile(r"^busy:1b"))
    assert busy.locator("td").all_inner_texts() == ["1", "0", "1", "1", "–", "chat"]
    smollm = page.get_by_role("row", name=re.compile(r"^smollm2:135m"))
    assert re.fullmatch(r"\d+(\.\d)?", smollm.locator("td").nth(4).inner_text())
    assert re.fullmatch(r"\d+(\.\d)? tokens/s", page.locator("#speed").inner_text())
    assert page.locator("#chart svg polyline").count() == 2
    # Live: the queue drains, and the next refresh shows it.
    node.answer(held["request_id"], "one")
    node.answer(node.request()["request_id"], "two")
    for thread in waiting:
        thread.join(30)
    page.clock.run_for(5_000)
    expect(page.locator("#queued-requests")).to_have_text("0")
    expect(busy.locator("td").nth(1)).to_have_text("1")


def test_the_network_figures_name_no_node_and_no_address(network, hand_node):
    hand_node("private:1b")
    reply = requests.get(f"{network.url}/network.json", timeout=5)
    assert reply.status_code == 200
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    data = reply.json()
    assert "private:1b" in [model["name"] for model in data["models"]]
    assert "hand-" not in reply.text and "127.0.0.1" not in reply.text


def test_the_network_page_has_the_same_security_headers(page):
    response = page.goto("/network")
    assert response.status == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["referrer-policy"] == "no-referrer"
    expect(page.locator("#nodes-online")).to_have_text(re.compile(r"^\d+$"))
