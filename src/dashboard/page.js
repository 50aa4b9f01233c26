// Business Connector dashboard. Reads /api/status and /api/history every
// REFRESH_MS. Every value from the server goes into the page through textContent (el()),
// never through innerHTML: a device name or a CUCM text cannot become markup.
"use strict";

const REFRESH_MS = 3000;
const LATEST = 50;
let search = { device: "", user: "" };
let openDevice = null;

// Errors show on the page itself (and so in a headless browser's DOM dump).
function showError(message) {
  const box = document.getElementById("errors");
  if (!box) return;
  box.hidden = false;
  box.textContent += message + "\n";
}
window.addEventListener("error", (e) => showError("error: " + e.message));
window.addEventListener("unhandledrejection", (e) => showError("unhandled: " + e.reason));

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

async function getJson(url) {
  const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
  if (!response.ok) {
    throw new Error(url + ": HTTP " + response.status + " " + (await response.text()).trim());
  }
  return response.json();
}

function pct(ratio) {
  return ratio === null || ratio === undefined ? "–" : (ratio * 100).toFixed(0) + " %";
}

function renderClusters(status) {
  document.getElementById("instance").textContent =
    "instance " + status.instance + " · history " + status.history;
  document.getElementById("updated").textContent =
    "updated " + new Date().toLocaleTimeString();
  const box = document.getElementById("clusters");
  const cards = status.clusters.map((cluster) => {
    const card = el("div", null, "cluster");
    card.dataset.cluster = cluster.code;
    card.append(el("h3", cluster.code));
    const nodes = el("div");
    for (const node of cluster.nodes) {
      nodes.append(el("span", node.node + (node.up ? " up" : " down"), "node " + (node.up ? "up" : "down")));
    }
    if (cluster.nodes.length === 0) nodes.append(el("span", "no node health yet", "muted"));
    card.append(nodes);
    const facts = el("dl");
    const fact = (name, value, extra) => {
      const dd = el("dd", value);
      if (extra) dd.append(extra);
      facts.append(el("dt", name), dd);
    };
    const inFlight = cluster.in_flight || 0;
    const cap = cluster.max_concurrent || 0;
    const bar = el("span", null, "bar" + (cap > 0 && inFlight >= cap ? " full" : ""));
    bar.style.width = (cap > 0 ? Math.min(1, inFlight / cap) * 6 : 0) + "em";
    fact("CUCM in flight", inFlight + " / " + cap, bar);
    fact("queue depth", cluster.queue_depth || 0);
    fact("CUCM calls/s", cluster.calls_per_second === null ? "–" : cluster.calls_per_second);
    fact("cache hit ratio", pct(cluster.cache_hit_ratio));
    fact("cached devices", cluster.cache_entries || 0);
    card.append(facts);
    const minutes = Math.max(1, Math.round(status.window_seconds / 60));
    card.append(el("div", "answers by code, last " + minutes + " min", "muted"));
    const answers = el("table", null, "answers");
    const codes = Object.keys(cluster.answers).sort((a, b) => Number(a) - Number(b));
    const most = Math.max(1, ...codes.map((c) => cluster.answers[c]));
    for (const code of codes) {
      const row = el("tr", null, code === "0" ? "ok" : "fail");
      const count = cluster.answers[code];
      const countCell = el("td", count);
      const bar = el("span", null, "bar");
      bar.style.width = (count / most) * 8 + "em";
      countCell.append(bar);
      row.append(el("td", code, "code"), countCell);
      answers.append(row);
    }
    if (codes.length === 0) {
      const row = el("tr");
      row.append(el("td", "no requests", "muted"));
      answers.append(row);
    }
    card.append(answers);
    return card;
  });
  const unrouted = Object.keys(status.unrouted || {});
  if (unrouted.length > 0) {
    // Refused before a cluster was chosen (no credentials, unknown cluster code, …).
    const card = el("div", null, "cluster");
    card.append(el("h3", "no cluster"), el("div", "refused before routing, last " +
      Math.max(1, Math.round(status.window_seconds / 60)) + " min", "muted"));
    const answers = el("table", null, "answers");
    for (const code of unrouted.sort((a, b) => Number(a) - Number(b))) {
      const row = el("tr", null, "fail");
      row.append(el("td", code, "code"), el("td", status.unrouted[code]));
      answers.append(row);
    }
    card.append(answers);
    cards.push(card);
  }
  box.replaceChildren(...cards);
}

