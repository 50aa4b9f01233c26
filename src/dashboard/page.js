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

// The span the sampler's window covers: five minutes, or less on a young gateway.
function windowLabel(seconds) {
  return seconds < 60 ? seconds + " s" : Math.round(seconds / 60) + " min";
}

// Rows: codes; columns: the minutes of the window (oldest first), then the window's
// total with a bar. A minute's column header says when it ended; its title how long it
// covered (the oldest minute of a young gateway is shorter).
function answersTable(total, perMinute, windowSeconds) {
  const table = el("table", null, "answers");
  const head = el("tr");
  head.append(el("th", "code"));
  for (const minute of perMinute) {
    const ago = Math.round(minute.ended_seconds_ago / 60);
    const th = el("th", ago === 0 ? "now" : "−" + ago + "′", "minute");
    th.title = minute.seconds + " s ending " + (ago === 0 ? "now" : ago + " min ago");
    head.append(th);
  }
  head.append(el("th", windowLabel(windowSeconds)));
  table.append(head);
  const codes = Object.keys(total).sort((a, b) => Number(a) - Number(b));
  const most = Math.max(1, ...codes.map((c) => total[c]));
  for (const code of codes) {
    const row = el("tr", null, code === "0" ? "ok" : "fail");
    row.append(el("td", code, "code"));
    for (const minute of perMinute) {
      row.append(el("td", minute.answers[code] || "·", "minute"));
    }
    const countCell = el("td", total[code]);
    const bar = el("span", null, "bar");
    bar.style.width = (total[code] / most) * 6 + "em";
    countCell.append(bar);
    row.append(countCell);
    table.append(row);
  }
  if (codes.length === 0) {
    const row = el("tr");
    row.append(el("td", "no requests", "muted"));
    table.append(row);
  }
  return table;
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
    fact("watched devices", cluster.watched_devices || 0);
    card.append(facts);
    card.append(el("div", "answers by code per minute (oldest left)", "muted"));
    card.append(answersTable(cluster.answers, cluster.answers_per_minute || [], status.window_seconds));
    return card;
  });
  const unrouted = Object.keys(status.unrouted || {});
  if (unrouted.length > 0) {
    // Refused before a cluster was chosen (no credentials, unknown cluster code, …).
    const card = el("div", null, "cluster");
    card.append(el("h3", "no cluster"), el("div", "refused before routing, last " +
      windowLabel(status.window_seconds), "muted"));
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

async function refreshChanges() {
  const data = await getJson("/api/events/latest");
  const rows = data.events.map((e) => {
    const row = el("tr", null, e.cause === "observed" ? "observed" : "");
    row.append(el("td", new Date(e.time).toLocaleTimeString()), el("td", e.cluster), deviceCell(e.device),
      el("td", e.before === null ? "nobody" : e.before), el("td", e.after === null ? "nobody" : e.after),
      el("td", e.cause + (e.source ? " (" + e.source + ")" : "")));
    return row;
  });
  document.querySelector("#changes tbody").replaceChildren(...rows);
}

let failures = 0;
async function refresh() {
  try {
    const [status] = await Promise.all([getJson("/api/status"), refreshRequests(), refreshDevice(), refreshChanges()]);
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
