// ddpmseg label: the page. Plain JavaScript, no build step. The labels of the current image live in a
// Uint8Array (class index per pixel, 255 = unlabelled); every edit is an op in the image's history
// (strokes, or whole maps set by Accept), saved to the server right after it ends (PUT /api/history).
"use strict";

const TOKEN = document.querySelector('meta[name="ddpmseg-token"]').content;
const UNLABELLED = 255;
const $ = (id) => document.getElementById(id);

const app = {
  classes: null, images: [], cur: null,
  tool: { cls: 0, eraser: false, radius: 6 },
  view: { scale: 1, tx: 0, ty: 0 },
  opacity: 0.6, showPred: true, showUnc: false,
  saving: false, dirty: false, pendingSave: null, spaceDown: false,
};
window.ddpmsegLabel = app; // for tests and scripts driving the page

// -- server -------------------------------------------------------------------------------------
async function api(method, path, body, type) {
  const headers = { "X-Token": TOKEN };
  if (body !== undefined) headers["Content-Type"] = type || "application/json";
  const r = await fetch(path, { method, headers, body, credentials: "same-origin" });
  if (!r.ok) {
    let msg = `${method} ${path}: HTTP ${r.status}`;
    try { const j = await r.json(); if (j.error) msg = j.error; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return r;
}

function showError(e) {
  const box = $("error");
  if (!e) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = String(e.message || e);
}

function setStatus(text, busy) {
  $("status-text").textContent = text;
  $("status").classList.toggle("busy", !!busy);
}

// -- labels -------------------------------------------------------------------------------------
function rleEncode(a) {
  const out = [];
  let v = a[0], n = 0;
  for (let i = 0; i < a.length; i++) {
    if (a[i] === v) { n++; } else { out.push(v, n); v = a[i]; n = 1; }
  }
  if (a.length) out.push(v, n);
  return out;
}

function rleDecodeInto(rle, a) {
  let i = 0;
  for (let k = 0; k < rle.length; k += 2) { a.fill(rle[k], i, i + rle[k + 1]); i += rle[k + 1]; }
}

function dab(c, cx, cy, r, dirty) {
  const cur = app.cur, w = cur.w, h = cur.h;
  const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(w - 1, Math.ceil(cx + r));
  const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(h - 1, Math.ceil(cy + r));
  const r2 = r * r;
  for (let y = y0; y <= y1; y++) {
    const dy = y + 0.5 - cy;
    for (let x = x0; x <= x1; x++) {
      const dx = x + 0.5 - cx;
      if (dx * dx + dy * dy <= r2) cur.labels[y * w + x] = c;
    }
  }
  if (dirty) grow(dirty, x0, y0, x1, y1);
}

function segment(c, xa, ya, xb, yb, r, dirty) {
  const d = Math.hypot(xb - xa, yb - ya), n = Math.max(1, Math.ceil(d / Math.max(0.5, r / 2)));
  for (let i = 1; i <= n; i++) dab(c, xa + (xb - xa) * i / n, ya + (yb - ya) * i / n, r, dirty);
}

function applyOp(op, dirty) {
  if (op.k === "set") { rleDecodeInto(op.rle, app.cur.labels); return; }
  const p = op.p;
  dab(op.c, p[0], p[1], op.r, dirty);
  for (let i = 2; i < p.length; i += 2) segment(op.c, p[i - 2], p[i - 1], p[i], p[i + 1], op.r, dirty);
}

function grow(d, x0, y0, x1, y1) {
  d.x0 = Math.min(d.x0, x0); d.y0 = Math.min(d.y0, y0); d.x1 = Math.max(d.x1, x1); d.y1 = Math.max(d.y1, y1);
}

function rebuild() {
  const cur = app.cur;
  cur.labels.fill(UNLABELLED);
  for (let i = 0; i < cur.cursor; i++) applyOp(cur.ops[i]);
  paintLabels({ x0: 0, y0: 0, x1: cur.w - 1, y1: cur.h - 1 });
}

function paintLabels(d) {
  const cur = app.cur, w = cur.w, px = cur.labelData.data, pal = app.palette;
  for (let y = d.y0; y <= d.y1; y++) {
    for (let x = d.x0; x <= d.x1; x++) {
      const i = y * w + x, c = cur.labels[i], o = 4 * i;
      if (c === UNLABELLED) { px[o + 3] = 0; continue; }
      px[o] = pal[c][0]; px[o + 1] = pal[c][1]; px[o + 2] = pal[c][2]; px[o + 3] = 255;
    }
  }
  cur.labelCtx.putImageData(cur.labelData, 0, 0, d.x0, d.y0, d.x1 - d.x0 + 1, d.y1 - d.y0 + 1);
  draw();
}

function pushOp(op) {
  const cur = app.cur;
  cur.ops = cur.ops.slice(0, cur.cursor);
  cur.ops.push(op);
  cur.cursor = cur.ops.length;
  scheduleSave();
}

function undo() { if (!app.cur || app.cur.cursor === 0) return; app.cur.cursor--; rebuild(); scheduleSave(); }
function redo() { if (!app.cur || app.cur.cursor >= app.cur.ops.length) return; app.cur.cursor++; rebuild(); scheduleSave(); }

// -- saving: right after each edit; edits made while a save runs go in the next one ----------------
function scheduleSave() {
  app.dirty = true;
  updateButtons();
  if (!app.saving) app.pendingSave = runSaves();
}

async function runSaves() {
  app.saving = true;
  try {
    while (app.dirty) {
      app.dirty = false;
      const cur = app.cur;
      $("save-state").textContent = "saving…";
      const body = JSON.stringify({ ops: cur.ops, cursor: cur.cursor, done: cur.done, labels: rleEncode(cur.labels) });
      const r = await api("PUT", `/api/history/${encodeURIComponent(cur.name)}`, body);
      const j = await r.json();
      setState(cur.name, j.state);
      $("save-state").textContent = "saved";
    }
  } catch (e) {
    $("save-state").textContent = "NOT SAVED";
    showError(e);
  } finally {
    app.saving = false;
  }
}

async function flushSaves() { while (app.saving || app.dirty) { await (app.pendingSave || runSaves()); } }

// -- view ---------------------------------------------------------------------------------------
const canvas = $("canvas"), ctx = canvas.getContext("2d");

function resize() {
  canvas.width = canvas.clientWidth; canvas.height = canvas.clientHeight; draw();
}

function fitView() {
  const cur = app.cur; if (!cur) return;
  const s = Math.min(canvas.width / cur.w, canvas.height / cur.h) * 0.95;
  app.view = { scale: s, tx: (canvas.width - cur.w * s) / 2, ty: (canvas.height - cur.h * s) / 2 };
  draw();
}

function draw() {
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const cur = app.cur; if (!cur || !cur.img) return;
  const v = app.view;
  ctx.setTransform(v.scale, 0, 0, v.scale, v.tx, v.ty);
  ctx.imageSmoothingEnabled = false;
  ctx.globalAlpha = 1;
  ctx.drawImage(cur.img, 0, 0);
  ctx.globalAlpha = app.opacity;
  if (app.showUnc && cur.unc) ctx.drawImage(cur.unc, 0, 0);
  else if (app.showPred && cur.pred) ctx.drawImage(cur.pred, 0, 0);
  ctx.globalAlpha = Math.min(1, app.opacity + 0.3);
  ctx.drawImage(cur.labelCanvas, 0, 0);
  ctx.globalAlpha = 1;
  if (app.hover) {
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 1 / v.scale;
    ctx.beginPath(); ctx.arc(app.hover[0], app.hover[1], app.tool.radius, 0, 2 * Math.PI); ctx.stroke();
  }
}

function toImage(ev) {
  const b = canvas.getBoundingClientRect(), v = app.view;
  return [(ev.clientX - b.left - v.tx) / v.scale, (ev.clientY - b.top - v.ty) / v.scale];
}

let stroke = null, pan = null;
canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
canvas.addEventListener("pointerdown", (ev) => {
  if (!app.cur) return;
  canvas.setPointerCapture(ev.pointerId);
  if (ev.button !== 0 || app.spaceDown) { pan = [ev.clientX, ev.clientY, app.view.tx, app.view.ty]; return; }
  const [x, y] = toImage(ev), c = app.tool.eraser ? UNLABELLED : app.tool.cls;
  const r = app.tool.radius, p = [+x.toFixed(2), +y.toFixed(2)];
  stroke = { k: "s", c, r, p };
  const d = { x0: 1e9, y0: 1e9, x1: -1, y1: -1 };
  dab(c, p[0], p[1], r, d);
  if (d.x1 >= 0) paintLabels(d);
});
canvas.addEventListener("pointermove", (ev) => {
  if (pan) {
    app.view.tx = pan[2] + ev.clientX - pan[0]; app.view.ty = pan[3] + ev.clientY - pan[1]; draw(); return;
  }
  const [x, y] = toImage(ev);
  app.hover = [x, y];
  if (!stroke) { draw(); return; }
  const p = stroke.p, xa = p[p.length - 2], ya = p[p.length - 1], xb = +x.toFixed(2), yb = +y.toFixed(2);
  if (Math.hypot(xb - xa, yb - ya) < 0.5) return;
  p.push(xb, yb);
  const d = { x0: 1e9, y0: 1e9, x1: -1, y1: -1 };
  segment(stroke.c, xa, ya, xb, yb, stroke.r, d);
  if (d.x1 >= 0) paintLabels(d); else draw();
});
function endStroke() {
  pan = null;
  if (!stroke) return;
  const s = stroke; stroke = null;
  pushOp(s);
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);
canvas.addEventListener("pointerleave", () => { app.hover = null; draw(); });
canvas.addEventListener("wheel", (ev) => {
  ev.preventDefault();
  const b = canvas.getBoundingClientRect(), mx = ev.clientX - b.left, my = ev.clientY - b.top, v = app.view;
  const f = Math.exp(-ev.deltaY * 0.0015), s = Math.min(64, Math.max(0.05, v.scale * f));
  v.tx = mx - (mx - v.tx) * s / v.scale; v.ty = my - (my - v.ty) * s / v.scale; v.scale = s;
  draw();
}, { passive: false });

// -- images -------------------------------------------------------------------------------------
function stateClass(s) { return "state state-" + s.split(" ")[0]; }

function renderList() {
  const ul = $("images"); ul.innerHTML = "";
  for (const im of app.images) {
    const li = document.createElement("li");
    li.dataset.name = im.name;
    if (app.cur && app.cur.name === im.name) li.classList.add("current");
    const name = document.createElement("span"); name.className = "name"; name.textContent = im.name;
    name.title = `${im.name} (${im.width}x${im.height})`;
    const right = document.createElement("span");
    if (im.suggest_rank) {
      const r = document.createElement("span"); r.className = "rank"; r.textContent = `#${im.suggest_rank} `;
      r.title = "suggested: label this next (most uncertain)"; right.appendChild(r);
    }
    const st = document.createElement("span"); st.className = stateClass(im.state); st.textContent = im.state;
    right.appendChild(st);
    li.append(name, right);
    li.addEventListener("click", () => openImage(im.name).catch(showError));
    ul.appendChild(li);
  }
}

function setState(name, state) {
  const im = app.images.find((i) => i.name === name); if (im) im.state = state;
  renderList();
}

async function refreshList() {
  app.images = await (await api("GET", "/api/images")).json();
  renderList();
}

function loadImg(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`cannot load ${src}`));
    img.src = src;
  });
}

