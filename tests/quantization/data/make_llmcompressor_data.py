"""Regenerate llmcompressor_configs.json and llmcompressor_manifest.json with llm-compressor itself.

Two environments: the project's (transformers 5.23) saves the tiny source checkpoint, a scratch one
with llm-compressor quantises it (llm-compressor 0.14 pins transformers 5.17, which has DiffusionGemma):

    cd <repo> && PYTHONPATH=$PWD .venv/bin/python -c "from pathlib import Path; \
        from tests.engine.checkpoints import save_reference; \
        save_reference(Path('/tmp/qtiny32'), moe_intermediate_size=32)"
    python -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0
    /tmp/lcvenv/bin/pip install llmcompressor  # 0.14.0.1 here; it pulls no CUDA torch over the CPU one
    /tmp/lcvenv/bin/python tests/quantization/data/make_llmcompressor_data.py /tmp/qtiny32

Each scheme runs llm-compressor's data-free `oneshot` (QuantizationModifier on Linear, the published
ignore choices: router, self-conditioning, vision, lm_head; NVFP4 also self_attn) on the fp32 model
and saves it compressed. The manifest records, per scheme, every `model.decoder.*` tensor's dtype,
shape and SHA-256 of its bytes, plus the same for the source's decoder tensors (`source`), so a test
can check it rebuilt the same source before comparing.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from safetensors.torch import load_file
from transformers import DiffusionGemmaForBlockDiffusion

HERE = Path(__file__).parent
PLAIN = ["lm_head", "re:.*router.*", "re:.*self_conditioning.*", "re:.*vision.*"]


def int4_group(symmetric: bool) -> dict[str, Any]:
    weights = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": symmetric}
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


RECIPES = {
    "FP8_DYNAMIC": lambda: QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=PLAIN),
    "W4A16": lambda: QuantizationModifier(config_groups=int4_group(True), ignore=PLAIN),
    "W4A16_ASYM": lambda: QuantizationModifier(config_groups=int4_group(False), ignore=PLAIN),
    "NVFP4A16": lambda: QuantizationModifier(
        targets="Linear", scheme="NVFP4A16", ignore=[*PLAIN, "re:.*self_attn.*"]
    ),
}


def digest(tensor: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of the tensor's bytes."""
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[
        :16
    ]


def manifest(path: Path) -> dict[str, list[Any]]:
    tensors = load_file(str(path))
    return {
        name: [str(t.dtype).removeprefix("torch."), list(t.shape), digest(t)]
        for name, t in sorted(tensors.items())
        if name.startswith("model.decoder.")
    }


def main(source: Path) -> None:
    configs: dict[str, Any] = {}
    manifests: dict[str, Any] = {"source": manifest(source / "model.safetensors")}
    for name, recipe in RECIPES.items():
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(str(source), dtype=torch.float32)
        oneshot(model=model, recipe=recipe())
        with tempfile.TemporaryDirectory() as out:
            model.save_pretrained(out, save_compressed=True)
            configs[name] = json.loads((Path(out) / "config.json").read_text())["quantization_config"]
            manifests[name] = manifest(Path(out) / "model.safetensors")
    (HERE / "llmcompressor_configs.json").write_text(json.dumps(configs, indent=1) + "\n")
    lines = [
        f'"{scheme}": {{\n'
        + ",\n".join(f"{json.dumps(n)}: {json.dumps(v)}" for n, v in entries.items())
        + "\n}"
        for scheme, entries in manifests.items()
    ]
    (HERE / "llmcompressor_manifest.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
