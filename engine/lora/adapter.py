"""`read_adapter`: a PEFT LoRA directory -> `LoRAAdapter`, every tensor checked against our model.

Tensor names are PEFT's: `base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight`
(out, r). A 3-D expert weight targeted through `target_parameters` is wrapped by a `ParamWrapper`
per parameter, nested when both are (`...experts.lora_A.weight` and `...experts.base_layer.lora_A
.weight`); its A is (E * r, in) with expert e's rows at [e * r, (e + 1) * r) and its B is (out, E * r)
with expert e's rank column j at j * E + e (PEFT's `get_delta_weight`). Which of the two weights a
pair adapts is read from its shapes (gate_up_proj takes H and gives 2I, down_proj takes I and gives H;
the two can never be confused). Scaling is folded into B here, so the engine adds `x @ A.T @ B.T`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from engine.lora.admission import lora_cache_key
from engine.lora.errors import LoRAError
from engine.lora.peft_config import PeftLoRAConfig, read_peft_config
from engine.lora.targets import ExpertsTarget, LinearTarget, Target, our_target

WEIGHTS_FILE = "adapter_model.safetensors"

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_NESTING = ".base_layer"


@dataclass(frozen=True)
class LoRAWeights:
    """One target's low-rank pair, scaling folded into `b`: the delta of x is `x @ a.T @ b.T`.

    Linear: a (r, in), b (out, r). Experts: a (E, r, in), b (E, out, r).
    """

    a: Tensor
    b: Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[-2]


@dataclass(frozen=True)
class LoRAAdapter:
    """A loaded adapter, on the host: its weights by (our target name, side)."""

    name: str
    path: Path
    load_id: int
    """Unique per load in this process: a reloaded adapter of the same name gets a new one."""
    weights: dict[tuple[str, int], LoRAWeights]

    @property
    def cache_key(self) -> str:
        """What keys this adapter's K/V in the prefix cache (`Request.cache_key`)."""
        return lora_cache_key(self.load_id)

    @property
    def sides(self) -> set[int]:
        return {side for _, side in self.weights}


def read_adapter(
    name: str, path: str | Path, load_id: int, targets: dict[str, Target], max_rank: int
) -> LoRAAdapter:
    """Read and check the adapter at `path` for a model offering `targets` (`model_targets`).

    Raises `LoRAError` naming the file or tensor: a missing file, an option PEFT's config sets that the
    engine does not implement, a tensor of no target we serve, shapes that do not fit the base, a rank
    other than the config's or above `max_rank`, an A without its B.
    """
    root = Path(path)
    if not root.is_dir():
        raise LoRAError(f"adapter directory {root} does not exist")
    config = read_peft_config(root)
    pairs = _read_pairs(root)
    weights: dict[tuple[str, int], LoRAWeights] = {}
    for peft_module, (a, b) in sorted(pairs.items()):
        target, side = _locate(peft_module, targets)
        key_name, pair = _convert(peft_module, a, b, target, targets, config, max_rank)
        weights[(key_name, side)] = pair
    if not weights:
        raise LoRAError(f"{root / WEIGHTS_FILE} holds no LoRA tensors")
    return LoRAAdapter(name, root, load_id, weights)


