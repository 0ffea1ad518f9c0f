"""Markup is stripped from what nodes write before any consumer sees it; code is left alone.

Nodes are untrusted, and consumers' clients render answers as Markdown, often with raw HTML
enabled. The sanitizer removes real HTML markup from prose and passes everything else byte for
byte, above all code. It is a streaming state machine over each text field (``content`` and
``thinking`` separately): a construct split over chunks is handled as if it came whole, so the
same text fed whole or cut anywhere gives the same output. Decisions that depend on what is
around a spot are taken on the text the consumer receives, so a removal never builds markup out
of what was on either side of it.

Stripped, in prose only:
  * start and end tags whose name, ASCII case-insensitively, is an HTML element name: the WHATWG
    list including obsolete elements browsers still render (``marquee``, ``frameset``, ...), and
    the SVG and MathML names (``ELEMENTS``). A tag ends at its first ``>`` outside a quoted
    attribute value, as the HTML tokenizer reads it (``<img alt=">" onerror=x>`` is one tag), and
    must end on the line it starts on. Every ``<`` is examined, also one inside another tag, as a
    CommonMark renderer does;
  * the body of ``<script>`` and ``<style>`` up to ``</script`` / ``</style``, or to the end of
    the stream if it never closes;
  * comments ``<!-- -->`` (to the end of the stream if unclosed), ``<![CDATA[ ]]>``, and any
    other ``<!...>`` (``<!DOCTYPE``) or ``<?...>`` up to its ``>``. One with no ``>`` before a
    blank line, the end of the stream or ``MAX_TAG_CHARS`` characters is text to a renderer: it
    is shown, with its ``<`` and any other ``<`` in it dropped (``x <? y`` -> ``x ? y``);
  * beyond the element list, because an unknown element still runs event handlers: a tag of any
    other name with an ``on*`` or ``style`` attribute that has a value, and any tag that a
    removal formed (``<<b>script>`` loses ``<b>`` and then the ``<script>`` that made).
Any other ``<`` stays: ``a < b``, ``x<=y``, ``Vec<u8>``, ``Option<T>``, ``2>&1``,
``<T extends X>``, ``List<String>``, ``<https://example.com>``.

Links that run script, in prose only: a link destination (after ``](`` or ``]:``, with spaces or
tabs allowed before the ``(`` or ``:``, then any white space and a ``<``) whose URL, read as a
renderer and then a browser read it (entity and numeric references and backslash escapes decoded,
tabs and line breaks dropped anywhere, white space and controls dropped at the start, any case),
begins with ``javascript:``, ``vbscript:`` or ``data:`` gets a ``#`` right after the ``(`` or
``:``, which makes it a link to a place on the page or no link at all; the link text stays
(``[x](javascript:alert(1))`` -> ``[x](#javascript:alert(1))``). This is looked for in the text
the consumer receives, so markup removed in between changes nothing. At most ``MAX_DEST_PROBE``
characters of a destination are held to decide; one still undecided then gets its ``#``. An
autolink ``<javascript:...>`` (also ``vbscript:``, ``data:``, any case) loses its ``<`` (and any
other ``<`` in it) and is shown as text, and so does one inside a kept tag.

Code, passed byte for byte and never examined for markup:
  * fenced code blocks (CommonMark): a line of at least three backticks or tildes, with no
    backtick in a backtick fence's info string, up to a closing fence of the same character at
    least as long with nothing else on its line. ``\r\n``, ``\r`` and ``\n`` all end lines. The
    fence line is indented at most three spaces past the content column of the list item it is
    in, or follows one list marker (``- ```js``, ``1. ~~~``). The list items open around each
    line are followed as CommonMark does (an item's content column from its marker and the
    spaces after it; a line indented less closes it unless it continues an open paragraph
    lazily; a blank line then a line at column 0 closes them all), so a fence in a nested list
    (``1. a`` / ``   - b`` / ``     ```js``) is code; where a line leaves them unknown (``>``,
    tabs, raw HTML, a table, a heading, an item that begins empty, a line that may or may not
    continue a paragraph, a tag spanning lines), only a fence indented at most three spaces or
    right after one marker is accepted, as before. A line indented less than the list item the
    fence sits in ends the fence and is prose (unless it begins with ``<``: it may be empty once
    its markup is removed, and then the rest of the stream is prose);
  * code spans: a run of backticks up to the next run of exactly the same length on the same
    line, with no ``|`` inside (GFM tables split cells before they look for code) unless it
    follows exactly one backslash (``\\|`` splits no cell; after ``\\\\`` renderers differ).

Where a renderer could read the text otherwise, the sanitizer takes the safe side (text is prose
unless every renderer must read it as code):
  * a backtick run with no closer on its line is literal, and so is every backtick run after it
    until the next blank line (the paragraph's runs can no longer be paired as a renderer pairs
    them). The same holds after a backslash-escaped backtick, after a code span with a bare ``|``,
    and after a ``<`` kept in prose that is followed by a letter, ``/``, ``!`` or ``?`` (raw HTML
    and autolinks pair before code spans do), unless it closed where every renderer closes it:
    a tag or autolink kept whole that the CommonMark grammar reads from that ``<`` to the same
    ``>`` (``<https://x.y>``, ``<a@b.co>``, ``<T a="1">``; on one line, printable ASCII, no
    backtick in it), or markup removed whole, leaves the pairing as it was before it. So an
    attacker who opens a backtick to pass ``<script>`` off as code gains nothing: it is prose and
    stripped;
  * a line that starts with such a ``<`` may open a raw HTML block, in which renderers see no
    code until the next blank line: a fence there is not trusted (next point), a tag left
    open there at the blank line loses its ``<``, and so does a ``</`` not followed by a letter
    (``</ x>``: the HTML tokenizer reads a bogus comment up to the next ``>``, hiding the text);
  * a line some renderer could read as a fence that this module does not accept (behind ``>`` or
    several list markers on one line, tabs before it, indented four or more spaces where the
    list items around it are unknown, inside a possible HTML block, an ordered list starting at
    a number other than 1 right after text, a fence line longer than ``MAX_FENCE_LINE_CHARS``),
    and a fence a renderer might or might not have closed, switch the stream to prose: all
    markup is stripped, code or not. Where that fence could only sit in a list item or a block
    quote (its line has a marker, ``>``, a tab, or four spaces or more), prose ends where every
    renderer has left them: at a line at column 0 after a blank line, unless a line that could
    be a fence at the top of the document (backticks or tildes after at most three spaces) came
    first, which opens or closes a fence for one reading and not another. Otherwise (at most
    three spaces before it, or such a line came) it lasts to the end of the stream;
  * a removal between two backtick or tilde runs leaves a space, so runs never merge into a
    longer one (a fence, or a different code span).
Text in indented code blocks (four spaces), tables, headings and other Markdown is prose.

Bounds (nothing waits or grows without limit; the work is linear in the input):
  * an element tag still open at the end of its line, after ``MAX_TAG_CHARS`` characters, or
    after ``MAX_TAG_ATTEMPTS`` pieces with a ``>`` in them (each inside a quoted value) is not
    removed as a tag: its text goes on as prose with every ``<`` in it dropped, so no later chunk
    can turn it into one. At the end of the stream it is shown as text;
  * a ``<`` kept in prose that begins something tag-shaped (``<Foo``, ``</x``) is held back until
    the tag closes, and then checked as above. It is let through as text, with any other ``<``
    inside it dropped, at a blank line, a fence or the end of the stream (a renderer shows it as
    text); past ``MAX_TAG_CHARS`` or ``MAX_TAG_ATTEMPTS``, or in a possible raw HTML block, its
    ``<`` is dropped as well. A kept tag with more than ``MAX_INNER_TAGS`` tag-shaped ``<`` inside
    loses those;
  * text held as "maybe code" after a backtick run is at most ``MAX_SPAN_CHARS``; past that, at
    the end of its line or of the stream it is prose;
  * a possible fence line is held until its line ends, at most ``MAX_FENCE_LINE_CHARS``;
  * work: a stream earns ``UNITS_PER_CHAR`` work units per character and ``UNITS_PER_PIECE`` per
    piece, and may save up at most ``MAX_SAVED_UNITS``; a piece may spend what it earns and what was
    saved. Work is counted, never timed, so the same text cut the same way always gives the same
    output: a step of the scanner costs ``STEP_UNITS`` and a unit per character it moves on, and so
    does each further round of a loop within a step (a tag on the output, a line of a fence, a
    character of a link destination's scheme, a list marker of a line's prefix), with extra for
    markup removed and text read again. The units were tuned on the worst shapes in the tests to
    about 25 ns of CPU each, so the allowance is about 1 ms per 10 KB, 50 microseconds per piece and
    3 ms saved; a streamed token costs a few hundred units, so only text built to be costly runs
    out. It is checked after every step and every tag on the output, so a piece spends at most one
    step (about 0.4 ms) more. Then the rest of the stream is passed with every ``<`` dropped and a
    ``#`` after every ``]``, which costs next to nothing (safe, but no longer faithful to code: such
    a stream was hostile or absurd).
"""

from __future__ import annotations

import re
from html.entities import html5
from typing import Any

MAX_TAG_CHARS = 1024
# What a backtick that opens a code span may follow. After anything else (a letter or digit, "(",
# "<", "/", "@", a quote, ...) it may belong to a link destination or title, an autolink or an
# email address for some renderer, so the paragraph's code spans are not trusted.
SPAN_MAY_FOLLOW = frozenset(" \t\r\n*_[|{,;!?.>")
MAX_SPAN_CHARS = 1024
MAX_FENCE_LINE_CHARS = 1024
# A line prefix (spaces, list markers, ">") longer than this cannot be classified: a fence behind
# it switches the stream to prose.
MAX_PREFIX_CHARS = 64
# A checked tag with more tag-shaped "<" inside it than this has all of them dropped.
MAX_INNER_TAGS = 8
# A tag still open after this many pieces with a ">" in them (each inside a quoted value) is not
# read any further: it is handled as one that overran MAX_TAG_CHARS.
MAX_TAG_ATTEMPTS = 16

