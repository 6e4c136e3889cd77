"""The weight-method seam: each projection's method is chosen once, by module name, and the loader
fills whatever the methods registered (through a format's remap), then runs their post-load step."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine.model.diffusion_gemma import DiffusionGemma
from engine.model.layers import Experts, Linear
from engine.model.loader import load_checkpoint
from engine.model.methods.base import stored
from engine.model.methods.plain import LoopedExperts, UnquantizedLinear
from engine.model.methods.selection import (
    FormatContext,
    TensorStream,
    WeightMethods,
    register_weight_format,
    select_weight_methods,
)
from tests.engine.checkpoints import rewrite_json, save_reference, tiny_model_config

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "proj"}


class MarkedLinear(UnquantizedLinear):
    """Plain numbers, a different class: tells which modules a selection gave the format's method."""


class MarkedExperts(LoopedExperts):
    pass


def methods_by_module(model: nn.Module) -> dict[str, object]:
    return {name: m.method for name, m in model.named_modules() if isinstance(m, Linear | Experts)}


def test_default_model_runs_every_projection_through_a_plain_method() -> None:
    model = DiffusionGemma(tiny_model_config())
    methods = methods_by_module(model)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears == []  # every projection goes through the seam
    assert {name.rpartition(".")[2] for name in methods} == PROJECTIONS | {"experts"}
    assert "self_conditioning.gate_proj" in methods and "layers.3.router.proj" in methods
    assert all(
        type(m) is (LoopedExperts if n.endswith("experts") else UnquantizedLinear) for n, m in methods.items()
    )


def test_ignored_modules_stay_plain_and_names_do_not_change() -> None:
    config = tiny_model_config()
    selection = WeightMethods(
        linear=MarkedLinear(),
        experts=MarkedExperts(),
        ignore=("layers.0.router.proj", "layers.1.", r"re:.*\.o_proj"),
    )
    methods = methods_by_module(DiffusionGemma(config, selection))
    plain = {name for name, m in methods.items() if type(m) in (UnquantizedLinear, LoopedExperts)}
    o_projs = {f"layers.{i}.self_attn.o_proj" for i in range(4)}
    layer_1 = {name for name in methods if name.startswith("layers.1.")}
    assert plain == {"layers.0.router.proj"} | o_projs | layer_1
    assert isinstance(methods["layers.0.self_attn.q_proj"], MarkedLinear)
    assert isinstance(methods["layers.2.experts"], MarkedExperts)
    assert isinstance(methods["self_conditioning.up_proj"], MarkedLinear)
    names = list(DiffusionGemma(config, selection).state_dict())
    assert names == list(DiffusionGemma(config).state_dict())


# --- a format plugged in from outside: stored in float64, experts stored as separate gate and up -------


class Float64Linear(UnquantizedLinear):
    """Keeps the stored float64 weight through loading, then casts it once after loading."""

    processed: ClassVar[list[int]] = []

    def load_dtype(self, name: str, model_dtype: torch.dtype) -> torch.dtype:
        return torch.float64

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        assert stored(layer, "weight").dtype == torch.float64
        layer.weight = nn.Parameter(stored(layer, "weight").float(), requires_grad=False)
        Float64Linear.processed.append(id(layer))

    def apply(self, layer: nn.Module, x: Tensor) -> Tensor:
        return F.linear(x, stored(layer, "weight"))


def stack_gate_and_up(stream: TensorStream) -> TensorStream:
    """`experts.gate_proj` and `experts.up_proj` (E, I, H) -> `experts.gate_up_proj` (E, 2I, H)."""
    gates: dict[str, Tensor] = {}
    for name, tensor in stream:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "gate_proj" and prefix.endswith("experts"):
            gates[prefix] = tensor
        elif leaf == "up_proj" and prefix.endswith("experts"):
            yield f"{prefix}.gate_up_proj", torch.cat([gates.pop(prefix), tensor], dim=1)
        else:
            yield name, tensor


def build_test_format(
    quantization: Mapping[str, Any], plain: WeightMethods, context: FormatContext
) -> WeightMethods:
    return dataclasses.replace(
        plain,
        linear=Float64Linear(),
        ignore=tuple(quantization.get("ignore", ())),
        remap=stack_gate_and_up,
        format="test-float64",
    )


register_weight_format("test-float64", build_test_format)


def split_experts_in_float64(path: Path) -> None:
    """Rewrite the checkpoint as the test format stores it (sorted so gate precedes up in the file)."""
    tensors = load_file(path / "model.safetensors")
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            out[name.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            out[name.replace("gate_up_proj", "up_proj")] = up.contiguous()
        elif name.startswith("model.decoder.") and tensor.dim() == 2 and "embed" not in name:
            out[name] = tensor.double()
        else:
            out[name] = tensor
    assert sum(name.endswith("experts.up_proj") for name in out) == 4  # one per layer
    assert sum(tensor.dtype == torch.float64 for tensor in out.values()) > 4 * 7
    save_file(out, path / "edited.safetensors", metadata={"format": "pt"})
    (path / "edited.safetensors").replace(path / "model.safetensors")


@pytest.fixture(scope="module")
def plain_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plain")
    save_reference(path)
    return path


def test_a_registered_format_loads_through_its_methods_and_remap(plain_path: Path, tmp_path: Path) -> None:
    path = Path(shutil.copytree(plain_path, tmp_path / "float64"))
    split_experts_in_float64(path)
    ignored = "layers.0.mlp.up_proj"
    quantization = {"quant_method": "test-float64", "ignore": [ignored]}
    rewrite_json(path / "config.json", lambda data: data.update(quantization_config=quantization))
    ignored_weight = f"model.decoder.{ignored}.weight"
    tensors = load_file(path / "model.safetensors")
    tensors[ignored_weight] = tensors[ignored_weight].float()  # an ignored module is stored plain
    save_file(tensors, path / "edited.safetensors", metadata={"format": "pt"})
    (path / "edited.safetensors").replace(path / "model.safetensors")

    Float64Linear.processed.clear()
    model = load_checkpoint(path, with_tokenizer=False).model
    expected = load_checkpoint(plain_path, with_tokenizer=False).model
    methods = methods_by_module(model)
    assert type(methods[ignored]) is UnquantizedLinear
    assert isinstance(methods["layers.0.mlp.gate_proj"], Float64Linear)
    assert len(Float64Linear.processed) == sum(isinstance(m, Float64Linear) for m in methods.values())
    got_state, want_state = model.state_dict(), expected.state_dict()
    assert list(got_state) == list(want_state)
    for name, tensor in want_state.items():
        torch.testing.assert_close(got_state[name], tensor, atol=0, rtol=0, msg=name)


def test_plain_selection_picks_experts_by_device() -> None:
    config = tiny_model_config()
    selection = select_weight_methods(None, config, torch.device("cpu"), torch.float32)
    assert type(selection.experts) is LoopedExperts and selection.format == "plain"
    assert type(selection.linear_for("layers.0.self_attn.q_proj")) is UnquantizedLinear
