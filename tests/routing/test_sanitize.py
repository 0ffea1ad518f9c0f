"""The sanitizer: real HTML markup leaves prose, code passes byte for byte, whole and across chunk
boundaries (routing/sanitize.py states the rule)."""

from __future__ import annotations

import pytest

from routing.sanitize import MAX_SPAN_CHARS, MAX_TAG_CHARS, ChunkSanitizer, TagStripper, strip_tags


def stream(pieces: list[str]) -> str:
    stripper = TagStripper()
    return "".join(stripper.feed(piece) for piece in pieces) + stripper.flush()


def every_split(text: str) -> list[list[str]]:
    """The text cut once at every position, and one character at a time."""
    return [[text[:cut], text[cut:]] for cut in range(1, len(text))] + [list(text)]


# --- Code answers pass unchanged -----------------------------------------------------------------

CODE_ANSWERS = {
    "java generics": (
        "In Java, declare the list with its element type:\n\n"
        "```java\n"
        "List<String> xs = new ArrayList<>();\n"
        "Map<String, List<Integer>> index = new HashMap<>();\n"
        "public static <T extends Comparable<T>> T max(List<? extends T> items) { ... }\n"
        "```\n\n"
        "`List<String>` is a *parameterized type*; `<T extends Comparable<T>>` bounds `T`.\n"
    ),
    "rust generics": (
        "Use a byte vector:\n\n```rust\nfn read(path: &Path) -> Result<Vec<u8>, io::Error> {\n"
        "    let mut buf: Vec<u8> = Vec::new();\n    Ok(buf)\n}\n```\n\n"
        "It returns `Result<Vec<u8>, io::Error>`; an `Option<T>` would hide the error.\n"
    ),
    "c++ templates": (
        "```cpp\n#include <vector>\n#include <map>\ntemplate <typename T>\n"
        "std::vector<T> twice(const std::vector<T>& v) {\n  std::vector<T> out;\n"
        "  for (auto& x : v) { out.push_back(x); out.push_back(x); }\n  return out;\n}\n"
        "int main() { std::cout << (a < b) << std::endl; }\n```\n"
    ),
    "typescript": (
        "~~~ts\nfunction first<T>(xs: Array<T>): T | undefined { return xs[0]; }\n"
        "const m = new Map<string, Set<number>>();\n"
        "const el = <div className=\"box\">{x}</div>;\n~~~\n"
        "A generic `Array<T>` works; in TSX `<div>` is JSX.\n"
    ),
    "c sharp": (
        "```csharp\nvar d = new Dictionary<string, List<int>>();\n"
        "IEnumerable<T> Where<T>(IEnumerable<T> src, Func<T, bool> p) => src.Where(p);\n```\n"
    ),
    "comparisons": (
        "```python\nif a<b and c>d:\n    print(a <= b, c >= d, x<y>z)\n```\n"
        "Inline: `if a<b and c>d:` and `x<=y`.\n"
    ),
    "shell": (
        "Redirect both streams:\n\n```bash\nmake build 2>&1 | tee log.txt\n"
        "cat <<EOF > config.yml\nname: <your-name>\nEOF\nsort < in.txt > out.txt\n```\n\n"
        "Then run `cmd 2>&1 >/dev/null` or `diff <(ls a) <(ls b)`.\n"
    ),
    "html in a fence": (
        "Here is the markup:\n\n```html\n<!DOCTYPE html>\n<html>\n<head><style>p { color: red }"
        "</style></head>\n<body>\n  <div class=\"a\">hi</div>\n  <script>alert(\"hi\")</script>\n"
        "  <img src=\"x.png\" onerror=\"fallback()\">\n  <!-- a comment -->\n"
        "</body>\n</html>\n```\n"
    ),
    "xml in a fence": (
        "```xml\n<?xml version=\"1.0\"?>\n<project>\n  <dependency><artifactId>x</artifactId>"
        "</dependency>\n  <![CDATA[ <raw> ]]>\n</project>\n```\n"
    ),
    "diff hunk": (
        "```diff\n@@ -1,4 +1,4 @@\n-<div class=\"old\">\n+<section class=\"new\">\n"
        "   <p>unchanged</p>\n-</div>\n+</section>\n```\n"
    ),
    "math in code": "`a<b>c` holds when `b` is between; in code: ```a<b>c``` too.\n",
    "list with fences": (
        "1. Install:\n   ```bash\n   pip install x\n   ```\n2. Use it:\n"
        "   ```html\n   <b>bold</b>\n   ```\n- or inline:\n  - ```js\n    let a = <i>x</i>;\n"
        "    ```\n"
    ),
    "longer fences and crlf": (
        "````md\n```html\n<b>inner</b>\n```\n````\r\n\r\n``<code>`` and ```<p>```\r\n"
        "~~~~\r\n<script>x</script>\r\n~~~~\r\n"
    ),
    "prose with harmless angle brackets": (
        "Use List<String> or Vec<u8>; a < b, x<=y, 2>&1, <T extends X> and Option<T> stay.\n"
        "Email <someone@example.com> and <https://example.com> are links.\n"
    ),
}