def _read_pairs(root: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """PEFT module name (nesting kept) -> (A, B), as stored (float32 on the host)."""
    file = root / WEIGHTS_FILE
    if not file.is_file():
        hint = (
            " (adapter_model.bin: convert it to safetensors)"
            if (root / "adapter_model.bin").is_file()
            else ""
        )
        raise LoRAError(f"{WEIGHTS_FILE} is missing from {root}{hint}")
    parts: dict[str, dict[str, Tensor]] = {}
    try:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                match = _KEY.match(key)
                if match is None:
                    raise LoRAError(
                        f"{file.name}: tensor {key} is not a LoRA A/B weight (DoRA magnitudes, LoRA "
                        "biases, embedding adapters and saved modules are not supported)"
                    )
                parts.setdefault(match["module"], {})[match["part"]] = handle.get_tensor(key).float()
    except SafetensorError as err:
        raise LoRAError(f"cannot read {file}: {err}") from err
    pairs = {}
    for module, found in parts.items():
        if set(found) != {"A", "B"}:
            missing = ({"A", "B"} - set(found)).pop()
            raise LoRAError(f"{file.name}: base_model.model.{module}.lora_{missing}.weight is missing")
        pairs[module] = (found["A"], found["B"])
    return pairs


def _locate(peft_module: str, targets: dict[str, Target]) -> tuple[str, int]:
    """Our module name (for experts: the `Experts` module) and side of a PEFT module name."""
    located = our_target(peft_module.replace(_NESTING, ""))
    if located is None or not _offered(located[0], targets):
        raise LoRAError(
            f"tensor base_model.model.{peft_module}.lora_A.weight targets a module the engine does not serve "
            "(targets: the attention projections, the dense MLP, the router projection, the "
            "self-conditioning MLP, and unquantized experts through target_parameters)"
        )
    return located


def _offered(name: str, targets: dict[str, Target]) -> bool:
    return name in targets or f"{name}.gate_up_proj" in targets


def _convert(
    peft_module: str,
    a: Tensor,
    b: Tensor,
    module: str,
    targets: dict[str, Target],
    config: PeftLoRAConfig,
    max_rank: int,
) -> tuple[str, LoRAWeights]:
    tensor = f"base_model.model.{peft_module}.lora_A.weight"
    if module in targets:
        target = targets[module]
        assert isinstance(target, LinearTarget)
        return module, _linear(
            tensor, a, b, target, config.scaling_of(peft_module), config, peft_module, max_rank
        )
    name = _expert_weight(tensor, module, a, b, targets)
    target = targets[name]
    assert isinstance(target, ExpertsTarget)
    param_key = f"{peft_module.replace(_NESTING, '')}.{name.rpartition('.')[2]}"
    return name, _experts(tensor, a, b, target, config, param_key, max_rank)


def _check_rank(tensor: str, rank: int, config: PeftLoRAConfig, peft_key: str, max_rank: int) -> None:
    expected = config.rank_of(peft_key)
    if rank != expected:
        raise LoRAError(
            f"{tensor} has rank {rank} but adapter_config.json gives {peft_key} rank {expected} "
            "(r / rank_pattern): the config and the weights disagree"
        )
    if rank > max_rank:
        raise LoRAError(
            f"{tensor} has rank {rank}, above max_lora_rank={max_rank}: raise --max-lora-rank to {rank}"
        )


def _linear(
    tensor: str,
    a: Tensor,
    b: Tensor,
    target: LinearTarget,
    scaling: float,
    config: PeftLoRAConfig,
    peft_key: str,
    max_rank: int,
) -> LoRAWeights:
    rank = a.shape[0]
    want_a, want_b = (rank, target.in_features), (target.out_features, rank)
    if a.ndim != 2 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise LoRAError(
            f"{tensor} and its lora_B have shapes {tuple(a.shape)} and {tuple(b.shape)}; the base model's "
            f"projection takes {target.in_features} and gives {target.out_features}, so expected (r, "
            f"{target.in_features}) and ({target.out_features}, r): the adapter was made for another model"
        )
    _check_rank(tensor, rank, config, peft_key, max_rank)
    return LoRAWeights(a.contiguous(), (b * scaling).contiguous())


def _expert_weight(tensor: str, module: str, a: Tensor, b: Tensor, targets: dict[str, Target]) -> str:
    """Which expert weight a (A, B) pair adapts, by its shapes."""
    for param in ("gate_up_proj", "down_proj"):
        target = targets[f"{module}.{param}"]
        assert isinstance(target, ExpertsTarget)
        if (
            a.ndim == 2
            and b.ndim == 2
            and a.shape[1] == target.in_features
            and b.shape[0] == target.out_features
            and a.shape[0] % target.num_experts == 0
            and b.shape[1] == a.shape[0]
        ):
            return f"{module}.{param}"
    gate_up = targets[f"{module}.gate_up_proj"]
    down = targets[f"{module}.down_proj"]
    assert isinstance(gate_up, ExpertsTarget) and isinstance(down, ExpertsTarget)
    num = gate_up.num_experts
    raise LoRAError(
        f"{tensor} and its lora_B have shapes {tuple(a.shape)} and {tuple(b.shape)}, which fit neither "
        f"expert weight of the base model: gate_up_proj wants ({num}*r, {gate_up.in_features}) and "
        f"({gate_up.out_features}, {num}*r), down_proj ({num}*r, {down.in_features}) and "
        f"({down.out_features}, {num}*r): the adapter was made for another model"
    )


def _experts(
    tensor: str,
    a: Tensor,
    b: Tensor,
    target: ExpertsTarget,
    config: PeftLoRAConfig,
    peft_key: str,
    max_rank: int,
) -> LoRAWeights:
    num = target.num_experts
    rank = a.shape[0] // num
    _check_rank(tensor, rank, config, peft_key, max_rank)
    scaling = config.scaling_of(peft_key)
    per_expert_a = a.view(num, rank, target.in_features)  # (E, r, in)
    per_expert_b = b.view(target.out_features, rank, num).permute(2, 0, 1)  # (E, out, r)
    return LoRAWeights(per_expert_a.contiguous(), (per_expert_b * scaling).contiguous())