function deviceCell(device) {
  const cell = el("td");
  if (device) {
    const link = el("a", device, "device");
    link.href = "#device=" + encodeURIComponent(device);
    link.addEventListener("click", (e) => {
      e.preventDefault();
      openDevice = device;
      refreshDevice();
    });
    cell.append(link);
  }
  return cell;
}

function requestRow(entry, columns) {
  const row = el("tr", null, entry.code === 0 ? "ok" : "fail");
  for (const column of columns) {
    if (column === "device") {
      row.append(deviceCell(entry.device));
    } else if (column === "time") {
      row.append(el("td", new Date(entry.time).toLocaleTimeString() + "." + entry.time.slice(20, 23)));
    } else {
      row.append(el("td", entry[column], column === "text" ? "text" : column === "code" ? "code" : ""));
    }
  }
  return row;
}

function historyUrl(filter, limit) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(filter)) if (value) params.set(key, value);
  params.set("limit", String(limit));
  return "/api/history?" + params.toString();
}

async function refreshRequests() {
  const data = await getJson(historyUrl(search, LATEST));
  const columns = ["time", "operation", "cluster", "device", "user", "code", "text", "duration_ms", "source", "client", "app"];
  document.querySelector("#requests tbody").replaceChildren(...data.entries.map((e) => requestRow(e, columns)));
  const filtered = search.device || search.user;
  document.getElementById("requests-title").textContent = filtered
    ? "Requests matching " + [search.device && "device " + search.device, search.user && "user " + search.user].filter(Boolean).join(", ")
    : "Latest requests";
}

async function refreshDevice() {
  const panel = document.getElementById("device-panel");
  if (!openDevice) {
    panel.hidden = true;
    return;
  }
  const data = await getJson(historyUrl({ device: openDevice }, 100));
  const columns = ["time", "operation", "user", "code", "text", "duration_ms", "source", "node", "client", "instance"];
  document.getElementById("device-title").textContent = "History of " + openDevice;
  document.querySelector("#device-history tbody").replaceChildren(...data.entries.map((e) => requestRow(e, columns)));
  panel.hidden = false;
}

let failures = 0;
async function refresh() {
  try {
    const [status] = await Promise.all([getJson("/api/status"), refreshRequests(), refreshDevice()]);
    renderClusters(status);
    failures = 0;
    const box = document.getElementById("errors");
    if (box.dataset.transient) { box.hidden = true; box.textContent = ""; delete box.dataset.transient; }
  } catch (error) {
    // A gateway restart or a network blip: say so, keep polling.
    failures += 1;
    const box = document.getElementById("errors");
    box.dataset.transient = "1";
    box.hidden = false;
    box.textContent = "refresh failed (" + failures + "): " + error.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("search").addEventListener("submit", (e) => {
    e.preventDefault();
    search = {
      device: document.getElementById("search-device").value.trim(),
      user: document.getElementById("search-user").value.trim(),
    };
    refreshRequests().catch((error) => showError(error.message));
  });
  document.getElementById("search-clear").addEventListener("click", () => {
    document.getElementById("search-device").value = "";
    document.getElementById("search-user").value = "";
    search = { device: "", user: "" };
    refreshRequests().catch((error) => showError(error.message));
  });
  document.getElementById("device-close").addEventListener("click", () => {
    openDevice = null;
    document.getElementById("device-panel").hidden = true;
  });
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("device")) openDevice = hash.get("device");
  refresh();
});
