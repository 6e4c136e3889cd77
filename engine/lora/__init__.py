"""LoRA adapters served beside the base model, many in one batch (issue 23).

An adapter is a PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`) made on
transformers' `DiffusionGemmaForBlockDiffusion`. That model's encoder and decoder are separate module
trees with tied base weights, so PEFT gives each its own LoRA weights: the encoder's apply on causal
passes (prompt chunks, canvas commits), the decoder's on denoise passes. Our one set of layers serves
both: every target module stacks its adapters' weights in `2 * max_loras` rows (row `slot` for the
encoder side, `max_loras + slot` for the decoder side) and adds, per token, the delta of its row.

Files, one concept each:
  errors.py     LoRAError, UnknownLoRA (no torch)
  peft_config.py  adapter_config.json -> PeftLoRAConfig: rank, alpha, rsLoRA, patterns; refused options
  targets.py    PEFT module paths -> our module and side (encoder/decoder); the model's target shapes
  adapter.py    read_adapter: a directory -> LoRAAdapter (host tensors, scaling folded into B), checked
  registry.py   the host registry: loaded adapters by name, per-load ids, in-flight counts, unloading
  admission.py  which waiting request may start under the max_loras rule (no torch)
  index.py      LoRAIndex: one forward's per-token rows and runs, one host-to-device copy
  stack.py      LoRAStack: one target's weights in 2 * max_loras device rows
  delta.py      the segmented LoRA matmul: torch reference, Triton kernel on CUDA
  methods.py    LoRALinear / LoRAExperts: weight methods wrapping the base method; enable_lora
  slots.py      device slots: adapters loaded into rows on demand, evicted least recently used
  manager.py    LoRAManager: what the engine and the runner ask of LoRA
"""

from engine.lora.errors import LoRAError, UnknownLoRA

__all__ = ["LoRAError", "UnknownLoRA"]
