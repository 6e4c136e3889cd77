"""Reading adapters: PEFT's scaling rules, and a clear `LoRAError` naming the tensor or field for every
adapter the engine cannot serve. Then the host registry's bound and the device slots' LRU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.lora import LoRAError, UnknownLoRA
from engine.lora.adapter import LoRAAdapter, LoRAWeights, read_adapter
from engine.lora.peft_config import PeftLoRAConfig, pattern_key
from engine.lora.registry import LoRARegistry
from engine.lora.slots import LoRASlots
from engine.lora.stack import LoRAStack
from engine.lora.targets import DECODER, ENCODER, Target, model_targets
from engine.model.diffusion_gemma import DiffusionGemma
from engine.model.loader import load_checkpoint
from tests.engine.checkpoints import save_reference
from tests.engine.lora.peft_adapters import EVERY_LINEAR, EXPERTS, make_adapter

PREFIX = "base_model.model.model"
Q_A = f"{PREFIX}.decoder.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Target]]:
    root = tmp_path_factory.mktemp("lora_adapters")
    save_reference(root / "base", seed=5)
    make_adapter(
        root / "base",
        root / "good",
        seed=3,
        r=4,
        lora_alpha=8,
        target_modules=EVERY_LINEAR,
        target_parameters=EXPERTS,
    )
    model = load_checkpoint(root / "base", with_tokenizer=False).model
    return root, model_targets(model)


def variant(
    made: tuple[Path, dict[str, Target]],
    tmp_path: Path,
    config: dict[str, Any] | None = None,
    tensors: Any = None,
) -> Path:
    """A copy of the good adapter with its config updated by `config` and its tensors edited by `tensors`."""
    root, _ = made
    out = tmp_path / "variant"
    shutil.copytree(root / "good", out)
    if config:
        data = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps(data | config))
    if tensors is not None:
        weights = load_file(out / "adapter_model.safetensors")
        tensors(weights)
        save_file(weights, out / "adapter_model.safetensors")
    return out


def read(made: tuple[Path, dict[str, Target]], path: Path, max_rank: int = 16) -> LoRAAdapter:
    return read_adapter("x", path, 1, made[1], max_rank)


def test_the_good_adapter_reads(made: tuple[Path, dict[str, Target]]) -> None:
    adapter = read(made, made[0] / "good")
    weights = adapter.weights[("layers.0.experts.gate_up_proj", ENCODER)]
    assert weights.a.shape == (4, 4, 64) and weights.b.shape == (4, 48, 4)  # (E, r, H), (E, 2I, r)
    assert ("self_conditioning.up_proj", DECODER) in adapter.weights
    assert adapter.cache_key == "lora-1"


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"use_dora": True}, "use_dora=True is not supported"),
        ({"bias": "all"}, "bias='all'"),
        ({"lora_bias": True}, "lora_bias=True"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
        ({"r": 8}, "lora_A.weight has rank 4 but adapter_config.json gives .* rank 8"),
        ({"rank_pattern": {"q_proj": 2}}, "q_proj.lora_A.weight has rank 4 but .* rank 2"),
        ({"r": "four"}, "r='four' must be a positive integer"),
    ],
)
def test_bad_configs_name_the_field(
    made: tuple[Path, dict[str, Target]], tmp_path: Path, config: dict[str, Any], match: str
) -> None:
    with pytest.raises(LoRAError, match=match):
        read(made, variant(made, tmp_path, config=config))


def _wrong_in(weights: dict[str, torch.Tensor]) -> None:
    weights[Q_A] = torch.zeros(4, 65)


def _unknown_target(weights: dict[str, torch.Tensor]) -> None:
    weights[f"{PREFIX}.decoder.embed_tokens.lora_A.weight"] = torch.zeros(4, 128)
    weights[f"{PREFIX}.decoder.embed_tokens.lora_B.weight"] = torch.zeros(64, 4)


def _dora(weights: dict[str, torch.Tensor]) -> None:
    weights[f"{PREFIX}.decoder.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)


def _no_b(weights: dict[str, torch.Tensor]) -> None:
    del weights[Q_A.replace("lora_A", "lora_B")]


def _bad_experts(weights: dict[str, torch.Tensor]) -> None:
    weights[f"{PREFIX}.decoder.layers.1.experts.lora_A.weight"] = torch.zeros(16, 23)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_wrong_in, f"{Q_A} and its lora_B have shapes \\(4, 65\\) and \\(64, 4\\).*expected \\(r, 64\\)"),
        (_unknown_target, "decoder.embed_tokens.lora_A.weight targets a module the engine does not serve"),
        (_dora, "lora_magnitude_vector is not a LoRA A/B weight"),
        (_no_b, "q_proj.lora_B.weight is missing"),
        (_bad_experts, "layers.1.experts.lora_A.weight and its lora_B .* fit neither expert weight"),
    ],
)
def test_bad_tensors_are_named(
    made: tuple[Path, dict[str, Target]], tmp_path: Path, edit: Any, match: str
) -> None:
    with pytest.raises(LoRAError, match=match):
        read(made, variant(made, tmp_path, tensors=edit))


def test_rank_above_the_limit_and_missing_files(made: tuple[Path, dict[str, Target]], tmp_path: Path) -> None:
    with pytest.raises(LoRAError, match="rank 4, above max_lora_rank=3: raise --max-lora-rank to 4"):
        read(made, made[0] / "good", max_rank=3)
    with pytest.raises(LoRAError, match="does not exist"):
        read(made, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAError, match=r"adapter_config\.json is missing"):
        read(made, tmp_path / "empty")
    no_weights = variant(made, tmp_path)
    (no_weights / "adapter_model.safetensors").rename(no_weights / "adapter_model.bin")
    with pytest.raises(LoRAError, match="convert it to safetensors"):
        read(made, no_weights)


def test_scaling_follows_peft() -> None:
    config = PeftLoRAConfig(
        r=8, lora_alpha=16, rank_pattern={"o_proj": 4}, alpha_pattern={r"layers\.1\..*": 2}
    )
    assert config.scaling_of("model.decoder.layers.0.self_attn.q_proj") == 2.0
    assert config.scaling_of("model.decoder.layers.0.self_attn.o_proj") == 4.0
    assert config.scaling_of("model.decoder.layers.1.self_attn.o_proj") == 0.5
    rs = PeftLoRAConfig(r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling_of("model.decoder.layers.0.mlp.up_proj") == 2.0
    assert (
        pattern_key({"proj": 1}, "model.decoder.layers.0.self_attn.o_proj")
        == "model.decoder.layers.0.self_attn.o_proj"
    )


def _adapter(load_id: int, name: str = "") -> LoRAAdapter:
    a = torch.full((2, 8), float(load_id))
    return LoRAAdapter(
        name or f"a{load_id}", Path("."), load_id, {("t", DECODER): LoRAWeights(a, torch.ones(4, 2))}
    )


def test_the_registry_is_bounded_and_frees_unloading_adapters_with_their_last_request() -> None:
    registry = LoRARegistry(max_cpu_loras=2)
    registry.add(_adapter(1))
    registry.add(_adapter(2))
    with pytest.raises(LoRAError, match="max_cpu_loras=2"):
        registry.add(_adapter(3))
    registry.acquire("a1")
    registry.acquire("a1")
    assert registry.remove("a1") is None
    with pytest.raises(UnknownLoRA, match="being unloaded"):
        registry.acquire("a1")
    assert registry.release(1) is None
    freed = registry.release(1)
    assert freed is not None and freed.load_id == 1 and registry.names() == ["a2"]


def test_slots_load_on_demand_and_evict_the_least_recently_used_not_in_the_step() -> None:
    stack = LoRAStack.zeros(4, 3, 8, 4, None, torch.float32, torch.device("cpu"))
    other = LoRAStack.zeros(4, 3, 8, 4, None, torch.float32, torch.device("cpu"))
    slots = LoRASlots({"t": stack, "other": other}, max_loras=2)
    one, two, three = _adapter(1), _adapter(2), _adapter(3)
    assert slots.assign([one]) == {1: 0}
    assert slots.assign([two]) == {2: 1}
    assert slots.assign([one, two]) == {1: 0, 2: 1} and slots.num_loads == 2  # both still there
    assert slots.assign([three, two]) == {3: 0, 2: 1}  # one was the least recently used
    assert torch.equal(stack.a[2 + 0, :2], torch.full((2, 8), 3.0))  # decoder row of slot 0
    assert torch.equal(stack.a[2 + 0, 2], torch.zeros(8))  # rank 2 of 3: the rest is zero
    assert stack.ranks == {2: 2, 3: 2} and other.ranks == {}  # no encoder side, no other target
    slots.evict(2)
    assert slots.assign([one]) == {1: 1}  # the freed slot first
    assert slots.num_loads == 4


def test_model_targets_list_every_linear_and_plain_experts() -> None:
    from tests.engine.checkpoints import tiny_model_config

    targets = model_targets(DiffusionGemma(tiny_model_config()))
    assert "layers.0.self_attn.q_proj" in targets and "layers.3.router.proj" in targets
    assert "self_conditioning.down_proj" in targets and "layers.2.experts.down_proj" in targets
    assert "layers.1.self_attn.v_proj" not in targets  # full-attention layers have no v_proj (K = V)


def test_a_model_serves_one_lora_engine_only() -> None:
    """A second `enable_lora` on one model is refused: it would find the experts already wrapped (no
    longer targets) and nest a second wrapper around each linear."""
    from engine.lora.manager import LoRAManager
    from tests.engine.checkpoints import tiny_model_config

    model = DiffusionGemma(tiny_model_config())
    LoRAManager(model, max_loras=1, max_lora_rank=4, max_cpu_loras=1)
    with pytest.raises(ValueError, match="LoRA is already enabled on this model"):
        LoRAManager(model, max_loras=1, max_lora_rank=4, max_cpu_loras=1)
