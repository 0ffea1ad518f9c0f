// Server-Sent Events read from a fetch() body (EventSource cannot POST).
//
// Yields { data } for each event and { comment } for each comment line: the router's queue
// notices (": queued position=3") are comments. Only "data" fields and comments matter to the
// page; "event", "id" and "retry" are ignored.

// A line longer than this is not something the router sends: the stream is broken.
const MAX_LINE_CHARS = 1_000_000;

export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let ended = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        ended = true;
        break;
      }
      buffer += value;
      let newline;
      while ((newline = buffer.search(/\r\n|\r|\n/)) !== -1) {
        const line = buffer.slice(0, newline);
        const width = buffer.startsWith("\r\n", newline) ? 2 : 1;
        if (buffer[newline] === "\r" && width === 1 && newline === buffer.length - 1) {
          break; // a "\r" at the end may be the first half of "\r\n"
        }
        buffer = buffer.slice(newline + width);
        if (line === "") {
          if (data.length) yield { data: data.join("\n") };
          data = [];
        } else if (line.startsWith(":")) {
          yield { comment: line.slice(1).trim() };
        } else {
          const colon = line.indexOf(":");
          const field = colon === -1 ? line : line.slice(0, colon);
          let value = colon === -1 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "data") data.push(value);
        }
      }
      if (buffer.length > MAX_LINE_CHARS) throw new Error("the stream sent an overlong line");
    }
  } finally {
    // A reader that stops early hangs up, which is how the router learns to stop the node.
    if (!ended) await reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}
