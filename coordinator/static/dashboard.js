"use strict";

// Starling dashboard: polls the coordinator's JSON API and renders it. No dependencies.

const STATE_URL = "api/v1/state";
const HISTORY_URL = "api/v1/history";
const STATE_INTERVAL_MS = 2000;
const HISTORY_INTERVAL_MS = 10000;
const FETCH_TIMEOUT_MS = 5000;
const RESIZE_DEBOUNCE_MS = 150;
const COPIED_FEEDBACK_MS = 1500;
const LOCALE = "en-US";
const DASH = "—";
const BYTES_PER_MB = 1e6;

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART_HEIGHT = 220;
const CHART_MIN_WIDTH = 260;
const MARGIN = { top: 12, right: 16, bottom: 28, left: 56 };
const Y_TICKS = 5;
const X_TICK_SPACING_PX = 70;
const DAY_S = 86400;
const TIME_STEPS_S = [10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, DAY_S];

const CHARTS = [
  { id: "loss-chart", field: "loss", label: "loss", digits: 3 },
  { id: "throughput-chart", field: "tokens_per_second", label: "tokens/s", digits: 0, zero: true },
  { id: "peers-chart", field: "active_peers", label: "peers", digits: 0, zero: true, integer: true },
];

let latestHistory = [];

// ---------- formatting ----------

const isNum = (value) => typeof value === "number" && Number.isFinite(value);

// One formatter per number of digits: toLocaleString builds a new one on every call, which took
// most of an update's time at 1,000 peers (benchmarks/records.py).
const numberFormats = new Map();

function formatNumber(value, digits = 0) {
  if (!isNum(value)) return DASH;
  if (!numberFormats.has(digits)) {
    const options = { minimumFractionDigits: digits, maximumFractionDigits: digits };
    numberFormats.set(digits, new Intl.NumberFormat(LOCALE, options));
  }
  return numberFormats.get(digits).format(value);
}

