// LabelFool studio: every number on this page comes from the server's public JSON API.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { key: sessionStorage.getItem("labelfool-key") || "", image: null, imageName: "", decision: null, target: null, running: false };
const SAMPLES = ["zebra", "tench", "siberian-husky"];

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role") e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() { $("#error").hidden = true; }

// The API with the key; an error answer is shown as the API words it, then thrown.
async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  const res = await fetch(path, Object.assign({}, options, { headers }));
  if (!res.ok) {
    let text = `${res.status} ${res.statusText}`;
    try {
      const body = await res.json();
      if (body && body.error) text = `${res.status} ${body.error.code}: ${body.error.message}`;
    } catch (_) { /* not JSON */ }
    showError(text);
    throw new Error(text);
  }
  return res;
}

function imageForm(extra = {}) {
  const form = new FormData();
  form.append("image", state.image, state.imageName);
  form.append("model", $("#model").value);
  for (const [k, v] of Object.entries(extra)) if (v !== undefined && v !== null && v !== "") form.append(k, v);
  return form;
}

const pct = (p) => (p * 100).toFixed(1) + "%";
const fmt = (x, d = 4) => (x === null || x === undefined ? "–" : typeof x === "number" ? Number(x.toPrecision(d)).toString() : x);
const label = (c) => `${c.label} (${pct(c.probability)})`;

async function loadModels() {
  const res = await api("/models");
  const body = await res.json();
  const select = $("#model");
  select.replaceChildren();
  for (const m of body.models) {
    const o = el("option", { value: m.name, disabled: m.state !== "ready" }, m.state === "ready" ? m.name : `${m.name} (${m.state})`);
    select.append(o);
  }
}

// A new image replaces everything the previous one showed at once; Run stays disabled until
// this one is classified and decided (a file the server refuses leaves nothing to attack).
async function setImage(blob, name) {
  clearError();
  $("#run").disabled = true;
  for (const sel of ["#classification", "#decision", "#ranking tbody", "#results"]) $(sel).replaceChildren();
  state.decision = null;
  state.target = null;
  state.image = blob;
  state.imageName = name;
  const img = $("#original");
  img.src = URL.createObjectURL(blob);
  img.hidden = false;
  try {
    await classify();
    await decide();
  } catch (e) {
    img.hidden = true;
    img.removeAttribute("src");
    state.image = null;
    throw e;
  }
  $("#run").disabled = state.running;
}

async function classify() {
  const res = await api("/classify", { method: "POST", body: imageForm({ top_k: 5 }) });
  const body = await res.json();
  $("#classification").replaceChildren(...body.top.map((c) => el("li", { "data-index": c.index }, label(c))));
}

async function decide() {
  const res = await api("/target-label", { method: "POST", body: imageForm({ alternatives: 6 }) });
  const body = await res.json();
  const d = body.decision;
  state.decision = d;
  state.target = d.target.index;
  const s = d.candidates.map((c) => label(c)).join(", ");
  $("#decision").replaceChildren(
    el("p", {}, "Branch: ", el("strong", { id: "branch" }, d.branch), ` (p̂1 = ${pct(d.p1)}, δ1 = ${d.delta1}, δ2 = ${d.delta2})`),
    el("p", {}, "Candidate set S: ", el("span", { id: "candidates" }, s)),
    // A live region: a screen reader announces the target when another is chosen below.
    el("p", { "aria-live": "polite" }, "Target: ", el("strong", { id: "target" }, d.target.label)),
  );
  // Each radio button is named by its class (the label in the next cell), so a screen reader
  // says which target it chooses.
  const rows = d.ranking.map((r, i) => {
    const id = `target-${i}`;
    const radio = el("input", { type: "radio", name: "target", id, value: r.index, checked: i === 0 });
    radio.addEventListener("change", () => { state.target = r.index; $("#target").textContent = r.label; });
    return el("tr", { "data-index": r.index }, el("td", {}, radio), el("td", {}, el("label", { htmlFor: id }, r.label)), el("td", {}, fmt(r.distance)));
  });
  $("#ranking tbody").replaceChildren(...rows);
}

function b64ToBlob(b64, type) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Blob([bytes], { type });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = reject;
    img.src = src;
  });
}

