// coreml-hub app: plain JavaScript over the app's JSON API and its server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, models: [], jobs: new Map(), current: null, upload: null, mask: null, control: null, gallery: [] };

// ---- helpers --------------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function humanSize(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  let value = bytes;
  for (const unit of ["B", "KB", "MB", "GB", "TB"]) {
    if (Math.abs(value) < 1000 || unit === "TB") return unit === "B" ? `${value} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1000;
  }
}

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status; this.param = err.param || null; this.hint = err.hint || null;
  }
}

async function api(path, { method = "GET", json, body, headers = {} } = {}) {
  const init = { method, headers: { ...headers }, credentials: "same-origin" };
  if (json !== undefined) { init.body = JSON.stringify(json); init.headers["Content-Type"] = "application/json"; }
  else if (body !== undefined) init.body = body;
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (_) { data = null; }
  if (response.status === 401) { window.location.href = "/login"; }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

function showError(node, error) {
  if (!error) { node.hidden = true; node.textContent = ""; return; }
  node.hidden = false;
  node.textContent = error.hint ? `${error.message}\n${error.hint}` : error.message;
}

// ---- tabs ---------------------------------------------------------------------------------------
function showTab() {
  const name = (location.hash || "#generate").slice(1);
  for (const section of document.querySelectorAll("section.tab")) section.hidden = section.id !== `tab-${name}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === name);
  if (name === "gallery") loadGallery();
  if (name === "library") loadModels();
}

// ---- models and the form ------------------------------------------------------------------------
function fillSelect(select, options, selected) {
  const keep = select.querySelector("option[value='']");
  select.replaceChildren(...(keep ? [keep] : []), ...options.map(([value, label]) => el("option", { value }, label)));
  if (selected !== undefined) select.value = selected;
}

async function loadInfo() {
  state.info = await api("/api/info");
  fillSelect($("scheduler"), state.info.schedulers.map((s) => [s.id, s.name]), state.info.default_scheduler);
  fillSelect($("prediction_type"), state.info.prediction_types.map((p) => [p, p]));
  fillSelect($("backend"), state.info.backends.map((b) => [b, b]), "auto");
  fillSelect($("device"), state.info.devices.map((d) => [d, d]), "auto");
  fillSelect($("compute_unit"), state.info.compute_units.map((c) => [c, c]), "ALL");
  $("outputs-folder").textContent = state.info.outputs;
}

async function loadModels() {
  const data = await api("/api/models");
  state.models = data.models;
  const usable = state.models.filter((m) => m.status === "ok");
  const select = $("model");
  const before = select.value;
  fillSelect(select, usable.map((m) => [m.id, `${m.id} (${humanSize(m.size_bytes)})`]));
  if (usable.some((m) => m.id === before)) select.value = before;
  $("no-models").hidden = usable.length > 0;
  renderLibrary();
}

function renderLibrary() {
  const rows = state.models.map((m) => el("tr", { dataset: { model: m.id } },
    el("td", {}, m.repo, m.warm ? el("span", { class: "tag warm", title: "loaded in memory" }, " warm") : null),
    el("td", {}, m.variant),
    el("td", { class: "num" }, humanSize(m.size_bytes)),
    el("td", {}, (m.components || []).map((c) => el("span", { class: "tag" }, c))),
    el("td", {}, el("span", { class: `state ${m.status === "ok" ? "done" : "failed"}` }, m.status)),
    el("td", { class: "num" },
      el("button", { class: "small", type: "button", onclick: () => { $("model").value = m.id; location.hash = "#generate"; } }, "Use"),
      " ",
      el("button", { class: "small danger remove", type: "button", onclick: () => removeModel(m.id) }, "Remove"))));
  $("library-list").replaceChildren(...rows);
  $("library-empty").hidden = rows.length > 0;
}

async function removeModel(id) {
  if (!confirm(`Remove ${id} from the store? Its files are deleted.`)) return;
  try { await api(`/api/models/${id}`, { method: "DELETE" }); } catch (error) { alert(error.message); }
  loadModels();
}

