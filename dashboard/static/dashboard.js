// meshfed dashboard: one Socket.IO connection to /dashboard, Chart.js charts, Bootstrap tables.
// Events are documented in dashboard/events.py. Everything is rendered with textContent (no HTML
// from the server is trusted).
"use strict";

const $ = (id) => document.getElementById(id);
const socket = io("/dashboard", { transports: ["websocket"] });
const state = { rounds: [], runs: [], viewing: null, status: null, system: [], clients: [], mesh: { contributions: [], edges: [] } };
window.meshfed = state;  // handy in the browser console and for the browser tests

// --- charts -----------------------------------------------------------------------------------
// Every per-round chart has a titled "round" axis whose points sit in the middle of their slot (offset), so a
// run's first round is not drawn on the y-axis.
const ROUND_AXIS = { offset: true, title: { display: true, text: "round" } };
function lineChart(id, datasets, yOptions = {}) {
  return new Chart($(id), {
    type: "line",
    data: { labels: [], datasets: datasets.map((d) => ({ data: [], tension: 0.2, pointRadius: 3, ...d })) },
    options: { animation: false, maintainAspectRatio: false, scales: { x: ROUND_AXIS, y: yOptions } },
  });
}
// The clients chart's tooltip says who was asked and did not deliver, and why (the round's why_dropped).
function droppedLines(items) {
  const row = state.rounds[items[0].dataIndex] || {};
  return Object.entries(row.why_dropped || {}).map(([cid, why]) => `${cid}: ${why}`);
}
const charts = {
  accuracy: lineChart("chart-accuracy", [{ label: "accuracy %", borderColor: "#0d6efd", spanGaps: true }], { suggestedMin: 0, suggestedMax: 100 }),
  loss: lineChart("chart-loss", [{ label: "loss", borderColor: "#dc3545", spanGaps: true }], { min: 0, suggestedMax: 1 }),
  duration: new Chart($("chart-duration"), {
    type: "bar", data: { labels: [], datasets: [{ label: "seconds", data: [], backgroundColor: "#6c757d" }] },
    options: { animation: false, maintainAspectRatio: false, scales: { x: ROUND_AXIS, y: { beginAtZero: true } } },
  }),
  clients: new Chart($("chart-clients"), {
    type: "bar",
    data: { labels: [], datasets: [
      { label: "participating", data: [], backgroundColor: "#198754" },
      { label: "refused updates", data: [], backgroundColor: "#dc3545" },
      { label: "flagged as anomalous", data: [], backgroundColor: "#ffc107" }] },
    options: { animation: false, maintainAspectRatio: false,
      plugins: { tooltip: { callbacks: { afterBody: droppedLines } } },
      scales: { x: { ...ROUND_AXIS, stacked: true }, y: { stacked: true, beginAtZero: true, suggestedMax: 1, ticks: { precision: 0 } } } },
  }),
  bytes: new Chart($("chart-bytes"), {
    type: "bar",
    data: { labels: [], datasets: [
      { label: "upload", data: [], backgroundColor: "#0d6efd" },
      { label: "download", data: [], backgroundColor: "#20c997" }] },
    options: { animation: false, maintainAspectRatio: false, scales: { x: ROUND_AXIS, y: { beginAtZero: true } } },
  }),
  privacy: lineChart("chart-privacy", [], { beginAtZero: true }),
  system: new Chart($("chart-system"), {
    type: "line",
    data: { labels: [], datasets: [
      { label: "host CPU %", data: [], borderColor: "#fd7e14", pointRadius: 0 },
      { label: "server process CPU % (of the host)", data: [], borderColor: "#0dcaf0", pointRadius: 0 },
      { label: "host memory %", data: [], borderColor: "#6f42c1", pointRadius: 0 }] },
    options: { animation: false, maintainAspectRatio: false, scales: { y: { min: 0, max: 100 } } },
  }),
};
state.charts = charts;

