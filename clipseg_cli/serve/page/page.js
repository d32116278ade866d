// The page of `clipseg serve`: pick or drop an image, type prompts, see each prompt's mask
// tinted over the image (toggle them), download masks and cutouts. It talks to this server's
// own API (/v1/segment) and nothing else; the token, when the server asks for one, is kept in
// this tab's sessionStorage. Every text from the user or the server goes in as text, never
// as markup.
"use strict";

const COLOURS = ["#ff0050", "#00a0ff", "#ffb000", "#20c060", "#a050ff", "#ff6a00", "#00c0c0"];
const TINT = 0.5; // how far a masked pixel moves towards its prompt's colour
const TOKEN_KEY = "clipseg-token";

const $ = (id) => document.getElementById(id);
const state = { file: null, image: null, prompts: [], urls: [] };

function setState(name, message, bad) {
  document.body.dataset.state = name;
  const status = $("status");
  status.textContent = message || "";
  status.classList.toggle("bad", Boolean(bad));
}

function lines(text) {
  return text.split("\n").map((line) => line.trim()).filter((line) => line.length > 0);
}

function ready() {
  $("go").disabled = !(state.file && lines($("prompts").value).length);
}

async function pick(file) {
  if (!file) return;
  state.file = file;
  $("drop-text").textContent = file.name || "image";
  setState("ready", "");
  ready();
}

function rgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

function decodePng(base64) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the server sent an image this browser cannot read"));
    image.src = "data:image/png;base64," + base64;
  });
}

function pixelsOf(image, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0, width, height);
  return context.getImageData(0, 0, width, height).data;
}

function compose() {
  const canvas = $("overlay");
  const context = canvas.getContext("2d");
  context.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  const frame = context.getImageData(0, 0, canvas.width, canvas.height);
  const data = frame.data;
  for (const prompt of state.prompts) {
    if (!prompt.shown) continue;
    const [r, g, b] = rgb(prompt.colour);
    const mask = prompt.mask;
    for (let i = 0, p = 0; p < mask.length; p += 4, i += 4) {
      if (mask[p] < 128) continue;
      data[i] = Math.round(data[i] * (1 - TINT) + r * TINT);
      data[i + 1] = Math.round(data[i + 1] * (1 - TINT) + g * TINT);
      data[i + 2] = Math.round(data[i + 2] * (1 - TINT) + b * TINT);
    }
  }
  context.putImageData(frame, 0, 0);
  document.body.dataset.shown = String(state.prompts.filter((p) => p.shown).length);
}

function askToken() {
  const dialog = $("token-dialog");
  const input = $("token");
  input.value = "";
  return new Promise((resolve) => {
    const done = (value) => {
      dialog.close();
      $("token-ok").onclick = $("token-cancel").onclick = null;
      resolve(value);
    };
    $("token-ok").onclick = () => done(input.value.trim());
    $("token-cancel").onclick = () => done("");
    input.onkeydown = (event) => { if (event.key === "Enter") done(input.value.trim()); };
    dialog.showModal();
    input.focus();
  });
}

async function post(form, asked) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch("/v1/segment", { method: "POST", body: form, headers });
  if (response.status === 401 && !asked) {
    const given = await askToken();
    if (!given) return response;
    sessionStorage.setItem(TOKEN_KEY, given);
    return post(form, true);
  }
  return response;
}

function link(text, blob, name) {
  const url = URL.createObjectURL(blob);
  state.urls.push(url);
  const anchor = document.createElement("a");
  anchor.href = url;
  anchor.download = name;
  anchor.textContent = text;
  return anchor;
}

function blobOf(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function safeName(text) {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "prompt";
}

async function show(answer) {
  for (const url of state.urls) URL.revokeObjectURL(url);
  state.urls = [];
  const canvas = $("overlay");
  canvas.width = answer.width;
  canvas.height = answer.height;
  state.image = await createImageBitmap(state.file, { imageOrientation: "from-image" });
  const byPrompt = new Map();
  for (const output of answer.outputs) {
    if (!byPrompt.has(output.prompt)) byPrompt.set(output.prompt, {});
    byPrompt.get(output.prompt)[output.kind] = output.png_base64;
  }
  state.prompts = [];
  const list = $("prompt-list");
  list.replaceChildren();
  const base = safeName((state.file.name || "image").replace(/\.[^.]*$/, ""));
  for (const [index, stats] of answer.prompts.entries()) {
    const files = byPrompt.get(stats.prompt) || {};
    const colour = COLOURS[index % COLOURS.length];
    const image = await decodePng(files.mask);
    const prompt = {
      label: stats.prompt, colour, shown: true, mask: pixelsOf(image, answer.width, answer.height),
    };
    state.prompts.push(prompt);
    const item = document.createElement("li");
    item.dataset.prompt = stats.prompt;
    const toggle = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = true;
    box.onchange = () => { prompt.shown = box.checked; compose(); };
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour;
    toggle.append(box, swatch, document.createTextNode(stats.prompt));
    const numbers = document.createElement("span");
    numbers.className = "stats";
    numbers.textContent = stats.empty
      ? "nothing found"
      : `${(stats.coverage * 100).toFixed(1)}% of the image, confidence ${stats.max.toFixed(2)}`;
    const thumb = document.createElement("img");
    thumb.alt = `mask of ${stats.prompt}`;
    thumb.src = image.src;
    const links = document.createElement("span");
    links.className = "links";
    const name = `${base}.${safeName(stats.prompt)}`;
    links.append(link("mask", blobOf(files.mask), `${name}.mask.png`));
    if (files.cutout) links.append(link("cutout", blobOf(files.cutout), `${name}.cutout.png`));
    item.append(toggle, numbers, thumb, links);
    list.append(item);
  }
  $("result").hidden = false;
  compose();
}

async function segment() {
  const prompts = lines($("prompts").value);
  if (!state.file || !prompts.length) return;
  const form = new FormData();
  form.append("image", state.file, state.file.name || "image");
  for (const prompt of prompts) form.append("prompt", prompt);
  for (const negative of lines($("negatives").value)) form.append("negative", negative);
  form.append("threshold", $("threshold").value);
  form.append("refine", $("refine").value);
  form.append("save", "mask,cutout");
  $("go").disabled = true;
  setState("busy", "Segmenting…");
  const started = performance.now();
  try {
    const response = await post(form, false);
    const answer = await response.json().catch(() => ({ error: "error", detail: "" }));
    if (!response.ok) {
      const wait = response.headers.get("Retry-After");
      const hint = wait ? ` (try again in ${wait} s)` : "";
      setState("error", `${answer.error}: ${answer.detail}${hint}`, true);
      return;
    }
    await show(answer);
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    setState("done", `${answer.prompts.length} prompt(s), ${answer.width}x${answer.height}, ${seconds} s`);
  } catch (error) {
    setState("error", `the server could not be reached (${error.message})`, true);
  } finally {
    ready();
  }
}

function init() {
  const drop = $("drop");
  $("file").onchange = (event) => pick(event.target.files[0]);
  drop.ondragover = (event) => { event.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    pick(event.dataTransfer.files[0]);
  };
  $("prompts").oninput = ready;
  $("threshold").oninput = () => {
    $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
  };
  $("go").onclick = segment;
  $("prompts").onkeydown = (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) segment();
  };
  document.body.dataset.ready = "true";
}

init();
