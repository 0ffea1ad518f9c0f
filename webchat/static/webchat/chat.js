// The chat page: model picker, conversation, streaming answers, and the header's figures.
//
// The conversation lives in this page only. It is kept in localStorage only when the user
// ticks "Keep this chat in this browser"; the router stores nothing.

import { ApiError, fetchHealth, fetchModels, streamChat } from "./api.js";
import { LiveMarkdown, renderMarkdown, visible } from "./markdown.js";
import { copyText, plural, storage } from "./helpers.js";

const REFRESH_MS = 15_000;
// The last block of an answer is rendered again as it grows. Once it is this long, rendering it
// may take longer than a frame, so it is rendered at most every LONG_BLOCK_MS while it streams.
const LONG_BLOCK_CHARS = 4096;
const LONG_BLOCK_MS = 150;
const KEYS = {
  privacy: "idleclaw.privacy-understood",
  keep: "idleclaw.keep-chat",
  chat: "idleclaw.chat",
};

const byId = (id) => document.getElementById(id);
const main = byId("chat");
const select = byId("model");
const think = byId("think");
const thinkLabel = byId("think-label");
const modelInfo = byId("model-info");
const conversation = byId("conversation");
const prompt = byId("prompt");
const sendButton = byId("send");
const stopButton = byId("stop");
const keep = byId("keep");
const summary = byId("network-summary");

const limits = {
  content: Number(main.dataset.maxContentChars),
  messages: Number(main.dataset.maxMessages),
  total: Number(main.dataset.maxTotalChars),
};

// Models seen lately, so one that loses its last node stays in the picker, greyed, instead of
// vanishing under the user's cursor. A node that keeps renaming its models must not grow the
// list without end: a model unseen for KNOWN_MS is forgotten, and at most MAX_KNOWN are kept.
const KNOWN_MS = 10 * 60_000;
const MAX_KNOWN = 200;
const known = new Map(); // name -> { info, seen }, the longest unseen first
let live = new Map();
const turns = [];
let current = null; // { controller, turn } while an answer streams

// --- the network: header figures and the model picker ------------------------------------

async function refreshNetwork() {
  try {
    const [health, models] = await Promise.all([fetchHealth(), fetchModels()]);
    summary.textContent =
      `${plural(health.node_count, "node")} online · ${plural(models.length, "model")}`;
    showModels(models);
  } catch {
    summary.textContent = "The router cannot be reached right now";
  }
}

function describe(info) {
  if (!live.has(info.name)) return "no node serves it right now";
  const parts = [plural(info.nodes, "node"), plural(info.freeSlots, "free slot")];
  if (info.freeSlots === 0) parts[1] = "all slots busy, requests wait in a queue";
  const can = [info.thinking && "thinking", info.tools && "tools"].filter(Boolean);
  if (can.length) parts.push(`can: ${can.join(", ")}`);
  return parts.join(" · ");
}

function showModels(models) {
  live = new Map(models.map((info) => [info.name, info]));
  const now = Date.now();
  for (const info of models) {
    known.delete(info.name); // to the end of the order
    known.set(info.name, { info, seen: now });
  }
  for (const [name, { seen }] of known) {
    if (live.has(name) || (known.size <= MAX_KNOWN && now - seen <= KNOWN_MS)) break;
    known.delete(name);
  }
  const order = [...models.map((info) => info.name),
    ...[...known.keys()].filter((name) => !live.has(name))];
  const options = new Map([...select.options].map((option) => [option.value, option]));
  const chosen = select.value;
  for (const name of order) {
    const option = options.get(name) ?? document.createElement("option");
    option.value = name;
    option.textContent = `${name} (${describe(known.get(name).info)})`;
    option.disabled = !live.has(name);
    select.append(option); // moves an existing option into its new place
    options.delete(name);
  }
  for (const option of options.values()) option.remove(); // the "no models yet" placeholder
  if (!select.options.length) {
    const none = document.createElement("option");
    none.value = "";
    none.textContent = "No model is online";
    none.disabled = true;
    select.append(none);
  }
  if (chosen && known.has(chosen)) select.value = chosen;
  else if (models.length) select.value = models[0].name;
  showModel();
}

function showModel() {
  const info = known.get(select.value)?.info;
  modelInfo.textContent = info ? `${info.name}: ${describe(info)}` : "No node is online yet.";
  const thinks = Boolean(info?.thinking);
  think.disabled = !thinks;
  thinkLabel.title = thinks
    ? "Let the model think before it answers; the reasoning is shown above the answer"
    : "Only thinking models can think";
  updateButtons();
}

// --- the conversation ---------------------------------------------------------------------

function userTurn(text) {
  const node = byId("user-turn").content.firstElementChild.cloneNode(true);
  node.querySelector(".user-text").textContent = text;
  conversation.append(node);
  const turn = { role: "user", content: text, node };
  turns.push(turn);
  return turn;
}

