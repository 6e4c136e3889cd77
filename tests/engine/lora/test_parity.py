"""Base + adapters in one mixed batch against transformers + PEFT (fp32, within 1e-4).

Two adapters made with PEFT: `every` targets every linear of both sides (attention, dense MLP, router,
self-conditioning MLP) and both expert weights through `target_parameters`, with a rank_pattern and
an alpha_pattern; `decoder_rs` targets a few decoder-side linears only, with rsLoRA. One forward
holds prompt chunks and canvases of the base and both adapters; a second holds commits and the next
canvases. Each request's logits must equal its reference's: the merged PEFT model (encoder and
decoder weights untied, see `peft_adapters`), which must itself equal the unmerged PEFT model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import DiffusionGemmaForBlockDiffusion

from engine.lora.manager import LoRAManager
from engine.lora.targets import DECODER, ENCODER
from engine.model.compiled import compile_layers
from engine.model.loader import load_checkpoint
from tests.engine.checkpoints import CANVAS, VOCAB, save_reference
from tests.engine.lora.peft_adapters import EVERY_LINEAR, EXPERTS, make_adapter
from tests.engine.model_harness import Harness, Part, Reference

FP32_TOL = 1e-4
References = dict[str, tuple[DiffusionGemmaForBlockDiffusion, DiffusionGemmaForBlockDiffusion]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, References]:
    root = tmp_path_factory.mktemp("lora_parity")
    base = root / "base"
    save_reference(base, seed=4)
    refs = {
        "every": make_adapter(
            base,
            root / "every",
            seed=1,
            r=4,
            lora_alpha=8,
            target_modules=EVERY_LINEAR,
            target_parameters=EXPERTS,
            rank_pattern={"o_proj": 2, "gate_up_proj": 3},
            alpha_pattern={"down_proj": 3},
        ),
        "decoder_rs": make_adapter(
            base,
            root / "decoder_rs",
            seed=2,
            r=8,
            lora_alpha=4,
            use_rslora=True,
            target_modules=r"model\.decoder\..*\.(q_proj|v_proj|gate_proj)",
        ),
    }
    return root, refs


def tokens(n: int, seed: int) -> Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def sc_logits(seed: int) -> Tensor:
    return 3 * torch.randn(CANVAS, VOCAB, generator=torch.Generator().manual_seed(seed))


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def test_every_supported_target_is_in_the_every_adapter(setup: tuple[Path, References]) -> None:
    root, _ = setup
    model = load_checkpoint(root / "base", with_tokenizer=False).model
    manager = LoRAManager(model, max_loras=2, max_lora_rank=8, max_cpu_loras=2)
    adapter = manager.add("every", root / "every")
    expected = {(name, side) for name in manager.targets for side in (ENCODER, DECODER)}
    expected -= {(name, ENCODER) for name in manager.targets if name.startswith("self_conditioning.")}
    assert set(adapter.weights) == expected
    assert any(name.endswith("experts.gate_up_proj") for name, _ in adapter.weights)
    assert any(name.endswith("router.proj") for name, _ in adapter.weights)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_mixed_batch_of_two_adapters_and_the_base_matches_peft(
    setup: tuple[Path, References], compiled: bool
) -> None:
    """Also with the layers compiled (`--compile`), as the engine compiles them: after LoRA is on."""
    root, refs = setup
    model = load_checkpoint(root / "base", with_tokenizer=False).model
    manager = LoRAManager(model, max_loras=2, max_lora_rank=8, max_cpu_loras=2)
    if compiled:
        compile_layers(model)
    ids = {name: manager.add(name, root / name).load_id for name in refs}
    harness = Harness(model, lora=manager)
    names: list[str | None] = [None, "every", "decoder_rs"]
    lora_ids = [None if n is None else ids[n] for n in names]
    base_ref = DiffusionGemmaForBlockDiffusion.from_pretrained(root / "base", dtype=torch.float32).eval()
    references = [Reference(base_ref if n is None else refs[n][1]) for n in names]
    unmerged = [None if n is None else Reference(refs[n][0]) for n in names]
    prompts = [tokens(11, 1), tokens(9, 2), tokens(13, 3)]

    # Step 1: three prompt chunks, then the three first canvases with self-conditioning inputs.
    canvases = [tokens(CANVAS, 10 + i) for i in range(3)]
    logits_in = [sc_logits(20 + i) for i in range(3)]
    parts = [Part(f"r{i}", p, 0, True, lora_id=lora_ids[i]) for i, p in enumerate(prompts)]
    parts += [
        Part(f"r{i}", c, len(prompts[i]), False, harness.soft(logits_in[i]), lora_ids[i])
        for i, c in enumerate(canvases)
    ]
    got = harness.run(parts)
    for i in range(3):
        references[i].encode(prompts[i], 0)
        expected = references[i].decode(canvases[i], logits_in[i])
        assert max_diff(got[i], expected) < FP32_TOL, f"step 1, request {names[i]}"
        peft_unmerged = unmerged[i]
        if peft_unmerged is not None:  # merging (on untied weights) keeps PEFT's own semantics
            peft_unmerged.encode(prompts[i], 0)
            assert max_diff(peft_unmerged.decode(canvases[i], logits_in[i]), expected) < FP32_TOL
            base_only = Reference(base_ref)  # and the adapter matters, well beyond the tolerance
            base_only.encode(prompts[i], 0)
            assert max_diff(got[i], base_only.decode(canvases[i], logits_in[i])) > 100 * FP32_TOL

    # Step 2: every canvas commits (causal), then every request's next canvas (no self-conditioning).
    nxt = [tokens(CANVAS, 30 + i) for i in range(3)]
    parts = [Part(f"r{i}", canvases[i], len(prompts[i]), True, lora_id=lora_ids[i]) for i in range(3)]
    parts += [Part(f"r{i}", nxt[i], len(prompts[i]) + CANVAS, False, lora_id=lora_ids[i]) for i in range(3)]
    got = harness.run(parts)
    for i in range(3):
        references[i].encode(canvases[i], len(prompts[i]))
        assert max_diff(got[i], references[i].decode(nxt[i])) < FP32_TOL, f"step 2, request {names[i]}"