function drawRounds() {
  const r = state.rounds;
  const labels = r.map((x) => x.round);
  for (const c of [charts.accuracy, charts.loss, charts.duration, charts.clients]) c.data.labels = labels;
  // a round not evaluated (eval_every) has no accuracy: a gap the line spans
  charts.accuracy.data.datasets[0].data = r.map((x) => (x.accuracy == null ? null : +(100 * x.accuracy).toFixed(2)));
  charts.loss.data.datasets[0].data = r.map((x) => x.loss);
  charts.duration.data.datasets[0].data = r.map((x) => +x.seconds.toFixed(2));
  charts.clients.data.datasets[0].data = r.map((x) => x.num_clients);
  charts.clients.data.datasets[1].data = r.map((x) => x.num_refused);
  charts.clients.data.datasets[2].data = r.map((x) => Object.keys(x.flagged || {}).length);
  // Bandwidth (round timings): the mean bytes each client moved, and the ratio to float32 (the model's size)
  const perClient = (x, way) => (x.timings?.[`${way}s`] ? x.timings[`${way}_bytes`] / x.timings[`${way}s`] : null);
  charts.bytes.data.labels = labels;
  charts.bytes.data.datasets[0].data = r.map((x) => perClient(x, "upload") && +(perClient(x, "upload") / 1024).toFixed(1));
  charts.bytes.data.datasets[1].data = r.map((x) => perClient(x, "download") && +(perClient(x, "download") / 1024).toFixed(1));
  for (const c of [charts.accuracy, charts.loss, charts.duration, charts.clients, charts.bytes]) c.update();
  const t = r.length ? r[r.length - 1].timings || {} : {};
  const ratio = (way) => (perClient(r[r.length - 1], way) ? `${(t.model_bytes / perClient(r[r.length - 1], way)).toFixed(1)}x` : "–");
  $("bandwidth-note").textContent = t.model_bytes ? `last round, float32 (${(t.model_bytes / 1024).toFixed(0)} KiB) ` +
    `over bytes per client: upload ${ratio("upload")}, download ${ratio("download")} ` +
    `(${t.delta_downloads || 0} downloads as coded steps)` : "";
  const last = [...r].reverse().find((x) => x.accuracy != null);
  $("stat-accuracy").textContent = last ? (100 * last.accuracy).toFixed(2) + "%" : "–";
  $("stat-loss").textContent = last && last.loss != null ? last.loss.toFixed(4) : "–";
  const partial = [...r].reverse().find((x) => Object.keys(x.why_dropped || {}).length);
  $("round-note").textContent = partial ? `round ${partial.round}: clients ${partial.num_clients}/${partial.num_selected}: ` +
    Object.entries(partial.why_dropped).map(([cid, why]) => `${cid} ${why}`).join(", ") : "";
  drawPrivacy();
  drawSecure();
}

// Secure aggregation: each secure round's stages (app/secagg.secure_row), newest first. The server never sees
// a single update, so nothing about one (norm, anomaly flags) can be shown.
function drawSecure() {
  const r = state.rounds.filter((x) => x.secure && x.secure.advertised).slice(-10).reverse();
  if (!r.length) return;
  $("secure-mode").textContent = "secure_aggregation: secagg+. Updates arrive masked: the server learns only their " +
    "sum, so the Flagged column and the flagged bars stay empty (no single update's norm or direction is known).";
  const body = $("secure-body");
  body.replaceChildren();
  for (const x of r) {
    const s = x.secure, row = body.insertRow();
    const bytes = Object.entries(s.bytes || {}).reduce((a, [, v]) => a + v, 0) / Math.max(1, s.advertised);
    cell(row, x.round);
    cell(row, `${s.advertised} / ${s.shared} / ${s.survivors}`);
    cell(row, s.recovered ? `${s.recovered} (${(s.dropped || []).join(", ")})` : "0");
    cell(row, `${s.neighbours}, ${s.threshold}`);
    cell(row, ["keys", "shares", "inputs", "reveal", "unmask"].map((k) => (s.seconds[k] ?? 0).toFixed(2)).join(", "));
    cell(row, `${(bytes / 1024).toFixed(1)} KiB`);
    cell(row, (s.unmask_cpu_seconds ?? 0).toFixed(3));
  }
}

