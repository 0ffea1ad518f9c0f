// Markdown for answers from untrusted nodes.
//
// Nothing here parses HTML: every node is made with createElement and every piece of answer
// text goes in as a text node (textContent), so markup a node sends is shown, never run or
// loaded. The page's Content-Security-Policy (no inline script, Trusted Types) is the second
// wall behind this one.
//
// The subset:
// - Paragraphs. A blank line ends every block; a single newline inside a paragraph is a line
//   break (as chat answers mean it), not a space.
// - Headings: "# " to "###### ".
// - Lists: "-", "*" or "+" bullets and "1." or "1)" numbers; an item's lines indented to its
//   text (nested lists, code) belong to it. Items separated by blank lines make consecutive
//   lists (a numbered one keeps its first number).
// - Block quotes ("> ") and rules ("---", "***", "___").
// - Fenced code: ``` or ~~~ (three or more), an optional language label, shown as written
//   with a Copy button; an unclosed fence runs to the end of the answer.
// - Inline: `code` (any run of backticks), **strong** / __strong__, *emphasis* / _emphasis_
//   (not inside words for "_"), ~~strikethrough~~, backslash escapes.
// - Links: [text](url) (no brackets in the text), <url> and bare URLs, only when the URL is
//   absolute http: or https:; they open in a new tab with rel="noopener noreferrer nofollow".
//   Any other link stays plain text, exactly as the node sent it.
// - Images: ![alt](url) becomes a link to the image (http(s) only), never an <img>: nothing
//   from an answer is loaded.
// - Anything else (HTML, entities such as &amp;, tables, footnotes) is shown as written.
// - Invisible characters (controls, bidi overrides, zero-width) are shown as markers: see
//   visible().
//
// Streaming: LiveMarkdown renders the blocks that a later blank line has closed once, and
// re-renders only the last, still growing block on each update (chat.js updates a long one less
// often). A block is always rendered
// from its own text alone, so how the answer was cut into chunks never changes what is shown.

// Block patterns are matched against whole lines, so none may backtrack in a way that grows with
// the line: what could (a fence's info string, a heading's closing "#"s) is checked in code.
const FENCE_OPEN = /^(\s*)(`{3,}|~{3,})(.*)$/;
const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*)$/;
const RULE = /^ {0,3}([-*_])[ \t]*(?:\1[ \t]*){2,}$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const LIST_ITEM = /^( {0,3})([-*+]|(\d{1,9})[.)])(?:([ \t]+)(.*))?$/;
const ESCAPABLE = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
// Deeper nesting than this (quotes in lists in quotes...) is shown as text.
const MAX_DEPTH = 12;

// Characters that do something unseen: C0 and C1 controls but tab and newline (ESC starts the
// terminal sequences that recolour text or end a bracketed paste, "ESC[201~"), bidi embeddings,
// overrides and isolates (they reorder what is shown), and zero-width characters.
const INVISIBLE =
  /[\0-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]/g;
const JOINERS = "\u200c\u200d";

/**
 * ``text`` with every invisible character shown: C0 controls and DEL as their Control Pictures
 * ("␛" for ESC), the others as "⟨U+202E⟩". What is copied is what is shown (issue 16, red team
 * F2). Zero-width (non-)joiners between two non-ASCII characters stay: emoji sequences and
 * scripts such as Persian need them, and no ASCII command can hide behind them.
 */
export function visible(text) {
  return text.replace(/\r\n?/g, "\n").replace(INVISIBLE, (char, at, whole) => {
    const code = char.charCodeAt(0);
    const between = whole.charCodeAt(at - 1) > 0x7f && whole.charCodeAt(at + 1) > 0x7f;
    if (JOINERS.includes(char) && between) return char;
    if (code < 0x20) return String.fromCharCode(0x2400 + code);
    if (code === 0x7f) return "\u2421";
    return `⟨U+${code.toString(16).toUpperCase().padStart(4, "0")}⟩`;
  });
}

/** An absolute http(s) URL as the browser will use it, or null for anything else. */
export function safeUrl(raw) {
  // Most of what is tried is no http(s) URL at all: answer without the parser's exception.
  if (!/^\s*https?:/i.test(raw)) return null;
  let url;
  try {
    url = new URL(raw.trim());
  } catch {
    return null; // relative or malformed: no base is given on purpose
  }
  return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
}

function element(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function isBlank(line) {
  return line.trim() === "";
}

function indentOf(line) {
  const match = /^[ \t]*/.exec(line)[0];
  let width = 0;
  for (const char of match) width += char === "\t" ? 4 - (width % 4) : 1;
  return width;
}

/** ``line`` without up to ``width`` columns of leading whitespace. */
function dedent(line, width) {
  let column = 0;
  let index = 0;
  while (index < line.length && column < width) {
    const char = line[index];
    if (char === " ") column += 1;
    else if (char === "\t") column += 4 - (column % 4);
    else break;
    index += 1;
  }
  return line.slice(index);
}

function closesFence(line, fence) {
  const trimmed = line.trim();
  return trimmed.length >= fence.length && trimmed === fence.char.repeat(trimmed.length);
}

function openFence(line) {
  const match = FENCE_OPEN.exec(line);
  if (!match || match[3].includes("`")) return null; // "```a`" is inline code, not a fence
  const marker = match[2];
  const lang = /^\s*(\S*)/.exec(match[3])[1];
  return { indent: indentOf(match[1]), char: marker[0], length: marker.length, lang };
}

