"""The page's Markdown renderer (``webchat/static/webchat/markdown.js``) on its own, in a real
Chromium: text no node could be trusted with, rendered without the router's sanitizer in front."""

from __future__ import annotations

import pytest

from tests.webchat.conftest import open_chat

pytestmark = pytest.mark.e2e

RENDER = """async (text) => {
    const {renderMarkdown} = await import('/static/webchat/markdown.js');
    const shown = document.createElement('div');
    shown.className = 'rendered';
    const started = performance.now();
    renderMarkdown(text, shown);
    const took = performance.now() - started;
    document.getElementById('conversation').append(shown);
    return took;
}"""

# One line each, about 90,000 characters, built so that every opener ("[", "<", "http", a run of
# backticks) made the renderer read the rest of the line: each took 1.5 to 9 s before.
ADVERSARIAL_LINES = {
    "a bare URL followed by dots": "http://a" + "." * 90_000 + "x",
    "'http://[' over and over": "http://[" * 11_250,
    "images that never close": "![a](" * 18_000 + ")",
    "links that never close": "[a](" * 22_500 + ")",
    "autolinks that never close": "<a:" * 30_000 + ">",
    "backtick runs of every length": "".join("`" * k + " " for k in range(1, 420)),
    "a heading of spaces and hashes": "# " + " #" * 45_000 + "x",
    "a fence with a backtick at the end": "```" + "a" * 90_000 + "`",
}


def test_a_90000_character_adversarial_line_renders_in_under_a_second(page):
    open_chat(page)
    took = {name: page.evaluate(RENDER, text) for name, text in ADVERSARIAL_LINES.items()}
    assert max(took.values()) < 1000, took
    # Shown as the text it is: no URL that long is made a link.
    shown = page.locator(".rendered")
    assert shown.first.inner_text() == ADVERSARIAL_LINES["a bare URL followed by dots"]
    assert shown.locator("a").count() == 0


def test_links_code_and_headings_still_render_as_before(page):
    open_chat(page)
    page.evaluate(RENDER, "\n".join([
        '# Title ##',
        '[with a title](http://example.org/a "the title") and [spaced]( <http://example.org/b> )',
        "see http://example.org/c... or <<http://example.org/d>",
        "``a ` b`` and ```c``` and `unclosed",
        "```py` is no fence",
    ]))
    shown = page.locator(".rendered")
    assert shown.locator("h1").inner_text() == "Title"
    links = shown.locator("a").evaluate_all("links => links.map(a => [a.textContent, a.href])")
    assert links == [
        ["with a title", "http://example.org/a"],
        ["spaced", "http://example.org/b"],
        ["http://example.org/c", "http://example.org/c"],
        ["http://example.org/d", "http://example.org/d"],
    ]
    assert shown.locator("code").all_inner_texts() == ["a ` b", "c"]
    assert "`unclosed" in shown.inner_text()
    assert "```py` is no fence" in shown.inner_text()
    assert shown.locator(".code-block").count() == 0
