// The engine view: reads GET /v1/engine/events (snapshots a few times a second) and reconnects with
// exponential backoff when the server goes away (restart, network), so it comes back on its own.

import { apiFetch } from "./auth.js";
import { readEvents } from "./sse.js";

const BACKOFF_S = [0.5, 1, 2, 4, 8];

const fmt = (value, digits = 1) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits));

export class EngineView {
  // root: the panel element; mine(engineId) -> the page's generation with that id, if any.
  constructor(root, { mine, onSnapshot }) {
    this.root = root;
    this.mine = mine;
    this.onSnapshot = onSnapshot;
    this.field = (name) => root.querySelector(`[data-field="${name}"]`);
    this.failures = 0;
    this.snapshot = null;
    this.dirty = false;
  }

  async run() {
    for (;;) {
      try {
        const response = await apiFetch("v1/engine/events?interval_ms=250", { cache: "no-store" });
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        this.setConnection("live");
        let received = 0;
        for await (const snapshot of readEvents(response)) {
          received += 1;
          this.failures = 0;
          this.receive(snapshot);
        }
        // The server ends each stream after a minute (reconnect at once), or at once while draining.
        if (!received || this.snapshot?.draining) throw new Error(received ? "draining" : "stream ended");
      } catch (error) {
        this.failures += 1;
        const wait = BACKOFF_S[Math.min(this.failures - 1, BACKOFF_S.length - 1)];
        this.setConnection(`offline (${error.message || error}); retrying in ${wait}s`);
        await new Promise((resolve) => setTimeout(resolve, wait * 1000));
      }
    }
  }

  setConnection(text) {
    this.connection = text;
    this.root.dataset.connection = text === "live" ? "live" : "offline";
    this.field("connection").textContent = text;
  }

  receive(snapshot) {
    this.snapshot = snapshot;
    this.dirty = true;
    this.onSnapshot(snapshot);
  }

  invalidate() {
    this.dirty = this.snapshot !== null;
  }

  render() {
    if (!this.dirty) return;
    this.dirty = false;
    const s = this.snapshot;
    const t = s.throughput;
    const adapters = s.model.adapters?.length ? ` · adapters ${s.model.adapters.join(", ")}` : "";
    this.field("model").textContent = `${s.model.name} · canvas ${s.model.canvas_length}${adapters}${s.draining ? " · draining" : ""}`;
    this.field("tok-s").textContent = fmt(t.committed_tokens_per_s);
    this.field("steps-canvas").textContent = fmt(t.steps_per_canvas ?? t.steps_per_canvas_all_time);
    this.field("steps-s").textContent = fmt(t.engine_steps_per_s);
    this.field("kv").textContent = `${fmt(100 * s.kv_usage)}%`;
    this.field("kv-bar").style.width = `${Math.min(100, 100 * s.kv_usage)}%`;
    this.field("queue").textContent = `${s.num_running}/${s.max_num_seqs} running · ${s.num_waiting} waiting`;
    const step = s.last_step;
    this.field("last-step").textContent = `${step.num_denoise_canvases} canvases denoised · ${step.num_prefill_tokens} prefill + ${step.num_commit_tokens} commit tokens · ${fmt(1000 * step.duration_s)} ms`;
    const finished = Object.entries(s.totals.finished).map(([reason, n]) => `${reason} ${n}`).join(" · ");
    this.field("totals").textContent = `${s.totals.engine_steps} steps · ${s.totals.committed_tokens} tokens · finished: ${finished || "none"}`;
    this.renderRows([...s.running, ...s.waiting]);
  }

  renderRows(rows) {
    const body = this.field("requests");
    body.replaceChildren(
      ...rows.map((r) => {
        const tr = document.createElement("tr");
        const own = this.mine(r.id);
        tr.dataset.requestId = r.id;
        tr.className = `${r.status}${own ? " mine" : ""}`;
        const cells = [own ? `#${own.number}` : "", r.id.slice(-14), r.lora_name ?? "base", r.status, r.canvas_index, `${r.step}/${r.max_steps}`, r.denoise_steps, r.output_tokens, r.streams_canvas ? "yes" : "no"];
        tr.replaceChildren(...cells.map((value) => Object.assign(document.createElement("td"), { textContent: value })));
        return tr;
      }),
    );
    this.field("empty").hidden = rows.length > 0;
  }
}
