// One generation on the page: its request, its live canvas, committed text, board and controls.
// States: starting -> streaming -> done | stopped | error; "restart" sends the same request again.

import { CanvasView, renoisedPositions } from "./canvas_view.js";
import { postJSON, readEvents } from "./sse.js";
import { isPuzzle, SudokuBoard } from "./sudoku.js";
import { label } from "./tokens.js";

let nextNumber = 1;

export class Generation {
  // request: {api: "completions" | "chat", body: {...}}; page: {tokens, schedule(generation), removed}
  constructor(request, page) {
    this.request = request;
    this.page = page;
    this.number = nextNumber++;
    this.prompt = request.api === "chat" ? request.body.messages.at(-1).content : request.body.prompt;
    this.build();
  }

  build() {
    const template = document.getElementById("generation-template");
    this.root = template.content.firstElementChild.cloneNode(true);
    this.root.dataset.number = this.number;
    this.field = (name) => this.root.querySelector(`[data-field="${name}"]`);
    const model = this.request.body.model ? ` [${this.request.body.model}]` : "";
    this.field("title").textContent = `#${this.number}${model} ${this.prompt.slice(0, 60)}`;
    this.canvasView = new CanvasView(this.field("canvas"));
    this.board = isPuzzle(this.prompt) ? new SudokuBoard(this.field("board"), this.prompt) : null;
    this.root.querySelector("[data-action=stop]").onclick = () => this.stop();
    this.root.querySelector("[data-action=restart]").onclick = () => this.start();
    this.root.querySelector("[data-action=remove]").onclick = () => this.remove();
  }

  get engineId() {
    return this.requestId ? `${this.requestId}-0` : null;
  }

  reset() {
    Object.assign(this, { requestId: null, canvas: null, previous: null, renoised: new Set(), text: "" });
    Object.assign(this, { finishReason: null, usage: null, numCanvases: 0, numRenoised: 0, error: null });
    this.startedAt = performance.now();
    this.endedAt = null;
    this.field("text").textContent = "";
    this.field("error").textContent = "";
  }

  async start() {
    this.controller?.abort();
    const controller = (this.controller = new AbortController());
    this.reset();
    this.setState("starting");
    try {
      const response = await postJSON(`v1/${this.request.api === "chat" ? "chat/completions" : "completions"}`, this.request.body, controller.signal);
      this.setState("streaming");
      const complete = await this.consume(response);
      if (controller !== this.controller) return;
      if (this.state === "error") return;
      if (!complete) throw new Error("the connection closed before the end of the stream");
      this.setState("done");
    } catch (error) {
      if (controller !== this.controller) return; // a restart took over
      if (error.name === "AbortError") this.setState("stopped");
      else if (error.status) this.fail(`the server refused the request (${error.status}): ${error.message}`);
      else this.fail(`connection to the server lost (${error.message || error}): press Restart once it is back`);
    }
  }

  async consume(response) {
    const events = readEvents(response);
    for (;;) {
      const { value, done } = await events.next();
      if (done) return value;
      this.apply(value);
    }
  }

  apply(chunk) {
    if (chunk.error) return this.fail(chunk.error.message);
    if (!this.requestId && chunk.id) {
      this.requestId = chunk.id;
      this.page.identified(this); // the engine view can now mark this request as the page's own
    }
    if (chunk.canvas) this.onCanvas(chunk.canvas);
    const choice = chunk.choices?.[0];
    const text = choice?.text ?? choice?.delta?.content;
    if (text) this.text += text;
    if (choice?.finish_reason) this.finishReason = choice.finish_reason;
    if (chunk.usage) this.usage = chunk.usage;
    this.page.schedule(this);
  }

  onCanvas(canvas) {
    this.page.stats.canvases += 1;
    const renoised = renoisedPositions(this.canvas, canvas);
    this.numRenoised = renoised.size;
    this.previous = this.canvas;
    this.canvas = canvas;
    this.renoised = renoised;
    this.numCanvases += 1;
    this.page.tokens.want(canvas.token_ids);
  }

  stop() {
    if (this.state === "starting" || this.state === "streaming") this.controller?.abort();
  }

  remove() {
    this.stop();
    this.root.remove();
    this.page.removed(this);
  }

  fail(message) {
    this.error = message;
    this.setState("error");
    this.field("error").textContent = message;
  }

  setState(state) {
    this.state = state;
    if (!["starting", "streaming"].includes(state)) this.endedAt ??= performance.now();
    this.root.dataset.state = state;
    this.field("state").textContent = state;
    const live = state === "starting" || state === "streaming";
    this.root.querySelector("[data-action=stop]").disabled = !live;
    this.root.querySelector("[data-action=restart]").disabled = live;
    this.page.schedule(this);
  }

  // Called at most once per animation frame.
  render() {
    const canvas = this.canvas;
    if (canvas) {
      this.canvasView.render(canvas, this.page.tokens, this.renoised);
      this.field("counters").textContent = `canvas ${canvas.canvas_index} · step ${canvas.step} · accepted ${canvas.num_accepted} · re-noised ${this.numRenoised}${canvas.pinned?.length ? ` · pinned ${canvas.pinned.length}` : ""} · entropy ${canvas.mean_entropy.toFixed(3)}`;
    }
    this.field("id").textContent = this.requestId ?? "";
    this.field("text").textContent = this.text;
    this.field("summary").textContent = this.summary();
    if (this.board) this.renderBoard();
  }

  renderBoard() {
    const final = this.state === "done";
    const fromText = final && this.text.length >= 81;
    const digits = fromText ? [...this.text.slice(0, 81)] : this.canvasDigits();
    this.board.render(digits, fromText ? null : this.canvas?.confidence, final);
  }

  canvasDigits() {
    const ids = this.canvas?.token_ids ?? [];
    return [...Array(81).keys()].map((p) => (p < ids.length ? label(this.page.tokens.text(ids[p])) : ""));
  }

  summary() {
    const seconds = (((this.endedAt ?? performance.now()) - this.startedAt) / 1000).toFixed(1);
    const parts = [`${this.numCanvases} canvases received`, `${seconds}s`];
    if (this.finishReason) parts.push(`finish: ${this.finishReason}`);
    if (this.usage) parts.push(`${this.usage.completion_tokens} tokens · ${this.usage.denoise_steps} denoise steps · ${this.usage.canvases} canvases`);
    return parts.join(" · ");
  }
}