/** A heading's text without the optional closing sequence of "#"s and the spaces around it. */
function headingText(text) {
  let end = text.length;
  while (end > 0 && " \t#".includes(text[end - 1])) end -= 1;
  return text.slice(0, end);
}

/**
 * Where the blocks of ``text`` end: offsets just after each blank line that is not inside a
 * fenced code block. ``from`` must be the start of a line outside any fence.
 */
export function blockEnds(text, from = 0) {
  const ends = [];
  let fence = null;
  let start = from;
  while (start < text.length) {
    const newline = text.indexOf("\n", start);
    if (newline === -1) break; // the last line is still being written
    const line = text.slice(start, newline);
    start = newline + 1;
    if (fence) {
      if (closesFence(line, fence)) fence = null;
    } else if (isBlank(line)) {
      ends.push(start);
    } else {
      fence = openFence(line);
    }
  }
  return ends;
}

/** Render the Markdown ``text`` into ``parent``, one block after another. */
export function renderMarkdown(text, parent) {
  let start = 0;
  for (const end of blockEnds(text)) {
    renderBlock(text.slice(start, end), parent);
    start = end;
  }
  renderBlock(text.slice(start), parent);
}

function renderBlock(text, parent) {
  const lines = visible(text).split("\n");
  // Blank lines at the end belong to no block (an unclosed fence would show them as code).
  while (lines.length && isBlank(lines.at(-1))) lines.pop();
  renderLines(lines, parent, 0);
}

function startsBlock(line) {
  return (
    openFence(line) !== null ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    LIST_ITEM.test(line)
  );
}

function renderLines(lines, parent, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) {
      i += 1;
      continue;
    }
    if (depth >= MAX_DEPTH) {
      parent.append(paragraph(lines.slice(i).filter((l) => !isBlank(l)), depth));
      return;
    }
    const fence = openFence(line);
    if (fence) {
      i = codeBlock(lines, i + 1, fence, parent);
      continue;
    }
    let match = HEADING.exec(line);
    if (match) {
      const heading = element(`h${match[1].length}`);
      renderInline(headingText(match[2]), heading, depth);
      parent.append(heading);
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(element("hr"));
      i += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && !isBlank(lines[i])) {
        match = QUOTE.exec(lines[i]);
        if (!match && startsBlock(lines[i])) break;
        inner.push(match ? match[1] : lines[i]); // a line without ">" continues the quote
        i += 1;
      }
      const quote = element("blockquote");
      renderLines(inner, quote, depth + 1);
      parent.append(quote);
      continue;
    }
    if (LIST_ITEM.test(line)) {
      i = list(lines, i, parent, depth);
      continue;
    }
    const text = [];
    while (i < lines.length && !isBlank(lines[i]) && (text.length === 0 || !startsBlock(lines[i]))) {
      text.push(lines[i]);
      i += 1;
    }
    parent.append(paragraph(text, depth));
  }
}

function paragraph(lines, depth) {
  const node = element("p");
  lines.forEach((line, index) => {
    if (index > 0) node.append(element("br"));
    renderInline(line.trim(), node, depth);
  });
  return node;
}