function formRequest() {
  const form = $("generate-form");
  const data = {};
  for (const name of ["model", "prompt", "negative_prompt", "scheduler", "prediction_type", "backend", "device", "compute_unit"]) {
    const value = form.elements[name].value;
    if (value !== "") data[name] = value;
  }
  for (const name of ["steps", "guidance_scale", "num_images", "seed", "strength", "save_every", "preview_every"]) {
    const value = form.elements[name].value.trim();
    if (value !== "") data[name] = /^-?\d+(\.\d+)?$/.test(value) ? Number(value) : value;
  }
  if (!state.upload) delete data.strength;
  else data.init_image = state.upload.id;
  if (state.upload && state.mask) data.mask = state.mask.id;
  const controlnet = form.elements.controlnet.value.trim();
  if (controlnet) {
    const scale = form.elements.control_scale.value.trim();
    data.controlnets = [{ name: controlnet, image: state.control ? state.control.id : null, scale: scale === "" ? 1 : Number(scale) }];
  }
  data.disable_safety = form.elements.disable_safety.checked;
  return data;
}

function markInvalid(param) {
  for (const node of document.querySelectorAll("#generate-form [aria-invalid]")) node.removeAttribute("aria-invalid");
  const files = { init_image: "init_image_file", mask: "mask_file", controlnets: "controlnet" };
  const field = param && ($(param) || (files[param] ? $(files[param]) : null));
  if (field) { field.setAttribute("aria-invalid", "true"); field.focus(); }
}

async function submitGenerate(event) {
  event.preventDefault();
  const button = $("generate-button");
  showError($("form-error"), null);
  markInvalid(null);
  if (!$("model").value) {
    showError($("form-error"), { message: "Choose a model first (pull one in the Library)." });
    return;
  }
  button.disabled = true;
  try {
    const job = await api("/api/jobs", { method: "POST", json: formRequest() });
    keepJob(job);
    follow(job.id);
    renderQueue();
  } catch (error) {
    showError($("form-error"), error);
    markInvalid(error.param);
  } finally {
    button.disabled = false;
  }
}