@pytest.mark.parametrize("name", list(CODE_ANSWERS))
def test_code_answers_pass_unchanged_whole_and_split_at_every_position(name):
    text = CODE_ANSWERS[name]
    assert strip_tags(text) == text
    for pieces in every_split(text):
        assert stream(pieces) == text, pieces


# --- What the issue observed ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "List<String> xs = new ArrayList<>();",
        "Vec<u8>",
        "`if a<b and c>d:`",
        '```\n<div class="a">hi</div>\n```',
    ],
)
def test_the_answers_the_issue_saw_corrupted_are_unchanged(text):
    assert strip_tags(text) == text


# --- Markup in prose is stripped -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, clean",
    [
        ("hello <b>world</b>", "hello world"),
        ("HELLO <B>WORLD</B>", "HELLO WORLD"),
        ('<script src="x.js"></script>ok', "ok"),
        ("a<script>alert(1)</script>b", "ab"),
        ("a<SCRIPT>alert(1)</ScRiPt >b", "ab"),
        ("a<style>p{}</style>b", "ab"),
        ("<img src=x onerror=alert(1)>", ""),
        ('<img alt=">" onerror=alert(1)>shown', "shown"),
        ("<img alt='>' onerror=alert(1)>shown", "shown"),
        ("<!-- hidden -->shown", "shown"),
        ("<!DOCTYPE html><?xml version='1.0'?><![CDATA[<b>x</b>]]>shown", "shown"),
        ("x <br/> y", "x  y"),
        ("<marquee>m</marquee><frameset></frameset><blink>b</blink>", "mb"),
        ('<svg onload=alert(1)><use href="#x"/></svg><math><mi>x</mi></math>', "x"),
        ("a < b and c > d", "a < b and c > d"),
        ("1 <2", "1 <2"),
        ("no tags at all", "no tags at all"),
        # a tag of an unknown name is kept unless it carries a handler or style
        ("<T>x</T>", "<T>x</T>"),
        ("<x-widget onmouseover=alert(1)>hover</x-widget>", "hover</x-widget>"),
        ('<T style="position:fixed">x', "x"),
    ],
)
def test_strip_tags(text, clean):
    assert strip_tags(text) == clean


@pytest.mark.parametrize(
    "text, clean",
    [
        # removing a tag never builds one out of what was around it
        ("<<b>script>alert(1)<</b>/script>", "alert(1)"),
        ("<scr<b>ipt>alert(1)</script>", "alert(1)"),
        ("<<<<a>b>x", "<< x"),
        ("</<b>script>x", "x"),
        ('<T a=">" o<i>nmouseover=1>x', "x"),
        # nor merges backtick runs into a fence or a longer code span
        ("``<b>`\n<i>", "`` `\n"),
        ("`<img onerror=x>`<b>``y``", "`<img onerror=x>` ``y``"),
    ],
)
def test_removal_never_builds_markup_from_what_surrounds_it(text, clean):
    assert strip_tags(text) == clean


def test_script_and_style_bodies_go_to_the_end_of_the_stream_when_never_closed():
    assert stream(["before <script>", "steal(document.cookie)", " and more"]) == "before "
    assert strip_tags("x<style>body{}") == "x"


# --- What is code --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, clean",
    [
        # an unterminated code span is literal text in CommonMark: what follows is prose
        ("a `<script>alert(1)</script> b", "a ` b"),
        ("a `x\n<b>y</b>` b", "a `x\ny` b"),
        # after it, no backtick on that paragraph opens code
        ("`x\n`<b>y</b>`", "`x\n`y`"),
        ("`x\n\n`<b>y</b>`", "`x\n\n`<b>y</b>`"),
        # a backslash-escaped backtick opens nothing
        ("\\`<b>x</b>`", "\\`x`"),
        # "|" splits table cells before code spans are found
        ("| `a|<b>x</b>` |", "| `a|x` |"),
        # code spans pair runs of the same length
        ("``a`<b>`b``", "``a`<b>`b``"),
        ("``a`<b>x</b>`", "``a`x`"),
        # four spaces make an indented code block, not a fence: its markup is stripped
        ("    ```\n    <b>x</b>\n    ```", "    ```\n    x\n    ```"),
        # a closing fence must be at least as long as the opening one
        ("````\n<b>x</b>\n```\n<b>y</b>\n````\n<b>z</b>", "````\n<b>x</b>\n```\n<b>y</b>\n````\nz"),
        ("~~~\n<b>x</b>\n```\n<b>y</b>\n~~~\n<b>z</b>", "~~~\n<b>x</b>\n```\n<b>y</b>\n~~~\nz"),
        # a backtick in the info string: not a fence, an inline code span
        ("```js`\n<b>x</b>", "```js`\nx"),
        # a line less indented than its list item ends the fence: that line is prose
        ("- ```\n  <b>code</b>\n<b>prose</b>\n", "- ```\n  <b>code</b>\nprose\n"),
        # \r alone ends a line too
        ("```\r<b>x</b>\r```\r<b>y</b>", "```\r<b>x</b>\r```\ry"),
    ],
)
def test_code_is_what_a_markdown_renderer_must_read_as_code(text, clean):
    assert strip_tags(text) == clean
    for pieces in every_split(text):
        assert stream(pieces) == clean, pieces


