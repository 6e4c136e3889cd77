// The live canvas: one cell per position, its token coloured by confidence, re-noised and pinned cells marked.

import { label } from "./tokens.js";

export const RENOISE_CONFIDENCE = 50; // below this (0-100), a changed token counts as re-noised

// Positions whose token changed since the previous snapshot of the same canvas while the model is
// unsure of them: the sampler drew a fresh token there (re-noise) rather than settling it.
export function renoisedPositions(previous, current) {
  const marked = new Set();
  if (!previous || previous.canvas_index !== current.canvas_index) return marked;
  current.token_ids.forEach((id, p) => {
    if (previous.token_ids[p] !== id && (current.confidence[p] ?? 100) < RENOISE_CONFIDENCE) marked.add(p);
  });
  return marked;
}

// 0 -> red, 50 -> amber, 100 -> green; low confidence also fades the glyph.
export function confidenceStyle(confidence) {
  const c = Math.max(0, Math.min(100, confidence));
  return { background: `hsl(${(c * 1.2).toFixed(0)} 70% ${(90 - c * 0.18).toFixed(0)}%)`, opacity: 0.35 + c / 154 };
}

export class CanvasView {
  constructor(container) {
    this.root = document.createElement("div");
    this.root.className = "canvas-grid";
    container.append(this.root);
    this.cells = [];
  }

  resize(length) {
    while (this.cells.length < length) {
      const cell = document.createElement("span");
      cell.className = "tok";
      this.root.append(cell);
      this.cells.push(cell);
    }
    while (this.cells.length > length) this.cells.pop().remove();
  }

  // canvas: {token_ids, confidence, pinned}; texts: id -> text; renoised: Set of positions.
  // Pinned positions (a grammar's skeleton, an infilling pin) are never re-noised: drawn framed.
  render(canvas, texts, renoised) {
    this.resize(canvas.token_ids.length);
    const pinned = new Set(canvas.pinned ?? []);
    canvas.token_ids.forEach((id, p) => {
      const cell = this.cells[p];
      const text = label(texts.text(id));
      const confidence = canvas.confidence[p] ?? 0;
      if (cell.textContent !== text) cell.textContent = text;
      const style = confidenceStyle(confidence);
      cell.style.background = style.background;
      cell.style.color = `rgb(20 20 30 / ${style.opacity.toFixed(2)})`;
      cell.classList.toggle("renoised", renoised.has(p));
      cell.classList.toggle("pinned", pinned.has(p));
      cell.title = `#${p} id ${id} · confidence ${confidence}${pinned.has(p) ? " · pinned" : ""}`;
    });
  }
}