async function chooseInit(event) {
  const file = event.target.files[0];
  showError($("form-error"), null);
  if (!file) return;
  try {
    state.upload = await api("/api/uploads", { method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" } });
    $("init-thumb").src = URL.createObjectURL(file);
    $("init-preview").hidden = false;
  } catch (error) {
    state.upload = null;
    event.target.value = "";
    $("init-preview").hidden = true;
    showError($("form-error"), error);
    markInvalid("init_image");
  }
}

function clearInit() {
  state.upload = null;
  $("init_image_file").value = "";
  $("init-preview").hidden = true;
}

// The inpainting mask and the control image: uploaded when chosen, sent with the request by id.
async function chooseUpload(event, key, param) {
  const file = event.target.files[0];
  showError($("form-error"), null);
  state[key] = null;
  if (!file) return;
  try {
    state[key] = await api("/api/uploads", { method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" } });
  } catch (error) {
    event.target.value = "";
    showError($("form-error"), error);
    markInvalid(param);
  }
}

// ---- the job being watched on the Generate page -------------------------------------------------
function follow(id) {
  state.current = id;
  $("preview-box").hidden = true;
  $("preview").removeAttribute("src");
  $("current-results").replaceChildren();
  renderCurrent();
}

function progressOf(job) {
  const p = job.progress || {};
  if (job.kind === "pull") return p.total ? [p.done, p.total, `${humanSize(p.done)} of ${humanSize(p.total)}`] : [0, 1, ""];
  if (!p.total) return [job.state === "done" ? 1 : 0, 1, ""];
  const images = p.images || 1, image = p.image || 1;
  const done = (image - 1) * p.total + p.step, total = images * p.total;
  return [done, total, images > 1 ? `image ${image}/${images}, step ${p.step}/${p.total}` : `step ${p.step}/${p.total}`];
}

function stateText(job) {
  if (job.state === "queued") return job.position ? `queued (#${job.position})` : "queued";
  return job.state;
}

function renderCurrent() {
  const job = state.jobs.get(state.current);
  $("current").hidden = !job;
  if (!job) return;
  $("current-title").textContent = job.title;
  const [done, total, label] = progressOf(job);
  $("current-phase").textContent = `${stateText(job)} · ${job.phase}${label ? ` · ${label}` : ""}`;
  $("current-progress").max = total || 1;
  $("current-progress").value = job.state === "done" ? total || 1 : done;
  $("current-cancel").hidden = job.state !== "queued" && job.state !== "running";
  showError($("current-error"), job.state === "failed" || job.state === "cancelled" ? { message: job.message, hint: job.hint } : null);
  if (job.state === "done" && job.result && job.result.images) {
    $("preview-box").hidden = true;
    $("current-results").replaceChildren(...job.result.images.map((image) =>
      el("a", { href: image.url, target: "_blank", title: `seed ${image.seed}` }, el("img", { src: image.url, alt: job.title, class: "result" }))));
  }
}

function showPreview(event) {
  const job = state.jobs.get(event.id);
  if (job) job.preview_step = event.step;
  if (event.id !== state.current) { renderQueue(); return; }
  $("preview").src = event.image;
  $("preview-caption").textContent = `preview at step ${event.step}`;
  $("preview-box").hidden = false;
}

// A job that has finished stays finished: the answer to a cancel request can arrive after the
// event saying the job was cancelled, and must not bring back its "Cancelling" state.
const FINISHED = new Set(["done", "failed", "cancelled"]);

function keepJob(job) {
  const known = state.jobs.get(job.id);
  if (known && FINISHED.has(known.state) && !FINISHED.has(job.state)) return;
  state.jobs.set(job.id, job);
}

async function cancelJob(id) {
  try { keepJob(await api(`/api/jobs/${id}/cancel`, { method: "POST" })); }
  catch (error) { alert(error.message); }
  renderQueue(); renderCurrent();
}

// ---- the queue ----------------------------------------------------------------------------------
// Rows are kept per job and rebuilt only when what they show besides progress changes (state,
// message, results): a running job sends an event every step, and a row replaced that often would
// swallow a click on its Cancel button (the press and the release would land on different buttons).
const queueRows = new Map();

function queueRow(job) {
  const [done, total, label] = progressOf(job);
  const active = job.state === "queued" || job.state === "running";
  const key = JSON.stringify([job.state, job.title, job.message, job.hint, stateText(job),
    job.result && job.result.images ? job.result.images.map((image) => image.url) : null]);
  let row = queueRows.get(job.id);
  if (!row || row.key !== key) {
    const bar = active || job.state === "done" ? el("progress", {}) : null;
    const phase = el("div", { class: "why" });
    const tr = el("tr", { dataset: { job: job.id, state: job.state } },
      el("td", {}, el("div", {}, job.kind === "pull" ? "⬇ " : "", job.title),
        job.message ? el("div", { class: "why" }, job.message, job.hint ? ` ${job.hint}` : "") : null),
      el("td", {}, el("span", { class: `state ${job.state}` }, stateText(job))),
      el("td", {}, bar, phase),
      el("td", { class: "num" },
        active ? el("button", { class: "small danger cancel", type: "button", onclick: () => cancelJob(job.id) }, "Cancel") : null,
        job.state === "done" && job.result && job.result.images
          ? job.result.images.map((image) => el("a", { href: image.url, target: "_blank" }, el("img", { class: "thumb", src: image.url, alt: "" })))
          : null));
    row = { key, tr, bar, phase };
    queueRows.set(job.id, row);
  }
  if (row.bar) {
    row.bar.max = total || 1;
    row.bar.value = job.state === "done" ? total || 1 : done;
  }
  row.phase.textContent = job.state === "running" ? `${job.phase}${label ? ` · ${label}` : ""}` : "";
  return row.tr;
}

function renderQueue() {
  const jobs = [...state.jobs.values()].sort((a, b) => b.created - a.created);
  const rows = jobs.map(queueRow);
  for (const id of queueRows.keys()) if (!state.jobs.has(id)) queueRows.delete(id);
  const list = $("queue-list");
  const keep = new Set(rows);
  for (const tr of [...list.children]) if (!keep.has(tr)) tr.remove();  // rebuilt or forgotten rows
  // move rows into order without detaching the ones already in place
  rows.forEach((tr, i) => { if (list.children[i] !== tr) list.insertBefore(tr, list.children[i] || null); });
  $("queue-empty").hidden = rows.length > 0;
  const waiting = jobs.filter((j) => j.state === "queued" || j.state === "running").length;
  $("queue-count").textContent = waiting ? `(${waiting})` : "";
}

// ---- the gallery ----------------------------------------------------------------------------------
function paramsLine(p) {
  if (!p) return "no settings recorded";
  const parts = [`seed ${p.seed}`, `${p.steps} steps`, p.scheduler, `CFG ${p.guidance_scale}`];
  if (p.width) parts.push(`${p.width}x${p.height}`);
  if (p.strength !== undefined && p.strength !== null) parts.push(`strength ${p.strength}`);
  if (p.model) parts.push(p.variant ? `${p.model}:${p.variant}` : p.model);
  return parts.filter((x) => x !== undefined && !String(x).includes("undefined")).join(" · ");
}

async function loadGallery() {
  const data = await api("/api/gallery");
  state.gallery = data.images;
  $("gallery-count").textContent = `(${data.total})`;
  $("gallery-empty").hidden = data.images.length > 0;
  $("gallery-grid").replaceChildren(...data.images.map((image) => {
    const p = image.parameters;
    return el("div", { class: "card", dataset: { name: image.name } },
      el("img", { src: image.url, alt: p ? p.prompt : image.name, loading: "lazy", onclick: () => view(image) }),
      el("p", { class: "prompt" }, p ? p.prompt : image.name),
      p && p.negative_prompt ? el("p", { class: "params" }, `not: ${p.negative_prompt}`) : null,
      el("p", { class: "params" }, paramsLine(p)),
      el("div", { class: "buttons" },
        p ? el("button", { class: "small use-settings", type: "button", onclick: () => useSettings(p, true) }, "Use these settings") : null,
        p ? el("button", { class: "small same-seed", type: "button", onclick: () => useSettings(p, false) }, "Same seed") : null,
        el("button", { class: "small danger delete", type: "button", onclick: () => deleteImage(image.name) }, "Delete")));
  }));
}

function view(image) {
  $("viewer-image").src = image.url;
  $("viewer-image").alt = image.parameters ? image.parameters.prompt : image.name;
  $("viewer").showModal();
}

function useSettings(p, all) {
  const form = $("generate-form");
  if (all) {
    const wanted = p.variant ? `${p.model}:${p.variant}` : p.model;
    const options = [...$("model").options].map((o) => o.value);
    const match = options.find((v) => v === wanted) || options.find((v) => v.split(":")[0] === p.model);
    if (match) $("model").value = match;
    form.elements.prompt.value = p.prompt || "";
    form.elements.negative_prompt.value = p.negative_prompt || "";
    if (p.steps) form.elements.steps.value = p.steps;
    if (p.guidance_scale !== undefined) form.elements.guidance_scale.value = p.guidance_scale;
    if (p.scheduler && [...$("scheduler").options].some((o) => o.value === p.scheduler)) form.elements.scheduler.value = p.scheduler;
    form.elements.prediction_type.value = p.prediction_type && [...$("prediction_type").options].some((o) => o.value === p.prediction_type) ? p.prediction_type : "";
    if (p.strength !== undefined && p.strength !== null) form.elements.strength.value = p.strength;
    form.elements.num_images.value = 1;
  }
  form.elements.seed.value = p.seed !== undefined ? p.seed : "";
  location.hash = "#generate";
  form.elements.prompt.focus();
}

async function deleteImage(name) {
  if (!confirm(`Delete ${name}? The file is removed from the outputs folder.`)) return;
  try { await api(`/api/gallery/${encodeURIComponent(name)}`, { method: "DELETE" }); } catch (error) { alert(error.message); }
  loadGallery();
}

// ---- the library: search and pull ------------------------------------------------------------------
async function search(event) {
  event.preventDefault();
  showError($("search-error"), null);
  const q = $("search-query").value.trim();
  $("search-results").replaceChildren(el("tr", {}, el("td", { class: "note" }, "Searching…")));
  try {
    const data = await api(`/api/search?q=${encodeURIComponent(q)}`);
    const rows = data.models.map((m) => {
      const select = el("select", { "aria-label": "variant" }, el("option", { value: "" }, "best variant here"),
        m.variants.map((v) => el("option", { value: v }, v)));
      return el("tr", { dataset: { repo: m.repo_id } },
        el("td", {}, m.repo_id),
        el("td", { class: "num" }, `♥ ${m.likes ?? 0}`),
        el("td", {}, select),
        el("td", { class: "num" }, el("button", { class: "small pull", type: "button", onclick: () => startPull(m.repo_id, select.value) }, "Pull")));
    });
    $("search-results").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "note" }, "Nothing found."))]));
  } catch (error) {
    $("search-results").replaceChildren();
    showError($("search-error"), error);
  }
}