// |adversarial − original| × gain, drawn from the two images' pixels.
async function drawDifference(canvas) {
  const [a, b] = await Promise.all([loadImage(canvas.dataset.original), loadImage(canvas.dataset.adversarial)]);
  canvas.width = a.naturalWidth;
  canvas.height = a.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(a, 0, 0);
  const pa = ctx.getImageData(0, 0, canvas.width, canvas.height);
  ctx.drawImage(b, 0, 0);
  const pb = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const gain = Number($("#gain").value);
  for (let i = 0; i < pa.data.length; i += 4) {
    for (let c = 0; c < 3; c++) pb.data[i + c] = Math.min(255, Math.abs(pb.data[i + c] - pa.data[i + c]) * gain);
    pb.data[i + 3] = 255;
  }
  ctx.putImageData(pb, 0, 0);
}

function resultCard(method) {
  const card = el("div", { class: "result", "data-method": method },
    el("h3", {}, method), el("p", { class: "status running" }, "running…"));
  $("#results").append(card);
  return card;
}

function fillCard(card, r) {
  const png = b64ToBlob(r.png_base64, "image/png");
  const advUrl = URL.createObjectURL(png);
  const origUrl = $("#original").src;
  const stem = state.imageName.replace(/\.[^.]*$/, "");
  const canvas = el("canvas", { class: "difference" });
  canvas.dataset.original = origUrl;
  canvas.dataset.adversarial = advUrl;
  const m = r.perturbation;
  card.replaceChildren(
    el("h3", {}, r.method),
    el("p", { class: "status " + (r.success ? "success" : "failure") }, r.success ? "fooled" : "not fooled"),
    el("div", { class: "images" },
      el("figure", {}, el("img", { src: origUrl, alt: "original" }), el("figcaption", {}, "original: ", el("span", { class: "original-label" }, label(r.original)))),
      el("figure", {}, el("img", { class: "adversarial", src: advUrl, alt: "adversarial" }), el("figcaption", {}, "adversarial: ", el("span", { class: "final-label" }, label(r.final)))),
      el("figure", {}, canvas, el("figcaption", {}, "difference × gain"))),
    el("dl", { class: "metrics" },
      el("dt", {}, "target"), el("dd", {}, r.target ? r.target.label : "– (untargeted)"),
      el("dt", {}, "Wu-Palmer"), el("dd", { class: "wup" }, fmt(r.label_space.wup, 3)),
      el("dt", {}, "mistake severity"), el("dd", { class: "severity" }, fmt(r.label_space.mistake_severity)),
      el("dt", {}, "perceptibility"), el("dd", { class: "perceptibility" }, fmt(m.perceptibility)),
      el("dt", {}, "L2 / L∞ / L0"), el("dd", {}, `${fmt(m.l2)} / ${fmt(m.linf)} / ${m.l0}`),
      el("dt", {}, "PSNR / SSIM"), el("dd", {}, `${fmt(m.psnr)} dB / ${fmt(m.ssim)}`),
      el("dt", {}, "iterations / checks"), el("dd", {}, `${r.iterations} / ${r.checks}`)),
    el("a", { class: "download", href: advUrl, download: `${stem}-${r.method}.png` }, "download PNG"));
  drawDifference(canvas).catch((e) => showError("cannot draw the difference: " + e));
}

// One run at a time: Run is disabled until every attack of this one has ended.
async function runAttacks() {
  if (state.running || !state.image) return;
  state.running = true;
  $("#run").disabled = true;
  try {
    await attackAll();
  } finally {
    state.running = false;
    $("#run").disabled = !state.image;
  }
}

async function attackAll() {
  clearError();
  $("#results").replaceChildren();
  const methods = [...document.querySelectorAll("input[name=method]:checked")].map((i) => i.value);
  await Promise.all(methods.map(async (method) => {
    const card = resultCard(method);
    const extra = { method };
    if (method === "labelfool" && state.target !== null) extra.target = state.target;
    try {
      // Followed live: progress events while the attack runs, then its result (or error).
      const res = await api("/attack", { method: "POST", body: imageForm(extra), headers: { Accept: "text/event-stream" } });
      let updates = 0;
      await readEvents(res, (event, data) => {
        if (event === "progress") {
          updates += 1;
          card.dataset.progressEvents = String(updates);
          const where = data.label ? `${data.label.label} (${pct(data.probability)})` : "–";
          const margin = data.margin === null || data.margin === undefined ? "" : ` · margin ${fmt(data.margin, 3)}`;
          card.querySelector(".status").textContent = `iteration ${data.iterations} · checks ${data.checks} · now: ${where}${margin}`;
        } else if (event === "result") {
          fillCard(card, data);
          card.dataset.progressEvents = String(updates);
        } else if (event === "error") {
          const text = `${data.status} ${data.error.code}: ${data.error.message}`;
          showError(text);
          throw new Error(text);
        }
      });
    } catch (e) {
      card.querySelector(".status").textContent = String(e.message || e);
      card.querySelector(".status").className = "status failure";
    }
  }));
}