function assistantTurn(model) {
  const node = byId("assistant-turn").content.firstElementChild.cloneNode(true);
  conversation.append(node);
  const turn = {
    role: "assistant", model, content: "", reasoning: "", node,
    finish: null, usage: null, error: null, retryAfter: null, stopped: false,
  };
  turns.push(turn);
  return turn;
}

function part(turn, selector) {
  return turn.node.querySelector(selector);
}

function setStatus(turn, text) {
  const status = part(turn, ".turn-status");
  status.textContent = text;
  status.hidden = !text;
}

/** The messages the router gets for ``turn``: the newest that fit its limits. */
function historyBefore(turn) {
  const messages = [];
  for (const earlier of turns) {
    if (earlier === turn) break;
    // A stopped or failed answer may be empty; the router takes no empty message.
    if (earlier.content) {
      messages.push({ role: earlier.role, content: earlier.content.slice(0, limits.content) });
    }
  }
  const kept = [];
  let total = 0;
  for (const message of messages.reverse()) {
    if (kept.length >= limits.messages || total + message.content.length > limits.total) break;
    kept.unshift(message);
    total += message.content.length;
  }
  while (kept.length && kept[0].role !== "user") kept.shift();
  return kept;
}

function nearBottom() {
  return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 120;
}

function followAnswer(stick) {
  if (stick) window.scrollTo(0, document.documentElement.scrollHeight);
}

