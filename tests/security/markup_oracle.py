"""An independent judge of sanitized answers: render the text the way consumers' clients do, with
raw HTML enabled, by markdown-it-py in two presets (CommonMark plus GFM tables; and "gfm-like",
which adds linkify and strikethrough), and look at what HTML comes out. A text passes only if it
passes under both. It shares no code or list with ``routing.sanitize``."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from markdown_it import MarkdownIt

RENDERERS = {
    "commonmark": MarkdownIt("commonmark", {"html": True}).enable("table"),
    # Tables, strikethrough and bare URLs turned into links (linkify-it-py), as GitHub-like
    # clients render.
    "gfm-like": MarkdownIt("gfm-like", {"html": True}),
    # markdown-it refuses javascript:, vbscript:, file: and most data: links by itself; not every
    # renderer does.
    "commonmark, every link": MarkdownIt("commonmark", {"html": True}).enable("table"),
}
RENDERERS["commonmark, every link"].validateLink = lambda url: True
# A link or image URL that runs script or carries its own document, as a browser reads it.
SCRIPT_URL = re.compile(r"(?:javascript|vbscript|data):")

# Element names a browser acts on, written out here independently of the sanitizer's list.
KNOWN_ELEMENTS = frozenset(
    """
    a abbr address area article aside audio b base bdi bdo big blink blockquote body br button
    canvas caption center cite code col colgroup data datalist dd del details dfn dialog dir div
    dl dt em embed fieldset figcaption figure font footer form frame frameset h1 h2 h3 h4 h5 h6
    head header hr html i iframe image img input ins kbd keygen label legend li link listing main
    map mark marquee math menu meta meter nav nobr noembed noframes noscript object ol optgroup
    option output p param picture plaintext pre progress q rp rt ruby s samp script section
    select slot small source span strike strong style sub summary sup svg table tbody td template
    textarea tfoot th thead time title tr track tt u ul var video wbr xmp
    animate animatemotion animatetransform circle clippath defs desc ellipse filter
    foreignobject g line lineargradient marker mask path pattern polygon polyline
    radialgradient rect set stop switch symbol text textpath tspan use view
    maction annotation annotation-xml mi mn mo mrow ms mtext semantics
    """.split()
)
# What markdown-it itself writes, with the attributes it writes.
MARKDOWN_TAGS = {
    "p": set(), "code": {"class"}, "pre": set(), "em": set(), "strong": set(),
    "a": {"href", "title"}, "img": {"src", "alt", "title"}, "h1": set(), "h2": set(),
    "h3": set(), "h4": set(), "h5": set(), "h6": set(), "ul": set(), "ol": {"start"},
    "li": set(), "blockquote": set(), "hr": set(), "br": set(), "table": set(),
    "thead": set(), "tbody": set(), "tr": set(), "th": {"style"}, "td": {"style"}, "s": set(),
}
RAW_MARKUP = re.compile(r"<(/?)([A-Za-z][^\t\n\f\r />]*)|<!|<\?")
# "</" and then no letter: the HTML tokenizer reads a bogus comment up to the next ">", hiding the
# text (Python's HTMLParser before 3.13 does not). Looked for outside complete tags, whose quoted
# values may hold anything.
BOGUS_END = re.compile(r"</(?![A-Za-z>])")
WHOLE_TAG = re.compile(r"""</?[A-Za-z][^\t\n\f\r />]*(?:"[^"]*"|'[^']*'|[^"'>])*>""")


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.found.append(f"<{tag} {' '.join(name for name, _ in attrs)}>")
        for name, value in attrs:
            if name in ("href", "src") and value:
                url = re.sub(r"[\t\n\r]", "", value).lstrip("".join(map(chr, range(33))))
                if SCRIPT_URL.match(url.lower()):
                    self.found.append(f"{name} {value}")
            # (Without a value neither runs or shows anything.)
            if name.startswith("on") and value:
                self.found.append(f"handler {name}")
            if name == "style" and value and not re.fullmatch(r"text-align:(left|right|center)",
                                                              value):
                self.found.append(f"style {value}")

    def handle_comment(self, data):
        self.found.append("comment")

    def handle_decl(self, decl):
        self.found.append("declaration")

    def handle_pi(self, data):
        self.found.append("processing instruction")

    def unknown_decl(self, data):
        self.found.append("declaration")


def raw_html(text: str, renderer: MarkdownIt) -> list[str]:
    """The pieces of ``text`` a renderer passes through as raw HTML."""
    pieces = []
    for token in renderer.parse(text):
        if token.type == "html_block":
            pieces.append(token.content)
        for child in token.children or ():
            if child.type == "html_inline":
                pieces.append(child.content)
    return pieces


def offences(text: str) -> list[str]:
    """Everything in the rendered ``text`` that is markup a node slipped in, under any of the
    renderers: raw HTML that names a known element, comments and declarations, and any event
    handler or style in the page."""
    found = []
    for name, renderer in RENDERERS.items():
        found += [f"{name}: {offence}" for offence in _offences(text, renderer)]
    return found


def _offences(text: str, renderer: MarkdownIt) -> list[str]:
    found = []
    for piece in raw_html(text, renderer):
        for m in RAW_MARKUP.finditer(piece):
            if m.group(2) is None or m.group(2).lower() in KNOWN_ELEMENTS:
                found.append(f"raw {m.group(0)!r} in {piece[:80]!r}")
        if BOGUS_END.search(WHOLE_TAG.sub("", piece)):
            found.append(f"bogus comment in {piece[:80]!r}")
    parser = _Tags()
    parser.feed(renderer.render(text))
    parser.close()
    for tag in parser.found:
        if tag.startswith("<"):
            # (Split on spaces only: a name may hold other white space, "p\u2003x" is no "p".)
            name, *attrs = (part for part in tag[1:-1].split(" ") if part)
            if name in MARKDOWN_TAGS and set(attrs) <= MARKDOWN_TAGS[name]:
                continue
            if name in KNOWN_ELEMENTS:
                found.append(f"rendered {tag}")
        else:
            found.append(tag)
    return found