async function openImage(name) {
  await flushSaves();
  showError(null);
  setStatus(`opening ${name}…`, true);
  const q = encodeURIComponent(name);
  const [hist, img] = await Promise.all([
    api("GET", `/api/history/${q}`).then((r) => r.json()),
    loadImg(`/api/images/${q}`),
  ]);
  const w = img.naturalWidth, h = img.naturalHeight;
  const labelCanvas = document.createElement("canvas"); labelCanvas.width = w; labelCanvas.height = h;
  const labelCtx = labelCanvas.getContext("2d");
  app.cur = { name, w, h, img, labels: new Uint8Array(w * h).fill(UNLABELLED), ops: hist.ops, cursor: hist.cursor,
              done: hist.done, labelCanvas, labelCtx, labelData: labelCtx.createImageData(w, h), pred: null, unc: null };
  $("done").checked = !!hist.done;
  location.hash = encodeURIComponent(name);
  rebuild();
  fitView();
  renderList();
  await loadPrediction(name);
  setStatus(`${name}: ${w}x${h}, ${hist.cursor} edit${hist.cursor === 1 ? "" : "s"}`);
  updateButtons();
}

async function loadPrediction(name) {
  const q = encodeURIComponent(name), t = Date.now();
  const cur = app.cur;
  try { cur.pred = await loadImg(`/api/prediction/${q}?t=${t}`); } catch (e) { cur.pred = null; }
  try { cur.unc = await loadImg(`/api/prediction/${q}/uncertainty?t=${t}`); } catch (e) { cur.unc = null; }
  updateButtons();
  draw();
}