# WHATWG HTML elements (current and obsolete ones browsers still parse as elements), SVG 1.1/2
# and MathML element names, lowercased: the HTML parser lowercases tag names.
ELEMENTS = frozenset(
    """
    a abbr acronym address applet area article aside audio b base basefont bdi bdo bgsound big
    blink blockquote body br button canvas caption center cite code col colgroup data datalist
    dd del details dfn dialog dir div dl dt em embed fieldset figcaption figure font footer form
    frame frameset h1 h2 h3 h4 h5 h6 head header hgroup hr html i iframe image img input ins
    isindex kbd keygen label legend li link listing main map mark marquee menu menuitem meta
    meter multicol nav nextid nobr noembed noframes noscript object ol optgroup option output p
    param picture plaintext pre progress q rb rp rt rtc ruby s samp script search section select
    selectedcontent slot small source spacer span strike strong style sub summary sup table
    tbody td template textarea tfoot th thead time title tr track tt u ul var video wbr xmp
    svg altglyph altglyphdef altglyphitem animate animatecolor animatemotion animatetransform
    circle clippath color-profile cursor defs desc discard ellipse feblend fecolormatrix
    fecomponenttransfer fecomposite feconvolvematrix fediffuselighting fedisplacementmap
    fedistantlight fedropshadow feflood fefunca fefuncb fefuncg fefuncr fegaussianblur feimage
    femerge femergenode femorphology feoffset fepointlight fespecularlighting fespotlight fetile
    feturbulence filter font-face font-face-format font-face-name font-face-src font-face-uri
    foreignobject g glyph glyphref hatch hatchpath hkern line lineargradient marker mask mesh
    meshgradient meshpatch meshrow metadata missing-glyph mpath path pattern polygon polyline
    radialgradient rect set solidcolor stop switch symbol text textpath tref tspan unknown use
    view vkern
    math maction maligngroup malignmark annotation annotation-xml menclose merror mfenced mfrac
    mglyph mi mlabeledtr mlongdiv mmultiscripts mn mo mover mpadded mphantom mprescripts mroot
    mrow ms mscarries mscarry msgroup msline mspace msqrt msrow mstack mstyle msub msubsup msup
    mtable mtd mtext mtr munder munderover none semantics
    """.split()
)


def _ci(text: str) -> str:
    """``text`` matched ASCII case-insensitively, with character classes (faster in ``re`` than
    the IGNORECASE flag over a large alternation)."""
    return "".join(f"[{ch}{ch.upper()}]" if ch.isalpha() else re.escape(ch) for ch in text)


def _trie(words: frozenset[str]) -> str:
    """A regex alternation of ``words`` shaped as a prefix tree, so matching a name costs a few
    steps instead of one attempt per word."""
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def walk(node: dict[str, Any]) -> str:
        firsts = sorted(ch for ch in node if ch)
        branches = [_ci(ch) + walk(node[ch]) for ch in firsts]
        if not branches:
            return ""
        body = "(?:" + "|".join(branches) + ")"
        if len(branches) > 2:
            # One class test rejects a character no branch starts with.
            body = "(?=[" + "".join(_ci(ch)[1:-1] if ch.isalpha() else re.escape(ch)
                                    for ch in firsts) + "])" + body
        return "(?:" + body + ")?" if "" in node else body

    return walk(root)


_NAMES = _trie(ELEMENTS)
_NAMES_PLAIN = _trie(ELEMENTS - {"script", "style"})
_DELIM = r"(?=[\t\n\f\r />])"
# The attributes of a tag as the HTML tokenizer reads them, up to (not including) its ">", for a
# tag that ends on the line it starts on (one that does not is read one step at a time).
_ATTRS = (
    r"(?:[\t\f /]|[^\t\n\f\r />][^\t\n\f\r />=]*+"
    r"""(?:[\t\f ]*+=[\t\f ]*+(?:"[^"\r\n]*+"|'[^'\r\n]*+'|[^\t\n\f\r >"'][^\t\n\f\r >]*+|(?=>))"""
    r"|(?![\t\f ]*+=)))*+"
)
# The same for a tag that may span lines (one kept in prose, that a renderer may read across
# the lines of a paragraph): matched from the end of its name, it ends just after the ">".
_TAG_END_ANY = re.compile(
    r"(?:[\t\n\f\r /]|[^\t\n\f\r />][^\t\n\f\r />=]*+"
    r"""(?:[\t\n\f\r ]*+=[\t\n\f\r ]*+(?:"[^"]*+"|'[^']*+'|[^\t\n\f\r >"'][^\t\n\f\r >]*+|(?=>))"""
    r"|(?![\t\n\f\r ]*+=)))*+>"
)
_TAG_END_LINE = re.compile(_ATTRS + ">")
# An attribute that makes even an unknown element run script or cover the page: an event handler
# or style with a value. It looks anywhere an attribute may begin, also inside quoted values, so
# it may flag more than the HTML tokenizer would.
_DANGER = re.compile(
    r"[\t\n\f\r /\"'](?:[oO][nN]|[sS][tT][yY][lL][eE])[^\t\n\f\r />=]*+[\t\n\f\r ]*+="
)
# Where prose needs a decision: a backtick, a line ending, or a "<" that starts markup.
_HARD = re.compile(
    r"[`\r\n]|<(?=[!?/A-Za-z])(?=[!?]|/?[A-Za-z][A-Za-z0-9-]{0,19}[\t\n\f\r />])"
    r"(?:[!?]|/?" + _NAMES + _DELIM + ")"
)


def _unit() -> str:
    """One complete markup construct on one line (a script or style element with its body)."""
    body = "|".join(
        _ci(name) + _DELIM + _ATTRS + ">.*?</" + _ci(name) + _DELIM + _ATTRS + ">"
        for name in ("script", "style")
    )
    return (
        r"<(?=[!?/A-Za-z])(?:/?" + _NAMES_PLAIN + _DELIM + _ATTRS + ">|" + body + "|"
        r"/(?:" + _ci("script") + "|" + _ci("style") + ")" + _DELIM + _ATTRS + ">"
        r"|!--(?:-?>|.*?--!?>)|!\[CDATA\[.*?\]\]>|!(?!--|\[CDATA\[)[^>\r\n]*>|\?[^>\r\n]*>)"
    )


# One or more complete markup constructs in a row, all on one line: removed in one step.
_FAST_MARKUP = re.compile("(?:" + _unit() + ")+")
_UNIT_ONE = re.compile(_unit())
# Prose that needs no decision one piece at a time: plain text, line endings not followed by a
# possible fence (even once markup at the line's start is gone), and complete markup on a line.
_LINE_OK = r"(?!(?:" + _unit() + r"|[ \t>*+.)0-9-])*+[`~])"


_BLOCK_BODY = r"(?:[^<`\r\n]++|(?:\r\n|\r|\n)" + _LINE_OK + "|" + _unit() + ")++"
_BLOCK = re.compile(_BLOCK_BODY)
_BLOCK_AT_LINE = re.compile(_LINE_OK + _BLOCK_BODY)
# Complete code spans on one line and the plain prose between them.
# (A closing run must be followed by a character: at the end of a piece it may go on.)
# A "|" inside may only follow exactly one backslash: GFM splits no table cell there.
_SPAN_BODY = r"(`++)(?:[^`\r\n|\\]++|\\++(?!\|)|(?<!\\)\\\||(?!\1(?!`))`++)*+\1(?=[^`])"
_SPANS = re.compile(r"(?:" + _SPAN_BODY + r"[^`<\r\n\\]*+)+")
_ONE_SPAN = re.compile(_SPAN_BODY)  # one of them, without the prose after it
# Where a block removed markup: "~" on both sides becomes "~ ~", as in _join_guard.
_REMOVED = "\x00"
_TILDE_JOIN = re.compile("(~)\x00+(?=~)")
# A complete tag that is not markup and may be let through as it is, with the plain text after
# it: a conservative subset (simple names and attributes, no "<" inside) on which the HTML
# tokenizer and CommonMark agree; _DANGER is checked on a match. It does not look at names: it
# runs on text the input side has already read, where every "<" that starts an element tag was
# removed (the output side checks names where a removal joined text). One tag per call, so the
# work for each "<" is the length of its tag and text (a run of tags matched at once was scanned
# again from each "<" in it that _DANGER then rejected).
_SAFE_TAG = re.compile(
    r"(</?[A-Za-z][A-Za-z0-9:._-]*+"
    r"(?:[ \t]++[A-Za-z_:][A-Za-z0-9_:.-]*+"
    r"""(?:=(?:"[^"<\r\n]*+"|'[^'<\r\n]*+'|[^\t\n\f\r >"'<=`]++))?)*+[ \t]*+/?>)[^<`\r\n]*+"""
)
# A kept "<...>" after which a paragraph's backticks still pair as a renderer pairs them: one that
# every CommonMark renderer reads as the same raw HTML tag or autolink, from its "<" to the same
# ">" as the HTML tokenizer (the spec's grammar, narrowed to printable ASCII, spaces and tabs on
# one line), with no backtick in it.
_ATTR_VALUE = r"""(?:[!#-&(-;?-_a-~]+|'[\t -&(-_a-~]*'|"[\t !#-_a-~]*")"""
_CLOSED = re.compile(
    r"<[A-Za-z][A-Za-z0-9-]*(?:[ \t]+[A-Za-z_:][A-Za-z0-9_.:-]*(?:[ \t]*=[ \t]*"
    + _ATTR_VALUE + r")?)*[ \t]*/?>"
    r"|</[A-Za-z][A-Za-z0-9-]*[ \t]*>"
    r"|<[A-Za-z][A-Za-z0-9+.-]{1,31}:[!-;=?-_a-~]*>"
    r"|<[A-Za-z0-9.!#$%&'*+/=?^_{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*>"
)
# Work, in units (module docstring, Bounds): a step of the scanner costs STEP_UNITS and a unit
# per character it moves on; each piece of markup removed in a run costs MARKUP_UNITS more. Tuned
# on the worst shapes of tests/security/test_sanitizer_hostile.py, measured with CPU time on a
# 2-core build machine: about 25 ns a unit (the costliest shape, 30 ns), so a stream earns 1 ms per
# 10 KB, 50 microseconds per piece and may save 3 ms. A streamed token of an honest answer costs
# 100-300 units.
STEP_UNITS = 64
MARKUP_UNITS = 16
UNITS_PER_CHAR = 4
UNITS_PER_PIECE = 2_000
MAX_SAVED_UNITS = 120_000
# Longest stretch one step handles in prose (and one regular expression call scans), so the work
# is checked often: a step of the costliest prose (a safe-looking tag every 8 characters, each
# read on the output side) costs about 0.4 ms.
_WINDOW = 1024

