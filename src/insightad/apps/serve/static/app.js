// InsightAD operators' page: inspect, threshold, review, model. Plain JavaScript, no dependencies.
// It talks only to this server (the page's Content-Security-Policy allows nothing else).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "insightad.apiKey";          // sessionStorage: this tab only
const SESSION_STORE = "insightad.session";     // sessionStorage: scored images survive a reload
const LABEL_STORE = "insightad.labels.";       // localStorage + model sha: labels survive reloads
const CONCURRENCY = 2;                          // uploads in flight (the server batches them)
const THUMB = 160;                              // review thumbnails, px on the longer side

const state = {
  model: null,        // GET /model
  sha: null,          // model_sha256 (or "unknown")
  serverThr: null,    // the server's threshold
  pageThr: null,      // the slider's threshold (decisions in this page only)
  answerThr: null,    // the threshold the last /infer answer carried
  results: [],        // {id, name, score, score_normalized, anomalous, threshold, ms, error, thumb, card}
  labels: {},         // labelKey(r) -> {name, score, label: "normal" | "anomalous"}
  queue: [], running: 0, done: 0, total: 0, aborters: new Set(),
  selected: 0,
  nextId: 1,
};

// ------------------------------------------------------------------ browser storage
// Storage can refuse (full, or turned off: then even reading it throws). The page goes on without it and says
// what will not survive a reload; it never stops on a storage error.
function storeGet(kind, name) {
  try { return window[kind].getItem(name); } catch (_) { return null; }
}
function storeSet(kind, name, value) {
  try { window[kind].setItem(name, value); return true; } catch (_) { return false; }
}
function storeRemove(kind, name) {
  try { window[kind].removeItem(name); } catch (_) { /* nothing kept to remove */ }
}
function storedJSON(kind, name, fallback) {
  try { return JSON.parse(storeGet(kind, name) || "null") ?? fallback; } catch (_) { return fallback; }
}
const storageProblems = {};  // what is not being kept -> the sentence saying so
function storageProblem(what, sentence) {
  if (sentence) storageProblems[what] = sentence; else delete storageProblems[what];
  const text = Object.values(storageProblems).join(" ");
  $("storage-note").textContent = text;
  $("storage-note").hidden = !text;
}

// ------------------------------------------------------------------ HTTP
let memoryKey = null;  // the key, also when the tab's storage refuses to keep it
function apiKey() { return memoryKey || storeGet("sessionStorage", KEY_STORE); }

const SENDABLE_KEY = /^[\x20-\x7e]+$/;        // what the server accepts as a key (security.check_api_key)
let keyPrompt = null;
function askKey(message) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    const dlg = $("key-dialog");
    $("key-error").hidden = !message;
    $("key-error").textContent = message || "";
    $("key-input").value = "";
    const done = (ev) => {
      ev.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      if (!SENDABLE_KEY.test(key)) {  // fetch() throws on such a header: every request failed, the key kept
        $("key-error").textContent = "An API key has printable ASCII characters only (letters, digits, " +
          "punctuation); this one has another character (a pasted quote, dash or invisible space?).";
        $("key-error").hidden = false;
        return;
      }
      memoryKey = key;
      storeSet("sessionStorage", KEY_STORE, key);
      $("key-form").removeEventListener("submit", done);
      dlg.removeEventListener("close", dismissed);
      $("key-open").hidden = true;
      dlg.close();
      keyPrompt = null;
      resolve(key);
    };
    // Escape closes a modal dialog: the requests waiting for the key then waited with nothing on the page saying
    // why, and no way to open the dialog again. They wait still, and a button in the header opens it again.
    const dismissed = () => {
      $("key-open").hidden = false;
      $("model-summary").textContent = "This server needs an API key: nothing is shown or scored without one.";
    };
    $("key-form").addEventListener("submit", done);
    dlg.addEventListener("close", dismissed);
    dlg.showModal();
  });
  return keyPrompt;
}