// -- predict / accept ---------------------------------------------------------------------------
async function predict() {
  if (!app.cur || app.predicting) return;
  const cur = app.cur;
  app.predicting = true; updateButtons(); showError(null);
  const t0 = performance.now();
  const poll = setInterval(async () => {
    try {
      const s = await (await api("GET", "/api/status")).json();
      if (s.busy) setStatus(`${s.phase || "working"}… ${s.elapsed.toFixed(1)} s`, true);
    } catch (e) { /* the next poll tries again */ }
  }, 300);
  try {
    await flushSaves();
    setStatus("predicting…", true);
    const r = await api("POST", `/api/predict/${encodeURIComponent(cur.name)}`);
    const url = URL.createObjectURL(await r.blob());
    cur.pred = await loadImg(url);
    app.showPred = true; $("show-pred").checked = true;
    draw();
    const ms = performance.now() - t0;
    document.body.dataset.predictMs = ms.toFixed(0);
    document.body.dataset.predicted = cur.name;
    const fitted = r.headers.get("X-Fitted") === "true";
    setStatus(`${cur.name}: predicted in ${(ms / 1000).toFixed(2)} s` + (fitted ? " (fitted on the strokes so far)" : ""));
    try { cur.unc = await loadImg(`/api/prediction/${encodeURIComponent(cur.name)}/uncertainty?t=${Date.now()}`); } catch (e) { cur.unc = null; }
    draw();
    await refreshList();
  } catch (e) {
    setStatus("predict failed");
    showError(e);
  } finally {
    clearInterval(poll);
    app.predicting = false; updateButtons();
  }
}