// Privacy: the run's epsilon (dp client) or each client's (dp sample, local), from the rounds' privacy field;
// the budget bar turns amber at 80% (the server raises an alert there too).
const PALETTE = ["#0d6efd", "#198754", "#dc3545", "#fd7e14", "#6f42c1", "#20c997", "#d63384", "#6c757d"];
function drawPrivacy() {
  const r = state.rounds.filter((x) => x.privacy && x.privacy.mode);
  const series = {};
  for (const x of r) {
    if (x.privacy.epsilon != null) (series.run ||= {})[x.round] = x.privacy.epsilon;
    for (const [cid, e] of Object.entries(x.privacy.clients || {})) (series[cid] ||= {})[x.round] = e;
  }
  const chart = charts.privacy;
  chart.data.labels = r.map((x) => x.round);
  chart.data.datasets = Object.entries(series).map(([name, points], i) => ({
    label: name === "run" ? "the run" : name, borderColor: PALETTE[i % PALETTE.length],
    data: r.map((x) => points[x.round] ?? null), spanGaps: true }));
  chart.update();
  const last = r[r.length - 1];
  if (!last) return;
  const spent = Math.max(last.privacy.epsilon || 0, ...Object.values(series).map((p) => Math.max(...Object.values(p))));
  const target = last.privacy.target || 0;
  $("privacy-mode").textContent = `dp: ${last.privacy.mode}` + (target ? `, budget epsilon ${target}` : ", no budget");
  const share = target ? Math.min(100, (100 * spent) / target) : 0;
  $("privacy-bar").className = `progress-bar privacy-bar-${5 * Math.round(share / 5)} ${share >= 80 ? "bg-warning" : ""}`;
  $("privacy-spent").textContent = `epsilon ${spent.toFixed(3)}` + (target ? ` of ${target} (${share.toFixed(0)}%)` : "");
}

function drawSystem() {
  const s = state.system.slice(-150);
  charts.system.data.labels = s.map((x) => new Date(x.time * 1000).toLocaleTimeString());
  charts.system.data.datasets[0].data = s.map((x) => x.cpu_percent);
  charts.system.data.datasets[1].data = s.map((x) => x.process_cpu_percent ?? null);
  charts.system.data.datasets[2].data = s.map((x) => x.memory_percent);
  charts.system.update();
}

// --- tables -----------------------------------------------------------------------------------
function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}
const STATUS_BADGE = { training: "primary", idle: "success", online: "info", offline: "secondary", mesh: "warning" };
const since = (t) => (t ? Math.max(0, Math.round(Date.now() / 1000 - t)) + " s ago" : "–");

function drawClients(clients) {
  const body = $("clients-body");
  body.replaceChildren();
  for (const c of clients) {
    const row = body.insertRow();
    row.dataset.client = c.id;
    cell(row, c.id, "fw-semibold text-nowrap");  // an id never wraps mid-word (the table scrolls instead)
    cell(row, c.fingerprint.slice(0, 27) + "…", "mono");
    const badge = document.createElement("span");
    badge.className = `badge text-bg-${STATUS_BADGE[c.status] || "secondary"} client-status`;
    badge.textContent = c.status;
    const status = row.insertCell();
    status.append(badge);
    if (c.progress && c.progress.total) {  // a training client's batches done this round (its status, every second)
      const bar = document.createElement("progress");
      bar.className = "client-progress d-block";
      bar.max = c.progress.total;
      bar.value = c.progress.done;
      bar.title = `round ${c.progress.round}: ${c.progress.done} of ${c.progress.total} batches`;
      status.append(bar);
    }
    cell(row, since(c.last_seen));
    cell(row, c.num_examples ?? "–");
    cell(row, c.last_round ?? "–");
    cell(row, c.accepted);
    cell(row, c.flagged);
    cell(row, c.reputation.toFixed(2));
    cell(row, Object.entries(c.refusals).map(([k, v]) => `${k}: ${v}`).join(", ") || "none");
    cell(row, c.resources.cpu_percent?.toFixed(0) ?? "–");
    cell(row, c.resources.memory_mb?.toFixed(0) ?? "–");
  }
  if (!clients.length) cell(body.insertRow(), "No client has registered yet.", "text-secondary").colSpan = 12;
}

