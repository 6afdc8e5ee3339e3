"""The upload page served at GET /: one self-contained HTML file (no CDN, no build step)."""

INDEX_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chestct predictor</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
         color: #1b1b1b; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  .note { color: #8a1c1c; font-size: .9rem; }
  form { margin: 1rem 0; display: flex; gap: .6rem; align-items: center; flex-wrap: wrap; }
  button { padding: .4rem 1rem; }
  #result { display: none; gap: 2rem; flex-wrap: wrap; }
  #result.shown { display: flex; }
  .bars { min-width: 22rem; flex: 1; }
  .bar { display: grid; grid-template-columns: 12rem 1fr 4rem; gap: .5rem; align-items: center;
         margin: .3rem 0; }
  .track { background: #e6e6e6; height: .9rem; border-radius: .2rem; overflow: hidden; }
  .fill { background: #2f6db5; height: 100%; }
  .fill.top { background: #b5482f; }
  #label { font-size: 1.3rem; font-weight: 600; }
  #flags span { display: inline-block; margin: .3rem .4rem 0 0; padding: .1rem .5rem;
                border-radius: .8rem; background: #eee; font-size: .85rem; }
  #flags span.warn { background: #f6d7a7; }
  figure { margin: 0; }
  #heatmap { max-width: 100%; width: 24rem; image-rendering: auto; border: 1px solid #ccc; }
  #error { color: #8a1c1c; white-space: pre-wrap; }
  #model { color: #555; font-size: .85rem; }
</style>
</head>
<body>
<h1>chestct: chest CT slice classifier</h1>
<p class="note">Research and teaching software, not a medical device. Do not use it for
diagnosis.</p>
<form id="upload">
  <input id="file" name="file" type="file" accept="image/png,image/jpeg,.dcm,application/dicom"
         required>
  <button id="submit" type="submit">Classify</button>
</form>
<p id="error" role="alert"></p>
<section id="result" aria-live="polite">
  <div class="bars">
    <div id="label"></div>
    <div id="flags"></div>
    <div id="bars"></div>
    <p id="model"></p>
  </div>
  <figure>
    <img id="heatmap" alt="Grad-CAM heatmap over the uploaded slice">
    <figcaption>Grad-CAM of the predicted class over the slice</figcaption>
  </figure>
</section>
<script>
"use strict";
const $ = (id) => document.getElementById(id);

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

function showBars(result) {
  const bars = $("bars");
  bars.textContent = "";
  const names = result.display_names || {};
  for (const [cls, p] of Object.entries(result.probabilities)) {
    const row = document.createElement("div");
    row.className = "bar";
    row.dataset.class = cls;
    const name = document.createElement("span");
    name.textContent = names[cls] || cls;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill" + (cls === result.label ? " top" : "");
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.appendChild(fill);
    const value = document.createElement("span");
    value.textContent = (100 * p).toFixed(1) + " %";
    row.append(name, track, value);
    bars.appendChild(row);
  }
}

function showFlags(result) {
  const flags = $("flags");
  flags.textContent = "";
  const add = (text, warn) => {
    const s = document.createElement("span");
    s.textContent = text;
    if (warn) s.className = "warn";
    flags.appendChild(s);
  };
  const u = result.uncertainty;
  add("entropy " + u.entropy.toFixed(2), false);
  if (u.abstain) add("uncertain: abstain", true);
  if (result.ood.out_of_distribution) add("unlike the training data", true);
}

$("upload").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) return;
  $("error").textContent = "";
  $("submit").disabled = true;
  try {
    const result = await post("/predict", file);
    $("label").textContent = result.display_name;
    $("label").dataset.label = result.label;
    showBars(result);
    showFlags(result);
    $("model").textContent = "model " + result.model.name + " v" + result.model.version +
      " · " + result.time_ms + " ms";
    const explained = await post("/explain?format=json", file);
    $("heatmap").src = "data:image/png;base64," + explained.heatmap_png;
    $("result").classList.add("shown");
  } catch (err) {
    $("result").classList.remove("shown");
    $("error").textContent = err.message;
  } finally {
    $("submit").disabled = false;
  }
});
</script>
</body>
</html>
"""