async function accept() {
  const cur = app.cur; if (!cur || !cur.pred) return;
  try {
    const j = await (await api("GET", `/api/prediction/${encodeURIComponent(cur.name)}?format=rle`)).json();
    if (j.width !== cur.w || j.height !== cur.h) throw new Error("the prediction's size differs from the image's");
    const op = { k: "set", rle: j.rle };
    applyOp(op);
    paintLabels({ x0: 0, y0: 0, x1: cur.w - 1, y1: cur.h - 1 });
    pushOp(op);
    setStatus(`${cur.name}: prediction accepted as labels; correct it with the brush`);
  } catch (e) { showError(e); }
}

// -- controls -----------------------------------------------------------------------------------
function buildClasses() {
  const box = $("classes"); box.innerHTML = "";
  app.classes.names.forEach((n, i) => {
    const b = document.createElement("button");
    b.dataset.cls = i;
    const sw = document.createElement("span"); sw.className = "swatch";
    sw.style.background = `rgb(${app.classes.colors[i].join(",")})`;
    b.append(sw, ` ${n} `);
    if (i < 10) { const k = document.createElement("span"); k.className = "key"; k.textContent = String((i + 1) % 10); b.appendChild(k); }
    b.addEventListener("click", () => pickClass(i));
    box.appendChild(b);
  });
}