function drawMesh() {
  const svg = $("mesh-graph");
  const NS = "http://www.w3.org/2000/svg";
  const el = (name, attrs) => {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    return e;
  };
  const status = Object.fromEntries(state.clients.map((c) => [c.id, c.status]));
  const ids = [...new Set([...state.clients.map((c) => c.id), ...state.mesh.edges.flat()])].sort();
  const at = Object.fromEntries(ids.map((id, i) => {
    const a = (2 * Math.PI * i) / Math.max(ids.length, 1) - Math.PI / 2;
    return [id, [160 + 115 * Math.cos(a), 160 + 115 * Math.sin(a)]];
  }));
  const live = state.clients.flatMap((c) => (c.mesh_peers || []).map((p) => [c.id, p])).filter(([, p]) => at[p]);
  svg.replaceChildren();
  for (const [edges, dash] of [[state.mesh.edges, ""], [live, "4 3"]]) {
    for (const [a, b] of edges) {
      svg.append(el("line", { x1: at[a][0], y1: at[a][1], x2: at[b][0], y2: at[b][1], stroke: "#6c757d",
                              "stroke-width": 2, "stroke-dasharray": dash }));
    }
  }
  for (const id of ids) {
    const fill = { mesh: "#ffc107", training: "#0d6efd", idle: "#198754", offline: "#adb5bd" }[status[id]] || "#dee2e6";
    svg.append(el("circle", { cx: at[id][0], cy: at[id][1], r: 16, fill, "data-client": id }));
    const label = el("text", { x: at[id][0], y: at[id][1] + 32, "text-anchor": "middle", "font-size": 12 });
    label.textContent = id;
    svg.append(label);
  }
  const body = $("mesh-body");
  body.replaceChildren();
  for (const c of [...state.mesh.contributions].reverse()) {
    const row = body.insertRow();
    cell(row, c.client_id, "fw-semibold");
    cell(row, "v" + c.base_version);
    cell(row, c.local_steps);
    cell(row, c.peers.join(", ") || "nobody");
    cell(row, new Date(c.received * 1000).toLocaleTimeString());
    cell(row, c.merged_version ? `v${c.merged_version} (staleness ${c.staleness})` : "pending");
  }
  if (!state.mesh.contributions.length) {
    cell(body.insertRow(), "No client has synced offline work yet.", "text-secondary").colSpan = 6;
  }
}

function drawModels(data) {
  const body = $("models-body");
  body.replaceChildren();
  for (const v of [...data.versions].reverse()) {
    const row = body.insertRow();
    cell(row, v.version + (v.version === data.current ? " (current)" : ""), "fw-semibold");
    cell(row, v.source + (v.parent ? ` of v${v.parent}` : ""));
    cell(row, v.round ?? "–");
    cell(row, v.accuracy == null ? "–" : (100 * v.accuracy).toFixed(2) + "%");
    cell(row, v.sha256.slice(0, 16) + "…", "mono");
    cell(row, new Date(v.created * 1000).toLocaleString());
    const actions = row.insertCell();
    const link = document.createElement("a");
    link.href = `/api/model/${v.version}`;
    link.textContent = "download";
    link.className = "btn btn-sm btn-outline-secondary me-1";
    const rollback = document.createElement("button");
    rollback.className = "btn btn-sm btn-outline-warning";
    rollback.textContent = "Rollback";
    rollback.disabled = v.version === data.current || (state.status && state.status.active);
    rollback.onclick = () => {  // it replaces the global model every client trains from next: ask first
      if (!confirm(`Roll the global model back to version ${v.version}? Clients train from it next round.`)) return;
      socket.emit("rollback_model", { version: v.version }, (ack) =>
        say("models-message", ack.ok ? `rolled back: new version ${ack.model_version}` : ack.error, ack.ok));
    };
    actions.append(link, rollback);
  }
}

