"""The errors of LoRA adapters (no torch): a bad adapter, or a name that is not loaded."""

from __future__ import annotations


class LoRAError(ValueError):
    """An adapter cannot be loaded or used; the message names the file, tensor or field and what to change.

    Raised for missing files, tensors whose shapes do not fit the base model, targets the engine does not
    serve, ranks above `max_lora_rank`, PEFT options the engine does not implement (DoRA, biases,
    `modules_to_save`, ...), a full host registry, and LoRA asked of an engine started without it.
    """


class UnknownLoRA(LoRAError):
    """A request or an unload named an adapter that is not loaded (or is being unloaded)."""