function formatDuration(seconds) {
  if (!isNum(seconds) || seconds < 0) return DASH;
  if (Math.round(seconds) < 60) return `${Math.round(seconds)} s`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

function formatAgo(then, now) {
  if (!isNum(then) || !isNum(now)) return DASH;
  return now - then < 1 ? "just now" : `${formatDuration(now - then)} ago`;
}

function formatClock(time, withSeconds = true) {
  const options = { hour: "2-digit", minute: "2-digit", second: withSeconds ? "2-digit" : undefined, hour12: false };
  return isNum(time) ? new Date(time * 1000).toLocaleTimeString(LOCALE, options) : DASH;
}

const formatDateTime = (time) => (isNum(time) ? new Date(time * 1000).toLocaleString(LOCALE, { hour12: false }) : DASH);

const formatMegabytes = (bytes) => (isNum(bytes) ? `${formatNumber(bytes / BYTES_PER_MB, 1)} MB` : DASH);

function shortId(peerId) {
  return typeof peerId === "string" && peerId.length > 12 ? `${peerId.slice(0, 6)}…${peerId.slice(-4)}` : peerId ?? DASH;
}

// ---------- DOM helpers ----------

const byId = (id) => document.getElementById(id);

function setText(id, text) {
  if (byId(id).textContent !== text) byId(id).textContent = text;
}

function h(tag, properties = {}, ...children) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

const numberCell = (text) => ({ text, className: "num" });  // a cell for renderRows

// Rebuild a container's children only when the data behind them changed (keeps text selectable).
function replaceIfChanged(container, data, buildChildren) {
  const key = JSON.stringify(data);
  if (container.dataset.key === key) return;
  container.dataset.key = key;
  container.replaceChildren(...buildChildren());
}

// ---------- state rendering ----------

function setStatus(state, text) {
  byId("status").dataset.state = state;
  setText("status", text);
}

function renderState(state) {
  renderHeader(state);
  renderFigures(state);
  renderPeers(state.peers ?? [], state.time);
  renderLeaderboard(state.leaderboard ?? []);
  renderJoin(state);
  renderCheckpoint(state.checkpoint ?? null, state.checkpoint_error ?? null, state.time, state.evaluation ?? null);
  renderDataset(state.dataset ?? null);
  setText("config", state.config == null ? DASH : JSON.stringify(state.config, null, 2));
}

function renderHeader(state) {
  const training = (state.active_peers?.total ?? 0) > 0;
  setStatus(training ? "training" : "idle", training ? "training" : "no active peers");
  setText("run-id", state.run_id ?? DASH);
  // In DiLoCo mode an epoch is an outer round: local inner steps, then one averaged outer step.
  setText("epoch-title", state.mode === "diloco" ? "Outer round (DiLoCo)" : "Epoch");
  setText("updated", `updated ${formatClock(state.time)}`);
  setText("version", state.version ? `v${state.version}` : "");
  setText("coordinator-id", shortId(state.coordinator?.peer_id));
  setText("started-at", formatDateTime(state.coordinator?.started_at));
  byId("coordinator-id").title = state.coordinator?.peer_id ?? "";
  document.title = `${state.run_id ?? "Starling"} · dashboard`;
}

function renderFigures(state) {
  setText("epoch", formatNumber(state.epoch));
  setText("samples-total", formatNumber(state.samples_total));
  setText("loss", formatNumber(state.loss, 3));
  setText("samples-per-second", formatNumber(state.samples_per_second, 1));
  setText("tokens-per-second", formatNumber(state.tokens_per_second));
  const active = state.active_peers ?? {};
  setText("active-peers", formatNumber(active.total ?? 0));
  for (const kind of ["gpu", "cpu", "client", "auxiliary"]) setText(`peers-${kind}`, formatNumber(active[kind] ?? 0));
  renderProgress(state.samples_this_epoch, state.target_batch_size, state.eta_seconds);
  setText("checkpoint-epoch", formatNumber(state.checkpoint?.epoch));
}

function renderProgress(done, target, etaSeconds) {
  const fraction = isNum(done) && isNum(target) && target > 0 ? Math.min(1, done / target) : 0;
  const fill = byId("epoch-progress");
  fill.style.width = `${(fraction * 100).toFixed(1)}%`;
  fill.parentElement.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
  // Peers keep accumulating while the swarm averages, so the count may pass the target.
  const averaging = isNum(done) && isNum(target) && target > 0 && done >= target;
  setText("epoch-samples", averaging ? "target reached: averaging…"
                                     : `${formatNumber(done)} / ${formatNumber(target)} samples`);
  setText("eta", averaging ? "now" : formatDuration(etaSeconds));
}

function formatRounds(rounds) {
  if (!rounds) return DASH;
  return ["succeeded", "partial", "failed"].map((outcome) => formatNumber(rounds[outcome] ?? 0)).join(" / ");
}

// One peer's row: each cell's text, class and title; the status cell also draws its dot.
function peerCells(peer, now) {
  return [
    { text: peer.name || shortId(peer.peer_id), title: peer.peer_id ?? "" },
    { text: peer.device_name ?? peer.device ?? DASH },
    { text: peer.precision ?? DASH },
    { text: peer.kind ?? DASH },
    { text: peer.objective ?? DASH },
    { text: peer.status ?? DASH, dot: peer.status ?? "unknown" },
    numberCell(formatNumber(peer.epoch)),
    numberCell(formatNumber(peer.samples_per_second, 1)),
    numberCell(formatNumber(peer.samples)),
    numberCell(formatRounds(peer.rounds)),
    numberCell(formatNumber(peer.inner_steps)),
    numberCell(isNum(peer.bytes_per_sample) ? formatNumber(peer.bytes_per_sample / 1000, 1) : DASH),
    numberCell(isNum(peer.compute_share) ? `${Math.round(100 * peer.compute_share)}%` : DASH),
    { text: formatAgo(peer.last_seen, now) },
  ];
}

function fillCell(td, spec) {
  const key = `${spec.text}\u0000${spec.className ?? ""}\u0000${spec.title ?? ""}\u0000${spec.dot ?? ""}`;
  if (td.starlingKey === key) return;
  td.starlingKey = key;
  td.className = spec.className ?? "";
  td.title = spec.title ?? "";
  if (spec.dot === undefined) td.textContent = spec.text;
  else td.replaceChildren(h("span", { className: `dot dot-${spec.dot}` }), spec.text);
}

// Rows are kept by key and only the cells whose text changed are written, not every node of a
// table rebuilt every update (14,000 cells at 1,000 peers); text stays selectable between updates.
function renderRows(body, items, keyOf, cellsOf) {
  const kept = new Map(Array.from(body.rows, (row) => [row.dataset.key, row]));
  const rows = items.map((item, index) => {
    const key = keyOf(item, index);
    const row = kept.get(key) ?? h("tr", {});
    kept.delete(key);
    row.dataset.key = key;
    const cells = cellsOf(item, index);
    while (row.cells.length < cells.length) row.insertCell();
    cells.forEach((spec, column) => fillCell(row.cells[column], spec));
    return row;
  });
  if (rows.length !== body.rows.length || rows.some((row, index) => row !== body.rows[index])) {
    body.replaceChildren(...rows);
  }
}

function renderPeers(peers, now) {
  renderRows(byId("peers-table").tBodies[0], peers, (peer) => peer.peer_id ?? "", (peer) => peerCells(peer, now));
  byId("peers-empty").hidden = peers.length > 0;
}

function renderLeaderboard(entries) {
  renderRows(byId("leaderboard-table").tBodies[0], entries, (_, index) => String(index), (entry, index) => [
    numberCell(String(index + 1)),
    { text: entry.name ?? DASH },
    numberCell(formatNumber(entry.samples)),
    numberCell(formatDuration(entry.online_seconds)),
    numberCell(formatNumber(entry.samples_per_second, 1)),
  ]);
  byId("leaderboard-empty").hidden = entries.length > 0;
}

function renderJoin(state) {
  setText("join-command", state.join_command ?? "");
  const addresses = state.initial_peers ?? [];
  replaceIfChanged(byId("initial-peers"), addresses, () => addresses.map((address) => h("li", {}, h("code", {}, address))));
}

function renderCheckpoint(checkpoint, error, now, evaluation) {
  setText("checkpoint-age", error ? "last write failed" : checkpoint ? `saved ${formatAgo(checkpoint.time, now)}` : "none yet");
  setText("checkpoint-error", error ?? DASH);
  setText("checkpoint-detail-epoch", formatNumber(checkpoint?.epoch));
  setText("checkpoint-path", checkpoint?.path ?? DASH);
  setText("checkpoint-size", formatMegabytes(checkpoint?.size_bytes));
  setText("checkpoint-time", formatDateTime(checkpoint?.time));
  // The newest checkpoint evaluated on the coordinator's held-out set (--eval-data), if any.
  setText(
    "checkpoint-evaluation",
    evaluation
      ? `${evaluation.loss.toFixed(3)} (perplexity ${evaluation.perplexity.toFixed(1)}) at epoch ${evaluation.epoch}`
      : DASH,
  );
}

function renderDataset(dataset) {
  // null: the run trains on the bundled corpus or on files each peer has.
  setText("dataset-sha256", dataset ? dataset.sha256 : "bundled corpus");
  setText("dataset-url", dataset?.url ?? DASH);
  setText("dataset-documents", formatNumber(dataset?.documents));
  setText("dataset-tokens", formatNumber(dataset?.tokens));
  setText("dataset-shards", dataset ? `${formatNumber(dataset.shards)} (${formatMegabytes(dataset.bytes)})` : DASH);
  setText("dataset-passes", formatNumber(dataset?.passes, 2));
}

// ---------- charts ----------

function setAttrs(node, attributes) {
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

const svgEl = (tag, attributes = {}) => setAttrs(document.createElementNS(SVG_NS, tag), attributes);

const svgText = (attributes, text) => Object.assign(svgEl("text", attributes), { textContent: text });

function niceStep(rawStep) {
  const power = 10 ** Math.floor(Math.log10(rawStep));
  const fraction = rawStep / power;
  return (fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10) * power;
}

function valueTicks(low, high, spec) {
  if (spec.zero) low = Math.min(0, low);
  if (low === high) {
    const pad = Math.abs(low) * 0.1 || 1;
    [low, high] = [spec.zero ? low : low - pad, high + pad];
  }
  let step = niceStep((high - low) / Y_TICKS);
  if (spec.integer) step = Math.max(1, step);
  const ticks = [];
  for (let i = Math.floor(low / step); i <= Math.ceil(high / step); i += 1) ticks.push(Number((i * step).toFixed(10)));
  return { ticks, digits: Math.max(0, -Math.floor(Math.log10(step))) };
}

function timeTicks(start, end, maxTicks) {
  const span = end - start;
  const step = TIME_STEPS_S.find((s) => span / s <= maxTicks) ?? Math.ceil(span / maxTicks / DAY_S) * DAY_S;
  const ticks = [];
  for (let time = Math.ceil(start / step) * step; time <= end; time += step) ticks.push(time);
  const date = (time) => new Date(time * 1000).toLocaleDateString(LOCALE, { month: "short", day: "numeric" });
  return { ticks, format: step >= DAY_S ? date : (time) => formatClock(time, step < 60) };
}

function makeScales(points, width, spec) {
  let [start, end] = [points[0].x, points.at(-1).x];
  if (start === end) [start, end] = [start - 30, end + 30];
  const values = points.map((point) => point.y);
  const yAxis = valueTicks(values.reduce((a, b) => Math.min(a, b)), values.reduce((a, b) => Math.max(a, b)), spec);
  const [low, high] = [yAxis.ticks[0], yAxis.ticks.at(-1)];
  const [left, right] = [MARGIN.left, width - MARGIN.right];
  const [top, bottom] = [MARGIN.top, CHART_HEIGHT - MARGIN.bottom];
  return {
    width, left, right, top, bottom, yAxis,
    xAxis: timeTicks(start, end, Math.max(2, Math.floor((right - left) / X_TICK_SPACING_PX))),
    x: (time) => left + ((time - start) / (end - start)) * (right - left),
    y: (value) => bottom - ((value - low) / (high - low)) * (bottom - top),
    timeAt: (px) => start + ((px - left) / (right - left)) * (end - start),
  };
}

function drawAxes(svg, scale) {
  for (const value of scale.yAxis.ticks) {
    const y = scale.y(value);
    const attributes = { class: "tick", x: scale.left - 6, y, "text-anchor": "end", "dominant-baseline": "middle" };
    svg.append(svgEl("line", { class: "grid", x1: scale.left, x2: scale.right, y1: y, y2: y }),
      svgText(attributes, formatNumber(value, scale.yAxis.digits)));
  }
  for (const time of scale.xAxis.ticks) {
    const x = scale.x(time);
    svg.append(svgEl("line", { class: "axis", x1: x, x2: x, y1: scale.bottom, y2: scale.bottom + 4 }),
      svgText({ class: "tick", x, y: scale.bottom + 16, "text-anchor": "middle" }, scale.xAxis.format(time)));
  }
  svg.append(svgEl("line", { class: "axis", x1: scale.left, x2: scale.right, y1: scale.bottom, y2: scale.bottom }));
}

function linePath(points, scale) {
  return points.map((p, i) => `${i ? "L" : "M"}${scale.x(p.x).toFixed(1)},${scale.y(p.y).toFixed(1)}`).join("");
}

function nearestPoint(points, time) {
  return points.reduce((best, p) => (Math.abs(p.x - time) < Math.abs(best.x - time) ? p : best));
}

function attachHover(container, svg, points, scale, spec) {
  const guide = svgEl("line", { class: "guide", y1: scale.top, y2: scale.bottom, visibility: "hidden" });
  const marker = svgEl("circle", { class: "marker", r: 4, visibility: "hidden" });
  const tooltip = h("div", { className: "tooltip", hidden: true });
  svg.append(guide, marker);
  container.append(tooltip);

  svg.addEventListener("pointermove", (event) => {
    const rect = svg.getBoundingClientRect();
    const ratio = rect.width / scale.width;
    const point = nearestPoint(points, scale.timeAt((event.clientX - rect.left) / ratio));
    const [x, y] = [scale.x(point.x), scale.y(point.y)];
    setAttrs(guide, { x1: x, x2: x, visibility: "visible" });
    setAttrs(marker, { cx: x, cy: y, visibility: "visible" });
    tooltip.textContent = `${formatClock(point.x)} · ${formatNumber(point.y, spec.digits)} ${spec.label}`;
    tooltip.style.left = `${x * ratio}px`;
    tooltip.style.top = `${y * ratio}px`;
    tooltip.classList.toggle("flip", x > scale.width / 2);
    tooltip.hidden = false;
  });
  svg.addEventListener("pointerleave", () => {
    for (const node of [guide, marker]) node.setAttribute("visibility", "hidden");
    tooltip.hidden = true;
  });
}

function drawChart(spec, history) {
  const container = byId(spec.id);
  const points = history
    .filter((p) => isNum(p.time) && isNum(p[spec.field]))
    .map((p) => ({ x: p.time, y: p[spec.field] }))
    .sort((a, b) => a.x - b.x);
  container.dataset.width = String(container.clientWidth);
  const width = Math.max(container.clientWidth, CHART_MIN_WIDTH);
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${CHART_HEIGHT}`, role: "img", "aria-label": `${spec.label} over time` });
  container.replaceChildren(svg);
  if (points.length === 0) {
    const attributes = { class: "placeholder", x: width / 2, y: CHART_HEIGHT / 2, "text-anchor": "middle" };
    svg.append(svgText(attributes, "waiting for data…"));
    return;
  }
  const scale = makeScales(points, width, spec);
  drawAxes(svg, scale);
  if (points.length >= 2) svg.append(svgEl("path", { class: "line", d: linePath(points, scale) }));
  else svg.append(svgEl("circle", { class: "marker", r: 3, cx: scale.x(points[0].x), cy: scale.y(points[0].y) }));
  attachHover(container, svg, points, scale, spec);
}

function renderHistory(history) {
  latestHistory = Array.isArray(history?.points) ? history.points : [];
  for (const spec of CHARTS) drawChart(spec, latestHistory);
}

// ---------- polling and wiring ----------

const failingUrls = new Set();

function setReachable(url, reachable) {
  if (reachable) failingUrls.delete(url);
  else failingUrls.add(url);
  byId("banner").hidden = failingUrls.size === 0;
  document.body.classList.toggle("offline", failingUrls.size > 0);
  if (url === STATE_URL && !reachable) setStatus("offline", "coordinator unreachable");
}

async function fetchJson(url) {
  const response = await fetch(url, { cache: "no-store", signal: AbortSignal.timeout(FETCH_TIMEOUT_MS) });
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

function poll(url, intervalMs, render) {
  const tick = async () => {
    const data = await fetchJson(url).catch(() => null); // failure: banner shows, and we retry
    setReachable(url, data !== null);
    setTimeout(tick, intervalMs);
    if (data !== null) render(data);
  };
  tick();
}

// Redraw the charts when their containers change width (window resize, layout shifts).
function watchChartWidths() {
  let timer = 0;
  const redraw = () => renderHistory({ points: latestHistory });
  const observer = new ResizeObserver((entries) => {
    if (!entries.some((entry) => entry.target.clientWidth !== Number(entry.target.dataset.width))) return;
    clearTimeout(timer);
    timer = setTimeout(redraw, RESIZE_DEBOUNCE_MS);
  });
  for (const spec of CHARTS) observer.observe(byId(spec.id));
}

async function copyJoinCommand() {
  const button = byId("copy-join");
  const command = byId("join-command");
  let copied = false;
  try {
    await navigator.clipboard.writeText(command.textContent);
    copied = true;
  } catch {
    // Clipboard API needs a secure context; fall back to selecting the text.
    window.getSelection().selectAllChildren(command);
    copied = document.execCommand("copy");
  }
  button.textContent = copied ? "Copied" : "Press Ctrl+C";
  setTimeout(() => { button.textContent = "Copy"; }, COPIED_FEEDBACK_MS);
}

function start() {
  byId("copy-join").addEventListener("click", copyJoinCommand);
  watchChartWidths();
  renderHistory({ points: [] });
  poll(STATE_URL, STATE_INTERVAL_MS, renderState);
  poll(HISTORY_URL, HISTORY_INTERVAL_MS, renderHistory);
}

document.addEventListener("DOMContentLoaded", start);
