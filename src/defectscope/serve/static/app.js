// defectscope inspector: upload images to the service, show verdicts, pictures and the session history.
// Plain JavaScript, no library, nothing loaded from outside the service (the plant is offline).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { models: [], history: [], next: 1 };

function headers() {
  const key = $("#apikey").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function setStatus(text, cls) {
  const s = $("#status");
  s.textContent = text;
  s.className = "status " + (cls || "");
}

async function errorText(resp) {
  try { const j = await resp.json(); return j.error || resp.statusText; } catch (e) { return resp.statusText; }
}

async function loadModels() {
  let resp;
  try { resp = await fetch("/v1/models", { headers: headers() }); } catch (e) { setStatus("service unreachable", "failed"); return; }
  if (resp.status === 401) { setStatus("API key needed", "failed"); $("#apikey").focus(); return; }
  if (!resp.ok) { setStatus(await errorText(resp), "failed"); return; }
  state.models = (await resp.json()).models;
  const sel = $("#model");
  const keep = sel.value;
  sel.textContent = "";
  for (const m of state.models) sel.append(el("option", { value: m.name }, m.name + (m.status === "ready" ? "" : " (" + m.status + ")")));
  if (keep && state.models.some((m) => m.name === keep)) sel.value = keep;
  showModel();
  const ready = state.models.every((m) => m.status === "ready");
  const failed = state.models.some((m) => m.status === "failed");
  setStatus(ready ? "ready" : failed ? "a model failed to load" : "loading models…", ready ? "ready" : failed ? "failed" : "");
  if (!ready && !failed) setTimeout(loadModels, 1000);
  loadReports();
}

function showModel() {
  const m = state.models.find((x) => x.name === $("#model").value);
  const info = $("#modelinfo");
  if (!m) { info.textContent = ""; return; }
  if (m.status === "failed") { info.textContent = m.name + " failed to load: " + m.error; return; }
  const parts = [m.method || "", m.input ? m.input.size.join("×") + " px, " + m.input.channels + " channel(s)" : "",
    m.calibration ? m.calibration.description : "not calibrated: raw scores only, no verdict",
    m.model_version ? "version " + m.model_version : ""];
  info.textContent = parts.filter(Boolean).join(" · ");
}

async function loadReports() {
  try {
    const resp = await fetch("/v1/reports", { headers: headers() });
    if (!resp.ok) return;
    const span = $("#reports");
    span.textContent = "";
    for (const r of (await resp.json()).reports) {
      if (r.has_report) span.append(" ", el("a", { href: r.url, target: "_blank" }, "report: " + r.name));
    }
  } catch (e) { /* no reports */ }
}

function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

function card(item) {
  const v = item.error ? "error" : (item.verdict || "none");
  const label = item.error ? "ERROR" : item.verdict === "defect" ? "DEFECT" : item.verdict === "good" ? "GOOD" : "NO VERDICT";
  const c = el("article", { class: "card " + v, "data-verdict": v, "data-id": String(item.id) });
  const head = el("header", {}, el("span", { class: "verdict" }, label), el("span", { class: "fname" }, item.file),
    el("span", { class: "muted" }, item.model));
  c.append(head);
  if (item.error) {
    c.append(el("p", { class: "errmsg" }, item.error));
  } else {
    head.append(el("span", { class: "score" }, "normalised score " + fmt(item.normalized, 3) + " · raw " + fmt(item.score, 4) +
      (item.threshold !== null && item.threshold !== undefined ? " · threshold " + fmt(item.threshold, 4) : "")));
    const bar = el("div", { class: "bar", title: "normalised score: 0.5 is the threshold" }, el("div", { class: "fill" }), el("div", { class: "mark" }));
    if (item.normalized !== null && item.normalized !== undefined) bar.firstChild.style.width = (100 * item.normalized).toFixed(1) + "%";
    c.append(bar);
  }
  const pics = el("div", { class: "pics" });
  const fig = (cls, src, caption) => el("figure", {}, el("img", { class: cls, src: src, alt: caption }), el("figcaption", {}, caption));
  if (item.originalUrl) pics.append(fig("original", item.originalUrl, "image"));
  if (item.overlay) pics.append(fig("overlay", "data:image/png;base64," + item.overlay, "heatmap overlay"));
  if (item.mask) pics.append(fig("mask", "data:image/png;base64," + item.mask, "predicted mask"));
  if (item.note) c.append(el("p", { class: "muted" }, item.note));
  c.append(pics);
  return c;
}

function renderHistory() {
  const f = $("#filter").value;
  const body = $("#history tbody");
  body.textContent = "";
  const counts = { defect: 0, good: 0, error: 0, none: 0 };
  for (const item of state.history) {
    const v = item.error ? "error" : (item.verdict || "none");
    counts[v] += 1;
    if (f !== "all" && f !== v) continue;
    const row = el("tr", { "data-verdict": v },
      el("td", {}, String(item.id)), el("td", {}, item.time), el("td", {}, item.file), el("td", {}, item.model),
      el("td", { class: "v-" + v }, item.error ? "error" : (item.verdict || "no verdict")),
      el("td", {}, fmt(item.normalized, 3)), el("td", {}, fmt(item.score, 4)));
    row.addEventListener("click", () => { $("#results").textContent = ""; $("#results").append(card(item)); });
    body.prepend(row);
  }
  $("#counts").textContent = state.history.length + " image(s): " + counts.defect + " defect, " + counts.good + " good" +
    (counts.error ? ", " + counts.error + " error" : "") + (counts.none ? ", " + counts.none + " without verdict" : "");
}

async function scoreFile(file, model) {
  const form = new FormData();
  form.append("file", file, file.name);
  const item = { id: state.next++, time: new Date().toLocaleTimeString(), file: file.name, model: model,
    originalUrl: URL.createObjectURL(file) };
  try {
    const resp = await fetch("/v1/models/" + encodeURIComponent(model) + "/predict?overlay=1&mask=1", {
      method: "POST", body: form, headers: headers() });
    if (!resp.ok) {
      item.error = resp.status + ": " + (await errorText(resp));
      if (resp.status === 401) setStatus("API key needed", "failed");
    } else {
      const r = await resp.json();
      Object.assign(item, { verdict: r.verdict, normalized: r.normalized, score: r.score, threshold: r.threshold,
        overlay: r.overlay, mask: r.mask, note: r.note });
    }
  } catch (e) {
    item.error = "the service did not answer (" + e + ")";
  }
  return item;
}

async function handleFiles(files) {
  const model = $("#model").value;
  if (!model || !files.length) return;
  const results = $("#results");
  results.textContent = "";
  const queue = Array.from(files);
  const slots = queue.map((f) => {
    const p = el("article", { class: "card pending" }, el("header", {}, el("span", { class: "verdict" }, "…"), el("span", { class: "fname" }, f.name)));
    results.append(p);
    return p;
  });
  let index = 0;
  async function worker() {
    while (index < queue.length) {
      const i = index++;
      const item = await scoreFile(queue[i], model);
      state.history.push(item);
      slots[i].replaceWith(card(item));
      renderHistory();
    }
  }
  await Promise.all([worker(), worker(), worker(), worker()]);
}

function setup() {
  const drop = $("#drop");
  $("#files").addEventListener("change", (e) => { handleFiles(e.target.files); e.target.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); handleFiles(e.dataTransfer.files); });
  $("#model").addEventListener("change", showModel);
  $("#filter").addEventListener("change", renderHistory);
  $("#apikey").addEventListener("change", () => { sessionStorage.setItem("defectscope-key", $("#apikey").value); loadModels(); });
  $("#apikey").value = sessionStorage.getItem("defectscope-key") || "";
  renderHistory();
  loadModels();
}

setup();