// fetch with the API key; a 401 asks for the key (once per wrong key) and retries.
async function api(path, options = {}, retry = true) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("X-API-Key", key);
  const resp = await fetch(path, { ...options, headers });
  if (resp.status === 401 && retry) {
    const msg = key ? "That key was refused by the server. Try again." : "";
    if (key) { memoryKey = null; storeRemove("sessionStorage", KEY_STORE); }
    await askKey(msg);
    return api(path, options, true);
  }
  return resp;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    const d = body.detail;
    if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
    return String(d);
  } catch (_) {
    return `HTTP ${resp.status}`;
  }
}

// ------------------------------------------------------------------ formatting
function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(4) : x.toPrecision(5).replace(/\.?0+$/, "");
}
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}
function decide(score) { return state.pageThr !== null && score > state.pageThr; }
// Files in different folders often share a name (000.png): an image is its name and its score.
function labelKey(r) { return `${r.name}|${r.score}`; }
function labelOf(r) { const l = state.labels[labelKey(r)]; return l ? l.label : undefined; }
function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ------------------------------------------------------------------ tabs
function show(view) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.view === view);
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${view}`;
  if (view === "threshold") drawHistogram();
  if (view === "review") renderGallery();
  if (view === "model") refreshHealth();
  if (view !== "camera") stopCamera();
}

// ------------------------------------------------------------------ model and health
// GET /model, again every few seconds until it answers: a page opened while the server was restarting, busy
// or behind a failing proxy would otherwise never learn the model (no heatmaps, no exports).
const MODEL_RETRY_MS = 3000;
let modelRetry = null;
async function loadModel() {
  clearTimeout(modelRetry);
  let m;
  try {
    const resp = await api("model");
    if (!resp.ok) throw new Error(await errorText(resp));
    m = await resp.json();
  } catch (e) {
    $("model-summary").textContent = `cannot read the model: ${e.message}; trying again…`;
    modelRetry = setTimeout(loadModel, MODEL_RETRY_MS);
    return;
  }
  const first = state.model === null;
  state.model = m;
  state.sha = m.model_sha256 || "unknown";
  state.serverThr = m.threshold.value;
  state.pageThr = state.serverThr;
  state.labels = storedJSON("localStorage", LABEL_STORE + state.sha, {});
  const size = m.preprocessing && m.preprocessing.size ? m.preprocessing.size.join("×") : "?";
  const backbone = m.backbone ? m.backbone.name : "none";
  $("model-summary").textContent = `${m.method} · backbone ${backbone} · input ${size} · threshold ${fmt(state.serverThr)}`;
  $("server-thr").textContent = fmt(state.serverThr);
  renderModelInfo(m);
  if (m.has_maps) {
    const bar = await api("colorbar.png");
    if (bar.ok) {
      $("colorbar").src = URL.createObjectURL(await bar.blob());
      $("colorbar-box").hidden = false;
    }
  } else {
    $("nomap-note").hidden = false;
    $("nomap-note").textContent = `No heatmaps: "${m.method}" scores whole images and gives no anomaly map. ` +
      "Train padim, patchcore or autoencoder to see where a defect is.";
    $("overlay-on").disabled = $("opacity").disabled = true;
  }
  if (first) restoreSession();
  else setPageThreshold(state.pageThr);
}

// Every answer carries the threshold the server decides with. The page decides with its own (the slider's),
// which starts as the server's from GET /model; until that has answered, or when the server now decides
// with another threshold (restarted with another model or --threshold), the page takes the server's and
// reads the model again, so that it never shows a decision the server did not make unasked.
function followServer(threshold) {
  if (!Number.isFinite(threshold)) return;
  const last = state.answerThr !== null ? state.answerThr : state.serverThr;  // the answers' own, once one came
  state.answerThr = threshold;
  if (last !== null && Math.abs(threshold - last) <= 1e-9 * Math.max(1, Math.abs(last))) return;
  state.serverThr = threshold;
  $("server-thr").textContent = fmt(threshold);
  setPageThreshold(threshold);
  if (state.model !== null) loadModel();
}

function renderModelInfo(m) {
  const t = m.threshold || {};
  const details = t.details || {};
  const rows = [
    ["method", `${m.method}${m.has_maps ? " (score + heatmap)" : " (image score only, no heatmap)"}`],
    ["backbone", m.backbone ? `${m.backbone.name}${m.backbone.weights_source ? ` (${m.backbone.weights_source})` : ""}` : "none"],
    ["input size", m.preprocessing ? `${m.preprocessing.size.join(" × ")} (${m.preprocessing.resize})` : "?"],
    ["threshold", fmt(t.value)],
    ["how it was chosen", `${t.strategy || "?"}${Object.keys(details).length ? ": " + Object.entries(details)
      .filter(([, v]) => typeof v !== "object").map(([k, v]) => `${k} ${typeof v === "number" ? fmt(v) : v}`).join(", ") : ""}`],
    ["model file", `${m.version.model_file || "(in memory)"} · sha256 ${m.model_sha256 || "unknown"}`],
    ["written by", `insightad ${m.version.model_written_by || "?"} (format ${m.version.model_format_version || "?"}) on ${m.version.model_created || "?"}`],
    ["served by", `insightad ${m.version.insightad}`],
  ];
  const dl = $("model-info");
  dl.replaceChildren();
  for (const [k, v] of rows) dl.append(el("dt", { text: k }), el("dd", { text: v }));
}

async function refreshHealth() {
  let body, ok = false;
  try {
    const resp = await fetch("health");
    body = await resp.json();
    ok = resp.ok;
  } catch (e) {
    body = { status: `unreachable (${e.message})` };
  }
  $("health-dot").className = `dot ${ok ? "ok" : "bad"}`;
  $("health-dot").title = `server: ${body.status}`;
  const dl = $("health-info");
  dl.replaceChildren();
  for (const [k, v] of Object.entries(body)) dl.append(el("dt", { text: k.replace(/_/g, " ") }), el("dd", { text: String(v) }));
}

// ------------------------------------------------------------------ inspect
function makeCard(r) {
  const img = el("img", { class: "photo", alt: r.name });
  const overlay = el("img", { class: "overlay", alt: "" });
  overlay.hidden = true;
  const figure = el("div", { class: "figure" }, img, overlay);
  const msg = el("p", { class: "msg muted", text: "waiting…" });
  const stats = el("dl", { class: "stats" });
  const badge = el("span", { class: "badge", text: "…" });
  const card = el("article", { class: "card", "data-id": String(r.id) },
    el("h3", {}, badge, el("span", { class: "name", text: r.name, title: r.name })), figure, stats, msg);
  r.card = { card, img, overlay, msg, stats, badge };
  $("cards").prepend(card);
  return r.card;
}

function renderCard(r) {
  const c = r.card;
  if (!c) return;
  if (r.error) {
    c.badge.textContent = "error";
    c.badge.className = "badge error";
    c.msg.className = "msg error";
    c.msg.textContent = r.error;
    c.card.classList.add("failed");
    return;
  }
  if (r.score === undefined) return;
  const anomalous = decide(r.score);
  c.badge.textContent = anomalous ? "anomalous" : "normal";
  c.badge.className = `badge ${anomalous ? "bad" : "good"}`;
  const rows = [
    ["score (raw)", fmt(r.score)],
    ["threshold", fmt(state.pageThr) + (state.pageThr !== r.threshold ? ` (page; server ${fmt(r.threshold)})` : "")],
    ["score_normalized", fmt(r.score_normalized)],
    ["decision", (anomalous ? "anomalous" : "normal") +
      (anomalous !== r.anomalous ? ` (server: ${r.anomalous ? "anomalous" : "normal"})` : "")],
    ["time", r.ms !== undefined ? `${Math.round(r.ms)} ms` : "–"],
  ];
  c.stats.replaceChildren();
  for (const [k, v] of rows) c.stats.append(el("dt", { text: k }), el("dd", { class: `v-${k.split(" ")[0]}`, text: v }));
  c.msg.textContent = r.note || "";
  c.card.dataset.decision = anomalous ? "anomalous" : "normal";
  c.card.dataset.score = String(r.score);  // exact, for scripts and tests (the table shows 5 digits)
  if (r.ms !== undefined) c.card.dataset.ms = String(r.ms);
}

function applyOverlaySettings() {
  const on = $("overlay-on").checked;
  const opacity = $("opacity").value;
  for (const r of state.results) {
    if (r.card && r.card.overlay.dataset.has) {
      r.card.overlay.hidden = !on;
      r.card.overlay.style.opacity = opacity;
    }
  }
}

function addFiles(files) {
  const list = Array.from(files);
  if (!list.length) return;
  show("inspect");
  for (const file of list) {
    const r = { id: state.nextId++, name: file.webkitRelativePath || file.name, file };
    state.results.push(r);
    makeCard(r);
    state.queue.push(r);
  }
  state.total += list.length;
  updateProgress();
  pump();
}

function pump() {
  while (state.running < CONCURRENCY && state.queue.length) {
    const r = state.queue.shift();
    state.running++;
    scoreOne(r).finally(() => {
      state.running--;
      state.done++;
      updateProgress();
      pump();
    });
  }
}

function updateProgress() {
  const busy = state.done < state.total;
  $("progress").hidden = !busy;
  $("cancel").hidden = !busy;
  $("progress").max = Math.max(1, state.total);
  $("progress").value = state.done;
  $("progress-text").textContent = state.total ? `${state.done} / ${state.total} scored` : "";
  if (!busy) { state.done = state.total = 0; }
  saveSession();
  refreshThresholdView();
  if (!$("view-review").hidden) renderGallery();
}

function cancelAll() {
  for (const r of state.queue) {
    r.error = "cancelled before it was scored";
    renderCard(r);
  }
  state.done += state.queue.length;
  state.queue = [];
  for (const a of state.aborters) a.abort();
  updateProgress();
}

function loadImage(img, src) {
  return new Promise((resolve) => {
    img.onload = () => resolve(true);
    img.onerror = () => resolve(false);
    img.src = src;
  });
}

function thumbnail(img) {
  const w = img.naturalWidth, h = img.naturalHeight;
  if (!w || !h) return null;
  const f = Math.min(1, THUMB / Math.max(w, h));
  const canvas = el("canvas");
  canvas.width = Math.max(1, Math.round(w * f));
  canvas.height = Math.max(1, Math.round(h * f));
  canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.75);
}

async function scoreOne(r) {
  const c = r.card;
  c.msg.textContent = "scoring…";
  const aborter = new AbortController();
  state.aborters.add(aborter);
  const t0 = performance.now();
  const shown = loadImage(c.img, URL.createObjectURL(r.file));
  try {
    const form = new FormData();
    form.append("file", r.file, r.file.name);
    const wantMap = Boolean(state.model && state.model.has_maps);
    form.append("heatmap", wantMap ? "true" : "false");
    const resp = await api("infer", { method: "POST", body: form, signal: aborter.signal });
    if (!resp.ok) {
      r.error = `${r.name}: could not be scored (${resp.status}): ${await errorText(resp)}`;
      c.img.hidden = true;
      return;
    }
    const body = await resp.json();
    Object.assign(r, { score: body.score, threshold: body.threshold, anomalous: body.Anomaly,
      score_normalized: body.score_normalized });
    followServer(body.threshold);
    const displayable = await shown;
    if (body.heatmap) {  // RGB PNG in the product's colour convention, rendered by the server
      await loadImage(c.overlay, `data:image/png;base64,${body.heatmap}`);
      c.overlay.dataset.has = "1";
    } else if (state.model && !state.model.has_maps) {
      r.note = `no heatmap: ${state.model.method} gives an image score only`;
    }
    r.ms = performance.now() - t0;  // request + server + transfer + both images decoded
    if (!displayable) {
      c.img.hidden = true;
      r.note = "this browser cannot display this file format; the score is valid";
    } else {
      r.thumb = thumbnail(c.img);
    }
    r.sha = state.sha;
  } catch (e) {
    r.error = e.name === "AbortError" ? `${r.name}: cancelled` : `${r.name}: request failed (${e.message})`;
  } finally {
    state.aborters.delete(aborter);
    delete r.file;
    renderCard(r);
    applyOverlaySettings();
  }
}

// ------------------------------------------------------------------ session persistence
function saveSession() {
  const keep = state.results.filter((r) => r.score !== undefined && !r.error)
    .map(({ id, name, score, threshold, anomalous, score_normalized, ms, thumb, sha }) =>
      ({ id, name, score, threshold, anomalous, score_normalized, ms, thumb, sha }));
  // storage full: keep the numbers, drop the thumbnails; refused again (or turned off): keep nothing, and say so
  const saved = storeSet("sessionStorage", SESSION_STORE, JSON.stringify(keep)) ||
    storeSet("sessionStorage", SESSION_STORE, JSON.stringify(keep.map((r) => ({ ...r, thumb: null }))));
  if (!saved) storeRemove("sessionStorage", SESSION_STORE);  // an older, shorter list would come back on a reload
  storageProblem("session", saved ? null : "This browser tab refused to store the scored results (its storage " +
    "is full or turned off): they are shown here but will be gone after a reload.");
}

function restoreSession() {
  const stored = storedJSON("sessionStorage", SESSION_STORE, []);
  const saved = (Array.isArray(stored) ? stored : []).filter((r) => r && r.sha === state.sha);
  for (const r of saved) {
    r.note = "restored after a reload (heatmap not kept)";
    state.results.push(r);
    state.nextId = Math.max(state.nextId, r.id + 1);
    makeCard(r);
    if (r.thumb) r.card.img.src = r.thumb; else r.card.img.hidden = true;
    renderCard(r);
  }
  refreshThresholdView();
  if (!$("view-review").hidden) renderGallery();
  document.body.dataset.ready = "1";  // model known, session restored (scripts and tests wait for this)
}

// ------------------------------------------------------------------ threshold
function scored() { return state.results.filter((r) => r.score !== undefined && !r.error); }

function scoreRange() {
  const s = scored().map((r) => r.score).concat([state.serverThr]);
  let lo = Math.min(...s), hi = Math.max(...s);
  const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 1;
  return [lo - pad, hi + pad];
}

function refreshThresholdView() {
  if (state.serverThr === null) return;
  const n = scored().length;
  const [lo, hi] = scoreRange();
  const slider = $("thr-slider");
  slider.min = lo; slider.max = hi; slider.step = "any";  // no snapping: the exported value is the one shown
  slider.value = state.pageThr;
  $("thr-number").value = Number(state.pageThr.toPrecision(6));
  slider.disabled = $("thr-number").disabled = n === 0;
  $("thr-export").disabled = n === 0 || !state.model;  // the file names the model it was chosen for
  $("thr-empty").hidden = n > 0;
  const anomalous = scored().filter((r) => decide(r.score));
  const changed = scored().filter((r) => decide(r.score) !== r.anomalous);
  $("thr-summary").textContent = n ? `At ${fmt(state.pageThr)}: ${anomalous.length} of ${n} images anomalous, ` +
    `${n - anomalous.length} normal; ${changed.length} decided differently from the server.` : "";
  $("thr-changed").replaceChildren(...changed.slice(0, 50).map((r) =>
    el("li", { text: `${r.name}: score ${fmt(r.score)} → ${decide(r.score) ? "anomalous" : "normal"} here, ` +
      `${r.anomalous ? "anomalous" : "normal"} on the server` })));
  if (!$("view-threshold").hidden) drawHistogram();
}

function setPageThreshold(value) {
  if (!Number.isFinite(value)) return;
  state.pageThr = value;
  for (const r of state.results) renderCard(r);
  refreshThresholdView();
  if (!$("view-review").hidden) renderGallery();
}

// The number typed in the threshold box. A box left empty (or holding what is not a number) reads as 0 through
// Number(""), which made every image anomalous and exported threshold 0: it shows the page's threshold again.
function typedThreshold(ev) {
  const value = ev.target.valueAsNumber;
  if (Number.isFinite(value)) setPageThreshold(value);
  else refreshThresholdView();
}

function drawHistogram() {
  const canvas = $("hist");
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, padL = 40, padB = 28, padT = 14;
  ctx.clearRect(0, 0, W, H);
  const scores = scored().map((r) => r.score);
  if (!scores.length || state.serverThr === null) return;
  const [lo, hi] = scoreRange();
  const bins = Math.min(40, Math.max(8, Math.ceil(Math.sqrt(scores.length) * 2)));
  const counts = new Array(bins).fill(0);
  for (const s of scores) counts[Math.min(bins - 1, Math.floor((s - lo) / (hi - lo) * bins))]++;
  const top = Math.max(...counts);
  const x = (v) => padL + (v - lo) / (hi - lo) * (W - padL - 10);
  const bw = (W - padL - 10) / bins;
  for (let i = 0; i < bins; i++) {
    const h = counts[i] / top * (H - padB - padT);
    const mid = lo + (i + 0.5) * (hi - lo) / bins;
    ctx.fillStyle = mid > state.pageThr ? "#d9534f" : "#4a7fc1";
    ctx.fillRect(padL + i * bw + 1, H - padB - h, bw - 2, h);
  }
  ctx.strokeStyle = "#333"; ctx.lineWidth = 1;
  ctx.beginPath(); ctx.moveTo(padL, H - padB); ctx.lineTo(W - 10, H - padB); ctx.stroke();
  ctx.fillStyle = "#333"; ctx.font = "12px sans-serif";
  ctx.fillText(fmt(lo), padL, H - 8);
  ctx.fillText(fmt(hi), W - 60, H - 8);
  ctx.fillText(`${top}`, 8, padT + 8);
  ctx.fillText("raw score", W / 2 - 25, H - 8);
  const line = (v, color, dash, label) => {
    ctx.save(); ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.setLineDash(dash);
    ctx.beginPath(); ctx.moveTo(x(v), padT); ctx.lineTo(x(v), H - padB); ctx.stroke(); ctx.restore();
    ctx.fillStyle = color; ctx.fillText(label, Math.min(x(v) + 4, W - 110), padT + 2);
  };
  line(state.serverThr, "#777", [5, 4], "server");
  line(state.pageThr, "#000", [], `threshold ${fmt(state.pageThr)}`);
}

function exportThreshold() {
  if (!state.model) return;  // (the button is enabled only once the model is known)
  const body = {
    threshold: state.pageThr,
    strategy: "manual (InsightAD web page)",
    model_sha256: state.model.model_sha256 || null,
    model_file: state.model.version.model_file || null,
    server_threshold: state.serverThr,
    n_scores: scored().length,
    created: new Date().toISOString(),
  };
  download(`threshold-${(state.model.model_sha256 || "model").slice(0, 12)}.json`, JSON.stringify(body, null, 2) + "\n",
    "application/json");
}

// ------------------------------------------------------------------ review
function near(r) {
  const [lo, hi] = scoreRange();
  return Math.abs(r.score - state.pageThr) <= 0.1 * (hi - lo);
}

function reviewItems() {
  const f = $("filter").value;
  const seen = new Set();  // the same image scored twice is one image to review
  const unique = scored().filter((r) => !seen.has(labelKey(r)) && seen.add(labelKey(r)));
  return unique.filter((r) => f === "all" || (f === "near" ? near(r) : (decide(r.score) === (f === "anomalous"))))
    .sort((a, b) => b.score - a.score);
}

function renderGallery() {
  const items = reviewItems();
  state.selected = Math.min(state.selected, Math.max(0, items.length - 1));
  const g = $("gallery");
  g.replaceChildren();
  items.forEach((r, i) => {
    const label = labelOf(r);
    const anomalous = decide(r.score);
    const tile = el("figure", { class: `tile${i === state.selected ? " selected" : ""}${label ? " labelled" : ""}`,
      "data-name": r.name, "data-score": String(r.score) });
    tile.append(r.thumb ? el("img", { src: r.thumb, alt: r.name }) : el("div", { class: "nothumb", text: "no preview" }));
    const nBtn = el("button", { type: "button", class: `lab${label === "normal" ? " on" : ""}`, text: "normal (n)" });
    const dBtn = el("button", { type: "button", class: `lab${label === "anomalous" ? " on bad" : ""}`, text: "defective (d)" });
    nBtn.onclick = () => { state.selected = i; setLabel(r, "normal"); };
    dBtn.onclick = () => { state.selected = i; setLabel(r, "anomalous"); };
    tile.append(el("figcaption", {},
      el("span", { class: "name", text: r.name, title: r.name }),
      el("span", { class: `badge ${anomalous ? "bad" : "good"}`, text: `${fmt(r.score)} · ${anomalous ? "anomalous" : "normal"}` }),
      el("span", { class: "truth", text: label ? `marked ${label === "anomalous" ? "defective" : "normal"}` : "not marked" }),
      el("span", { class: "buttons" }, nBtn, dBtn)));
    tile.onclick = (ev) => { if (ev.target.tagName !== "BUTTON") { state.selected = i; renderGallery(); } };
    g.append(tile);
  });
  const n = Object.keys(state.labels).length;
  $("label-count").textContent = `${items.length} shown · ${n} labelled`;
  const sel = g.querySelector(".selected");
  if (sel) sel.scrollIntoView({ block: "nearest" });
}

function setLabel(r, label) {
  if (label) state.labels[labelKey(r)] = { name: r.name, score: r.score, label };
  else delete state.labels[labelKey(r)];
  const kept = storeSet("localStorage", LABEL_STORE + state.sha, JSON.stringify(state.labels));
  storageProblem("labels", kept ? null : "This browser refused to store the labels (its storage is full or " +
    "turned off): they are shown here but will be gone after a reload; use \"Export labels\" to keep them.");
  renderGallery();
}

function csvField(v) {
  const s = String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

// A name a spreadsheet would run as a formula (=, +, -, @, tab or CR first) is written after a ' (OWASP's CSV
// injection advice), and so is one that starts with ' itself, as insightad.io.csv_cell does for every CSV the
// tool writes; calibrate --labels reads the name back without it (insightad.io.csv_value).
function csvName(name) {
  const s = String(name);
  return /^[=+\-@\t\r']/.test(s) ? `'${s}` : s;
}