function pickClass(i) { app.tool.cls = i; app.tool.eraser = false; updateButtons(); }
function setRadius(r) { app.tool.radius = Math.max(1, Math.min(64, Math.round(r))); $("radius").value = app.tool.radius; $("radius-value").textContent = app.tool.radius; draw(); }

function updateButtons() {
  for (const b of $("classes").children) b.classList.toggle("active", !app.tool.eraser && +b.dataset.cls === app.tool.cls);
  $("eraser").classList.toggle("active", app.tool.eraser);
  const cur = app.cur;
  $("undo").disabled = !cur || cur.cursor === 0;
  $("redo").disabled = !cur || cur.cursor >= cur.ops.length;
  $("predict").disabled = !cur || !!app.predicting;
  $("accept").disabled = !cur || !cur.pred || !!app.predicting;
}

$("eraser").addEventListener("click", () => { app.tool.eraser = !app.tool.eraser; updateButtons(); });
$("radius").addEventListener("input", (ev) => setRadius(+ev.target.value));
$("opacity").addEventListener("input", (ev) => { app.opacity = ev.target.value / 100; draw(); });
$("undo").addEventListener("click", undo);
$("redo").addEventListener("click", redo);
$("predict").addEventListener("click", predict);
$("accept").addEventListener("click", accept);
$("show-pred").addEventListener("change", (ev) => { app.showPred = ev.target.checked; draw(); });
$("show-unc").addEventListener("change", (ev) => { app.showUnc = ev.target.checked; draw(); });
$("done").addEventListener("change", (ev) => { if (app.cur) { app.cur.done = ev.target.checked; scheduleSave(); } });

document.addEventListener("keydown", (ev) => {
  if (ev.target.tagName === "INPUT" && ev.target.type !== "checkbox" && ev.target.type !== "range") return;
  const k = ev.key;
  if ((ev.ctrlKey || ev.metaKey) && (k === "z" || k === "Z")) { ev.preventDefault(); if (ev.shiftKey) redo(); else undo(); return; }
  if ((ev.ctrlKey || ev.metaKey) && (k === "y" || k === "Y")) { ev.preventDefault(); redo(); return; }
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (/^[0-9]$/.test(k)) { const i = (+k + 9) % 10; if (app.classes && i < app.classes.names.length) pickClass(i); }
  else if (k === "[") setRadius(app.tool.radius / 1.25);
  else if (k === "]") setRadius(app.tool.radius * 1.25 + 0.5);
  else if (k === "e" || k === "E") { app.tool.eraser = !app.tool.eraser; updateButtons(); }
  else if (k === "p" || k === "P") predict();
  else if (k === "a" || k === "A") accept();
  else if (k === "u" || k === "U") { app.showUnc = !app.showUnc; $("show-unc").checked = app.showUnc; draw(); }
  else if (k === "f" || k === "F") fitView();
  else if (k === " ") { app.spaceDown = true; ev.preventDefault(); }
});
document.addEventListener("keyup", (ev) => { if (ev.key === " ") app.spaceDown = false; });
window.addEventListener("resize", resize);
window.addEventListener("beforeunload", (ev) => { if (app.saving || app.dirty) { ev.preventDefault(); ev.returnValue = ""; } });

async function start() {
  try {
    if (location.search.includes("token=")) history.replaceState(null, "", location.pathname + location.hash);
    app.classes = await (await api("GET", "/api/classes")).json();
    app.palette = app.classes.colors;
    buildClasses();
    setRadius(app.tool.radius);
    resize();
    await refreshList();
    const wanted = decodeURIComponent(location.hash.slice(1));
    const first = app.images.find((i) => i.name === wanted) || app.images[0];
    if (first) await openImage(first.name);
    app.ready = true;
    document.body.dataset.ready = "1";
  } catch (e) { showError(e); setStatus("error"); }
}
start();
