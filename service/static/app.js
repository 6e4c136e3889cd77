// The page: the form, the generations, the engine view, and one render per animation frame.

import { EngineView } from "./engine_view.js";
import { Generation } from "./generation.js";
import { ModelPicker } from "./models.js";
import { EXAMPLES, isPuzzle } from "./sudoku.js";
import { TokenTexts } from "./tokens.js";

const form = document.getElementById("prompt-form");
const list = document.getElementById("generations");
const generations = new Set();
const dirty = new Set();
let defaultsApplied = false;
const picker = new ModelPicker(form.elements.model);

// Numbers the browser test reads: events handled, frames rendered and their cost, event-loop lag.
const stats = { canvases: 0, frames: 0, renderMsTotal: 0, renderMsMax: 0, lagMsMax: 0, lagSamples: [] };

const page = {
  tokens: new TokenTexts(),
  stats,
  schedule(generation) {
    dirty.add(generation);
    requestFrame();
  },
  identified() {
    engineView.invalidate();
    requestFrame();
  },
  removed(generation) {
    generations.delete(generation);
    dirty.delete(generation);
  },
};

const engineView = new EngineView(document.getElementById("engine"), {
  mine: (engineId) => [...generations].find((g) => g.engineId === engineId),
  onSnapshot(snapshot) {
    if (!defaultsApplied) applyDefaults(snapshot.model);
    requestFrame();
  },
});

let framePending = false;
function requestFrame() {
  if (framePending) return;
  framePending = true;
  requestAnimationFrame(() => {
    framePending = false;
    const start = performance.now();
    for (const generation of dirty) generation.render();
    dirty.clear();
    engineView.render();
    const ms = performance.now() - start;
    stats.frames += 1;
    stats.renderMsTotal += ms;
    stats.renderMsMax = Math.max(stats.renderMsMax, ms);
  });
}

// Event-loop lag: how late a 50 ms timer fires (a busy page fires it late).
let expected = performance.now() + 50;
setInterval(() => {
  const lag = Math.max(0, performance.now() - expected);
  stats.lagMsMax = Math.max(stats.lagMsMax, lag);
  stats.lagSamples.push(lag);
  if (stats.lagSamples.length > 600) stats.lagSamples.shift();
  expected = performance.now() + 50;
}, 50);

function applyDefaults(model) {
  defaultsApplied = true;
  const d = model.defaults;
  const values = { max_denoising_steps: d.max_denoising_steps, entropy_bound: d.entropy_bound, t_min: d.t_min, t_max: d.t_max };
  for (const [name, value] of Object.entries(values)) if (form.elements[name].value === "") form.elements[name].value = value;
  page.tokens.preload(model.vocab_size);
  if (/sudoku/i.test(model.name) && form.elements.prompt.value === "") form.elements.prompt.value = EXAMPLES[0];
  updatePromptHint();
}

const NUMBER_FIELDS = ["max_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "seed", "stability_threshold", "confidence_threshold"];

function requestFromForm() {
  const f = form.elements;
  const prompt = f.prompt.value;
  const body = { stream: true, stream_options: { include_usage: true, include_canvas: true } };
  for (const name of NUMBER_FIELDS) if (f[name].value !== "") body[name] = Number(f[name].value);
  if (body.t_min !== undefined || body.t_max !== undefined) body.temperature = 1; // t_min/t_max as given
  if (f.interval.value !== "") body.stream_options.canvas_min_interval_ms = Number(f.interval.value);
  const schema = schemaFromForm();
  if (schema !== null) body.response_format = { type: "json_schema", json_schema: { name: "page", schema, strict: true } };
  if (f.model.value !== "") body.model = f.model.value;
  const api = f.api.value;
  if (api === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = isPuzzle(prompt) ? prompt.trim() : prompt;
  return { api, body };
}

// The schema box's JSON: null when empty; throws (shown under the box) when it is not a JSON object.
function schemaFromForm() {
  const text = form.elements.schema.value.trim();
  if (text === "") return null;
  const schema = JSON.parse(text);
  if (typeof schema !== "object" || schema === null || Array.isArray(schema)) throw new Error("a JSON schema is an object");
  return schema;
}

function startGeneration() {
  if (form.elements.prompt.value === "") return;
  const hint = document.getElementById("schema-hint");
  hint.textContent = "";
  try {
    schemaFromForm();
  } catch (error) {
    hint.textContent = `JSON schema: ${error.message}`;
    return;
  }
  const generation = new Generation(requestFromForm(), page);
  generations.add(generation);
  list.prepend(generation.root);
  generation.start();
}

function updatePromptHint() {
  const puzzle = isPuzzle(form.elements.prompt.value);
  document.getElementById("prompt-hint").textContent = puzzle ? "Sudoku puzzle: the board view will show it solving" : "";
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  startGeneration();
});
document.getElementById("stop-all").onclick = () => generations.forEach((g) => g.stop());
document.getElementById("example").onclick = () => {
  const current = EXAMPLES.indexOf(form.elements.prompt.value.trim());
  form.elements.prompt.value = EXAMPLES[(current + 1) % EXAMPLES.length];
  form.elements.api.value = "completions";
  updatePromptHint();
};
form.elements.prompt.addEventListener("input", updatePromptHint);

window.canvasServe = { generations, stats, engineView, page, picker };
engineView.run();
picker.refresh();