function exportLabels() {
  if (!state.model) { alert("The model is not known yet (GET /model has not answered): try again shortly."); return; }
  const lines = ["name,label,score,model_sha256"];
  for (const { name, score, label } of Object.values(state.labels)) {
    lines.push([csvName(name), label, String(score), state.model.model_sha256 || ""].map(csvField).join(","));
  }
  download(`labels-${(state.model.model_sha256 || "model").slice(0, 12)}.csv`, lines.join("\n") + "\n", "text/csv");
}

function onKey(ev) {
  if ($("view-review").hidden || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName)) return;
  const items = reviewItems();
  if (!items.length) return;
  const r = items[state.selected];
  if (ev.key === "j") { state.selected = Math.min(items.length - 1, state.selected + 1); renderGallery(); }
  else if (ev.key === "k") { state.selected = Math.max(0, state.selected - 1); renderGallery(); }
  else if (ev.key === "n") setLabel(r, "normal");
  else if (ev.key === "d") setLabel(r, "anomalous");
  else if (ev.key === "u") setLabel(r, null);
  else return;
  ev.preventDefault();
}

// ------------------------------------------------------------------ camera
const camera = { stream: null, timer: null, busy: false, frames: 0 };

async function startCamera() {
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    $("cam-status").textContent = "The browser allows the camera only on localhost or over HTTPS " +
      "(serve with --ssl-certfile and --ssl-keyfile).";
    return;
  }
  try {
    camera.stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (e) {
    $("cam-status").textContent = `No camera: ${e.message || e.name}`;
    return;
  }
  const video = $("cam-video");
  video.srcObject = camera.stream;
  await video.play();
  $("cam-start").disabled = true;
  $("cam-stop").disabled = false;
  $("cam-status").textContent = "scoring one frame a second…";
  camera.timer = setInterval(scoreFrame, 1000);
  scoreFrame();
}

