// Kestrel console: plain JavaScript on the public REST API and the SSE stream only (ADR-0021), no build step.
const API = "/api/v1";
const $ = (sel) => document.querySelector(sel);
const state = { token: sessionStorage.getItem("kestrel.token"), tenant: "", scopes: [], devices: new Map(),
  cursor: "", source: null, device: null, series: null, plot: null, etag: "" };

// ------------------------------------------------------------------------------------------------ API helper
async function api(path, { method = "GET", body, headers = {} } = {}) {
  const init = { method, headers: { Authorization: `Bearer ${state.token}`, ...headers } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(API + path, init);
  if (response.status === 401) { signOut("Your token is no longer valid: sign in again."); throw new Error("401"); }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const error = new Error((data && (data.detail || data.title)) || response.statusText);
    error.status = response.status;
    throw error;
  }
  return { data, etag: response.headers.get("ETag") };
}

function show(message) {
  const banner = $("#error");
  banner.textContent = message;
  banner.hidden = !message;
  if (message) setTimeout(() => { banner.hidden = true; }, 6000);
}

const text = (value) => document.createTextNode(value == null ? "" : String(value));
function cell(row, value, cls) {
  const td = row.insertCell();
  if (value instanceof Node) td.append(value); else td.append(text(value));
  if (cls) td.className = cls;
  return td;
}
function pill(value) {
  const span = document.createElement("span");
  span.className = `status ${value}`;
  span.textContent = value;
  return span;
}
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "never");
const has = (scope) => state.scopes.includes(scope);

// ------------------------------------------------------------------------------------------------ sign in
async function signIn(event) {
  event.preventDefault();
  const button = $("#signin");
  button.disabled = true;
  $("#signin-error").textContent = "";
  try {
    const clientId = $("#client-id").value.trim();
    if (clientId) {
      const form = new URLSearchParams({ grant_type: "client_credentials" });
      const response = await fetch(`${API}/oauth/token`, { method: "POST", body: form,
        headers: { Authorization: `Basic ${btoa(`${clientId}:${$("#client-secret").value}`)}` } });
      const data = await response.json();
      if (!response.ok) throw new Error(data.error_description || data.error || "refused");
      state.token = data.access_token;
    } else {
      state.token = $("#token").value.trim();
    }
    await start();
    sessionStorage.setItem("kestrel.token", state.token);
    $("#token").value = "";
    location.hash = location.hash && location.hash !== "#/" ? location.hash : "#/fleet";
    route();
  } catch (error) {
    state.token = null;
    $("#signin-error").textContent = `Sign-in refused: ${error.message === "401" ? "unknown or expired token" : error.message}`;
  } finally {
    button.disabled = false;
  }
}

async function start() {
  const { data } = await api("/stream/tickets", { method: "POST" });
  state.tenant = data.tenant;
  state.scopes = data.scopes;
  $("#nav").hidden = false;
  $("#signout").hidden = false;
  $("#signin-view").hidden = true;
  $("#nav-alarms").hidden = !has("alarms:read");
  $("#nav-admin").hidden = !has("tokens:read");
  document.title = `Kestrel · ${state.tenant}`;
  connect(data.ticket);
}

function signOut(message) {
  sessionStorage.removeItem("kestrel.token");
  state.token = null;
  if (state.source) state.source.close();
  for (const id of ["#fleet-view", "#device-view", "#alarms-view", "#admin-view", "#nav", "#signout", "#live"]) $(id).hidden = true;
  $("#signin-view").hidden = false;
  $("#signin-error").textContent = message || "";
}