// ---- jobs ----------------------------------------------------------------------------------

function jobRow(job) {
  let row = document.querySelector(`tr.job[data-id="${job.id}"]`);
  if (!row) {
    const methods = job.spec ? job.spec.methods : state.jobMethods[job.id] || [];
    row = el("tr", { class: "job", "data-id": job.id },
      el("td", {}, job.id), el("td", { class: "job-methods" }, methods.join(", ")), el("td", { class: "job-state" }),
      el("td", {}, el("progress", { max: 1, value: 0 }), el("span", { class: "job-count" })),
      el("td", { class: "job-links" }));
    $("#jobs tbody").prepend(row);
  }
  row.querySelector(".job-state").textContent = job.state;
  const p = row.querySelector("progress");
  p.max = job.total; p.value = job.done;
  row.querySelector(".job-count").textContent = ` ${job.done}/${job.total} (${job.successes} fooled)`;
  if (job.state === "done") {
    if (!document.querySelector(`#study-job option[value="${job.id}"]`)) $("#study-job").prepend(el("option", { value: job.id }, job.id));
    $("#study-job").value = job.id;
    const links = row.querySelector(".job-links");
    if (!links.childElementCount) {
      for (const m of (job.spec ? job.spec.models : state.jobModels[job.id] || [])) {
        links.append(el("a", { class: "report", href: "#", onclick: (e) => { e.preventDefault(); openReport(job.id, m).catch(() => {}); } }, `report (${m})`), " ");
      }
      links.append(el("a", { class: "results", href: "#", title: `job-${job.id}-results.jsonl`,
        onclick: (e) => { e.preventDefault(); download(`/jobs/${job.id}/results`, `job-${job.id}-results.jsonl`).catch(() => {}); } }, "results (JSON lines)"));
    }
  }
}
state.jobModels = {};
state.jobMethods = {};

// A download named for what it is: fetched with the key, saved as `name`.
async function download(path, name) {
  const res = await api(path);
  const url = URL.createObjectURL(await res.blob());
  const a = el("a", { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// A job's report: the server's HTML page (its charts inside it) in a new tab. The tab opens on
// the click itself, which pop-up blockers allow, and gets the page once it is fetched with the
// key; where no tab may open, the page is downloaded instead.
async function openReport(id, model) {
  const tab = window.open("", "_blank");
  const path = `/jobs/${id}/report/${encodeURIComponent(model)}`;
  if (!tab) return download(path, `job-${id}-report-${model}.html`);
  try {
    const res = await api(path);
    tab.location.href = URL.createObjectURL(await res.blob());
  } catch (e) {
    tab.close();
    throw e;
  }
}

// Server-Sent Events read with fetch (EventSource cannot send the API key or POST an image):
// calls onEvent(name, data) for each event.
async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const message = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of message.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      if (data.length) onEvent(event, JSON.parse(data.join("\n")));
    }
  }
}

async function follow(id) {
  const res = await api(`/jobs/${id}/events`);
  await readEvents(res, (event, data) => { if (event === "progress") jobRow(data); });
}

async function createJob() {
  clearError();
  // The job form's own method boxes (the attack section's are for the attacks above).
  const spec = { methods: [...document.querySelectorAll("input[name=job-method]:checked")].map((i) => i.value), models: [$("#model").value] };
  const limit = Number($("#job-limit").value);
  if (limit > 0) spec.limit = limit;
  const archive = $("#job-archive").files[0];
  let res;
  if (archive) {
    const form = new FormData();
    form.append("archive", archive, archive.name);
    form.append("spec", JSON.stringify(spec));
    res = await api("/jobs", { method: "POST", body: form });
    $("#job-archive").value = "";
  } else {
    const body = Object.assign({ images: $("#job-folder").value }, spec);
    res = await api("/jobs", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  }
  const job = await res.json();
  state.jobModels[job.id] = job.spec.models;
  state.jobMethods[job.id] = job.spec.methods;
  jobRow(job);
  follow(job.id).catch((e) => showError(String(e.message || e)));
}

async function loadJobs() {
  const res = await api("/jobs");
  for (const job of (await res.json()).reverse()) {
    state.jobModels[job.id] = job.spec.models;
    state.jobMethods[job.id] = job.spec.methods;
    jobRow(job);
    if (job.state === "queued" || job.state === "running") follow(job.id).catch(() => {});
  }
}

// ---- human studies --------------------------------------------------------------------------

const num = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));
const spread = (m, s) => (m === null || m === undefined ? "–" : s === null || s === undefined ? num(m) : `${num(m)} ± ${num(s)}`);