@pytest.mark.parametrize(
    "text",
    [
        "<T>\n```\n<b>x</b>\n```",  # a line starting with a tag may open a raw HTML block
        "> ```\n> <b>x</b>\n> ```",  # a fence in a block quote
        "- - ```\n    <b>x</b>\n    ```",  # behind two list markers
        "text\n2. ```\n<b>x</b>\n```",  # "2." cannot start a list right after text
        "      ```\n<b>x</b>\n```",  # indented too far to be a fence here
    ],
)
def test_a_fence_a_renderer_may_read_otherwise_turns_the_rest_into_prose(text):
    out = strip_tags(text)
    assert "<b>" not in out and "x" in out


# --- Bounds --------------------------------------------------------------------------------------


def test_a_tag_that_never_closes_is_released_without_its_bracket():
    stripper = TagStripper()
    out = stripper.feed("<img title=" + "x" * (MAX_TAG_CHARS + 10))
    assert out.startswith("img title=xx") and "<" not in out
    # and nothing that comes later can turn it back into a tag
    assert stripper.feed(" onerror=alert(1)> after") == " onerror=alert(1)> after"


def test_an_element_tag_must_close_on_its_line():
    assert strip_tags("<img\nsrc=x onerror=alert(1)>after") == "img\nsrc=x onerror=alert(1)>after"


def test_a_tag_shaped_run_is_held_back_at_most_max_tag_chars():
    stripper = TagStripper()
    assert stripper.feed("see <Foo bar='") == "see "
    out = stripper.feed("y" * MAX_TAG_CHARS)
    assert out and "<" not in out


def test_maybe_code_is_held_back_at_most_max_span_chars():
    stripper = TagStripper()
    assert stripper.feed("`<b>") == ""
    out = stripper.feed("x" * MAX_SPAN_CHARS)
    assert out.startswith("`") and "<b>" not in out


def test_an_unclosed_tag_at_the_end_of_the_stream_is_text():
    assert strip_tags("if x<a then y") == "if x<a then y"
    assert strip_tags("unfinished <tag") == "unfinished <tag"


# --- Streams of chunks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pieces, clean",
    [
        (["Hello <scr", "ipt>alert(1)</scr", "ipt> world"], "Hello  world"),
        (["<", "i", "m", "g", " src=x", ">", "after"], "after"),
        (["keep <", " this"], "keep < this"),
        (["x <b", "r/>y"], "x y"),
        (["a <", "<b>", "script>z"], "a z"),
        (["Vec<", "u8>"], "Vec<u8>"),
        (["``", "`py", "thon\n<b>", "</b>\n``", "`\n"], "```python\n<b></b>\n```\n"),
    ],
)
def test_markup_split_over_chunks_is_handled_as_if_whole(pieces, clean):
    assert stream(pieces) == clean


def test_every_split_of_a_tagged_text_gives_the_same_result():
    text = 'Sure! <a href="https://evil.example">click</a> and `<b>`, 3 < 4.\n```\n<i>\n```'
    expected = strip_tags(text)
    assert expected == 'Sure! click and `<b>`, 3 < 4.\n```\n<i>\n```'
    for cut in range(1, len(text)):
        for second in range(cut, len(text), 3):
            assert stream([text[:cut], text[cut:second], text[second:]]) == expected


def chunk(content: str = "", *, done: bool = False, **message) -> dict:
    return {"message": {"role": "assistant", "content": content, **message}, "done": done}


def test_chunk_sanitizer_holds_back_a_tag_and_releases_the_text_around_it():
    sanitizer = ChunkSanitizer()
    assert sanitizer.clean(chunk("Hello <scr")) == chunk("Hello ")
    assert sanitizer.clean(chunk("ipt>x</script> there")) == chunk(" there")
    plain = chunk(" world")
    assert sanitizer.clean(plain) is plain  # the common case: the chunk itself, unchanged
    first = sanitizer.clean(chunk("", thinking="Let"))
    assert first == {"message": {"role": "assistant", "thinking": "Let"}, "done": False}
    thought = chunk("", thinking=" me see")
    assert sanitizer.clean(thought) is thought
    end = sanitizer.clean({**chunk("", done=True), "done_reason": "stop"})
    assert end == {"message": {"role": "assistant"}, "done": True, "done_reason": "stop"}


def test_chunk_sanitizer_keeps_code_in_content_and_thinking_apart():
    sanitizer = ChunkSanitizer()
    out = [
        sanitizer.clean(chunk(thinking="`<b>")),
        sanitizer.clean(chunk("<i>x</i>")),
        sanitizer.clean(chunk(thinking="` ok")),
        sanitizer.clean(chunk("", done=True)),
    ]
    assert out[0] is None  # maybe code: held until its closing run
    assert out[1] == chunk("x")
    assert out[2]["message"]["thinking"] == "`<b>` ok"
    assert out[3] == {"message": {"role": "assistant"}, "done": True}