function stopCamera() {
  if (camera.timer) clearInterval(camera.timer);
  if (camera.stream) for (const t of camera.stream.getTracks()) t.stop();
  camera.timer = camera.stream = null;
  $("cam-start").disabled = false;
  $("cam-stop").disabled = true;
  if (camera.frames) $("cam-status").textContent = `stopped after ${camera.frames} frames`;
}

async function scoreFrame() {
  const video = $("cam-video");
  if (camera.busy || !camera.stream || !video.videoWidth) return;  // never queue frames behind a slow one
  camera.busy = true;
  const t0 = performance.now();
  try {
    const canvas = el("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
    const form = new FormData();
    form.append("file", blob, "camera.jpg");
    form.append("heatmap", state.model && state.model.has_maps ? "true" : "false");
    const resp = await api("infer", { method: "POST", body: form });
    if (!resp.ok) { $("cam-status").textContent = `frame not scored: ${await errorText(resp)}`; return; }
    const body = await resp.json();
    followServer(body.threshold);
    const old = $("cam-frame").src;
    await loadImage($("cam-frame"), URL.createObjectURL(blob));
    if (old.startsWith("blob:")) URL.revokeObjectURL(old);
    const overlay = $("cam-overlay");
    if (body.heatmap) {
      await loadImage(overlay, `data:image/png;base64,${body.heatmap}`);
      overlay.hidden = !$("overlay-on").checked;
      overlay.style.opacity = $("opacity").value;
    }
    camera.frames++;
    const anomalous = decide(body.score);
    const stats = $("cam-stats");
    stats.dataset.score = String(body.score);
    stats.replaceChildren();
    for (const [k, v] of [["score (raw)", fmt(body.score)], ["threshold", fmt(state.pageThr)],
      ["score_normalized", fmt(body.score_normalized)], ["decision", anomalous ? "anomalous" : "normal"],
      ["time", `${Math.round(performance.now() - t0)} ms`], ["frames", String(camera.frames)]]) {
      stats.append(el("dt", { text: k }), el("dd", { text: v }));
    }
  } catch (e) {
    $("cam-status").textContent = `frame not scored: ${e.message}`;
  } finally {
    camera.busy = false;
  }
}

// ------------------------------------------------------------------ wiring
function init() {
  for (const b of document.querySelectorAll(".tab")) b.onclick = () => show(b.dataset.view);
  $("file-input").onchange = (ev) => { addFiles(ev.target.files); ev.target.value = ""; };
  $("folder-input").onchange = (ev) => {  // a folder: its images only, named by their path inside it
    addFiles(Array.from(ev.target.files).filter((f) => /\.(png|jpe?g|bmp|tiff?)$/i.test(f.name)));
    ev.target.value = "";
  };
  const drop = $("drop");
  drop.ondragover = (ev) => { ev.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (ev) => { ev.preventDefault(); drop.classList.remove("over"); addFiles(ev.dataTransfer.files); };
  $("overlay-on").onchange = applyOverlaySettings;
  $("opacity").oninput = applyOverlaySettings;
  $("cancel").onclick = cancelAll;
  $("key-open").onclick = () => { $("key-open").hidden = true; $("key-dialog").showModal(); };
  $("clear").onclick = () => {
    state.results = state.results.filter((r) => r.score === undefined && !r.error);
    $("cards").replaceChildren(...state.results.map((r) => r.card.card));
    saveSession();
    refreshThresholdView();
  };
  $("thr-slider").oninput = (ev) => setPageThreshold(Number(ev.target.value));
  $("thr-number").onchange = typedThreshold;
  $("thr-reset").onclick = () => setPageThreshold(state.serverThr);
  $("thr-export").onclick = exportThreshold;
  $("filter").onchange = () => { state.selected = 0; renderGallery(); };
  $("export-labels").onclick = exportLabels;
  $("clear-labels").onclick = () => { state.labels = {}; storeRemove("localStorage", LABEL_STORE + state.sha); storageProblem("labels", null); renderGallery(); };
  document.addEventListener("keydown", onKey);
  $("cam-start").onclick = startCamera;
  $("cam-stop").onclick = stopCamera;
  refreshHealth();
  loadModel();
}

document.addEventListener("DOMContentLoaded", init);