function addAlert(a) {
  const list = $("alerts");
  if (list.firstElementChild && list.firstElementChild.classList.contains("text-secondary")) list.replaceChildren();
  const item = document.createElement("li");
  item.className = "list-group-item";
  const badge = document.createElement("span");
  badge.className = `badge me-2 text-bg-${a.severity === "critical" ? "danger" : "warning"}`;
  badge.textContent = a.severity;
  const when = document.createElement("span");
  when.className = "text-secondary small ms-2";
  when.textContent = new Date(a.time * 1000).toLocaleTimeString();
  item.append(badge, document.createTextNode(a.message), when);
  list.prepend(item);
}

// --- config form --------------------------------------------------------------------------------
// The form is made from the run configuration's JSON Schema (config_schema event, GET /api/config/schema):
// one field per setting, a select where the schema lists choices, its help as the tooltip.
let configSchema = null;
function configNames() { return configSchema ? Object.keys(configSchema.properties) : []; }
function buildForm() {
  const box = $("config-fields");
  box.replaceChildren();
  for (const [name, field] of Object.entries(configSchema.properties)) {
    const col = document.createElement("div");
    col.className = "col-12 col-sm-6 col-lg-3";
    const lab = document.createElement("label");
    lab.className = "form-label small mb-0";
    lab.htmlFor = "cfg-" + name;
    lab.textContent = field.title || name;
    lab.title = field.description || "";
    const input = document.createElement(field.enum ? "select" : "input");
    input.className = field.enum ? "form-select form-select-sm" : "form-control form-control-sm";
    input.id = "cfg-" + name;
    input.name = name;
    input.title = field.description || "";
    for (const o of field.enum || []) input.add(new Option(o === "" ? "each client's own" : o, o));
    const feedback = document.createElement("div");
    feedback.className = "invalid-feedback";
    feedback.id = "err-" + name;
    col.append(lab, input, feedback);
    box.append(col);
  }
}
function fillForm(config) {
  for (const name of configNames()) {
    const input = $("cfg-" + name);
    if (input && document.activeElement !== input) input.value = config[name];
  }
}
// --- runs: browse an earlier run's rounds (request_metrics {run_id}); live rounds are the current run's ------
function drawRuns() {
  const select = $("run-select");
  select.replaceChildren(...state.runs.map((run) => new Option(
    `${run.id === state.currentRun ? "current: " : ""}run ${run.id}, ${run.completed_round}/${run.num_rounds} rounds, ` +
    `${run.status}${run.from_version ? `, continued from v${run.from_version}` : ""} ` +
    `(${new Date(run.created * 1000).toLocaleString()})`, run.id)));
  select.value = state.viewing || state.currentRun || "";
}
$("run-select").onchange = () => {
  state.viewing = $("run-select").value === state.currentRun ? null : $("run-select").value;
  socket.emit("request_metrics", state.viewing ? { run_id: state.viewing } : {});
};

// --- the open round's deadline, counted down here from what the last status said --------------------
function drawDeadline() {
  const s = state.status, open = s && s.open_round;
  if (!open || open.deadline_in == null || s.state !== "training") { $("deadline").textContent = ""; return; }
  const left = Math.max(0, Math.round(open.deadline_in - (Date.now() - state.statusAt) / 1000));
  $("deadline").textContent = `· deadline in ${left} s (${s.config.round_timeout} s a round)`;
}
setInterval(drawDeadline, 1000);

function say(id, text, ok) {
  $(id).textContent = text;
  $(id).className = `small ms-2 ${ok ? "text-success" : "text-danger"}`;
}