// ------------------------------------------------------------------------------------------------ live stream
function connect(ticket) {
  const params = new URLSearchParams({ ticket });
  if (state.cursor) params.set("cursor", state.cursor);
  const source = new EventSource(`${API}/stream?${params}`);
  state.source = source;
  const live = $("#live");
  live.hidden = false;
  source.onopen = () => { live.textContent = "live"; live.className = "live on"; };
  for (const kind of ["telemetry", "presence", "shadow", "command", "lifecycle", "alarm"]) {
    source.addEventListener(kind, (message) => {
      state.cursor = message.lastEventId || state.cursor;
      onEvent(JSON.parse(message.data));
    });
  }
  source.addEventListener("heartbeat", (message) => { state.cursor = message.lastEventId || state.cursor; });
  const again = () => {  // a ticket opens one stream: buy another and resume from the cursor (nothing missed)
    source.close();
    live.textContent = "reconnecting…";
    live.className = "live";
    if (!state.token) return;
    setTimeout(async () => {
      try { connect((await api("/stream/tickets", { method: "POST" })).data.ticket); } catch { again(); }
    }, 1500);
  };
  source.addEventListener("lagged", again);
  source.addEventListener("end", again);
  source.onerror = again;
}

function onEvent(event) {
  const device = state.devices.get(event.device);
  if (event.kind === "presence" && device) {
    device.online = event.data.online;
    device.last_seen = new Date(event.data.at).toISOString();
    renderFleet();
  }
  if (event.kind === "telemetry") {
    const readings = event.data.readings;
    const last = readings[readings.length - 1];
    if (device) {
      device.latest = last.metrics;
      device.last_seen = new Date(last.ts).toISOString();
      renderFleetRow(device);
    }
    if (state.device === event.device) for (const r of readings) addPoint(r.ts, r.metrics);
  }
  if (state.device !== event.device) {
    if (event.kind === "alarm" && !$("#alarms-view").hidden) loadAlarms();
    return;
  }
  if (event.kind === "shadow") renderShadow({ ...event.data, desired: event.data.desired }, null, false);
  if (event.kind === "command") updateCommand(event.data.command_id, event.data.event);
  if (event.kind === "presence") setPresence(event.data.online);
  if (event.kind === "alarm" && !$("#alarms-view").hidden) loadAlarms();
}

// ------------------------------------------------------------------------------------------------ fleet
async function loadFleet() {
  const devices = [];
  let cursor = "";
  do {
    const { data } = await api(`/devices?limit=500${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    devices.push(...data.items);
    cursor = data.next_cursor;
  } while (cursor && devices.length < 5000);
  const presence = new Map();
  try {
    for (const p of (await api("/presence?limit=1000")).data) presence.set(p.device_id, p);
  } catch { /* presence needs devices:read too; shown as unknown */ }
  state.devices = new Map(devices.map((d) => {
    const p = presence.get(d.device_id) || {};
    return [d.device_id, { ...d, online: !!p.online, last_seen: p.last_seen, latest: null }];
  }));
  renderFleet();
}

function renderFleet() {
  const query = $("#search").value.trim().toLowerCase();
  const status = $("#status-filter").value;
  const body = $("#fleet tbody");
  body.replaceChildren();
  let shown = 0;
  for (const device of state.devices.values()) {
    const haystack = `${device.device_id} ${device.name} ${device.tags.join(" ")}`.toLowerCase();
    if (query && !haystack.includes(query)) continue;
    if (status && (status === "online") !== device.online) continue;
    const row = body.insertRow();
    row.dataset.device = device.device_id;
    fillFleetRow(row, device);
    shown += 1;
  }
  $("#fleet-empty").hidden = shown > 0;
  $("#fleet-count").textContent = `${shown} of ${state.devices.size} devices · ` +
    `${[...state.devices.values()].filter((d) => d.online).length} online`;
}

function fillFleetRow(row, device) {
  row.replaceChildren();
  const link = document.createElement("a");
  link.href = `#/device/${encodeURIComponent(device.device_id)}`;
  link.textContent = device.device_id;
  cell(row, link);
  cell(row, device.name);
  cell(row, pill(device.online ? "online" : "offline"), "presence");
  cell(row, when(device.last_seen), "seen");
  cell(row, device.tags.join(", "));
  const latest = device.latest ? Object.entries(device.latest).slice(0, 3).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ") : "";
  cell(row, latest, "latest");
}

function renderFleetRow(device) {
  const row = document.querySelector(`#fleet tr[data-device="${CSS.escape(device.device_id)}"]`);
  if (row) fillFleetRow(row, device);
}

const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(2)) : String(v));

