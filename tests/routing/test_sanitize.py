"""Markup stripping, whole and across chunk boundaries."""

from __future__ import annotations

import pytest

from routing.sanitize import TagStripper, strip_tags


@pytest.mark.parametrize(
    "text, clean",
    [
        ("hello <b>world</b>", "hello world"),
        ('<script src="x.js"></script>ok', "ok"),
        ("<img src=x onerror=alert(1)>", ""),
        ("a < b and c > d", "a < b and c > d"),
        ("1 <2", "1 <2"),
        ("<!-- hidden -->shown", "shown"),
        ("<<b>script>alert(1)<</b>/script>", "alert(1)"),
        ("x <br/> y", "x  y"),
        ("no tags at all", "no tags at all"),
    ],
)
def test_strip_tags(text, clean):
    assert strip_tags(text) == clean


def stream(pieces: list[str]) -> str:
    stripper = TagStripper()
    return "".join(stripper.feed(piece) for piece in pieces) + stripper.flush()


@pytest.mark.parametrize(
    "pieces, clean",
    [
        (["Hello <scr", "ipt>alert(1)</scr", "ipt> world"], "Hello alert(1) world"),
        (["<", "i", "m", "g", " src=x", ">", "after"], "after"),
        (["keep <", " this"], "keep < this"),
        (["x <b", "r/>y"], "x y"),
        (["unfinished <tag"], "unfinished <tag"),
        (["a <", "<b>", "script>z"], "a z"),
    ],
)
def test_tags_split_over_chunks_are_still_removed_and_the_rest_kept(pieces, clean):
    assert stream(pieces) == clean


def test_every_split_of_a_tagged_text_gives_the_same_result():
    text = 'Sure! <a href="https://evil.example">click</a> and <b>bold</b>, 3 < 4.'
    expected = strip_tags(text)
    for cut in range(1, len(text)):
        for second in range(cut, len(text)):
            assert stream([text[:cut], text[cut:second], text[second:]]) == expected


def test_a_long_run_without_closing_bracket_is_released_without_its_bracket():
    stripper = TagStripper()
    out = stripper.feed("<a " + "x" * 2000)
    assert out.startswith("a xx")
    assert stripper.feed("> after") == "> after"