# A "<" at the very end of a piece that may still become markup when the next piece comes.
_TAIL = re.compile(r"<(?:/?[A-Za-z][^\t\n\f\r />]*|/)?")
_EOL = re.compile(r"[\r\n]")
_EOL_OR_TICK = re.compile(r"[\r\n`]")
_SPAN_STOP = re.compile(r"[`|\r\n]")
_TICKS = re.compile(r"`*")
_TILDES = re.compile(r"~*")
_INDENT = re.compile(r"[ \t]*")
_NAME_RUN = re.compile(r"[^\t\n\f\r />]*")
# Characters a line may start with before a fence: indentation, list markers, ">".
_PREFIX_RUN = re.compile(r"[ \t>*+.)0-9-]*")
# Container prefixes under which some renderer could see a fence.
_CONTAINER_PREFIX = re.compile(r"(?:[ \t]*(?:>|[-+*](?=[ \t])|\d{1,9}[.)](?=[ \t])))*[ \t]*")
# A line prefix under which a fence would be at the top of the document, outside any list item.
_TOP_LEVEL = re.compile(r" {0,3}")
# The prefixes under which this module accepts a fence: up to three spaces, or one list marker.
_OPENER_PREFIX = re.compile(r" {0,3}(?:([-+*]|(\d{1,9})[.)]) {1,4})?")
# A blank line: a line ending, spaces or tabs, another line ending.
_BLANK_IN = re.compile(r"(?:\r\n|\r(?!\n)|\n)[ \t]*(?=[\r\n])")
# A "<" in output text that begins something tag-shaped, or may once the next character comes.
_TAGISH = re.compile(r"<(?:[A-Za-z!?]|/[A-Za-z]|/?\Z|(/))")
_TAGISH_AT = re.compile(r"<(?:[A-Za-z!?]|/[A-Za-z])")
_INNER_TAGISH = re.compile(r"<(?=[A-Za-z!?]|/[A-Za-z])")
_COMMENT_END = re.compile(r"--!?>")
_BODY_END = {
    "script": re.compile(r"</script[\t\n\f\r />]", re.I),
    "style": re.compile(r"</style[\t\n\f\r />]", re.I),
}

def _tag_markup(text: str, start: int, end: int) -> bool:
    """Whether the complete tag ``text[start - 1 or 2 : end]`` (its name begins at ``start``)
    must not reach a consumer: an element name, or an event handler or style attribute."""
    name_end = _NAME_RUN.match(text, start, end).end()
    if text[start:name_end].lower() in ELEMENTS:
        return True
    return _DANGER.search(text, name_end, end) is not None


_FENCE_LINES: dict[tuple[str, int, int], re.Pattern[str]] = {}


def _fence_lines(char: str, length: int, indent: int) -> re.Pattern[str]:
    """Whole lines of a fence's content that cannot close it: blank, or indented at least
    ``indent`` columns and not a run of ``char`` that could be the closing fence."""
    key = (char, min(length, 64), indent)
    pattern = _FENCE_LINES.get(key)
    if pattern is None:
        # (A run longer than 64 is looked at line by line: such keys are not worth keeping.)
        run = f"{re.escape(char)}{{{key[1]},}}" if length <= 64 else re.escape(char) + "{3,}"
        pattern = re.compile(
            rf"(?:(?:[ \t]*|{' ' * indent}(?![ \t]*{run}[ \t]*[\r\n])[^\r\n]*)(?:\r\n|\r|\n))+"
        )
        if len(_FENCE_LINES) < 512:
            _FENCE_LINES[key] = pattern
    return pattern


# A list item marker and the spaces after it, in a line's prefix.
_MARKER = re.compile(r"([-+*]|(\d{1,9})[.)])( *)")
# A line of three or more "-" or "*" (with spaces): a thematic break, not list items.
_THEMATIC = re.compile(r"([-*])(?: *\1){2,} *")
# What a paragraph's line may begin with that opens no block: such a line goes on with an open
# paragraph even when it is indented less than the list item around it ("lazy continuation").
# (Not "[": a link reference definition; not ":" or "|": a GFM table's delimiter row.)
_PLAIN_PUNCTUATION = frozenset("\"'(),.;?@{!$%&/\\^`~")


def _follow_items(
    items: tuple[int, ...] | None, para: bool | None, prev_blank: bool, prefix: str, first: str,
    *, fence: bool = False,
) -> tuple[tuple[int, ...] | None, bool | None, int, int]:
    """The list items open after a line, by CommonMark's rules for list items (other containers
    are not followed: a ">" or a tab makes them unknown).

    ``items`` are the content columns of the list items open before the line (None: unknown),
    ``para`` whether a paragraph is open (None: unknown), ``prefix`` the line's indentation and
    list markers as far as it has them, ``first`` the character after that ("" at the line's
    end), ``fence`` whether the line is a fence line. Returns the items and paragraph after it,
    and for a fence line the content column of the container the fence would open in and the
    fence's indentation past it (-1, -1 when the line cannot open a fence there, or it cannot
    be told).
    """
    unknown = (None, None, -1, -1)
    if not first and not prefix.strip(" \t"):
        return items, False, -1, -1  # a blank line
    if "\t" in prefix or ">" in prefix or len(prefix) > MAX_PREFIX_CHARS:
        return unknown
    indent = len(prefix) - len(prefix.lstrip(" "))
    marker = _MARKER.match(prefix, indent)
    if items is None:
        # A line at column 0 after a blank line, or a bullet or "1." item there, leaves no list
        # item open before it (their content is indented at least two columns).
        starts_list = marker is not None and marker.group(3) and marker.group(2) in (None, "1")
        if indent or not (prev_blank or starts_list):
            return unknown
        items = ()
    k = 0
    while k < len(items) and items[k] <= indent:
        k += 1
    base = items[k - 1] if k else 0
    # What the line is, in the innermost list item it continues.
    new: list[int] = []
    empty = False
    code = False  # the item's content is indented code
    if indent - base >= 4:
        kind = "indented"
    elif not first and _THEMATIC.fullmatch(prefix, indent):
        kind = "block"
    else:
        pos = indent
        while (m := _MARKER.match(prefix, pos)) is not None:
            end = m.end(1)
            if m.end() == len(prefix) and not first:
                new.append(end + 1)  # an empty item
                empty = True
                break
            spaces = len(m.group(3))
            if not spaces:
                break
            if not new and m.group(2) not in (None, "1"):
                empty = None  # (an ordered list not starting at 1: see below)
            if spaces > 4:
                new.append(end + 1)  # what follows is indented code in the item
                code = True
                break
            new.append(end + spaces)
            pos = end + spaces
        if new:
            kind = "item"
        elif fence:
            kind = "block"
        elif first and (first.isalnum() or first in _PLAIN_PUNCTUATION):
            kind = "text"
        else:
            kind = "unknown"
    if kind == "item" and k == len(items) and empty is not False and para is not False:
        # An empty item, or an ordered list not starting at 1, cannot interrupt a paragraph. (A
        # fence there is left to the caller's safe side: some renderers read a list item. A bare
        # "-" may underline a heading.)
        if not para or fence or empty:
            return unknown
        kind = "text"
    if k < len(items):
        if para is not False and kind in ("text", "indented", "unknown"):
            # Lazy continuation of an open paragraph, or not: unknown unless it is one.
            if not para or kind == "unknown":
                return unknown
            return items, True, -1, -1
        items = items[:k]
    if kind == "item":
        items = items + tuple(new)
        col = items[-1]
        if empty is True:
            # An item that begins with a blank line ends at the next blank line: not followed.
            return unknown
        if fence:
            if len(new) > 1:
                return unknown  # (several markers before a fence: not followed, the safe side)
            return items, False, col, len(prefix) - col
        if code:
            return items, False, -1, -1
        return items, True if first.isalnum() or first in _PLAIN_PUNCTUATION else None, -1, -1
    if kind == "indented":
        return items, bool(para) if para is not None else None, -1, -1
    if kind == "block":
        if fence:
            return items, False, base, indent - base
        return items, False, -1, -1
    if kind == "text":
        # (After a line of unknown kind, a table or a raw HTML block may take this one in.)
        return items, True if para is not None else None, -1, -1
    return items, None, -1, -1


def _marker_units(prefix: str) -> int:
    """Work units for following a line's prefix in _follow_items: a round of its loop per list
    marker, counted here as the prefix's characters other than spaces."""
    return MARKUP_UNITS * (len(prefix) - prefix.count(" "))


def _classify(s: str) -> tuple[Any, int]:
    """What the ``<`` at ``s[0]`` starts: (kind, characters it takes), or (None, 0) when the
    text so far cannot tell. Kinds: "lit" (a plain "<"), "comment", "cdata", "bogus" (anything
    up to the next ">"), or ("tag", name, is_end_tag) for an element tag."""
    if len(s) < 2:
        return None, 0
    ch = s[1]
    if ch == "!":
        if s.startswith("<!--"):
            return "comment", 4
        if s.startswith("<![CDATA["):
            return "cdata", 9
        if "<!--".startswith(s) or "<![CDATA[".startswith(s):
            return None, 0
        return "bogus", 2
    if ch == "?":
        return "bogus", 2
    start = 2 if ch == "/" else 1
    if len(s) <= start:
        return None, 0
    first = s[start]
    if not ("a" <= first <= "z" or "A" <= first <= "Z"):
        return "lit", 1
    end = _NAME_RUN.match(s, start).end()
    if end == len(s):
        return (None, 0) if end - start <= 40 else ("lit", 1)
    name = s[start:end]
    if name.lower() in ELEMENTS:
        return ("tag", name, start == 2), end
    return "lit", 1


class _Code(str):
    """Output that is code: no link destination is looked for in it."""

    __slots__ = ()


# Link destinations (after "](" or "]:", spaces allowed before either) whose scheme runs script
# or carries a document of its own. At most MAX_DEST_PROBE characters of one are held to decide.
_DANGEROUS_SCHEMES = ("javascript:", "vbscript:", "data:")
_SCRIPT_AUTOLINK = re.compile(r"<(?:javascript|vbscript|data):", re.I)
MAX_DEST_PROBE = 256
_IDLE, _BRACKET, _PROBING = range(3)
# What a browser drops from a URL: tabs and line breaks anywhere; controls and spaces at its
# start, where a "<" (of a destination in brackets) may also stand.
_URL_SPACE = re.compile(r"[\t\n\r]*")
_URL_LEADING = re.compile(r"[\x00-\x20<]*")
# Entity and numeric character references, as CommonMark decodes them in destinations.
_ENTITY = re.compile(r"&(?:#[xX][0-9A-Fa-f]{1,6}|#[0-9]{1,7}|[A-Za-z][A-Za-z0-9]{1,31});")
_ENTITY_START = re.compile(r"&(?:#[xX]?[0-9A-Fa-f]{0,6}|#[0-9]{0,7}|[A-Za-z][A-Za-z0-9]{0,31})?")
_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _decode_entity(ref: str) -> str:
    """What a renderer writes for the reference ``ref``; an unknown name stays as it is."""
    if ref[1] == "#":
        code = int(ref[3:-1], 16) if ref[2] in "xX" else int(ref[2:-1])
        return chr(code) if 0 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "\ufffd"
    return html5.get(ref[1:], ref)