async function ask() {
  const model = select.value;
  const info = known.get(model)?.info;
  const turn = assistantTurn(model);
  const controller = new AbortController();
  current = { controller, turn };
  updateButtons();
  turn.node.setAttribute("aria-busy", "true");
  setStatus(turn, "Sending…");
  const answer = new LiveMarkdown(part(turn, ".answer"));
  const reasoning = part(turn, ".reasoning");
  const reasoningText = part(turn, ".reasoning-text");
  let frame = 0;
  let timer = 0;
  let painted = 0;
  const paint = () => {
    frame = 0;
    const stick = nearBottom();
    answer.update(turn.content);
    followAnswer(stick);
    painted = performance.now();
  };
  // One render per frame however many tokens arrived in it, and a long last block less often.
  const schedule = () => {
    if (frame || timer) return;
    const long = answer.tailLength(turn.content) > LONG_BLOCK_CHARS;
    const wait = long ? painted + LONG_BLOCK_MS - performance.now() : 0;
    if (wait > 0) {
      timer = setTimeout(() => {
        timer = 0;
        frame = requestAnimationFrame(paint);
      }, wait);
    } else {
      frame = requestAnimationFrame(paint);
    }
  };
  try {
    const events = streamChat({
      model,
      messages: historyBefore(turn),
      think: info?.thinking ? think.checked : null,
      signal: controller.signal,
    });
    for await (const event of events) {
      if (event.queued !== undefined) {
        setStatus(turn, `Waiting for a free node: position ${event.queued} in the queue`);
      } else if (event.reasoning) {
        setStatus(turn, "");
        turn.reasoning += event.reasoning;
        if (reasoning.hidden) {
          reasoning.hidden = false;
          part(turn, ".reasoning summary").textContent = "Thinking…";
        }
        reasoningText.append(event.reasoning); // a text node: never parsed
      } else if (event.content) {
        setStatus(turn, "");
        turn.content += event.content;
        schedule();
      } else if (event.finish) {
        turn.finish = event.finish;
        turn.usage = event.usage;
      } else if (event.error) {
        turn.error = event.error;
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      turn.stopped = true;
    } else if (error instanceof ApiError) {
      turn.error = error.message;
      turn.retryAfter = error.retryAfter;
    } else {
      turn.error = "the router cannot be reached; check your connection";
    }
  } finally {
    clearTimeout(timer);
    cancelAnimationFrame(frame);
    paint();
    current = null;
    finishTurn(turn);
    save();
    refreshNetwork(); // slots changed, and a refusal may mean the model is gone
  }
}

function finishTurn(turn) {
  turn.node.removeAttribute("aria-busy");
  setStatus(turn, "");
  part(turn, ".reasoning summary").textContent = "Reasoning";
  const notes = [turn.model];
  if (turn.usage?.completion_tokens) notes.push(plural(turn.usage.completion_tokens, "token"));
  if (turn.finish === "length") notes.push("cut at the answer length limit");
  if (turn.stopped) notes.push("stopped");
  part(turn, ".turn-meta").textContent = notes.join(" · ");
  if (turn.error) showError(turn);
  updateButtons();
}

function showError(turn) {
  part(turn, ".turn-error").hidden = false;
  part(turn, ".turn-error-text").textContent = `Error: ${turn.error}`;
  const countdown = part(turn, ".countdown");
  const retry = part(turn, ".retry");
  const regenerate = part(turn, ".regenerate");
  // The router's Retry-After: Retry and Regenerate (the same request) wait for it, counting down.
  let left = turn.retryAfter ?? 0;
  const tick = () => {
    countdown.hidden = left <= 0;
    countdown.textContent = left > 0 ? `You can retry in ${plural(left, "second")}.` : "";
    retry.disabled = left > 0;
    regenerate.disabled = left > 0;
    left -= 1;
    if (left >= 0) turn.timer = setTimeout(tick, 1000);
  };
  tick();
}

function dropTurn(turn) {
  clearTimeout(turn.timer);
  turn.node.remove();
  turns.splice(turns.indexOf(turn), 1);
}

function updateButtons() {
  const busy = current !== null;
  sendButton.disabled = busy || !select.value;
  stopButton.hidden = !busy;
  sendButton.hidden = busy;
  const last = turns.at(-1);
  for (const turn of turns) {
    if (turn.role !== "assistant") continue;
    const isLast = turn === last && !busy;
    part(turn, ".regenerate").hidden = !isLast;
    part(turn, ".retry").hidden = !isLast || !turn.error;
    part(turn, ".copy-answer").hidden = turn === current?.turn;
  }
}

function send() {
  const text = prompt.value.trim();
  if (!text || current || !select.value) return;
  userTurn(text);
  prompt.value = "";
  ask();
}

function stop() {
  current?.controller.abort();
}

function regenerate() {
  const last = turns.at(-1);
  if (current || last?.role !== "assistant") return;
  dropTurn(last);
  ask();
}

function newChat() {
  stop();
  for (const turn of [...turns]) dropTurn(turn);
  save();
  prompt.focus();
}

function flash(button, text) {
  const before = [button.textContent, button.getAttribute("aria-label")];
  button.textContent = text;
  if (before[1]) button.setAttribute("aria-label", text);
  setTimeout(() => {
    button.textContent = before[0];
    if (before[1]) button.setAttribute("aria-label", before[1]);
  }, 1500);
}

conversation.addEventListener("click", async (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  if (button.classList.contains("copy-code")) {
    // As shown: invisible characters are already markers (markdown.js, visible()).
    const code = button.closest(".code-block").querySelector("code").textContent;
    flash(button, (await copyText(code)) ? "Copied" : "Copy failed");
  } else if (button.classList.contains("copy-answer")) {
    const turn = turns.find((candidate) => candidate.node.contains(button));
    // Its Markdown, with the markers the page shows for invisible characters.
    flash(button, (await copyText(visible(turn.content))) ? "Copied" : "Copy failed");
  } else if (button.classList.contains("regenerate") || button.classList.contains("retry")) {
    regenerate();
  }
});

// --- keeping the chat in this browser (opt-in) ---------------------------------------------

function save() {
  if (!keep.checked) {
    storage.remove(KEYS.chat);
    return;
  }
  const kept = turns
    .filter((turn) => turn !== current?.turn)
    .map(({ role, content, reasoning, model }) => ({ role, content, reasoning, model }));
  storage.set(KEYS.chat, JSON.stringify(kept));
}

function restore() {
  let saved;
  try {
    saved = JSON.parse(storage.get(KEYS.chat) ?? "[]");
  } catch {
    saved = [];
  }
  if (!Array.isArray(saved)) return;
  for (const entry of saved) {
    if (typeof entry?.content !== "string") continue;
    if (entry.role === "user") {
      userTurn(entry.content);
    } else if (entry.role === "assistant") {
      const turn = assistantTurn(String(entry.model ?? ""));
      turn.content = entry.content;
      renderMarkdown(turn.content, part(turn, ".answer"));
      if (typeof entry.reasoning === "string" && entry.reasoning) {
        turn.reasoning = entry.reasoning;
        part(turn, ".reasoning").hidden = false;
        part(turn, ".reasoning-text").textContent = entry.reasoning;
      }
      finishTurn(turn);
    }
  }
}

keep.addEventListener("change", () => {
  if (keep.checked) storage.set(KEYS.keep, "1");
  else storage.remove(KEYS.keep);
  save();
});

// --- wiring -----------------------------------------------------------------------------

byId("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && current) {
    event.preventDefault();
    stop();
  }
});
stopButton.addEventListener("click", stop);
byId("new-chat").addEventListener("click", newChat);
select.addEventListener("change", showModel);

const privacy = byId("privacy");
if (storage.get(KEYS.privacy) !== "1") privacy.hidden = false;
byId("privacy-ok").addEventListener("click", () => {
  storage.set(KEYS.privacy, "1");
  privacy.hidden = true;
  prompt.focus();
});

keep.checked = storage.get(KEYS.keep) === "1";
if (keep.checked) restore();
showModel();
refreshNetwork();
setInterval(refreshNetwork, REFRESH_MS);
