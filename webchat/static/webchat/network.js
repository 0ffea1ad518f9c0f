// The network page: live figures from /network.json and a chart of requests over the time
// the page has been open (the router keeps no history to draw an earlier one from).

import { fetchNetwork } from "./api.js";
import { plural } from "./helpers.js";

const byId = (id) => document.getElementById(id);
const main = byId("network");
const refreshMs = Number(main.dataset.refreshSeconds) * 1000;
const HOUR_MS = 3_600_000;
const SVG = "http://www.w3.org/2000/svg";

const samples = []; // { at, active, queued } for the last hour

function speed(value) {
  return value === null || value === undefined ? "not measured yet" : `${value} tokens/s`;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
}

function showModels(models) {
  const body = byId("models").tBodies[0];
  body.replaceChildren(
    ...models.map((model) => {
      const row = document.createElement("tr");
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = model.name;
      row.append(name);
      cell(row, String(model.nodes), "number");
      cell(row, String(model.free_slots), "number");
      cell(row, String(model.active), "number");
      cell(row, String(model.queued), "number");
      cell(row, model.tokens_per_s === null ? "–" : String(model.tokens_per_s), "number");
      const can = [model.thinking && "thinking", model.tools && "tools"].filter(Boolean);
      cell(row, can.join(", ") || "chat");
      return row;
    }),
  );
  byId("no-models").hidden = models.length > 0;
}

function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

function drawChart() {
  const width = 600;
  const height = 160;
  const pad = 28;
  const now = Date.now();
  const top = Math.max(1, ...samples.map((s) => Math.max(s.active, s.queued)));
  const x = (at) => pad + ((at - (now - HOUR_MS)) / HOUR_MS) * (width - pad - 8);
  const y = (value) => height - pad - (value / top) * (height - 2 * pad);
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": "Requests in flight and waiting over the last hour",
  });
  chart.append(
    svg("line", { x1: pad, y1: y(0), x2: width - 8, y2: y(0), class: "axis" }),
    svg("line", { x1: pad, y1: y(top), x2: width - 8, y2: y(top), class: "grid" }),
  );
  const label = (text, attributes) => {
    const node = svg("text", attributes);
    node.textContent = text;
    chart.append(node);
  };
  label(String(top), { x: pad - 6, y: y(top) + 4, class: "tick", "text-anchor": "end" });
  label("0", { x: pad - 6, y: y(0) + 4, class: "tick", "text-anchor": "end" });
  label("1 hour ago", { x: pad, y: height - 8, class: "tick" });
  label("now", { x: width - 8, y: height - 8, class: "tick", "text-anchor": "end" });
  for (const [key, className] of [["active", "series-active"], ["queued", "series-queued"]]) {
    const points = samples.map((s) => `${x(s.at).toFixed(1)},${y(s[key]).toFixed(1)}`);
    if (points.length) chart.append(svg("polyline", { points: points.join(" "), class: className }));
  }
  const legend = document.createElement("figcaption");
  for (const [text, className] of [["in flight", "series-active"], ["waiting", "series-queued"]]) {
    const key = document.createElement("span");
    key.className = `legend ${className}`;
    key.textContent = text;
    legend.append(key);
  }
  byId("chart").replaceChildren(chart, legend);
}

async function refresh() {
  try {
    const data = await fetchNetwork();
    byId("nodes-online").textContent = String(data.nodes_online);
    byId("models-count").textContent = String(data.models.length);
    byId("free-slots").textContent = `${data.free_slots} of ${data.slots}`;
    byId("active-requests").textContent = String(data.active_requests);
    byId("queued-requests").textContent = String(data.queued_requests);
    byId("speed").textContent = speed(data.tokens_per_s);
    byId("answers").textContent = `${data.answers_completed} (${data.answers_failed} failed)`;
    byId("network-summary").textContent =
      `${plural(data.nodes_online, "node")} online · ${plural(data.models.length, "model")}`;
    showModels(data.models);
    const now = Date.now();
    samples.push({ at: now, active: data.active_requests, queued: data.queued_requests });
    while (samples.length && samples[0].at < now - HOUR_MS) samples.shift();
    drawChart();
    byId("updated").textContent = `Updated ${new Date(now).toLocaleTimeString()}`;
  } catch {
    byId("updated").textContent = "The router cannot be reached right now; retrying.";
  }
}

refresh();
setInterval(refresh, refreshMs);