async function startPull(model, variant) {
  showError($("pull-error"), null);
  try {
    const job = await api("/api/pulls", { method: "POST", json: { model, variant: variant || null } });
    keepJob(job);
    renderPulls(); renderQueue();
  } catch (error) {
    showError($("pull-error"), error);
  }
}

function renderPulls() {
  const pulls = [...state.jobs.values()].filter((j) => j.kind === "pull").sort((a, b) => b.created - a.created).slice(0, 5);
  $("pulls").replaceChildren(...pulls.map((job) => {
    const [done, total, label] = progressOf(job);
    const p = job.progress || {};
    return el("div", { class: "card pull-job", dataset: { job: job.id, state: job.state } },
      el("div", {}, el("strong", {}, job.title), " ", el("span", { class: `state ${job.state}` }, stateText(job))),
      el("progress", { max: total || 1, value: job.state === "done" ? total || 1 : done }),
      el("div", { class: "why" }, job.state === "done" ? `Pulled ${job.result.ref}` : `${job.phase}${label ? ` · ${label}` : ""}`),
      p.note ? el("div", { class: "why" }, p.note) : null,
      job.message ? el("div", { class: "error" }, job.message, job.hint ? `\n${job.hint}` : "") : null);
  }));
}

// ---- live updates -------------------------------------------------------------------------------
function onEvent(message) {
  const event = JSON.parse(message.data);
  if (event.type === "snapshot") {
    state.jobs = new Map(event.jobs.map((j) => [j.id, j]));
  } else if (event.type === "job") {
    const before = state.jobs.get(event.job.id);
    keepJob(event.job);
    const finished = event.job.state === "done" && (!before || before.state !== "done");
    if (finished && event.job.kind === "generate" && !$("tab-gallery").hidden) loadGallery();
    if (finished && event.job.kind === "pull") loadModels();
  } else if (event.type === "preview") {
    showPreview(event);
    return;
  }
  renderQueue(); renderCurrent(); renderPulls();
}