// ------------------------------------------------------------------------------------------------ device page
async function openDevice(id) {
  const { data: found } = await api(`/devices/${encodeURIComponent(id)}`);  // 404 for another tenant's: said, not shown
  state.device = id;
  state.series = new Map();
  $("#device-title").textContent = found.name && found.name !== id ? `${id} · ${found.name}` : id;
  $("#live-value").textContent = "–";
  $("#metric").replaceChildren();
  $("#chart").replaceChildren();
  state.plot = null;
  $("#chart-empty").hidden = false;
  const from = new Date(Date.now() - 15 * 60 * 1000).toISOString();
  const [presence, telemetry, shadow, commands, connections] = await Promise.allSettled([
    api(`/devices/${id}/presence`), api(`/devices/${id}/telemetry?from=${from}&limit=1000`),
    api(`/devices/${id}/shadow`), api(`/devices/${id}/commands?limit=20`), api(`/devices/${id}/connections?limit=10`),
  ]);
  if (state.device !== id) return;
  if (presence.status === "fulfilled") setPresence(presence.value.data.online);
  if (telemetry.status === "fulfilled") {
    for (const point of telemetry.value.data.points) {
      if (point.value && typeof point.value === "object") addPoint(Date.parse(point.ts), point.value);
    }
  }
  if (shadow.status === "fulfilled") renderShadow(shadow.value.data, shadow.value.etag, true);
  else renderShadow({ desired: {}, reported: {}, delta: {}, version: 0 }, null, true);
  const body = $("#commands tbody");
  body.replaceChildren();
  if (commands.status === "fulfilled") for (const c of commands.value.data) addCommandRow(c, false);
  const list = $("#connections");
  list.replaceChildren();
  if (connections.status === "fulfilled") {
    for (const c of connections.value.data) {
      const li = document.createElement("li");
      li.textContent = `${when(c.connected_at)} → ${c.disconnected_at ? when(c.disconnected_at) : "now"}` +
        `${c.reason ? ` (${c.reason})` : ""}${c.peer ? ` from ${c.peer}` : ""}`;
      list.append(li);
    }
    if (!connections.value.data.length) list.append(Object.assign(document.createElement("li"), { textContent: "Never connected." }));
  }
}

function setPresence(online) {
  const el = $("#device-presence");
  el.textContent = online ? "online" : "offline";
  el.className = `pill ${online ? "online" : "offline"}`;
}

function addPoint(ts, metrics) {
  for (const [name, value] of Object.entries(metrics)) {
    if (typeof value !== "number") continue;
    if (!state.series.has(name)) {
      state.series.set(name, []);
      const option = document.createElement("option");
      option.value = option.textContent = name;
      $("#metric").append(option);
    }
    const points = state.series.get(name);
    points.push([ts / 1000, value]);
    if (points.length > 2000) points.shift();
  }
  drawChart();
}

function drawChart() {
  const name = $("#metric").value;
  const points = state.series.get(name);
  if (!points || !points.length) return;
  const sorted = [...points].sort((a, b) => a[0] - b[0]);
  const last = sorted[sorted.length - 1];
  const live = $("#live-value");
  live.textContent = fmt(last[1]);
  live.dataset.metric = name;
  live.dataset.value = String(last[1]);
  $("#chart-empty").hidden = true;
  const data = [sorted.map((p) => p[0]), sorted.map((p) => p[1])];
  const width = $("#chart").clientWidth || 600;
  if (!state.plot || state.plot.series[1].label !== name) {
    $("#chart").replaceChildren();
    if (!window.uPlot) return;
    state.plot = new window.uPlot({ width, height: 260, series: [{}, { label: name, stroke: "#0b6bcb", width: 2 }],
      axes: [{}, { size: 60 }] }, data, $("#chart"));
  } else {
    state.plot.setData(data);
  }
}

