// Business Connector dashboard. Reads /api/status and /api/history every
// REFRESH_MS. Times are local, 24-hour, with the date when not today; the header names
// the zone. Every value from the server goes into the page through textContent (el()),
// never through innerHTML: a device name or a CUCM text cannot become markup.
"use strict";

const REFRESH_MS = 3000;
const LATEST = 50;
const CHANGES = 25;
// Logins shown in a user's whereabouts (each costs two small history queries).
const WHEREABOUTS = 8;
let search = { device: "", user: "" };
let openDevice = null;
// From /api/status: [{first, last, meaning}], the gateway's one table of code meanings.
let codeMeanings = [];

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

function pad(number, width) {
  return String(number).padStart(width, "0");
}

function sameDay(a, b) {
  return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
}

// 24-hour local time to the millisecond; the date too when it is not today. The zone is
// named once in the header (zoneLabel), not in every cell.
function formatTime(value) {
  const moment = value instanceof Date ? value : new Date(value);
  if (Number.isNaN(moment.getTime())) return String(value);
  const clock = pad(moment.getHours(), 2) + ":" + pad(moment.getMinutes(), 2) + ":" +
    pad(moment.getSeconds(), 2) + "." + pad(moment.getMilliseconds(), 3);
  if (sameDay(moment, new Date())) return clock;
  return moment.getFullYear() + "-" + pad(moment.getMonth() + 1, 2) + "-" + pad(moment.getDate(), 2) + " " + clock;
}

// "Europe/Berlin, UTC+01:00": the zone the page's times are in.
function zoneLabel() {
  const offset = -new Date().getTimezoneOffset();
  const sign = offset < 0 ? "−" : "+";
  const utc = "UTC" + sign + pad(Math.floor(Math.abs(offset) / 60), 2) + ":" + pad(Math.abs(offset) % 60, 2);
  const name = Intl.DateTimeFormat().resolvedOptions().timeZone;
  return name && name !== "UTC" ? name + ", " + utc : utc;
}

// Milliseconds with the precision that matters at their size: 0.412, 3.25, 48.3, 1520.
function formatMs(value) {
  if (value === null || value === undefined || value === "") return "";
  const ms = Number(value);
  if (!Number.isFinite(ms)) return String(value);
  if (ms < 1) return ms.toFixed(3);
  if (ms < 10) return ms.toFixed(2);
  if (ms < 100) return ms.toFixed(1);
  return String(Math.round(ms));
}

function meaningOf(code) {
  const number = Number(code);
  const entry = codeMeanings.find((m) => number >= m.first && number <= m.last);
  return entry ? entry.meaning : "";
}

// A code cell: the number, its meaning on hover.
function codeCell(code) {
  const cell = el("td", code, "code");
  const meaning = meaningOf(code);
  if (meaning) cell.title = meaning;
  return cell;
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
  head.append(el("th", "meaning"));
  table.append(head);
  const codes = Object.keys(total).sort((a, b) => Number(a) - Number(b));
  const most = Math.max(1, ...codes.map((c) => total[c]));
  for (const code of codes) {
    const row = el("tr", null, code === "0" ? "ok" : "fail");
    row.append(codeCell(code));
    for (const minute of perMinute) {
      row.append(el("td", minute.answers[code] || "·", "minute"));
    }
    const countCell = el("td", total[code]);
    const bar = el("span", null, "bar");
    bar.style.width = (total[code] / most) * 6 + "em";
    countCell.append(bar);
    row.append(countCell);
    row.append(el("td", meaningOf(code) || "not a documented code", "meaning"));
    table.append(row);
  }
  // Cache hits per minute: answered without CUCM, counted (not recorded one by one).
  if (perMinute.length > 0) {
    const hits = el("tr", null, "hits");
    hits.append(el("td", "cache hits", "code"));
    for (const minute of perMinute) hits.append(el("td", minute.cache_hits || "·", "minute"));
    table.append(hits);
  }
  if (codes.length === 0) {
    const row = el("tr");
    row.append(el("td", "no requests", "muted"));
    table.append(row);
  }
  return table;
}

