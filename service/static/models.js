// The model picker: the base model and every LoRA adapter served beside it, from GET /v1/models.
// Adapters can be loaded and unloaded while the page is open, so the list is read again whenever the
// picker gets focus; the choice is kept while its model is still served, else it falls back to the base.

import { getJSON } from "./sse.js";

export class ModelPicker {
  constructor(select) {
    this.select = select;
    select.addEventListener("focus", () => this.refresh());
  }

  async refresh() {
    try {
      const list = await getJSON("v1/models");
      this.fill(list.data);
    } catch (error) {
      this.select.title = `could not list the models: ${error.message}`;
    }
  }

  // cards: /v1/models' data: the base (no parent) first, then adapters with `parent`.
  fill(cards) {
    const chosen = this.select.value;
    this.select.replaceChildren(
      ...cards.map((card) => {
        const label = card.parent ? `${card.id} (adapter of ${card.parent})` : `${card.id} (base)`;
        return Object.assign(document.createElement("option"), { value: card.id, textContent: label });
      }),
    );
    if (cards.some((card) => card.id === chosen)) this.select.value = chosen;
  }
}