function connect() {
  const source = new EventSource("/api/events");
  source.onopen = () => { $("connection").textContent = "live"; $("connection").classList.add("live"); };
  source.onerror = () => { $("connection").textContent = "reconnecting…"; $("connection").classList.remove("live"); };
  source.onmessage = onEvent;
}

// ---- start ---------------------------------------------------------------------------------------
async function start() {
  window.addEventListener("hashchange", showTab);
  $("generate-form").addEventListener("submit", submitGenerate);
  $("seed-random").addEventListener("click", () => { $("seed").value = ""; });
  $("init_image_file").addEventListener("change", chooseInit);
  $("init-clear").addEventListener("click", clearInit);
  $("mask_file").addEventListener("change", (event) => chooseUpload(event, "mask", "mask"));
  $("control_image_file").addEventListener("change", (event) => chooseUpload(event, "control", "controlnets"));
  $("current-cancel").addEventListener("click", () => state.current && cancelJob(state.current));
  $("search-form").addEventListener("submit", search);
  $("pull-form").addEventListener("submit", (event) => {
    event.preventDefault();
    startPull($("pull-model").value.trim(), $("pull-variant").value.trim());
  });
  await loadInfo();
  await loadModels();
  connect();
  showTab();
  document.body.dataset.ready = "true";
}

start().catch((error) => {
  document.body.prepend(el("p", { class: "error", role: "alert" }, `The app could not start: ${error.message}`));
});