function codeBlock(lines, i, fence, parent) {
  const code = [];
  while (i < lines.length && !closesFence(lines[i], fence)) {
    code.push(dedent(lines[i], fence.indent));
    i += 1;
  }
  const block = element("div", "code-block");
  const head = element("div", "code-head");
  const label = element("span", "code-lang");
  label.textContent = fence.lang;
  const copy = element("button", "copy-code");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", fence.lang ? `Copy ${fence.lang} code` : "Copy code");
  head.append(label, copy);
  const pre = element("pre");
  const body = element("code");
  body.textContent = code.join("\n");
  pre.append(body);
  block.append(head, pre);
  parent.append(block);
  return i + 1; // past the closing fence
}

function list(lines, i, parent, depth) {
  const first = LIST_ITEM.exec(lines[i]);
  const ordered = first[3] !== undefined;
  const node = element(ordered ? "ol" : "ul");
  if (ordered && Number(first[3]) !== 1) node.start = Number(first[3]);
  while (i < lines.length) {
    const match = LIST_ITEM.exec(lines[i]);
    if (!match || (match[3] !== undefined) !== ordered) break;
    const marker = indentOf(match[1]) + match[2].length;
    const gap = match[4] === undefined ? 1 : indentOf(" ".repeat(marker) + match[4]) - marker;
    // A marker followed by 5 or more spaces starts its text after one (CommonMark).
    const content = marker + (gap > 4 ? 1 : gap);
    const item = [match[5] ?? ""];
    i += 1;
    let fence = null;
    while (i < lines.length) {
      const line = lines[i];
      if (fence) {
        item.push(dedent(line, content));
        if (closesFence(line, fence)) fence = null;
      } else if (isBlank(line) || indentOf(line) >= content) {
        const inner = dedent(line, content);
        item.push(inner);
        fence = openFence(inner);
      } else if (startsBlock(line)) {
        break;
      } else {
        item.push(line.trim()); // a lazy continuation of the item's text
      }
      i += 1;
    }
    const li = element("li");
    renderLines(item, li, depth + 1);
    node.append(li);
  }
  parent.append(node);
  return i;
}

// --- inline ----------------------------------------------------------------------------------

// Longest link text looked at; a longer "[...](" is text.
const MAX_LABEL_CHARS = 1000;
// Longest URL made a link (in "[...](...)" with its title, "<...>" or bare); a longer one stays
// text. It bounds the work one "[", "<" or "http" can cause in a line of thousands of them.
const MAX_URL_CHARS = 2048;
const URL_SCHEME = /https?:\/\//iy;
const TRAILING_PUNCTUATION = ".,:;!?'\")]";

/**
 * The searches inline parsing makes in one line, remembering their answers.
 *
 * Each search asks for the first offset at or after ``from`` where something holds, and whether
 * it holds at an offset depends only on the characters around that offset, never on the opener
 * that asks. So an answer ``at`` found from ``from`` is the answer from any offset in between,
 * and a miss from ``from`` is a miss from any later offset. Openers are met left to right, so
 * each kind of search reads the line about once: a line of thousands of unmatched "*", "[", "<"
 * or "http" costs a pass per kind, not a pass per opener (issue 16, red team F1).
 */
class LineSearch {
  constructor(text) {
    this.text = text;
    this.found = new Map(); // kind -> { from, at }
    this.codeRuns = null; // backtick run length -> start offsets, ascending
  }

  /** The first ``at >= from`` where ``find`` finds ``kind``; ``find(from)`` does the search. */
  first(kind, from, find) {
    const known = this.found.get(kind);
    if (known && from >= known.from && (known.at === -1 || from <= known.at)) return known.at;
    const at = find(from);
    this.found.set(kind, { from, at });
    return at;
  }

  /** The first ``token`` at or after ``from`` where ``fits(at)`` holds, or -1. */
  next(token, from, kind = token, fits = () => true) {
    return this.first(kind, from, (start) => {
      let at = this.text.indexOf(token, start);
      while (at !== -1 && !fits(at)) at = this.text.indexOf(token, at + 1);
      return at;
    });
  }

  /** The first offset at or after ``from`` whose character matches ``pattern`` (a /g regex). */
  nextMatch(kind, from, pattern) {
    return this.first(kind, from, (start) => {
      pattern.lastIndex = start;
      return pattern.exec(this.text)?.index ?? this.text.length;
    });
  }

