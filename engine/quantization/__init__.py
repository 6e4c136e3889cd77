"""Quantized weight formats: the published checkpoints' layouts and their exact math (issue 20).

Pure tensor functions, one format per file; the weight methods (`engine.model` seam) are thin classes
over them:

- `scheme`: a checkpoint's `quantization_config` -> a frozen `QuantScheme` (which module, which format).
- `fp8`, `int8`: per-output-channel 8-bit weights (FP8 E4M3 as published; int8 for `--quantization int8`).
- `w4a16`: compressed-tensors `pack-quantized` int4 groups, optional zero points (`int4_pack` packs them).
- `nvfp4`: e2m1 values (`e2m1`) with FP8 block scales and a global scale, in ModelOpt's and
  compressed-tensors' storage conventions.
- `cpu_matmul`: torch's CPU int8 / int4 weight-only matmul ops behind small typed functions.
- `convert`: write a plain checkpoint in one of the published layouts
  (`python -m engine.quantization.convert`).
- `weight_kernels`, `methods`, `expert_stream`, `online`, `register`: the weight methods serving
  those layouts (reference, CPU int8/int4, CUDA `_scaled_mm` and Triton), the per-expert -> stacked
  remap, quantise-at-load for `--quantization fp8|int8`, and their registration with
  `engine.model.methods.selection` (done on import).
"""

from engine.quantization.register import register

register()
