// The router's public APIs, as the page uses them. The page is an ordinary consumer: its
// answers go through /v1/chat/completions with the same limits and queue as anyone's.

import { readEvents } from "./sse.js";

/** A refusal before the answer started (4xx/5xx), with the router's own message. */
export class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter; // seconds, or null
  }
}

// The longest Retry-After the page counts down: a larger one (a misconfigured proxy, a hostile
// network in between) would keep the user from retrying for days.
const MAX_RETRY_AFTER_SECONDS = 3600;
// An HTTP-date as servers send it (RFC 9110's IMF-fixdate); Date.parse alone takes "-5" for a year.
const HTTP_DATE = /^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$/;

/** The seconds a Retry-After header asks to wait, 0..3600, or null when it says nothing valid. */
function retryAfterSeconds(header) {
  const value = (header ?? "").trim();
  let seconds;
  if (/^\d+$/.test(value)) seconds = Number(value);
  else if (HTTP_DATE.test(value)) seconds = Math.ceil((Date.parse(value) - Date.now()) / 1000);
  if (!Number.isFinite(seconds)) return null;
  return Math.min(Math.max(seconds, 0), MAX_RETRY_AFTER_SECONDS);
}

async function errorOf(response) {
  let message = `the router answered ${response.status}`;
  try {
    const body = await response.json();
    message = body?.error?.message ?? body?.detail ?? message;
  } catch {
    // not JSON: keep the status line
  }
  const retry = retryAfterSeconds(response.headers.get("Retry-After"));
  return new ApiError(response.status, String(message), retry);
}

async function getJson(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/**
 * Live models: [{ name, nodes, freeSlots, queued, thinking, tools }], largest first
 * (``/api/models``).
 */
export async function fetchModels() {
  const body = await getJson("/api/models");
  // Embedding models are listed too, flagged ``chat: false``; they cannot answer a chat.
  const chatting = body.models.filter((name) => body.capabilities?.[name]?.chat !== false);
  return chatting.map((name) => ({
    name,
    nodes: body.details?.[name]?.nodes ?? 0,
    freeSlots: body.details?.[name]?.free_slots ?? 0,
    queued: body.details?.[name]?.queued ?? 0,
    thinking: Boolean(body.capabilities?.[name]?.thinking),
    tools: Boolean(body.capabilities?.[name]?.tool_calls),
  }));
}

/** ``/health``: { node_count, ... }. */
export function fetchHealth() {
  return getJson("/health");
}

/** The network page's figures. */
export function fetchNetwork() {
  return getJson("/network.json");
}

/**
 * Ask ``model`` and yield what comes back, in order:
 * { queued: position } while waiting for a free node, { reasoning: text }, { content: text },
 * then { finish: reason, usage } or { error: message }. Throws ApiError when the router
 * refuses the request, and the fetch's AbortError when ``signal`` aborts.
 *
 * ``think``: true or false for a thinking model, null to leave it out (other models).
 */
export async function* streamChat({ model, messages, think, signal }) {
  const request = {
    model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  if (think !== null) request.reasoning_effort = think ? "medium" : "none";
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      Accept: "text/event-stream",
      // The network's own contract (PROTOCOL §2): a model no node serves is a 503 with
      // Retry-After, counted down before Retry, rather than the 404 other /v1 clients get.
      "X-IdleClaw-Contract": "network",
    },
    body: JSON.stringify(request),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  let finish = null;
  let usage = null;
  for await (const event of readEvents(response.body)) {
    if (event.comment !== undefined) {
      const queued = /^queued position=(\d+)$/.exec(event.comment);
      if (queued) yield { queued: Number(queued[1]) };
      continue;
    }
    if (event.data === "[DONE]") {
      yield { finish: finish ?? "stop", usage };
      return;
    }
    const chunk = JSON.parse(event.data);
    if (chunk.error) {
      yield { error: String(chunk.error.message ?? "the answer failed") };
      return;
    }
    if (chunk.usage) usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (!choice) continue;
    const delta = choice.delta ?? {};
    if (typeof delta.reasoning_content === "string" && delta.reasoning_content) {
      yield { reasoning: delta.reasoning_content };
    }
    if (typeof delta.content === "string" && delta.content) yield { content: delta.content };
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  yield { error: "the connection to the router was lost before the answer ended" };
}