  /** Where a run of exactly ``length`` backticks starts at or after ``from``, or -1. */
  codeRun(length, from) {
    if (this.codeRuns === null) {
      this.codeRuns = new Map();
      for (const run of this.text.matchAll(/`+/g)) {
        const starts = this.codeRuns.get(run[0].length) ?? [];
        starts.push(run.index);
        this.codeRuns.set(run[0].length, starts);
      }
    }
    const starts = this.codeRuns.get(length) ?? [];
    let low = 0;
    let high = starts.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (starts[middle] < from) low = middle + 1;
      else high = middle;
    }
    return low < starts.length ? starts[low] : -1;
  }

  /** Where a bare URL that runs to ``end`` ends once trailing punctuation is left out. */
  urlEnd(end) {
    return this.first("url-end", end, () => {
      let at = end;
      while (TRAILING_PUNCTUATION.includes(this.text[at - 1])) at -= 1;
      return at;
    });
  }
}

/** Inline Markdown of one line into ``parent``. */
function renderInline(text, parent, depth) {
  inline(text, parent, { depth, links: true });
}

function isWordChar(char) {
  return char !== undefined && /[\p{L}\p{N}]/u.test(char);
}

function inline(text, parent, context) {
  const { depth, links } = context;
  const inner = { depth: depth + 1, links };
  const search = new LineSearch(text);
  let plain = "";
  const flush = () => {
    if (plain) parent.append(document.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const char = text[i];
    if (char === "\\" && ESCAPABLE.includes(text[i + 1] ?? "")) {
      plain += text[i + 1];
      i += 2;
      continue;
    }
    if (char === "`") {
      let run = 1;
      while (text[i + run] === "`") run += 1;
      // Closed by the next run exactly as long as the one that opens (read whole from ``i``).
      const close = search.codeRun(run, i + run);
      if (close === -1) {
        plain += "`".repeat(run);
        i += run;
        continue;
      }
      let code = text.slice(i + run, close);
      if (code.length > 2 && code.startsWith(" ") && code.endsWith(" ") && code.trim()) {
        code = code.slice(1, -1);
      }
      flush();
      const node = element("code");
      node.textContent = code;
      parent.append(node);
      i = close + run;
      continue;
    }
    if (links && (char === "[" || (char === "!" && text[i + 1] === "["))) {
      const image = char === "!";
      const link = parseLink(text, image ? i + 1 : i, search);
      if (link) {
        flush();
        if (image) {
          parent.append(imageLink(link));
        } else {
          const anchor = anchorFor(link.href);
          inline(link.label, anchor, { ...inner, links: false });
          parent.append(anchor);
        }
        i = link.end;
        continue;
      }
    }
    if (links && char === "<") {
      const href = parseAutolink(text, i, search);
      if (href) {
        flush();
        const anchor = anchorFor(href.href);
        anchor.textContent = href.target;
        parent.append(anchor);
        i = href.end;
        continue;
      }
    }
    if (links && (char === "h" || char === "H") && !isWordChar(text[i - 1])) {
      const url = bareUrl(text, i, search);
      const href = url ? safeUrl(url) : null;
      if (href) {
        flush();
        const anchor = anchorFor(href);
        anchor.textContent = url;
        parent.append(anchor);
        i += url.length;
        continue;
      }
    }
    if ((char === "*" || char === "_" || char === "~") && depth < MAX_DEPTH) {
      const emphasis = parseEmphasis(text, i, search);
      if (emphasis) {
        flush();
        const node = element(emphasis.tag);
        inline(emphasis.inner, node, inner);
        parent.append(node);
        i = emphasis.end;
        continue;
      }
    }
    plain += char;
    i += 1;
  }
  flush();
}

const EMPHASIS = [
  ["**", "strong"],
  ["__", "strong"],
  ["~~", "del"],
  ["*", "em"],
  ["_", "em"],
];

function parseEmphasis(text, i, search) {
  for (const [token, tag] of EMPHASIS) {
    if (!text.startsWith(token, i)) continue;
    const start = i + token.length;
    if (/\s/.test(text[start] ?? " ")) continue;
    if (token[0] === "_" && isWordChar(text[i - 1])) continue; // snake_case stays as it is
    // A closer follows text, is not part of a longer run, and "_" does not end inside a word.
    const fits = (at) => {
      const after = text[at + token.length];
      return (
        !/\s/.test(text[at - 1]) &&
        !(token.length === 1 && (after === token || text[at - 1] === token)) &&
        !(token[0] === "_" && isWordChar(after))
      );
    };
    const close = search.next(token, start + 1, `emphasis${token}`, fits);
    if (close === -1) continue;
    return { tag, inner: text.slice(start, close), end: close + token.length };
  }
  return null;
}

/** ``[label](url "title")`` with ``i`` at the "[", when the URL is http(s); else null. */
function parseLink(text, i, search) {
  const middle = search.next("](", i + 1);
  if (middle === -1 || middle - i > MAX_LABEL_CHARS) return null;
  // Brackets inside link text are not supported: a later "[" may start the link instead.
  const bracket = search.next("[", i + 1);
  if ((bracket !== -1 && bracket < middle) || search.next("]", i + 1) < middle) return null;
  const start = middle + 2;
  const end = search.next(")", start);
  if (end === -1 || end - start > MAX_URL_CHARS) return null;
  // The destination runs to the first whitespace (a title may follow it) or the ")".
  const from = search.nextMatch("link-destination", start, /\S/g);
  const to = Math.min(end, search.nextMatch("link-destination-end", from, /\s/g));
  const url = text.slice(from, to).replace(/^<(.*)>$/, "$1");
  const href = safeUrl(url);
  if (!href) return null; // shown as the text the node sent
  return { label: text.slice(i + 1, middle), href, end: end + 1 };
}

/** ``<http://…>`` with ``i`` at the "<": { href, target, end }, or null. */
function parseAutolink(text, i, search) {
  const close = search.next(">", i + 1);
  if (close === -1 || close - i - 1 > MAX_URL_CHARS) return null;
  // Neither "<" nor whitespace in the URL (so of "<<<url>" only the last "<" is looked at).
  const inside = (at) => at !== -1 && at < close;
  if (inside(search.next("<", i + 1)) || search.nextMatch("autolink-space", i + 1, /\s/g) < close) {
    return null;
  }
  const target = text.slice(i + 1, close);
  const href = /^[a-z]+:\S*$/i.test(target) ? safeUrl(target) : null;
  return href ? { href, target, end: close + 1 } : null;
}

/** The bare http(s) URL at ``i`` without trailing punctuation, or "". */
function bareUrl(text, i, search) {
  URL_SCHEME.lastIndex = i;
  if (!URL_SCHEME.test(text)) return "";
  const run = search.nextMatch("url-run", i, /[\s<>]/g); // a URL ends at whitespace, "<" or ">"
  if (run === URL_SCHEME.lastIndex || run - i > MAX_URL_CHARS) return "";
  return text.slice(i, search.urlEnd(run));
}

function anchorFor(href) {
  const anchor = element("a");
  anchor.href = href;
  anchor.rel = "noopener noreferrer nofollow";
  anchor.target = "_blank";
  return anchor;
}

function imageLink(link) {
  const anchor = anchorFor(link.href);
  anchor.className = "image-link";
  anchor.textContent = `Image: ${link.label.trim() || link.href}`;
  anchor.title = "An image in the answer, not loaded: opens in a new tab";
  return anchor;
}

/**
 * An answer being streamed into ``container``. Blocks a blank line has closed are rendered
 * once; only the last block is rendered again on each update.
 */
export class LiveMarkdown {
  constructor(container) {
    this.container = container;
    this.text = "";
    this.closed = 0; // text[0:closed] is rendered for good
    this.tail = element("div", "live-block");
    container.append(this.tail);
  }

  /** How much of ``text`` an update would render again: its last block, or a little more. */
  tailLength(text) {
    return text.length - this.closed;
  }

  /** Show ``text``, which extends what was shown before. */
  update(text) {
    this.text = text;
    const ends = blockEnds(text, this.closed);
    if (ends.length) {
      const done = document.createDocumentFragment();
      let start = this.closed;
      for (const end of ends) {
        renderBlock(text.slice(start, end), done);
        start = end;
      }
      this.closed = start;
      this.container.insertBefore(done, this.tail);
    }
    this.tail.replaceChildren();
    renderBlock(text.slice(this.closed), this.tail);
  }
}
