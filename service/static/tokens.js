// Token id -> text, fetched from the server in batches and cached for the page's lifetime.

import { getJSON } from "./sse.js";

const BATCH = 2048;

export class TokenTexts {
  constructor() {
    this.texts = new Map();
    this.pending = new Set();
    this.inFlight = null;
    this.listeners = new Set();
  }

  // Fetch every id of a small vocabulary at once (Sudoku: 32 ids).
  async preload(vocabSize) {
    if (vocabSize > 0 && vocabSize <= BATCH) this.want([...Array(vocabSize).keys()]);
    return this.inFlight;
  }

  text(id) {
    return this.texts.get(id);
  }

  // Ask for ids not known yet; listeners run once they arrive.
  want(ids) {
    for (const id of ids) if (!this.texts.has(id)) this.pending.add(id);
    if (this.pending.size && !this.inFlight) this.inFlight = this.fetchPending();
  }

  onUpdate(listener) {
    this.listeners.add(listener);
  }

  async fetchPending() {
    try {
      while (this.pending.size) {
        const ids = [...this.pending].slice(0, BATCH);
        ids.forEach((id) => this.pending.delete(id));
        const body = await getJSON(`v1/engine/tokens?ids=${ids.join(",")}`);
        body.ids.forEach((id, i) => this.texts.set(id, body.tokens[i]));
        this.listeners.forEach((listener) => listener());
      }
    } catch {
      this.pending.clear(); // the server is away: ask again with the next canvas
    } finally {
      this.inFlight = null;
    }
  }
}

// A short, visible label for one token: whitespace made visible, specials shortened.
export function label(text) {
  if (text === undefined) return "·";
  if (text === "") return "∅";
  const special = /^<([^<>]{1,32})>$/.exec(text);
  if (special) return special[1].length > 5 ? `${special[1].slice(0, 4)}…` : special[1];
  return text.replace(/\n/g, "↵").replace(/ /g, "␣").replace(/\t/g, "⇥");
}