function renderShadow(shadow, etag, replaceDesired) {
  if (etag) state.etag = etag;
  else if (shadow.version !== undefined) state.etag = `"s${shadow.version}"`;
  $("#shadow-version").textContent = `version ${shadow.version ?? "–"}`;
  const editor = $("#shadow-desired");
  if (replaceDesired || document.activeElement !== editor) editor.value = JSON.stringify(shadow.desired || {}, null, 2);
  $("#shadow-reported").textContent = JSON.stringify(shadow.reported || {}, null, 2);
  $("#shadow-delta").textContent = JSON.stringify(shadow.delta || {}, null, 2);
}

async function saveDesired() {
  const status = $("#shadow-status");
  let desired;
  try { desired = JSON.parse($("#shadow-desired").value || "{}"); } catch (error) {
    status.textContent = `Not JSON: ${error.message}`; status.className = "error"; return;
  }
  try {
    const { data, etag } = await api(`/devices/${state.device}/shadow`, { method: "PATCH", body: { desired },
      headers: state.etag ? { "If-Match": state.etag } : {} });
    renderShadow(data, etag, true);
    status.textContent = `Saved: version ${data.version}.`; status.className = "";
  } catch (error) {
    status.className = "error";
    status.textContent = error.status === 412 ? "Someone changed the shadow first: reloaded it, check and save again."
      : `Not saved: ${error.message}`;
    if (error.status === 412) {
      const { data, etag } = await api(`/devices/${state.device}/shadow`);
      renderShadow(data, etag, true);
    }
  }
}

function addCommandRow(command, first) {
  const body = $("#commands tbody");
  const row = first ? body.insertRow(0) : body.insertRow();
  row.dataset.command = command.command_id;
  cell(row, command.name);
  cell(row, pill(command.status), "status-cell");
  cell(row, when(command.created_at));
}

function updateCommand(id, status) {
  const row = document.querySelector(`#commands tr[data-command="${CSS.escape(id)}"] .status-cell`);
  if (row) row.replaceChildren(pill(status));
}

async function sendCommand(event) {
  event.preventDefault();
  const error = $("#command-error");
  error.textContent = "";
  let params;
  try { params = JSON.parse($("#command-params").value || "{}"); } catch (e) { error.textContent = `Parameters are not JSON: ${e.message}`; return; }
  try {
    const { data } = await api(`/devices/${state.device}/commands`, { method: "POST",
      body: { name: $("#command-name").value.trim(), params } });
    addCommandRow(data, true);
  } catch (e) {
    error.textContent = `Not sent: ${e.message}`;
  }
}

// ------------------------------------------------------------------------------------------------ alarms
async function loadAlarms() {
  const status = $("#alarm-status").value;
  const { data } = await api(`/alarms?limit=200${status ? `&status=${status}` : ""}`);
  const body = $("#alarms tbody");
  body.replaceChildren();
  for (const alarm of data.items || data) {
    const row = body.insertRow();
    row.dataset.alarm = alarm.alarm_id;
    cell(row, pill(alarm.severity));
    cell(row, alarm.rule_name);
    const link = document.createElement("a");
    link.href = `#/device/${encodeURIComponent(alarm.device_id)}`;
    link.textContent = alarm.device_id;
    cell(row, link);
    cell(row, when(alarm.raised_at));
    cell(row, `${alarm.status}${alarm.acknowledged ? ", acknowledged" : ""}`);
    const actions = cell(row, "");
    if (has("alarms:write")) {
      for (const [label, verb, shown] of [["Acknowledge", "acknowledge", !alarm.acknowledged], ["Clear", "clear", alarm.status === "active"]]) {
        if (!shown) continue;
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = label;
        button.onclick = async () => {
          try { await api(`/alarms/${alarm.alarm_id}/${verb}`, { method: "POST" }); loadAlarms(); } catch (e) { show(e.message); }
        };
        actions.append(button);
      }
    }
  }
  $("#alarms-empty").hidden = body.rows.length > 0;
}