// --- socket events ------------------------------------------------------------------------------
socket.on("connect", () => {
  socket.emit("request_status");
  socket.emit("request_metrics");
});
socket.on("connect_error", (err) => {
  $("state").textContent = "disconnected";
  if (String(err.message).startsWith("unauthorized")) window.location = "/login";
});
socket.on("disconnect", () => { $("state").textContent = "disconnected"; });
socket.on("config_schema", (schema) => {
  configSchema = schema;
  buildForm();
  if (state.status) fillForm(state.status.config);
});
socket.on("status_update", (s) => {
  if (state.status && state.status.active !== s.active) $("config-message").textContent = "";  // not stale after Start/Stop
  state.status = s;
  state.statusAt = Date.now();
  drawDeadline();
  $("state").textContent = s.waiting_for ? `waiting for clients ${s.clients_online}/${s.waiting_for}` : s.state;
  $("state").className = `badge text-bg-${{ training: "primary", waiting: "info", aggregating: "primary", finished: "success", stopped: "warning" }[s.state] || "secondary"}`;
  $("round").textContent = s.round;
  $("num-rounds").textContent = s.num_rounds;
  $("stat-online").textContent = s.clients_online;
  $("stat-version").textContent = s.model_version ?? "–";
  $("btn-start").disabled = s.active;
  $("btn-stop").disabled = !s.active;
  $("btn-save").disabled = s.active;
  fillForm(s.config);
});
socket.on("metrics_history", (m) => {
  state.rounds = m.rounds;
  state.currentRun = m.current;
  state.runs = m.runs || [];
  drawRuns();
  drawRounds();
});
socket.on("privacy_update", (p) => {
  const a = p.audit;
  if (!a) return;
  const rows = Object.entries(a.attacks).map(([name, x]) =>
    `${name}: AUC ${x.auc.toFixed(3)}, TPR ${(100 * x.tpr_at_1pct_fpr).toFixed(1)}% at 1% FPR, ` +
    `epsilon lower bound ${x.epsilon_lower_bound.toFixed(2)}`);
  const verdict = a.epsilon == null ? "no DP: nothing to check" :
    (a.consistent ? `consistent with the accountant's epsilon ${a.epsilon.toFixed(2)}` :
      `EXCEEDS the accountant's epsilon ${a.epsilon.toFixed(2)}: a bug`);
  $("privacy-audit").textContent = `${rows.join("; ")} (${verdict})`;
});
socket.on("metrics_update", (row) => {
  socket.emit("request_status");
  const run = state.runs.find((x) => x.id === row.run_id);  // its menu entry's round count
  if (run) { run.completed_round = row.round; drawRuns(); }
  if (state.viewing) return;  // an earlier run is shown: its rounds do not change
  state.rounds = state.rounds.filter((r) => r.round !== row.round).concat([row]);
  drawRounds();
});
socket.on("training_started", () => {
  state.viewing = null;
  $("config-message").textContent = "";
  socket.emit("request_metrics");
});
socket.on("training_stopped", (d) => {
  say("control-message", `run ${d.run_id} ended: ${d.reason}`, true);
  socket.emit("request_metrics", state.viewing ? { run_id: state.viewing } : {});  // the run's new status
});
socket.on("clients_update", (d) => { state.clients = d.clients; drawClients(d.clients); drawMesh(); });
socket.on("mesh_update", (d) => { state.mesh = d; drawMesh(); });
socket.on("models_update", drawModels);
socket.on("system_history", (d) => { state.system = d.samples; drawSystem(); d.alerts.forEach(addAlert); });
socket.on("system_update", (s) => { state.system.push(s); drawSystem(); });
socket.on("alert", addAlert);

$("btn-start").onclick = () => socket.emit("start_training", { new_run: $("new-run").checked }, (ack) =>
  say("control-message", ack.ok ? `run ${ack.run_id} ${ack.began.how}: ${ack.began.why}` : ack.error, ack.ok));
$("btn-stop").onclick = () => socket.emit("stop_training", (ack) =>
  say("control-message", ack.ok ? "stopping…" : ack.error, ack.ok));
$("config-form").onsubmit = (event) => {
  event.preventDefault();
  const changes = {};
  for (const name of configNames()) {
    changes[name] = $("cfg-" + name).value;
    $("cfg-" + name).classList.remove("is-invalid");
  }
  socket.emit("update_config", changes, (ack) => {
    if (ack.ok) { say("config-message", "saved", true); socket.emit("request_status"); return; }
    for (const [name, message] of Object.entries(ack.fields || {})) {
      if ($("cfg-" + name)) { $("cfg-" + name).classList.add("is-invalid"); $("err-" + name).textContent = message; }
    }
    say("config-message", ack.error, false);
  });
};
