"use strict";
// The page: pick or drop an image, preview it, POST it to /v1/classify, show the server's default top-k
// (5, or every class of a smaller model) with score bars; on request ("Explain") POST it to /v1/explain and show
// the heatmap overlay it returns. Labels come from the checkpoint: text only, never HTML.
const $ = (id) => document.getElementById(id);
let currentFile = null; // the image last classified, which "Explain" explains
const keyInput = $("api-key");
keyInput.value = sessionStorage.getItem("ecanfnet-api-key") || "";
keyInput.addEventListener("change", () => sessionStorage.setItem("ecanfnet-api-key", keyInput.value));

function headers() {
  return keyInput.value ? { "X-API-Key": keyInput.value } : {};
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

async function loadModelInfo() {
  const response = await fetch("/v1/model", { headers: headers() });
  if (response.status === 401) {
    $("key-box").open = true;
    $("model").textContent = "This server needs an API key (below).";
    return;
  }
  const info = await response.json();
  $("model").textContent = `${info.architecture} · ${info.labels_count} classes · ${info.input_size[1]} px · ` +
    `${info.backend} ${info.precision}`;
}

function showResults(predictions) {
  const list = $("results");
  list.replaceChildren();
  for (const p of predictions) {
    const item = document.createElement("li");
    item.dataset.index = p.index;
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(100 * p.score).toFixed(2)}%`;
    row.append(label, score);
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${Math.max(0.5, 100 * p.score)}%`;
    bar.append(fill);
    item.append(row, bar);
    list.append(item);
  }
}

async function classify(file) {
  if (!file) return;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("results").replaceChildren();
  $("latency").textContent = "";
  currentFile = file;
  $("overlay").hidden = true;
  $("overlay-caption").textContent = "";
  delete document.body.dataset.explained;
  setStatus(`classifying ${file.name}…`, false);
  const form = new FormData();
  form.append("file", file, file.name);
  const started = performance.now();
  try {
    const response = await fetch("/v1/classify", { method: "POST", body: form, headers: headers() });
    const body = await response.json();
    if (!response.ok) {
      if (response.status === 401) $("key-box").open = true;
      setStatus(`error ${response.status}: ${body.detail}`, true);
      return;
    }
    showResults(body.predictions);
    const roundTrip = performance.now() - started;
    const openSet = typeof body.open_set_score === "number" ?
      ` · open-set score ${body.open_set_score.toFixed(3)}` : "";
    $("latency").textContent =
      `server ${body.elapsed_ms.toFixed(1)} ms · round trip ${roundTrip.toFixed(1)} ms${openSet}`;
    $("explain-box").hidden = false;
    setStatus(`${file.name}: done`, false);
    document.body.dataset.state = "done";
  } catch (err) {
    setStatus(`request failed: ${err}`, true);
  }
}

async function explain() {
  if (!currentFile) return;
  const file = currentFile;
  const method = $("method").value;
  const form = new FormData();
  form.append("file", file, file.name);
  $("explain").disabled = true;
  setStatus(`explaining ${file.name}…`, false);
  try {
    const response = await fetch(`/v1/explain?method=${encodeURIComponent(method)}`,
                                 { method: "POST", body: form, headers: headers() });
    const body = await response.json();
    if (file !== currentFile) return; // another image was chosen meanwhile
    if (!response.ok) {
      if (response.status === 401) $("key-box").open = true;
      setStatus(`error ${response.status}: ${body.detail}`, true);
      return;
    }
    const overlay = $("overlay");
    overlay.src = `data:image/png;base64,${body.overlay_png}`;
    overlay.hidden = false;
    const name = method === "gradcam" ? "Grad-CAM" : "EigenCAM";
    $("overlay-caption").textContent = `${name} · ${body.label} ${(100 * body.probability).toFixed(2)}% · ` +
      `${body.width}×${body.height} crop the model saw · ${body.elapsed_ms.toFixed(0)} ms`;
    setStatus(`${file.name}: explained`, false);
    document.body.dataset.explained = method;
  } catch (err) {
    setStatus(`request failed: ${err}`, true);
  } finally {
    $("explain").disabled = false;
  }
}

$("explain").addEventListener("click", explain);
$("file").addEventListener("change", (e) => classify(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  classify(e.dataTransfer.files[0]);
});
loadModelInfo().catch((err) => setStatus(`cannot reach the server: ${err}`, true));
