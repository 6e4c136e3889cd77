"""Load a DiffusionGemma checkpoint directory in Hugging Face format.

Reads `config.json`, single or sharded safetensors (`model.safetensors` or
`model.safetensors.index.json`), `generation_config.json` (optional: the reference defaults apply)
and, for serving, the tokenizer and `chat_template.jinja` through transformers' tokenizer classes.

The model is built on the meta device and each tensor is read from the memory-mapped file, cast and
placed one at a time, so at most one tensor exists twice at any moment. When the file's dtype and
device already match (fp32 on the CPU), parameters stay views of the private file mapping: replace a
served checkpoint by writing a new file and renaming it, never by rewriting it in place. Vision
weights are skipped.
Tensors are assigned by name into whatever each module's weight method registered
(`engine.model.methods`, chosen once from the config's optional `quantization_config`, the device and
the dtype), after the format's `remap` of the stream; then every method's
`process_weights_after_loading` runs once.
Any missing file, missing, unused or mis-shaped tensor, unsupported architecture or weight format
raises `CheckpointError` naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from engine.config import ConfigError, DiffusionDefaults, ModelConfig
from engine.model.diffusion_gemma import DiffusionGemma
from engine.model.methods.base import WeightMethod
from engine.model.methods.selection import WeightFormatError, WeightMethods, select_weight_methods

CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"

_ENCODER_SCALAR = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")
_SKIPPED_PREFIXES = (
    "model.encoder.vision_tower.",
    "model.encoder.embed_vision.",
    "model.encoder.language_model.",  # tied to the decoder's weights (scalars handled above)
    "lm_head.",  # tied to the embedding
)


class CheckpointError(RuntimeError):
    """The checkpoint directory cannot be served; the message names the file or tensor at fault."""


@dataclass
class Checkpoint:
    """Everything the engine needs from a checkpoint directory."""

    model: DiffusionGemma
    config: ModelConfig
    defaults: DiffusionDefaults
    tokenizer: Any | None
    path: Path


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
    quantization: str | None = None,
) -> Checkpoint:
    """Load model, configuration, diffusion defaults and (optionally) the tokenizer.

    `quantization` is `--quantization` as vLLM spells it: None detects the checkpoint's own format;
    `fp8` or `int8` quantise a plain checkpoint's linears and experts at load; naming a different
    format than the checkpoint's is a `CheckpointError`.
    """
    root = _require_dir(path)
    config = read_model_config(root)
    model = load_weights(root, config, dtype, torch.device(device), quantization)
    tokenizer = load_tokenizer(root) if with_tokenizer else None
    return Checkpoint(model, config, read_defaults(root, config), tokenizer, root)


def _require_dir(path: str | Path) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    return root


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing from {path.parent}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def read_model_config(root: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(_read_json(root / CONFIG_FILE))
    except ConfigError as err:
        raise CheckpointError(f"{root / CONFIG_FILE}: {err}") from err


def read_defaults(root: Path, config: ModelConfig) -> DiffusionDefaults:
    path = root / GENERATION_FILE
    return DiffusionDefaults.from_hf(_read_json(path) if path.is_file() else {}, config)


def load_tokenizer(root: Path) -> Any:
    """The checkpoint's tokenizer (with `chat_template.jinja` when present), loaded offline."""
    if not (root / "tokenizer.json").is_file() and not (root / "tokenizer.model").is_file():
        raise CheckpointError(f"tokenizer.json is missing from {root}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root), local_files_only=True)


def weight_files(root: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    if (root / WEIGHTS_INDEX).is_file():
        weight_map = _read_json(root / WEIGHTS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{WEIGHTS_INDEX} has no weight_map")
        files = {name: root / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"shard {shard.name} listed in {WEIGHTS_INDEX} is missing from {root}")
        return files
    if (root / SINGLE_WEIGHTS).is_file():
        with _open(root / SINGLE_WEIGHTS) as f:
            return {name: root / SINGLE_WEIGHTS for name in f.keys()}  # noqa: SIM118
    raise CheckpointError(f"no weights in {root}: expected {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}")


def our_name(checkpoint_name: str) -> str | None:
    """Map a checkpoint tensor name to our parameter name; None for tensors we do not use.

    `model.decoder.layers.3.mlp.up_proj.weight` -> `layers.3.mlp.up_proj.weight`;
    `model.encoder.language_model.layers.3.layer_scalar` -> `layers.3.encoder_layer_scalar`.
    """
    if match := _ENCODER_SCALAR.match(checkpoint_name):
        return f"layers.{match.group(1)}.encoder_layer_scalar"
    if checkpoint_name.startswith(_SKIPPED_PREFIXES):
        return None
    if checkpoint_name.startswith("model.decoder."):
        return checkpoint_name.removeprefix("model.decoder.")
    return None


def _read_tensors(files: dict[str, Path]) -> Iterator[tuple[str, Tensor]]:
    """Yield (our name, tensor) one at a time, opening each shard once."""
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with _open(file) as f:
            for name in sorted(names):
                target = our_name(name)
                if target is not None:
                    yield target, _get_tensor(f, name, file)


def _open(file: Path) -> Any:
    """safe_open, with unreadable files (e.g. mode 0600 owned by another user) named clearly."""
    try:
        return safe_open(str(file), framework="pt")
    except OSError as err:
        raise CheckpointError(
            f"cannot read {file}: {err}; make the file readable by the server's user"
        ) from err


def _get_tensor(handle: Any, name: str, file: Path) -> Tensor:
    try:
        return handle.get_tensor(name)
    except Exception as err:  # safetensors raises its own error type for a name it does not hold
        raise CheckpointError(
            f"tensor {name} is listed for {file.name} but cannot be read from it: {err}"
        ) from err


def load_weights(
    root: Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str | None = None,
) -> DiffusionGemma:
    """Build the model on the meta device and fill it tensor by tensor from the checkpoint."""
    methods = read_weight_methods(root, config, device, dtype, quantization)
    try:
        with torch.device("meta"):
            model = DiffusionGemma(config, methods)
        _fill(model, methods, weight_files(root), dtype, device)
        _process_after_loading(model)
    except WeightFormatError as err:
        raise CheckpointError(f"{root}: {err}") from err
    model.reset_rope_buffers(device)
    return model.eval().requires_grad_(False)


def _fill(
    model: DiffusionGemma,
    methods: WeightMethods,
    files: dict[str, Path],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Assign every tensor of the (remapped) checkpoint stream; every registered one must come."""
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    loaded: set[str] = set()
    for name, tensor in methods.remap(_read_tensors(files)):
        if name not in expected:
            raise CheckpointError(
                f"checkpoint tensor {_checkpoint_name(name)} is not used by the model "
                f"(weight format {methods.format!r} registers no {name})"
            )
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"tensor {_checkpoint_name(name)} has shape {tuple(tensor.shape)}; expected {want}"
            )
        target = _load_dtype(model, name, dtype, tensor.dtype)
        _assign(model, name, tensor.to(device=device, dtype=target))
        loaded.add(name)
    _check_complete(model, loaded)


def read_weight_methods(
    root: Path,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None = None,
) -> WeightMethods:
    """The weight methods for this checkpoint on `device`: its config's `quantization_config`, if any,
    and `quantization` (`--quantization`)."""
    stored = _read_json(root / CONFIG_FILE).get("quantization_config")
    if stored is not None and not isinstance(stored, dict):
        raise CheckpointError(f"{root / CONFIG_FILE}: quantization_config must be a JSON object")
    try:
        return select_weight_methods(stored, config, device, dtype, quantization)
    except WeightFormatError as err:
        raise CheckpointError(f"{root / CONFIG_FILE}: {err}") from err


def _method_of(model: nn.Module, name: str) -> WeightMethod | None:
    """The weight method of the module owning parameter `name`, if it has one."""
    method = getattr(model.get_submodule(name.rpartition(".")[0]), "method", None)
    return method if isinstance(method, WeightMethod) else None


def _load_dtype(model: nn.Module, name: str, dtype: torch.dtype, stored: torch.dtype) -> torch.dtype:
    method = _method_of(model, name)
    if method is None:
        return dtype
    leaf = name.rpartition(".")[2]
    return stored if method.keeps_stored_dtype(leaf) else method.load_dtype(leaf, dtype)


def _process_after_loading(model: nn.Module) -> None:
    """Each weight method's post-load step, once per module (e.g. repacking into a kernel's layout)."""
    for module in model.modules():
        method = getattr(module, "method", None)
        if isinstance(method, WeightMethod):
            method.process_weights_after_loading(module)


def _assign(model: nn.Module, name: str, tensor: Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def _check_complete(model: DiffusionGemma, loaded: set[str]) -> None:
    persistent = set(model.state_dict().keys())
    missing = sorted(persistent - loaded)
    if missing:
        shown = ", ".join(_checkpoint_name(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensor {shown}{more}")


def _checkpoint_name(name: str) -> str:
    """Our parameter name back to the checkpoint's, for error messages."""
    if name.endswith(".encoder_layer_scalar"):
        return "model.encoder.language_model." + name.replace("encoder_layer_scalar", "layer_scalar")
    return "model.decoder." + name
