"""The upload page served at GET /: one self-contained HTML file (no CDN, no build step).

Several slices at once (file picker or drag and drop), one row of results per slice: the
label, the probabilities as bars, the abstain and out-of-distribution warnings in words and
the Grad-CAM heatmap; an answer the model abstains on is headed "Uncertain", never by its
label. The model's version and its test figures come from GET /metadata: with their bootstrap
interval, the nearest-neighbour memorizer's figure the model is above (or below), overall and on
the test slices unlike any training slice, and, when the card has them, its figures under the
synthetic shifts of the test split. FAVICON_SVG is served at /favicon.svg and /favicon.ico.
"""

# A slice outline with two lungs, in the page's blue: small enough to inline.
FAVICON_SVG = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">
<ellipse cx="16" cy="16" rx="15" ry="12" fill="#2f6db5"/>
<ellipse cx="10.5" cy="15" rx="5" ry="7" fill="#eef4fb"/>
<ellipse cx="21.5" cy="15" rx="5" ry="7" fill="#eef4fb"/>
</svg>
"""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chestct predictor</title>
<link rel="icon" type="image/svg+xml" href="/favicon.svg">
<style>
  body { font-family: system-ui, sans-serif; max-width: 64rem; margin: 2rem auto; padding: 0 1rem;
         color: #1b1b1b; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  .note { color: #8a1c1c; font-size: .9rem; }
  #model { color: #444; font-size: .9rem; }
  #drop { margin: 1rem 0; padding: 1.2rem; border: 2px dashed #9aa7b8; border-radius: .5rem;
          display: flex; gap: .6rem; align-items: center; flex-wrap: wrap; }
  #drop.over { background: #eef4fb; border-color: #2f6db5; }
  button { padding: .4rem 1rem; }
  #error { color: #8a1c1c; white-space: pre-wrap; }
  .row { display: flex; gap: 1.5rem; flex-wrap: wrap; border-top: 1px solid #ddd;
         padding: .8rem 0; }
  .main { min-width: 22rem; flex: 1; }
  .file { color: #555; font-size: .85rem; }
  .label { font-size: 1.2rem; font-weight: 600; }
  .label.abstain { color: #8a1c1c; }
  .likely { color: #555; font-size: .9rem; }
  .bar { display: grid; grid-template-columns: 12rem 1fr 4rem; gap: .5rem; align-items: center;
         margin: .25rem 0; }
  .track { background: #e6e6e6; height: .9rem; border-radius: .2rem; overflow: hidden; }
  .fill { background: #2f6db5; height: 100%; }
  .fill.top { background: #b5482f; }
  .warn { background: #f6d7a7; border-radius: .3rem; padding: .3rem .6rem; margin: .3rem 0;
          font-size: .9rem; }
  .row .error { color: #8a1c1c; white-space: pre-wrap; }
  .heatmap { width: 14rem; border: 1px solid #ccc; }
  .meta { color: #666; font-size: .8rem; }
</style>
</head>
<body>
<h1>chestct: chest CT slice classifier</h1>
<p class="note">Research and teaching software, not a medical device. Do not use it for
diagnosis.</p>
<p id="model">Loading the model's description…</p>
<form id="upload">
  <div id="drop">
    <span>Drop chest CT slices here (PNG, JPEG, DICOM), or</span>
    <input id="file" name="file" type="file" multiple
           accept="image/png,image/jpeg,.dcm,application/dicom">
    <button id="submit" type="submit">Classify</button>
  </div>
</form>
<p id="error" role="alert"></p>
<section id="results" aria-live="polite"></section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
const fixed = (v, n) => (typeof v === "number" ? v.toFixed(n) : "–");

function problemText(body, status) {
  if (body && body.title) return body.title + (body.detail ? ": " + body.detail : "");
  return "request failed with HTTP " + status;
}

async function post(url, file) {
  const form = new FormData();
  form.append("file", file);
  const resp = await fetch(url, { method: "POST", body: form });
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) throw new Error(problemText(body, resp.status));
  return body;
}

function interval(m, key) {
  const ci = (m.ci || {})[key];
  if (!ci || typeof ci.low !== "number") return "";
  return " [" + Math.round(100 * (m.ci.confidence || 0.95)) + " % interval " + fixed(ci.low, 3) +
    "–" + fixed(ci.high, 3) + "]";
}

async function describeModel() {
  try {
    const resp = await fetch("/metadata");
    const meta = await resp.json();
    if (!resp.ok) throw new Error(problemText(meta, resp.status));
    const m = meta.metrics || {};
    let text = "Model " + meta.name + " version " + meta.version + " (" + meta.backend + ")";
    if (typeof m.accuracy === "number") {
      text += " · on its clean test split: accuracy " + fixed(m.accuracy, 3) +
        ", balanced accuracy " + fixed(m.balanced_accuracy, 3) +
        ", macro-F1 " + fixed(m.macro_f1, 3) + interval(m, "macro_f1") +
        (m.n ? " (" + m.n + " slices)" : "");
      const memo = (m.baseline || {}).nearest_neighbour;
      if (memo && typeof memo.macro_f1 === "number") {
        const above = m.macro_f1 - memo.macro_f1;
        text += " · a memorizer (the label of the most similar training slice) scores macro-F1 " +
          fixed(memo.macro_f1, 3) + ": the model is " + fixed(Math.abs(above), 3) +
          (above >= 0 ? " above" : " below") + " it";
        const novel = m.novel || {};
        if (novel.n && typeof novel.macro_f1 === "number") {
          text += "; on the " + novel.n + " test slices unlike any training slice: model " +
            fixed(novel.macro_f1, 3) + ", memorizer " +
            fixed(novel.baseline.nearest_neighbour.macro_f1, 3);
        }
      }
      const s = m.shift || {};
      if (typeof s.worst_macro_f1 === "number") {
        text += " · under synthetic shifts of that split (zoom, aspect, gamma, blur, JPEG, " +
          "noise): worst macro-F1 " +
          fixed(s.worst_macro_f1, 3) + (s.worst_shift ? " (" + s.worst_shift + ")" : "");
        if (typeof m.robust_macro_f1 === "number") {
          text += ", robust macro-F1 " + fixed(m.robust_macro_f1, 3);
        }
      } else {
        text += " · clean test figures only: this card has no figures under shifted slices";
      }
    }
    $("model").textContent = text;
    $("model").dataset.version = meta.version;
  } catch (err) {
    $("model").textContent = "No model description: " + err.message;
  }
}

function warnings(result) {
  const out = [];
  const u = result.uncertainty;
  if (u.abstain) {
    out.push(["abstain", "Uncertain: the answer's entropy (" + fixed(u.entropy, 2) +
      ") is above the model's abstain threshold (" + fixed(u.abstain_threshold, 2) +
      "), so the model abstains. Do not rely on this label."]);
  }
  const o = result.ood;
  if (o.out_of_distribution) {
    out.push(["ood", "Unlike the training data: this slice lies far from the images the " +
      "model learnt from (distance " + fixed(o.score, 1) + ", threshold " +
      fixed(o.threshold, 1) + "). The answer may be meaningless."]);
  }
  return out;
}

function bars(result) {
  const box = el("div", "bars");
  const names = result.display_names || {};
  for (const [cls, p] of Object.entries(result.probabilities)) {
    const row = el("div", "bar");
    row.dataset.class = cls;
    const track = el("div", "track");
    const fill = el("div", "fill" + (cls === result.label ? " top" : ""));
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.appendChild(fill);
    row.append(el("span", "", names[cls] || cls), track, el("span", "", fixed(100 * p, 1) + " %"));
    box.appendChild(row);
  }
  return box;
}

async function classify(file) {
  const row = el("article", "row");
  row.dataset.file = file.name;
  const main = el("div", "main");
  main.appendChild(el("div", "file", file.name));
  row.appendChild(main);
  $("results").appendChild(row);
  try {
    const result = await post("/predict", file);
    row.dataset.label = result.label;
    row.dataset.id = result.id;
    if (result.uncertainty.abstain) {
      // An abstention is not an answer: its label must not read as one.
      main.appendChild(el("div", "label abstain", "Uncertain: no answer"));
      main.appendChild(el("div", "likely", "most probable class, not to be relied on: " +
        result.display_name));
    } else {
      main.appendChild(el("div", "label", result.display_name));
    }
    for (const [kind, text] of warnings(result)) {
      const w = el("p", "warn " + kind, text);
      w.setAttribute("role", "note");
      main.appendChild(w);
    }
    main.appendChild(bars(result));
    main.appendChild(el("p", "meta", "model " + result.model.name + " v" + result.model.version +
      " · " + result.time_ms + " ms · id " + result.id));
    const explained = await post("/explain?format=json", file);
    const img = el("img", "heatmap");
    img.alt = "Grad-CAM heatmap of the predicted class over " + file.name;
    img.src = "data:image/png;base64," + explained.heatmap_png;
    const fig = el("figure");
    fig.append(img, el("figcaption", "meta", "Grad-CAM of the predicted class"));
    row.appendChild(fig);
    row.dataset.done = "ok";
  } catch (err) {
    main.appendChild(el("p", "error", err.message));
    row.dataset.done = "error";
  }
}

async function classifyAll(files) {
  $("error").textContent = "";
  if (!files.length) {
    $("error").textContent = "Choose or drop one or more slices first.";
    return;
  }
  $("submit").disabled = true;
  $("results").textContent = "";
  try {
    for (const file of files) await classify(file);  // one at a time: the server stays light
  } finally {
    $("submit").disabled = false;
  }
}

$("upload").addEventListener("submit", (event) => {
  event.preventDefault();
  classifyAll(Array.from($("file").files));
});
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  classifyAll(Array.from(event.dataTransfer.files));
});
describeModel();
</script>
</body>
</html>
"""