// The pooled PG's 95% bootstrap interval (resampling observers), "–" where there is none.
const interval = (ci) => (!ci || ci.low === null ? "–" : `${num(ci.low)} to ${num(ci.high)}`);
const ms = (x) => (x === null || x === undefined ? "–" : `${Math.round(x)} ms`);

function summaryTable(scope, rates) {
  const head = el("tr", {}, ...["category", "answers", "observers", "CR mean ± sd", "PG mean ± sd", "left out of PG mean",
    "pooled CR", "pooled PG", "pooled PG 95% CI", "median answer time"].map((h) => el("th", {}, h)));
  const rows = rates.summary.map((s) => el("tr", { "data-category": s.category },
    el("td", {}, s.category), el("td", { class: "num" }, s.pooled.answered), el("td", { class: "num" }, s.observers),
    el("td", { class: "num", "data-scope": scope, "data-stat": "cr_mean" }, spread(s.cr_mean, s.cr_std)),
    el("td", { class: "num", "data-scope": scope, "data-stat": "pg_mean" }, spread(s.pg_mean, s.pg_std)),
    el("td", { class: "num", "data-scope": scope, "data-stat": "observers_dropped", title: "observers with a clean CR of 0: their PG is undefined" },
      s.category === "clean" ? "–" : String(s.observers_dropped)),
    el("td", { class: "num", "data-scope": scope, "data-stat": "pooled_cr" }, num(s.pooled.cr)),
    el("td", { class: "num", "data-scope": scope, "data-stat": "pooled_pg" }, num(s.pooled.pg)),
    el("td", { class: "num", "data-scope": scope, "data-stat": "pooled_pg_ci" }, interval(s.pooled_pg_ci)),
    el("td", { class: "num", "data-scope": scope, "data-stat": "answer_ms_median" }, ms(s.answer_ms_median))));
  return el("table", { class: "study-results", "data-scope": scope }, el("thead", {}, head), el("tbody", {}, ...rows));
}

function observerTable(rates) {
  const head = el("tr", {}, ...["observer", "category", "answers", "misjudged", "CR", "PG"].map((h) => el("th", {}, h)));
  const rows = [];
  for (const o of rates.per_observer) for (const r of o.rates) {
    rows.push(el("tr", { "data-observer": o.observer, "data-category": r.category },
      el("td", {}, o.observer), el("td", {}, r.category), el("td", { class: "num" }, r.answered), el("td", { class: "num" }, r.misjudged),
      el("td", { class: "num", "data-stat": "cr" }, num(r.cr)), el("td", { class: "num", "data-stat": "pg" }, num(r.pg))));
  }
  return el("table", { class: "study-results observers" }, el("thead", {}, head), el("tbody", {}, ...rows));
}

async function showResults(card, id) {
  const r = await (await api(`/studies/${id}/results`)).json();
  const chart = await (await api(`/studies/${id}/chart.png`)).blob();
  const out = card.querySelector(".study-output");
  out.replaceChildren(
    el("h3", {}, "All images"), summaryTable("all", r.all),
    el("h3", {}, "Animals (WordNet)"), summaryTable("animals", r.animals),
    el("h3", {}, "Per observer"), observerTable(r.all),
    el("img", { id: "study-chart", src: URL.createObjectURL(chart), alt: "performance gain per method (mean over observers ± sd)" }),
    el("p", { class: "definition" }, r.definition));
  card.dataset.results = "true";
}