function renderClusters(status) {
  codeMeanings = status.code_meanings || [];
  document.getElementById("instance").textContent =
    "instance " + status.instance + " · history " + status.history;
  document.getElementById("updated").textContent = "updated " + formatTime(new Date());
  document.getElementById("zone").textContent = "times in " + zoneLabel();
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
    fact("cache hits / min", cluster.cache_hits_per_minute === null || cluster.cache_hits_per_minute === undefined
      ? "–" : cluster.cache_hits_per_minute);
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
      row.append(codeCell(code), el("td", status.unrouted[code]), el("td", meaningOf(code), "meaning"));
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
      const cell = el("td", formatTime(entry.time), "time");
      cell.title = entry.time;
      row.append(cell);
    } else if (column === "code") {
      row.append(codeCell(entry.code));
    } else if (column === "duration_ms") {
      row.append(el("td", formatMs(entry.duration_ms), "ms"));
    } else if (column === "change") {
      const change = { logout: "logged out", observed: "seen at the phone" }[entry.operation] || "logged in";
      row.append(el("td", change, entry.operation));
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

// Successful logins and logouts, and changes seen at the phones, newest first: the
// history's change operations.
async function refreshChanges() {
  const [logins, logouts, observed] = await Promise.all([
    getJson(historyUrl({ operation: "login", code: "0" }, CHANGES)),
    getJson(historyUrl({ operation: "logout", code: "0" }, CHANGES)),
    getJson(historyUrl({ operation: "observed" }, CHANGES)),
  ]);
  const changes = logins.entries.concat(logouts.entries, observed.entries)
    .sort((a, b) => (a.time < b.time ? 1 : a.time > b.time ? -1 : 0))
    .slice(0, CHANGES);
  // A logout names no user; the login before it on the same device, when listed, does.
  changes.forEach((change, index) => {
    if (change.operation !== "logout" || change.user) return;
    const before = changes.slice(index + 1).find((older) => older.device === change.device);
    if (before && before.operation === "login") change.user = before.user;
  });
  const columns = ["time", "change", "device", "user", "app"];
  document.querySelector("#changes tbody").replaceChildren(...changes.map((e) => requestRow(e, columns)));
}

// What ended a login: the first successful logout of the device after it, or another
// login there (a force login replaces the user). Undefined while neither happened.
async function endOf(login) {
  const after = { device: login.device, code: "0", since: login.time };
  const [logouts, logins] = await Promise.all([
    getJson(historyUrl(Object.assign({ operation: "logout" }, after), 100)),
    getJson(historyUrl(Object.assign({ operation: "login" }, after), 100)),
  ]);
  const later = logouts.entries.concat(logins.entries.filter((e) => !(e.time === login.time && e.user === login.user)));
  later.sort((a, b) => (a.time < b.time ? -1 : a.time > b.time ? 1 : 0));
  return later[0];
}

async function refreshUser() {
  const panel = document.getElementById("user-panel");
  if (!search.user) {
    panel.hidden = true;
    return;
  }
  const data = await getJson(historyUrl({ user: search.user, operation: "login", code: "0" }, WHEREABOUTS));
  const ends = await Promise.all(data.entries.map(endOf));
  const rows = data.entries.map((login, index) => {
    const end = ends[index];
    const row = el("tr");
    row.append(deviceCell(login.device), el("td", login.cluster));
    const at = el("td", formatTime(login.time), "time");
    at.title = login.time;
    row.append(at, el("td", login.app), el("td", login.client));
    if (!end) {
      row.append(el("td", "still logged in (no logout recorded)", "muted"), el("td"), el("td"));
    } else {
      const what = end.operation === "logout" ? "" : " (replaced by " + (end.user || "another user") + ")";
      const ended = el("td", formatTime(end.time) + what, "time");
      ended.title = end.time;
      row.append(ended, el("td", end.app), el("td", end.client));
    }
    return row;
  });
  if (rows.length === 0) {
    const row = el("tr");
    row.append(el("td", "no successful login of this user in the history", "muted"));
    rows.push(row);
  }
  document.getElementById("user-title").textContent = "Where " + search.user + " was logged in";
  document.querySelector("#user-whereabouts tbody").replaceChildren(...rows);
  panel.hidden = false;
}

async function refreshDevice() {
  const panel = document.getElementById("device-panel");
  if (!openDevice) {
    panel.hidden = true;
    return;
  }
  const data = await getJson(historyUrl({ device: openDevice }, 100));
  const columns = ["time", "operation", "user", "code", "text", "duration_ms", "source", "node", "client", "app", "instance"];
  document.getElementById("device-title").textContent = "History of " + openDevice;
  document.querySelector("#device-history tbody").replaceChildren(...data.entries.map((e) => requestRow(e, columns)));
  panel.hidden = false;
}


let failures = 0;
async function refresh() {
  try {
    // Status first: the tables name codes with its meanings.
    renderClusters(await getJson("/api/status"));
    await Promise.all([refreshRequests(), refreshChanges(), refreshUser(), refreshDevice()]);
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
    Promise.all([refreshRequests(), refreshUser()]).catch((error) => showError(error.message));
  });
  document.getElementById("search-clear").addEventListener("click", () => {
    document.getElementById("search-device").value = "";
    document.getElementById("search-user").value = "";
    search = { device: "", user: "" };
    Promise.all([refreshRequests(), refreshUser()]).catch((error) => showError(error.message));
  });
  document.getElementById("device-close").addEventListener("click", () => {
    openDevice = null;
    document.getElementById("device-panel").hidden = true;
  });
  // #device=SEP… opens a device's history; #user=… searches a user (links to share).
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("device")) openDevice = hash.get("device");
  if (hash.get("user")) {
    search.user = hash.get("user");
    document.getElementById("search-user").value = search.user;
  }
  refresh();
});