# Modes of the input scanner.
_PROSE, _LT, _RUN, _SPAN, _FENCE_INFO, _FENCE, _TAG, _RAW, _COMMENT, _CDATA, _BOGUS, _PANIC = range(
    12
)


class TagStripper:
    """Strips HTML markup from a stream of text pieces and keeps code intact (module docstring).

    ``feed`` returns what can be shown now; ``flush`` what is left at the end of the stream.
    """

    def __init__(self) -> None:
        # Output side: the line the consumer's text is on, and what a "<" in it may become.
        self._out: list[str] = []
        self._line: str | None = ""  # prefix characters of the current output line, or None
        self._line_long = False  # ... more of them than MAX_PREFIX_CHARS
        self._blank = True  # the current output line is blank so far
        self._prev_blank = True  # the previous output line was blank
        self._no_fence = False  # this line already proved not to be a fence
        self._last = "\n"  # last output character
        self._lt_tail = False  # output ends with a "<" or "</" that was let through
        self._cr = False  # output ends with "\r" (a "\n" next completes the line ending)
        self._joined = False  # something was removed since the last output character
        self._spans_off = False  # no code spans until the next blank line
        self._html_maybe = False  # a line may have opened a raw HTML block
        self._degraded = 0  # 1: everything is prose until the list ends; 2: to the end
        self._items: tuple[int, ...] | None = ()  # content columns of open list items
        self._para: bool | None = False  # a paragraph is open (None: unknown)
        self._lt_pending = ""  # "<" or "</" whose next character is not known yet
        self._snap: tuple[Any, ...] | None = None
        self._held: str | None = None  # output held from a tag-shaped "<"
        self._held_name = 1  # where the held tag's name begins (after "<" or "</"); 0: "<!", "<?"
        self._held_tries = 0
        self._held_spans_off = False  # _spans_off before the held "<"
        # Input side.
        self._mode = _PROSE
        self._refeed: str | None = None
        self._pend = ""
        self._run_char = "`"
        self._run_len = 0
        self._run_prefix = False
        self._run_escaped = False
        self._span_n = 0
        self._span_buf: list[str] = []
        self._span_size = 0
        self._span_tick = 0
        self._fence_buf: list[str] = []
        self._fence_size = 0
        self._fchar = "`"
        self._flen = 0
        self._wlo = 0
        self._whi = 0
        self._fkind = 3
        self._fcol = 0
        self._findent = ""
        self._frun = 0
        self._fbulk: re.Pattern[str] | None = None
        self._tag_text = ""  # an element tag being read, from its "<"
        self._tag_name_end = 0
        self._tag_tries = 0
        self._tag_body: str | None = None
        self._bogus_from = 0  # where a blank line may begin in the held "<!" or "<?" text
        self._rtail = ""
        self._ctail = ""
        self._cfresh = False
        self._le_text: str | None = None  # where the line of a piece ends (cached)
        self._le_at = 0
        self._left = MAX_SAVED_UNITS  # work units this piece may still spend
        self.allowed = 0  # work units the last piece was allowed ...
        self.spent = 0  # ... and spent
        self.quiet = False  # mid-line prose, nothing held: a plain piece passes unchanged
        # Link destinations, on the output (_guard_links).
        self._dest = _IDLE
        self._probe = ""  # output held from the start of a destination ...
        self._probe_at = 0  # ... read up to here ...
        self._probe_norm = ""  # ... into its scheme so far, as a browser reads it

    # --- public -------------------------------------------------------------------------------

    def feed(self, piece: str) -> str:
        """The part of the stream that can be shown now, markup removed."""
        if self.quiet and not ("<" in piece or "`" in piece or "\n" in piece or "\r" in piece
                               or "]" in piece):
            if piece:
                self._last = piece[-1]
            return piece
        self._out = []
        # What this piece may spend: what it earns and what was saved (see UNITS_PER_CHAR).
        left = self._left
        left = (MAX_SAVED_UNITS if left + UNITS_PER_PIECE > MAX_SAVED_UNITS
                else left + UNITS_PER_PIECE if left > 0 else UNITS_PER_PIECE)
        self._left = self.allowed = left + len(piece) * UNITS_PER_CHAR
        self._work(piece)
        out = self._guard_links(final=False)
        self.spent = self.allowed - self._left
        self._set_quiet()
        return out

    def flush(self) -> str:
        """What is left at the end of the stream; the stripper starts afresh afterwards."""
        self._out = []
        self._earn(0)
        while True:
            mode = self._mode
            if mode == _LT:
                pend, self._pend = self._pend, ""
                self._mode = _PROSE
                self._put_prose("<")
                self._work(pend[1:])
            elif mode == _RUN:
                self._end_run()
            elif mode == _FENCE_INFO:
                self._open_fence()
            elif mode == _SPAN:
                if self._span_tick == self._span_n:
                    self._close_span()  # the stream ended right after the closing run
                else:
                    self._abandon_span()
            elif mode == _TAG:
                # Nothing can follow: the text is shown as it came. Its "<" is checked as output,
                # the rest is read as prose (it may hold other markup).
                raw = self._tag_text
                self._tag_text = ""
                self._mode = _PROSE
                self._put_prose("<")
                self._work(raw[1:])
            elif mode == _BOGUS:
                self._release_bogus(self._tag_text)
            elif mode in (_RAW, _COMMENT, _CDATA):
                self._mode = _PROSE
            else:
                if self._refeed is None:
                    break
            if self._refeed is not None:
                again, self._refeed = self._refeed, None
                self._work(again)
        if self._lt_pending:
            self._flush_lt()
        if self._held is not None:
            self._release(bound=False)
        out = self._guard_links(final=True)
        self.__init__()  # type: ignore[misc]
        return out

    # --- driver -------------------------------------------------------------------------------

    def _work(self, text: str) -> None:
        stack = [(text, 0)]
        while stack:
            text, pos = stack.pop()
            end = len(text)
            while pos < end:
                start = pos
                pos = _HANDLERS[self._mode](self, text, pos)
                # After every step: a piece done in one step (no line ending, backtick or
                # element tag in it) must be checked too, so that no step goes on unchecked.
                if self._mode != _PANIC:  # (once it ran out, a step costs next to nothing)
                    self._left -= STEP_UNITS + (pos - start if pos > start else 0)
                    if self._left < 0:
                        self._panic()
                if self._refeed is not None:
                    again, self._refeed = self._refeed, None
                    if pos < end:
                        stack.append((text, pos))
                    stack.append((again, 0))
                    break

    def _earn(self, size: int) -> None:
        """What this piece may spend: what it earns and what was saved (see UNITS_PER_CHAR)."""
        saved = min(MAX_SAVED_UNITS, max(0, self._left) + UNITS_PER_PIECE)
        self._left = saved + size * UNITS_PER_CHAR
        self.allowed = self._left

    def _panic(self) -> None:
        """The stream has used up its CPU time (text built to be costly): from here on it is
        passed with every "<" dropped, which costs next to nothing and can hold no markup."""
        mode = self._mode
        held = self._held or ""
        pending = {
            _LT: self._pend,
            _RUN: self._run_char * self._run_len,
            _SPAN: "`" * self._span_n + "".join(self._span_buf) + "`" * self._span_tick,
            _FENCE_INFO: "".join(self._fence_buf),
            _TAG: self._tag_text,
            _BOGUS: self._tag_text,
        }.get(mode, "")
        lt_tail = self._snap[6] if self._held is not None and self._snap else self._lt_tail
        self._held = None
        self._lt_pending = ""
        self._mode = _PANIC
        text = (held + pending).replace("<", "")
        if text and lt_tail:
            text = " " + text
        self._out.append(text)
        self._lt_tail = False

    def _panicked(self, text: str, pos: int) -> int:
        out = text[pos:].replace("<", "")
        if out and self._lt_tail:
            out = " " + out
        self._out.append(out)
        self._lt_tail = False
        return len(text)

    def _set_quiet(self) -> None:
        self.quiet = (
            self._mode == _PROSE
            and self._line is None
            and not self._lt_pending
            and self._held is None
            and not self._joined
            and not self._dest
        )

    # --- link destinations --------------------------------------------------------------------

    def _guard_links(self, *, final: bool) -> str:
        """The output of this step, with link destinations whose scheme runs script made
        harmless: a "#" before them makes them a link to a place on the page, or no link."""
        out = "".join(self._out)
        if not self._dest and "]" not in out:
            return out
        shown: list[str] = []
        parts = self._out
        at = 0
        while at < len(parts):  # (_panic may add parts)
            part = parts[at]
            at += 1
            if isinstance(part, _Code):
                # A destination that would go on into code begins with a backtick or a tilde
                # there: no scheme.
                if self._dest == _PROBING:
                    self._end_probe(shown, danger=False)
                self._dest = _IDLE
                shown.append(part)
                continue
            if self._mode == _PANIC:
                self._scan_links_cheaply(part, shown)
                continue
            self._scan_links(part, shown)
        if final and self._dest == _PROBING:
            self._end_probe(shown, danger=False)
        return "".join(shown)

    def _scan_links(self, text: str, shown: list[str]) -> None:
        pos = 0
        end = len(text)
        while pos < end:
            self._left -= STEP_UNITS
            if self._left < 0:
                self._panic()
                self._scan_links_cheaply(text[pos:], shown)
                return
            if self._dest == _PROBING:
                pos = self._probe_more(text, pos, shown)
                continue
            if self._dest == _BRACKET:
                stop = _INDENT.match(text, pos).end()
                if stop == end:
                    shown.append(text[pos:])  # spaces: "(" may follow in the next part
                    return
                self._dest = _IDLE
                if text[stop] in "(:":
                    shown.append(text[pos : stop + 1])
                    pos = stop + 1
                    self._dest = _PROBING
                continue
            at = text.find("]", pos)
            self._left -= ((end if at < 0 else at) - pos) >> 3
            if at < 0:
                shown.append(text[pos:] if pos else text)
                return
            shown.append(text[pos : at + 1])
            pos = at + 1
            self._dest = _BRACKET

    def _scan_links_cheaply(self, text: str, shown: list[str]) -> None:
        """Once the stream ran out of work (_panic): a "#" after every "]", so that no link or
        reference definition forms at all."""
        if self._dest == _PROBING:
            self._end_probe(shown, danger=True)
        elif self._dest == _BRACKET:
            shown.append("#")
        self._dest = _IDLE
        shown.append(text.replace("]", "]#"))

    def _end_probe(self, shown: list[str], *, danger: bool) -> None:
        if danger:
            shown.append("#")
        shown.append(self._probe)
        self._dest = _IDLE
        self._probe = ""
        self._probe_at = 0
        self._probe_norm = ""

    def _probe_more(self, text: str, pos: int, shown: list[str]) -> int:
        """Read a destination on from ``text[pos]`` and decide on it where its first characters
        tell (see the module docstring); returns where to go on looking for the next one."""
        held = len(self._probe)
        probe = self._probe + text[pos : pos + MAX_DEST_PROBE + 1 - held]
        at = self._probe_at
        norm = self._probe_norm
        end = len(probe)
        verdict = None
        self._left -= end  # (the text held is read again with each part)
        while at < end:
            self._left -= STEP_UNITS + 16
            at = (_URL_SPACE if norm else _URL_LEADING).match(probe, at).end()
            if at == end:
                break
            ch = probe[at]
            step = 1
            if ch == "&":
                m = _ENTITY.match(probe, at)
                if m is not None:
                    self._left -= STEP_UNITS >> 1
                    ch = _decode_entity(m.group())
                    step = m.end() - at
                elif _ENTITY_START.fullmatch(probe, at):
                    break  # it may still become one
            elif ch == "\\":
                if at + 1 == end:
                    break
                if probe[at + 1] in _ASCII_PUNCTUATION:
                    ch = probe[at + 1]
                    step = 2
            for c in ch:
                if c in "\t\n\r" or not norm and (c <= " " or c == "<"):
                    continue
                norm += c.lower()
            if norm.startswith(_DANGEROUS_SCHEMES):
                verdict = True
                at += step
                break
            if not any(scheme.startswith(norm) for scheme in _DANGEROUS_SCHEMES):
                verdict = False
                break  # (this character is looked at again as text)
            at += step
        if verdict is None and end <= MAX_DEST_PROBE:
            self._probe = probe
            self._probe_at = at
            self._probe_norm = norm
            return len(text)
        # Decided (or too long to: then it is taken as one that runs script). What was held
        # before this part holds no "]": it is shown as it is, and the search for the next
        # destination goes on from the character that decided, or from this part's first.
        keep = max(at, held) if verdict is not None else end
        self._probe = probe[:keep]
        self._end_probe(shown, danger=verdict is not False)
        return pos + keep - held

    # --- output side --------------------------------------------------------------------------

    def _snapshot(self) -> tuple[Any, ...]:
        return (self._line, self._line_long, self._blank, self._prev_blank, self._no_fence,
                self._last, self._lt_tail, self._cr, self._items, self._para, self._degraded)

    def _restore(self, snap: tuple[Any, ...]) -> None:
        (self._line, self._line_long, self._blank, self._prev_blank, self._no_fence,
         self._last, self._lt_tail, self._cr, self._items, self._para, self._degraded) = snap

    def _track(self, s: str) -> None:
        """Follow the output line as ``s`` (no line ending in it) is written."""
        self._last = s[-1]
        self._joined = False
        self._lt_tail = s[-1] == "<" or s[-2:] == "</"
        self._cr = False
        line = self._line
        if line is not None:
            if _PREFIX_RUN.fullmatch(s):
                if len(line) + len(s) <= MAX_PREFIX_CHARS:
                    self._line = line + s
                else:
                    self._line_long = True
            else:
                self._line = None
                k = _PREFIX_RUN.match(s).end()
                self._line_began(line + s[:k], s[k], long=self._line_long)
        if self._blank and s.strip(" \t"):
            self._blank = False

    def _line_began(self, prefix: str, first: str, *, long: bool = False) -> None:
        """The output line's prefix is known (``first``: the character after it, "" if the line
        ends there; ``long``: the prefix was longer than MAX_PREFIX_CHARS): follow the list items
        around it, and end a degraded stretch where every renderer is back at the top."""
        # _follow_items reads every list marker in the prefix (red-team round 4, F3).
        self._left -= STEP_UNITS + _marker_units(prefix)
        if long:
            prefix = " " * (MAX_PREFIX_CHARS + 1)
        if not prefix and first:
            self._recover()
        if self._html_maybe:
            # In a raw HTML block no line opens or closes a list item.
            self._items, self._para = None, None
            return
        self._items, self._para, _, _ = _follow_items(
            self._items, self._para, self._prev_blank, prefix, first
        )

    def _join_guard(self, first: str) -> None:
        # A removal must not merge two backtick or tilde runs into a longer one: that would
        # change which code spans and fences a renderer sees.
        if self._joined and first == self._last and first in "`~":
            self._write(" ")

    def _write(self, s: str) -> None:
        if self._held is not None:
            self._held += s
        else:
            self._out.append(s)
        self._track(s)

    def _put_code(self, s: str) -> None:
        """Code, byte for byte."""
        if self._lt_pending:
            self._flush_lt()
        if self._held is not None:
            self._release(bound=False)
        self._join_guard(s[0])
        self._out.append(_Code(s))
        self._track(s)

    def _put_prose(self, s: str) -> None:
        """Prose text without line endings; a "<" in it is checked on the output."""
        pos = 0
        end = len(s)
        while pos < end:
            self._left -= STEP_UNITS
            if self._left < 0 and self._mode != _PANIC:
                # (A step of this loop per tag: the allowance is checked here too.)
                self._panic()
                self._panicked(s, pos)
                return
            if self._lt_pending:
                pos = self._resolve_lt(s, pos)
                continue
            if self._held is not None:
                pos = self._held_feed(s, pos)
                continue
            m = _TAGISH.search(s, pos)
            if m is None:
                piece = s[pos:] if pos else s
                self._join_guard(piece[0])
                self._out.append(piece)
                self._track(piece)
                return
            i = m.start()
            if i > pos:
                self._join_guard(s[pos])
                self._out.append(s[pos:i])
                self._track(s[pos:i])
            if m.group(1):
                # "</" and no letter: text, but a bogus comment up to the next ">" where the HTML
                # tokenizer reads it, in a raw HTML block.
                bare = "/" if self._html_maybe else "</"
                self._join_guard(bare[0])
                self._out.append(bare)
                self._track(bare)
                pos = i + 2
                continue
            safe = _SAFE_TAG.match(s, i, i + _WINDOW)
            if safe is not None and _DANGER.search(s, i, safe.end()) is not None:
                # Only where the output side would keep it too: its check of attribute names is
                # coarser, and both must agree however the text is cut into pieces. (A _DANGER
                # match never reaches from one tag and its text into the next tag.)
                safe = None
            if safe is not None:
                # Tags like "<T>" or "<String>": kept, as the held path would keep them.
                if self._line is not None:
                    self._html_maybe = True
                kept = safe.group()
                if _SCRIPT_AUTOLINK.match(kept):
                    kept = (" " if self._lt_tail else "") + kept[1:]  # (as in _close_held)
                    self._spans_off = True
                elif self._html_maybe or not _CLOSED.fullmatch(safe.group(1)):
                    self._spans_off = True
                self._out.append(kept)
                self._track(kept)
                pos = safe.end()
                continue
            self._snap = self._snapshot()
            self._lt_pending = "<"
            self._track("<")
            pos = i + 1

    def _resolve_lt(self, s: str, pos: int) -> int:
        pending = self._lt_pending
        probe = pending + s[pos : pos + 2]
        if _TAGISH_AT.match(probe):
            # A tag-shaped "<": hold the output from it until the tag closes.
            if pending == "<" and s[pos] == "/":
                pending = "</"
                self._track("/")
                pos += 1
            self._lt_pending = ""
            assert self._snap is not None
            self._held = pending
            self._held_name = 0 if pending == "<" and s[pos] in "!?" else len(pending)
            self._held_tries = 0
            self._held_spans_off = self._spans_off
            self._spans_off = True
            if self._snap[0] is not None:
                self._html_maybe = True
            return pos
        if pending == "<" and s[pos] == "/":
            self._lt_pending = "</"
            self._track("/")
            pos += 1
            if pos == len(s):
                return pos
        self._flush_lt()
        return pos

    def _flush_lt(self) -> None:
        pending = self._lt_pending
        self._lt_pending = ""
        self._snap = None
        if pending == "</" and self._html_maybe:
            pending = "/"  # (as in _put_prose: no bogus comment in a raw HTML block)
        self._out.append(pending)
        self._lt_tail = pending != "/"

    def _held_feed(self, s: str, pos: int) -> int:
        held = self._held
        assert held is not None
        part = s[pos : pos + max(0, MAX_TAG_CHARS + 1 - len(held))]
        if part:
            self._join_guard(part[0])
            held = self._held
            assert held is not None
        text = held + part
        # A tag can only end at a ">": look again only when one arrives, a bounded number of times.
        self._left -= len(part) >> 3
        if ">" in part:
            end = self._held_end(text, len(held))
            self._left -= len(text) if end < 0 else end  # (each ">" reads the held tag again)
        else:
            end = -1
        if end < 0:
            self._held = text
            if part:
                self._track(part)
            if ">" in part:
                self._held_tries += 1
            if len(text) > MAX_TAG_CHARS or self._held_tries > MAX_TAG_ATTEMPTS:
                self._release(bound=True)
            return pos + len(part)
        taken = end - len(held)
        self._held = text[:end]
        self._track(part[:taken])
        self._close_held()
        return pos + taken

    def _held_end(self, text: str, new: int) -> int:
        """Where the held tag ends in ``text`` (just after its ">"), or -1; the text from
        ``new`` on is what just arrived."""
        start = self._held_name
        if not start:  # "<!" or "<?": the HTML tokenizer ends these at the first ">"
            at = text.find(">", max(new, 2))
            return -1 if at < 0 else at + 1
        name_end = _NAME_RUN.match(text, start).end()
        if name_end == len(text):
            return -1
        m = _TAG_END_ANY.match(text, name_end)
        return -1 if m is None else m.end()

    def _close_held(self) -> None:
        assert self._held is not None and self._snap is not None
        self._left -= 2 * STEP_UNITS
        region, start, snap = self._held, self._held_name, self._snap
        self._held = None
        self._snap = None
        if not start or _tag_markup(region, start, len(region)):
            self._drop(snap)
            self._spans_closed()
            return
        whole = region
        if _INNER_TAGISH.search(region, 1) and self._inner_unsafe(region):
            region = region[:start] + region[start:].replace("<", "")
            if self._held_end(region, 0) != len(region) or _tag_markup(region, start, len(region)):
                self._drop(snap)
                self._spans_closed()
                return
        if _SCRIPT_AUTOLINK.match(region):
            # An autolink to a scheme that runs script: shown as text, no link. (A "<" let through
            # before it must not meet what follows it.)
            region = (" " if snap[6] else "") + region.replace("<", "")
        self._out.append(region)
        if region is not whole:
            self._relocate(snap, region)
        elif _CLOSED.fullmatch(region):
            self._spans_closed()

    def _spans_closed(self) -> None:
        """A held "<" closed where every renderer closes it (or left no trace): the paragraph's
        backticks pair as they did before it, unless a raw HTML block may have begun."""
        self._spans_off = self._held_spans_off or self._html_maybe

    @staticmethod
    def _inner_unsafe(region: str) -> bool:
        """Whether a "<" inside a kept tag could itself start markup a renderer acts on."""
        starts = [m.start() for m in _INNER_TAGISH.finditer(region, 1)]
        if len(starts) > MAX_INNER_TAGS:
            return True
        for at in starts:
            if region[at + 1] in "!?" or _SCRIPT_AUTOLINK.match(region, at):
                return True
            start = at + (2 if region[at + 1] == "/" else 1)
            name_end = _NAME_RUN.match(region, start).end()
            end = _TAG_END_ANY.match(region, name_end)
            if end is None:
                return True  # it reaches past the tag around it
            if _tag_markup(region, start, end.end()):
                return True
        return False

    def _drop(self, snap: tuple[Any, ...]) -> None:
        """The held tag is markup: it never reaches the output."""
        self._restore(snap)
        if self._lt_tail:
            self._write(" ")  # a "<" let through before it must not meet what follows it
        self._joined = True

    def _release(self, *, bound: bool) -> None:
        """Let a held, unclosed tag through as text, with "<"s dropped so that nothing in it or
        after it can become a tag: all of them when it overran its bound or may sit in a raw
        HTML block, else all but its first (the renderer shows it as text)."""
        assert self._held is not None and self._snap is not None
        region = self._held
        snap = self._snap
        self._held = None
        self._snap = None
        if bound or self._html_maybe:
            body = region.replace("<", "")
            if body and snap[6]:
                body = " " + body
        else:
            body = region[0] + region[1:].replace("<", "")
        if body != region:
            self._joined = True
        self._out.append(body)
        self._relocate(snap, body)

    def _relocate(self, snap: tuple[Any, ...], body: str) -> None:
        """Recompute the output line state after writing ``body`` instead of what was held."""
        k = max(body.rfind("\n"), body.rfind("\r"))
        if k >= 0:
            tail = body[k + 1 :]
            line: str | None = ""
            blank = True
            long = False
            self._cr = k == len(body) - 1 and body[k] == "\r"
        else:
            tail = body
            line, long, blank = snap[0], snap[1], snap[2]
            self._cr = snap[7] if not body else False
        # (The list items: as before the held text, then as this text begins its line. A line
        # break in it leaves them unknown.)
        self._items, self._para = (snap[8], snap[9]) if k < 0 else (None, None)
        if tail:
            if line is not None:
                if _PREFIX_RUN.fullmatch(tail):
                    if len(line) + len(tail) <= MAX_PREFIX_CHARS:
                        line = line + tail
                    else:
                        long = True
                else:
                    p = _PREFIX_RUN.match(tail).end()
                    if k < 0:
                        self._line_began(line + tail[:p], tail[p], long=long)
                    line = None
            if blank and tail.strip(" \t"):
                blank = False
        self._line, self._line_long, self._blank = line, long, blank
        if body:
            self._last = body[-1]
            self._lt_tail = body[-1] == "<" or body[-2:] == "</"
        else:
            self._last, self._lt_tail = snap[5], snap[6]

    def _put_eol(self, eol: str) -> None:
        if self._lt_pending:
            self._flush_lt()
        if eol == "\n" and self._cr:
            # The second half of "\r\n": the line already ended.
            self._write_eol(eol)
            self._cr = False
            return
        self._write_eol(eol)
        self._cr = eol == "\r"
        self._end_line()

    def _write_eol(self, eol: str) -> None:
        if self._held is not None:
            self._held += eol
        else:
            self._out.append(eol)
        self._last = eol[-1]
        self._joined = False
        self._lt_tail = False

    def _end_line(self) -> None:
        if self._line is not None:
            self._line_began(self._line, "", long=self._line_long)
        was_blank = self._blank
        if was_blank:
            # A blank line ends the paragraph, and any raw HTML block.
            if self._held is not None:
                self._release(bound=False)
            self._spans_off = False
            self._html_maybe = False
        self._prev_blank = was_blank
        self._line = ""
        self._line_long = False
        self._blank = True
        self._no_fence = False

    # --- input side ---------------------------------------------------------------------------

    def _removed(self) -> None:
        self._joined = True

    def _line_end(self, text: str, pos: int) -> int:
        """Where the line containing ``pos`` ends in ``text`` (searched once per line)."""
        if text is not self._le_text or pos > self._le_at:
            m = _EOL.search(text, pos)
            self._le_text = text
            self._le_at = m.start() if m else len(text)
        return self._le_at

    def _prose(self, text: str, pos: int) -> int:
        if self._line is not None:
            stop = _PREFIX_RUN.match(text, pos).end()
            if stop > pos:
                self._put_prose(text[pos:stop])
                pos = stop
                if pos == len(text):
                    return pos
            ch = text[pos]
            # (Re-read: writing the prefix may have closed and removed a held tag, and with it
            # the line break before it.)
            if ch in "`~" and self._line is not None and not self._no_fence:
                if not self._line:
                    self._recover()
                if not self._degraded or _TOP_LEVEL.fullmatch(self._line):
                    # (While degraded, a fence line at the top is only looked at: _end_run.)
                    self._begin_run(ch, at_prefix=True)
                    return pos
        # A "<" near the end that may still become markup waits for the next piece.
        limit = len(text)
        at = text.rfind("<", max(pos, limit - 42))
        if at >= 0 and _TAIL.fullmatch(text, at):
            limit = at
        if pos >= limit:
            self._pend = ""
            self._mode = _LT
            return pos
        if self._held is None and not self._lt_pending and not (self._cr and text[pos] == "\n"):
            # (Bounded, so that a tag that never closes is not searched to the end every time.)
            block = (_BLOCK_AT_LINE if self._line is not None else _BLOCK).match(
                text, pos, min(limit, pos + MAX_TAG_CHARS + 1)
            )
            if block is not None and block.end() > pos and _REMOVED not in block.group():
                self._put_block(block.group())
                return block.end()
            tried = pos  # no complete markup starts here
        else:
            tried = -1
        window = min(limit, pos + _WINDOW)
        m = _HARD.search(text, pos, window)
        if m is None:
            if window < limit:
                # (Not at the window's edge: a "<" there is looked at again from the next step.)
                stop = text.rfind("<", pos, window)
                stop = window if stop <= pos else stop
                self._put_prose(text[pos:stop])
                return stop
            self._put_prose(text[pos:limit])
            if limit < len(text):
                self._pend = ""
                self._mode = _LT
            return limit
        i = m.start()
        if i > pos:
            self._put_prose(text[pos:i])
        ch = text[i]
        if ch == "<":
            fast = None if i == tried else _FAST_MARKUP.match(
                text, i, min(self._line_end(text, i), i + MAX_TAG_CHARS + 1)
            )
            if fast:
                self._left -= fast.group().count("<") * MARKUP_UNITS
                self._removed()
                return fast.end()
            self._pend = ""
            self._mode = _LT
            return i
        if ch == "`":
            if self._last not in SPAN_MAY_FOLLOW:
                # Glued to a word, a URL, an address or a link's destination or title: renderers
                # may read the backtick as part of those (an autolink, a link) rather than as a
                # code span, so nothing in this paragraph is trusted as code.
                self._spans_off = True
            if not (self._spans_off or self._degraded or self._lt_pending or self._last == "\\"):
                stop = min(self._line_end(text, i), i + MAX_SPAN_CHARS, limit)
                spans = _SPANS.match(text, i, stop)
                if spans:
                    # Only the spans are code: the prose between them goes out as prose, so
                    # that a link around a span is guarded (red-team round 4, F2).
                    end = spans.end()
                    at = i
                    while at < end:
                        span_end = _ONE_SPAN.match(text, at, stop).end()
                        self._put_code(text[at:span_end])
                        at = text.find("`", span_end, end)
                        if at < 0:
                            at = end
                        if at > span_end:
                            self._bulk(text[span_end:at])
                    return end
            self._begin_run("`", at_prefix=False)
            return i
        if ch == "\r" and text.startswith("\r\n", i):
            self._put_eol("\r\n")
            return i + 2
        self._put_eol(ch)
        return i + 1

    def _put_block(self, block: str) -> None:
        """Plain prose lines with complete markup in them, as one piece (nothing is held)."""
        if "<" in block:
            self._left -= block.count("<") * MARKUP_UNITS
            marked = _UNIT_ONE.sub(_REMOVED, block)
            ends_removed = marked[-1] == _REMOVED
            if "~" in marked:
                marked = _TILDE_JOIN.sub("~ ", marked)
            text = marked.replace(_REMOVED, "")
            if marked[0] == _REMOVED:
                self._removed()
            if not text:
                self._removed()
                return
            self._bulk(text)
            self._joined = ends_removed
            return
        self._bulk(block)

    def _bulk(self, s: str) -> None:
        """Write prose ``s`` (no "<", no backtick) and follow its lines."""
        first = _EOL.search(s)
        self._join_guard(s[0])
        if first is None:
            self._out.append(s)
            self._track(s)
            return
        k = first.start()
        line_blank = self._blank and not s[:k].strip(" \t")
        blank_seen = line_blank or _BLANK_IN.search(s, k) is not None
        last_end = max(s.rfind("\n"), s.rfind("\r"))
        eol_start = last_end - 1 if s[last_end] == "\n" and s[last_end - 1 : last_end] == "\r" \
            else last_end
        if eol_start <= k:
            prev_blank = line_blank
        else:
            before = max(s.rfind("\n", 0, eol_start), s.rfind("\r", 0, eol_start))
            prev_blank = not s[before + 1 : eol_start].strip(" \t")
        self._follow_lines(s)
        if blank_seen:
            self._spans_off = False
            self._html_maybe = False
        self._out.append(s)
        self._prev_blank = prev_blank
        self._no_fence = False
        self._joined = False
        self._lt_tail = False
        tail = s[last_end + 1 :]
        self._cr = not tail and s[-1] == "\r"
        self._last = s[-1]
        self._line_long = False
        if _PREFIX_RUN.fullmatch(tail) and len(tail) <= MAX_PREFIX_CHARS:
            self._line = tail
        else:
            self._line = None
        self._blank = not tail.strip(" \t")

    def _follow_lines(self, s: str) -> None:
        """Call _line_began for each line that ``s`` (prose with line endings, written in one
        piece by _bulk) begins or ends while its prefix is open."""
        line, long = self._line, self._line_long
        blank = self._blank
        pos = 0
        end = len(s)
        while True:
            self._left -= STEP_UNITS
            if self._left < 0:
                # The allowance ran out (_work stops after this step): the lines are not followed.
                self._items, self._para = None, None
                return
            m = _EOL.search(s, pos)
            stop = m.start() if m else end
            seg = s[pos:stop]
            if line is not None:
                k = _PREFIX_RUN.match(seg).end()
                if k < len(seg):
                    self._line_began(line + seg[:k], seg[k], long=long)
                    line = None
                else:
                    line += seg
            if m is None:
                return
            if line is not None:
                self._line_began(line, "", long=long or len(line) > MAX_PREFIX_CHARS)
            self._prev_blank = blank = blank and not seg.strip(" \t")
            if blank:
                self._html_maybe = False  # (as _end_line does)
            pos = stop + (2 if s.startswith("\r\n", stop) else 1)
            line, long, blank = "", False, True

    def _lt(self, text: str, pos: int) -> int:
        pend = self._pend
        s = pend + text[pos : pos + 48]
        kind, used = _classify(s)
        if kind is None:
            self._pend = s
            return pos + 48 if pos + 48 < len(text) else len(text)
        self._pend = ""
        self._mode = _PROSE
        if used < len(pend):
            self._refeed = pend[used:]
            taken = pos
        else:
            taken = pos + used - len(pend)
        if kind == "lit":
            self._put_prose("<")
        elif kind == "comment":
            self._removed()
            self._mode = _COMMENT
            self._ctail = ""
            self._cfresh = True
        elif kind == "cdata":
            self._removed()
            self._mode = _CDATA
            self._ctail = ""
        elif kind == "bogus":
            self._removed()
            self._mode = _BOGUS
            self._tag_text = s[:used]
            self._bogus_from = used
        else:
            _, name, is_end = kind
            self._tag_text = s[:used]
            self._tag_name_end = used
            self._tag_tries = 0
            lowered = name.lower()
            self._tag_body = lowered if not is_end and lowered in _BODY_END else None
            self._mode = _TAG
        return taken

    def _tag(self, text: str, pos: int) -> int:
        line_end = self._line_end(text, pos)
        limit = min(line_end, pos + max(0, MAX_TAG_CHARS + 1 - len(self._tag_text)))
        known = len(self._tag_text)
        raw = self._tag_text + text[pos:limit]
        arrived = ">" in text[pos:limit] if limit - pos < 4096 else text.find(">", pos, limit) >= 0
        m = _TAG_END_LINE.match(raw, self._tag_name_end) if arrived else None
        if m is not None:
            self._removed()
            self._tag_text = ""
            self._mode = _RAW if self._tag_body is not None else _PROSE
            self._rtail = ""
            return pos + m.end() - known
        self._tag_text = raw
        self._tag_tries += arrived
        if (limit < len(text) and limit == line_end or len(raw) > MAX_TAG_CHARS
                or self._tag_tries > MAX_TAG_ATTEMPTS):
            self._release_tag()
        return limit

    def _release_tag(self) -> None:
        """An element tag that did not close on its line (or in time) is no tag a renderer
        shows; its text goes on as prose without any "<", so it can never become one."""
        raw = self._tag_text
        self._tag_text = ""
        self._mode = _PROSE
        self._removed()
        self._refeed = raw.replace("<", "")

    def _raw(self, text: str, pos: int) -> int:
        body = self._tag_body
        assert body is not None
        s = self._rtail + text[pos:]
        m = _BODY_END[body].search(s)
        if m is None:
            self._rtail = s[-8:]
            return len(text)
        delim = pos + m.end() - 1 - len(self._rtail)
        self._rtail = ""
        self._tag_text = "</" + body
        self._tag_name_end = len(self._tag_text)
        self._tag_tries = 0
        self._tag_body = None
        self._mode = _TAG
        return delim

    def _comment(self, text: str, pos: int) -> int:
        s = self._ctail + text[pos:]
        base = pos - len(self._ctail)
        if self._cfresh:
            if s in ("", "-"):
                self._ctail = s
                return len(text)
            self._cfresh = False
            # "<!-->" and "<!--->" are whole comments to the HTML tokenizer.
            for opener in (">", "->"):
                if s.startswith(opener):
                    self._ctail = ""
                    self._mode = _PROSE
                    return base + len(opener)
        m = _COMMENT_END.search(s)
        if m:
            self._ctail = ""
            self._mode = _PROSE
            return base + m.end()
        self._ctail = s[-3:]
        return len(text)

    def _cdata(self, text: str, pos: int) -> int:
        s = self._ctail + text[pos:]
        at = s.find("]]>")
        if at >= 0:
            end = pos - len(self._ctail) + at + 3
            self._ctail = ""
            self._mode = _PROSE
            return end
        self._ctail = s[-2:]
        return len(text)

    def _bogus(self, text: str, pos: int) -> int:
        held = self._tag_text
        limit = min(len(text), pos + max(0, MAX_TAG_CHARS + 1 - len(held)))
        at = text.find(">", pos, limit)
        stop = limit if at < 0 else at + 1
        s = held + text[pos:stop]
        blank = _BLANK_IN.search(s, self._bogus_from)
        if blank is not None:
            # A renderer ends the paragraph here: what came since the "<" is text.
            cut = blank.start()
            self._release_bogus(s[:cut])
            if cut < len(held):
                self._refeed += held[cut:]
                return pos
            return pos + cut - len(held)
        if at >= 0:
            self._tag_text = ""
            self._mode = _PROSE
            return stop
        if len(s) > MAX_TAG_CHARS:
            self._release_bogus(s)
            return stop
        self._tag_text = s
        # (A blank line may begin at the last line ending: look from there next time.)
        k = max(s.rfind("\n", len(held)), s.rfind("\r", len(held)))
        if k >= 0:
            self._bogus_from = k - 1 if k and s[k - 1] == "\r" else k
        return stop

    def _release_bogus(self, raw: str) -> None:
        """A "<!" or "<?" without its ">" is text to a renderer: it goes on as prose, without
        any "<", so that no later text can make it markup."""
        self._left -= STEP_UNITS
        self._tag_text = ""
        self._mode = _PROSE
        self._refeed = raw.replace("<", "")

    def _begin_run(self, ch: str, *, at_prefix: bool) -> None:
        self._mode = _RUN
        self._run_char = ch
        self._run_len = 0
        self._run_prefix = at_prefix
        self._run_escaped = self._last == "\\" and not self._lt_pending

    def _run(self, text: str, pos: int) -> int:
        stop = (_TICKS if self._run_char == "`" else _TILDES).match(text, pos).end()
        self._run_len += stop - pos
        if stop < len(text):
            self._end_run()
        return stop

    def _end_run(self) -> None:
        ch, n = self._run_char, self._run_len
        run = ch * n
        self._mode = _PROSE
        if self._run_prefix and n >= 3 and self._degraded:
            # A fence may open or close here for some renderer and not for another: from now on
            # nothing is code.
            self._degrade(2)
            self._run_prefix = False
        if self._run_prefix and n >= 3:
            self._fence_buf = [run]
            self._fence_size = n
            self._mode = _FENCE_INFO
            return
        if ch == "~":
            self._put_prose(run)
            return
        if self._run_escaped or self._spans_off or self._degraded:
            if self._run_escaped:
                self._spans_off = True
            self._put_prose(run)
            return
        self._span_n = n
        self._span_buf = []
        self._span_size = 0
        self._span_tick = 0
        self._mode = _SPAN

    def _span(self, text: str, pos: int) -> int:
        end = len(text)
        while pos < end:
            self._left -= STEP_UNITS
            if self._span_tick:
                stop = _TICKS.match(text, pos).end()
                self._span_tick += stop - pos
                pos = stop
                if pos == end:
                    return pos
                if self._span_tick == self._span_n:
                    self._close_span()
                    return pos
                self._span_buf.append("`" * self._span_tick)
                self._span_size += self._span_tick
                self._span_tick = 0
                continue
            window = min(end, pos + max(0, MAX_SPAN_CHARS + 1 - self._span_size))
            m = _SPAN_STOP.search(text, pos, window)
            stop = m.start() if m else window
            if stop > pos:
                self._span_buf.append(text[pos:stop])
                self._span_size += stop - pos
            if self._span_size > MAX_SPAN_CHARS:
                self._abandon_span()
                return stop
            if m is None:
                return stop
            if text[stop] == "|" and self._span_escapes_pipe():
                self._span_buf.append("|")
                self._span_size += 1
                pos = stop + 1
                continue
            if text[stop] != "`":
                self._abandon_span()  # "|" or a line ending: no code span here
                return stop
            ticks = _TICKS.match(text, stop).end()
            pos = ticks
            if ticks == end:
                self._span_tick = ticks - stop
                return end
            if ticks - stop == self._span_n:
                self._close_span()
                return pos
            self._span_buf.append(text[stop:ticks])
            self._span_size += ticks - stop
        return pos

    def _span_escapes_pipe(self) -> bool:
        """Whether the span's text so far ends with exactly one backslash: a "|" after it splits
        no GFM table cell (after two, some renderers split and some do not)."""
        tail = ""
        for part in reversed(self._span_buf):
            tail = part[-2:] + tail
            if len(tail) >= 2:
                break
        return tail[-1:] == "\\" and tail[-2:] != "\\\\"

    def _close_span(self) -> None:
        fence = "`" * self._span_n
        self._mode = _PROSE
        self._put_code(fence + "".join(self._span_buf) + fence)
        self._span_buf = []
        self._span_tick = 0

    def _abandon_span(self) -> None:
        content = "".join(self._span_buf) + "`" * self._span_tick
        self._span_buf = []
        self._span_tick = 0
        self._mode = _PROSE
        self._spans_off = True
        self._put_prose("`" * self._span_n)
        if content:
            self._refeed = content

    def _fence_info(self, text: str, pos: int) -> int:
        window = min(len(text), pos + MAX_FENCE_LINE_CHARS + 1 - self._fence_size)
        m = (_EOL_OR_TICK if self._run_char == "`" else _EOL).search(text, pos, window)
        stop = m.start() if m else window
        if stop > pos:
            self._fence_buf.append(text[pos:stop])
            self._fence_size += stop - pos
        if self._fence_size > MAX_FENCE_LINE_CHARS:
            self._degrade(2)
            self._not_a_fence()
            return stop
        if m is None:
            return stop
        if text[stop] == "`":
            self._not_a_fence()
            return stop
        self._open_fence()
        return stop

    def _not_a_fence(self) -> None:
        self._mode = _PROSE
        self._no_fence = True
        self._refeed = "".join(self._fence_buf)
        self._fence_buf = []

    def _open_fence(self) -> None:
        prefix = self._line
        if prefix is None or not self._line_long and not _CONTAINER_PREFIX.fullmatch(prefix):
            self._not_a_fence()  # "-```" and the like: no renderer sees a fence
            return
        if "|" in "".join(self._fence_buf):
            # With a "|" in its info string (escaped or not) the line may be a table's header
            # row, and a GFM renderer looks for tables before fences: whether it opens a fence
            # depends on the next line (red-team round 4, F1). This module cannot follow that.
            self._degrade(2 if _TOP_LEVEL.fullmatch(prefix) else 1)
            self._not_a_fence()
            return
        self._left -= _marker_units(prefix)
        items, para, col, indent = _follow_items(
            self._items, self._para, self._prev_blank,
            " " * (MAX_PREFIX_CHARS + 1) if self._line_long else prefix, self._run_char,
            fence=True,
        )
        if items is not None and not self._html_maybe:
            # The list items around the line are known: so is whether it opens a fence, and the
            # column of the item it is in (CommonMark's rules).
            if not 0 <= indent <= 3:
                self._not_a_fence()
                return
            self._wlo = self._whi = col
        else:
            m = _OPENER_PREFIX.fullmatch(prefix)
            accepted = (
                m is not None
                and not self._line_long
                and not self._html_maybe
                and (m.group(2) is None or int(m.group(2)) == 1 or self._prev_blank)
            )
            if not accepted:
                # Some renderer may open a fence here and this module cannot follow it: all is
                # prose until it surely ended (_degrade).
                self._degrade(2 if _TOP_LEVEL.fullmatch(prefix) else 1)
                self._not_a_fence()
                return
            assert m is not None
            # The content column W of the list item around the fence: exact after a marker,
            # else anything from 0 to the fence's indentation.
            indent = len(prefix)
            self._wlo, self._whi = (0, indent) if m.group(1) is None else (indent, indent)
        line = "".join(self._fence_buf)
        self._fence_buf = []
        self._items, self._para = items, False
        self._line = None  # (the line's prefix is followed here)
        self._put_code(line)
        self._spans_off = False
        self._html_maybe = False
        self._fchar = self._run_char
        self._flen = self._run_len
        self._fbulk = _fence_lines(self._fchar, self._flen, self._whi)
        self._fkind = 3
        self._mode = _FENCE

    def _recover(self) -> None:
        """At the first character of a line at column 0: after a blank line, such a line ends
        every list item, block quote and paragraph, and so a fence a renderer may have seen in
        one (level 1 of _degrade)."""
        if self._degraded == 1 and self._prev_blank:
            self._degraded = 0
            self._items = ()
            self._para = False

    def _degrade(self, level: int) -> None:
        """From here on everything is prose: a renderer may see code here that this module
        cannot follow. Level 1 (a fence that could only be in a list item or block quote) ends
        after a blank line at a line at column 0, unless a fence line at the top (at most three
        spaces in) comes first: level 2, to the end of the stream."""
        self._degraded = max(self._degraded, level)
        self._items = None
        self._para = None

    def _fence(self, text: str, pos: int) -> int:
        end = len(text)
        while pos < end:
            self._left -= STEP_UNITS
            if self._left < 0:
                return pos  # (the allowance ran out: _work takes it from here)
            kind = self._fkind
            if kind == 3:
                m = _EOL.search(text, pos)
                if m is None:
                    self._put_code(text[pos:])
                    return end
                if m.start() > pos:
                    self._put_code(text[pos : m.start()])
                pos = self._fence_eol(text, m.start())
                continue
            if kind == 0:
                if self._cr and text[pos] == "\n":
                    self._out.append("\n")
                    self._cr = False
                    pos += 1
                    continue
                assert self._fbulk is not None
                # Whole lines only: after a cut inside a line's indentation the rest of the line
                # is not one (its columns are counted below).
                bulk = None if self._fcol or self._findent else self._fbulk.match(text, pos)
                if bulk:
                    self._out.append(_Code(bulk.group()))
                    self._cr = text[bulk.end() - 1] == "\r"
                    self._last = text[bulk.end() - 1]
                    pos = bulk.end()
                    if pos == end:
                        return end
                stop = _INDENT.match(text, pos).end()
                if stop > pos:
                    for ch in text[pos:stop]:
                        self._fcol = self._fcol + 1 if ch == " " else (self._fcol // 4 + 1) * 4
                    if len(self._findent) < MAX_PREFIX_CHARS:
                        self._findent += text[pos:stop][:MAX_PREFIX_CHARS]
                    self._put_code(text[pos:stop])
                    pos = stop
                    if pos == end:
                        return end
                ch = text[pos]
                if ch in "\r\n":
                    pos = self._fence_eol(text, pos)
                    continue
                col = self._fcol
                if col < self._whi:
                    # Indented less than the list item around the fence: a renderer ends the
                    # item and the fence here, and reads this line as prose. Or maybe not, and
                    # nothing is code any more: where the item may be that wide, or where the
                    # line begins with a "<" and may be empty once its markup is removed (an
                    # empty line ends neither).
                    if col >= self._wlo or ch == "<":
                        self._degrade(2)
                    indent = self._findent
                    self._close_fence()
                    self._line = indent if _PREFIX_RUN.fullmatch(indent) else None
                    self._blank = True
                    return pos
                if ch == self._fchar and col <= self._whi + 3:
                    self._fkind = 1
                    self._frun = 0
                else:
                    self._fkind = 3
                continue
            if kind == 1:
                stop = (_TICKS if self._fchar == "`" else _TILDES).match(text, pos).end()
                if stop > pos:
                    self._frun += stop - pos
                    self._put_code(text[pos:stop])
                    pos = stop
                    if pos == end:
                        return end
                self._fkind = 2 if self._frun >= self._flen else 3
                continue
            # kind 2: after a run long enough to close, only spaces may follow
            stop = _INDENT.match(text, pos).end()
            if stop > pos:
                self._put_code(text[pos:stop])
                pos = stop
                if pos == end:
                    return end
            if text[pos] not in "\r\n":
                self._fkind = 3
                continue
            pos = self._fence_eol(text, pos)
            if self._fcol > self._wlo + 3:
                self._degrade(2)  # a renderer may not close here: nothing is code any more
            self._close_fence()
            return pos
        return pos

    def _fence_eol(self, text: str, at: int) -> int:
        eol = "\r\n" if text.startswith("\r\n", at) else text[at]
        self._out.append(eol)
        self._last = eol[-1]
        self._cr = eol == "\r"
        self._fkind = 0
        self._fcol = 0
        self._findent = ""
        return at + len(eol)

    def _close_fence(self) -> None:
        self._mode = _PROSE
        self._para = False
        self._fbulk = None
        self._spans_off = False
        self._html_maybe = False
        self._line = ""
        self._line_long = False
        self._blank = True
        self._prev_blank = False
        self._no_fence = False
        self._joined = False


_HANDLERS = (
    TagStripper._prose,
    TagStripper._lt,
    TagStripper._run,
    TagStripper._span,
    TagStripper._fence_info,
    TagStripper._fence,
    TagStripper._tag,
    TagStripper._raw,
    TagStripper._comment,
    TagStripper._cdata,
    TagStripper._bogus,
    TagStripper._panicked,
)


def strip_tags(text: str) -> str:
    """``text`` as a whole answer, with its markup stripped by the rule in the module docstring."""
    stripper = TagStripper()
    return stripper.feed(text) + stripper.flush()


# The parts of a message a consumer sees; a chunk without any of them shows nothing.
_SHOWN = ("content", "thinking", "tool_calls")


class ChunkSanitizer:
    """Strips markup from a node's chunks, across chunk boundaries."""

    def __init__(self) -> None:
        self.content = TagStripper()
        self.thinking = TagStripper()

    def clean(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk with markup removed, or None when nothing of it can be shown yet."""
        message = chunk["message"]
        if not chunk["done"]:
            # Most chunks: one token of content (or of thinking) in mid-line prose, nothing held,
            # nothing in it that could start markup, code or a line: the chunk itself.
            text = message.get("content")
            stripper = self.content
            if not text or "thinking" in message:
                stripper = self.thinking
                if text or not (text := message.get("thinking")):
                    stripper = None
            if (stripper is not None and stripper.quiet and "<" not in text and "`" not in text
                    and "\n" not in text and "\r" not in text and "]" not in text):
                stripper._last = text[-1]  # (it decides whether a backtick after it is escaped)
                return chunk
        message = dict(message)
        for key, stripper in (("content", self.content), ("thinking", self.thinking)):
            text = stripper.feed(message.get(key, ""))
            if chunk["done"]:
                text += stripper.flush()
            if text:
                message[key] = text
            else:
                message.pop(key, None)
        if not chunk["done"] and message.keys().isdisjoint(_SHOWN):
            return None
        return {**chunk, "message": message}