function studyCard(study) {
  let card = document.querySelector(`.study[data-id="${study.id}"]`);
  if (!card) {
    card = el("div", { class: "result study", "data-id": study.id });
    $("#studies").prepend(card);
  }
  // Groups are numbered from 0 here as in the API and the CSV.
  const allGroups = study.design === "all_groups";
  const links = el("ul", { class: "observers" }, ...study.observers.map((o) => el("li", { "data-group": o.group },
    el("a", { class: "observer-link", href: o.link, target: "_blank", "data-observer": o.name }, o.name),
    ` — ${allGroups ? "every group, from group" : "group"} ${o.group}, ${o.answered}/${o.total} answered${o.revoked_ms ? " (link revoked)" : ""}`)));
  const refresh = el("button", { type: "button", class: "study-refresh" }, "Results");
  refresh.addEventListener("click", () => refreshStudy(study.id).catch(() => {}));
  const add = el("button", { type: "button", class: "study-add-observer" }, "Add observer");
  add.addEventListener("click", () => addObserver(study.id).catch(() => {}));
  const csv = el("a", { class: "study-csv", href: "#", title: `study-${study.id}-answers.csv`,
    onclick: (e) => { e.preventDefault(); download(`/studies/${study.id}/answers.csv`, `study-${study.id}-answers.csv`).catch(() => {}); } }, "answers (CSV)");
  // A group nobody is placed in would go unanswered: said where the observers are listed.
  const without = study.groups_without_observers || [];
  const warning = el("p", { class: "warning", role: "status", hidden: without.length === 0 },
    without.length === 1
      ? `Warning: group ${without[0]} has no observer, so its puzzles go unanswered. Add an observer.`
      : `Warning: groups ${without.join(", ")} have no observer, so their puzzles go unanswered. Add observers.`);
  const sizes = study.groups.map((n, g) => `group ${g}: ${n}`).join(", ");
  const refs = study.reference_images ? `up to ${study.references} reference pictures each from ${study.reference_images}` : "no reference pictures";
  card.replaceChildren(
    el("h3", {}, `${study.name} (${study.id})`),
    el("p", {}, `${study.puzzles} puzzles (${sizes}); ${allGroups ? "each observer answers every group in sequence" : "each observer answers one group"}; ${refs}; categories: ${study.categories.join(", ")}; ${study.answers} answers`),
    warning, links, refresh, " ", add, " ", csv, el("div", { class: "study-output" }));
}

async function addObserver(id) {
  clearError();
  await api(`/studies/${id}/observers`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" });
  studyCard(await (await api(`/studies/${id}`)).json());
}

async function refreshStudy(id) {
  clearError();
  const study = await (await api(`/studies/${id}`)).json();
  studyCard(study);
  await showResults(document.querySelector(`.study[data-id="${id}"]`), id);
}

async function createStudy() {
  clearError();
  const body = { job: $("#study-job").value, observers: Number($("#study-observers").value) || 0, design: $("#study-design").value };
  const refs = $("#study-references").value.trim();
  if (refs) body.reference_images = refs;
  const res = await api("/studies", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  studyCard(await res.json());
}

async function loadStudies() {
  const res = await api("/studies");
  for (const s of (await res.json()).reverse()) studyCard(s);
}

// ---- wiring --------------------------------------------------------------------------------

async function start() {
  $("#api-key").value = state.key;
  $("#save-key").addEventListener("click", () => {
    state.key = $("#api-key").value;
    sessionStorage.setItem("labelfool-key", state.key);
    clearError();
    loadModels().then(loadJobs).then(loadStudies).catch(() => {});
  });
  for (const name of SAMPLES) {
    const b = el("button", { type: "button", class: "sample", "data-name": name }, name);
    b.addEventListener("click", async () => {
      const res = await fetch(`/studio/samples/${name}.jpg`);
      setImage(await res.blob(), `${name}.jpg`).catch(() => {});
    });
    $("#samples").append(b);
  }
  $("#file").addEventListener("change", (e) => { const f = e.target.files[0]; if (f) setImage(f, f.name).catch(() => {}); });
  const drop = $("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) setImage(f, f.name).catch(() => {});
  });
  $("#model").addEventListener("change", () => { if (state.image) setImage(state.image, state.imageName).catch(() => {}); });
  $("#run").addEventListener("click", () => runAttacks().catch(() => {}));
  $("#gain").addEventListener("input", () => {
    $("#gain-value").textContent = $("#gain").value + "×";
    document.querySelectorAll("canvas.difference").forEach((c) => drawDifference(c).catch(() => {}));
  });
  $("#job-create").addEventListener("click", () => createJob().catch(() => {}));
  $("#study-create").addEventListener("click", () => createStudy().catch(() => {}));
  try {
    await loadModels();
    await loadJobs();
    await loadStudies();
  } catch (_) { /* shown */ }
  document.body.dataset.ready = "true";
}

start();