// ------------------------------------------------------------------------------------------------ admin
const READ_ONLY = ["devices:read", "telemetry:read", "groups:read", "rules:read", "alarms:read"];
async function loadAdmin() {
  const tokens = await api("/tokens");
  const body = $("#tokens tbody");
  body.replaceChildren();
  for (const token of tokens.data.items || tokens.data) {
    if (token.revoked_at) continue;
    const row = body.insertRow();
    cell(row, token.name || token.token_id);
    cell(row, token.scopes.join(" "));
    cell(row, when(token.expires_at));
    const revoke = document.createElement("button");
    revoke.type = "button";
    revoke.textContent = "Revoke";
    revoke.onclick = async () => {
      if (!confirm(`Revoke ${token.name || token.token_id}? Streams opened with it end at once.`)) return;
      try { await api(`/tokens/${token.token_id}`, { method: "DELETE" }); loadAdmin(); } catch (e) { show(e.message); }
    };
    cell(row, revoke);
  }
  if (has("users:read")) {
    const users = await api("/users");
    const ubody = $("#users tbody");
    ubody.replaceChildren();
    for (const user of users.data.items || users.data) {
      const row = ubody.insertRow();
      cell(row, user.email);
      cell(row, user.role);
      cell(row, pill(user.status));
    }
  }
}

async function createToken(event) {
  event.preventDefault();
  const scopes = $("#token-role").value === "viewer" ? READ_ONLY.filter(has) : state.scopes;
  try {
    const { data } = await api("/tokens", { method: "POST", body: { name: $("#token-name").value.trim(), scopes } });
    $("#token-secret").textContent = `New token (shown once, copy it now): ${data.token}`;
    loadAdmin();
  } catch (e) { show(e.message); }
}

// ------------------------------------------------------------------------------------------------ routing
async function route() {
  if (!state.token) return;
  const [, page, arg] = location.hash.split("/");
  for (const id of ["#fleet-view", "#device-view", "#alarms-view", "#admin-view"]) $(id).hidden = true;
  for (const link of document.querySelectorAll("#nav a")) link.removeAttribute("aria-current");
  state.device = null;
  try {
    if (page === "device" && arg) {
      await openDevice(decodeURIComponent(arg));
      $("#device-view").hidden = false;
      state.plot = null;  // drawn again now that the page has its width
      drawChart();
    } else if (page === "alarms" && has("alarms:read")) {
      $("#alarms-view").hidden = false;
      $("#nav-alarms").setAttribute("aria-current", "page");
      await loadAlarms();
    } else if (page === "admin" && has("tokens:read")) {
      $("#admin-view").hidden = false;
      $("#nav-admin").setAttribute("aria-current", "page");
      await loadAdmin();
    } else {
      $("#fleet-view").hidden = false;
      $("#nav-fleet").setAttribute("aria-current", "page");
      await loadFleet();
    }
    $("#main").focus({ preventScroll: true });
  } catch (error) {
    if (error.message !== "401") show(`Could not load: ${error.message}`);
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("#signin-form").addEventListener("submit", signIn);
  $("#signout").addEventListener("click", () => signOut());
  $("#search").addEventListener("input", renderFleet);
  $("#status-filter").addEventListener("change", renderFleet);
  $("#metric").addEventListener("change", () => { state.plot = null; drawChart(); });
  $("#save-desired").addEventListener("click", saveDesired);
  $("#command-form").addEventListener("submit", sendCommand);
  $("#alarm-status").addEventListener("change", loadAlarms);
  $("#token-form").addEventListener("submit", createToken);
  window.addEventListener("hashchange", route);
  window.addEventListener("resize", () => { if (state.plot) state.plot.setSize({ width: $("#chart").clientWidth, height: 260 }); });
  if (state.token) {
    try { await start(); route(); } catch { signOut(); }
  }
});
