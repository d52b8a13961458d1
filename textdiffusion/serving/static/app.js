// The live view: POST /v1/generate with stream=true, read server-sent events from the response body,
// show each step (masks as grey blocks, tokens coloured by the model's confidence), keep every frame
// for the replay slider. Frames are shown at least `frame ms` apart so a person can follow them.
"use strict";
const $ = (id) => document.getElementById(id);
let frames = [], shown = -1, pending = [], timer = null, controller = null, final = null;

// With API keys (serve --api-key-file), every call carries "Authorization: Bearer <key>": the page asks for the
// key once, on the first 401, and keeps it for this tab only (sessionStorage), never in the address bar.
function withKey(options = {}) {
  const key = sessionStorage.getItem("textdiffusion-api-key");
  const headers = { ...(options.headers || {}) };
  if (key) headers.authorization = `Bearer ${key}`;
  return { ...options, headers };
}

async function api(url, options = {}) {
  let response = await fetch(url, withKey(options));
  if (response.status === 401) {
    const key = window.prompt("This server needs an API key:");
    if (key) {
      sessionStorage.setItem("textdiffusion-api-key", key.trim());
      response = await fetch(url, withKey(options));
    }
  }
  return response;
}

api("/v1/models").then((r) => r.json()).then((m) => {
  const info = m.data[0];
  $("model").textContent = `${info.id} · ${info.positions} positions · batch ≤ ${info.max_batch}`;
  $("max_length").value = Math.min(64, info.max_length);
  const labels = info.labels || [], methods = info.guidance || [];
  if (labels.length && methods.length) {  // a label picker only where the checkpoint (or the guide) has labels
    for (const label of labels) $("label").append(new Option(label, label));
    for (const method of methods) $("guidance").append(new Option(method, method));
    $("guidance_controls").hidden = false;
  }
}).catch(() => {});

function request() {
  const text = $("prompt").value;
  const body = { stream: true, seed: +$("seed").value, steps: +$("steps").value, strategy: $("strategy").value,
                 sampling: $("sampling").value, temperature: +$("temperature").value, top_k: +$("top_k").value,
                 top_p: +$("top_p").value, max_length: +$("max_length").value };
  if (+$("block_length").value > 0) body.block_length = +$("block_length").value;
  if (/<mask(:\d+)?>/.test(text)) body.template = text; else body.prompt = text;
  if ($("label").value) {
    body.label = $("label").value;
    body.guidance = $("guidance").value;
    const strength = +$("guidance_scale").value;
    if (body.guidance === "cfg") body.cfg_scale = strength; else body.guidance_scale = strength;
    if (body.guidance === "smc") body.particles = +$("particles").value;
  }
  return body;
}

function colour(p) { return `hsl(${Math.round(120 * p)}, ${75 - 20 * p}%, ${85 - 5 * p}%)`; }

function render(i) {
  const f = frames[i], prev = frames[i - 1];
  const out = $("text");
  out.replaceChildren();
  f.rows.forEach((row, r) => {
    const div = document.createElement("div");
    div.className = "sample";
    row.tokens.forEach((tok, k) => {
      const span = document.createElement("span");
      if (row.masked[k]) { span.className = "tok mask"; span.title = "masked"; }
      else {
        span.textContent = tok;
        if (!row.editable[k]) span.className = "tok fixed";
        else {
          const p = row.confidence[k];
          span.className = "tok gen" + (prev && prev.rows[r].masked[k] ? " new" : "");
          if (p !== null) { span.style.background = colour(p); span.title = `p = ${p.toFixed(3)}`; }
        }
      }
      div.appendChild(span);
    });
    out.appendChild(div);
  });
  const generated = f.rows.reduce((n, row) => n + row.editable.filter((e, k) => e && !row.masked[k]).length, 0);
  $("step").textContent = `${f.step} / ${f.num_steps}`;
  $("calls").textContent = f.model_calls;
  $("masked").textContent = f.masked;
  $("elapsed").textContent = `${f.elapsed.toFixed(2)} s`;
  $("tps").textContent = f.elapsed > 0 ? Math.round(generated / f.elapsed) : "–";
  $("frame-label").textContent = `frame ${i} of ${frames.length - 1}`;
  $("slider").value = i;
  shown = i;
}

function pump() {  // show queued frames one at a time, `frame ms` apart
  if (!pending.length) { timer = null; if (final) finish(); return; }
  const i = pending.shift();
  render(i);
  timer = setTimeout(pump, Math.max(0, +$("frame_ms").value));
}

function push(frame) {
  frames.push(frame);
  $("slider").max = frames.length - 1;
  pending.push(frames.length - 1);
  if (!timer) pump();
}

function finish() {
  $("state").textContent = `done: ${final.model_calls} model calls, ${final.generate_seconds.toFixed(2)} s`;
  $("state").dataset.state = "done";
  $("slider").disabled = false;
  $("generate").disabled = false;
}

function fail(message) {
  $("error").hidden = false;
  $("error").textContent = message;
  $("state").textContent = "error";
  $("state").dataset.state = "error";
  $("generate").disabled = false;
}

async function generate(ev) {
  ev.preventDefault();
  if (controller) controller.abort();
  controller = new AbortController();
  frames = []; pending = []; final = null; shown = -1;
  clearTimeout(timer); timer = null;
  $("error").hidden = true;
  $("slider").disabled = true;
  $("generate").disabled = true;
  $("state").textContent = "generating"; $("state").dataset.state = "running";
  let response;
  try {
    response = await api("/v1/generate", { method: "POST", headers: { "content-type": "application/json" },
                                             body: JSON.stringify(request()), signal: controller.signal });
  } catch (e) { return fail(String(e)); }
  if (!response.ok) {
    const err = await response.json().catch(() => ({ error: { message: response.statusText } }));
    return fail(`${response.status}: ${err.error.message}`);
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {  // one server-sent event per blank-line-terminated block
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue;
      const event = JSON.parse(data);
      if (event.event === "error") return fail(event.message);
      push(event);
      if (event.event === "done") { final = event; if (!timer) finish(); }
    }
  }
}

$("form").addEventListener("submit", generate);
$("slider").addEventListener("input", (e) => { if (frames.length) render(+e.target.value); });
