"""load_checkpoint on good and broken checkpoint directories saved by transformers."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
)

from engine.config import DiffusionDefaults
from engine.model.loader import CheckpointError, load_checkpoint
from tests.engine.checkpoints import CHAT_TEMPLATE, rewrite_json, save_reference, save_tokenizer

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good")
    save_reference(path)
    return path


@pytest.fixture
def copy(good: Path, tmp_path: Path) -> Path:
    """A private copy of the good checkpoint, for one test to break."""
    return Path(shutil.copytree(good, tmp_path / "checkpoint"))


def rewrite_weights(path: Path, edit: Callable[[dict[str, Tensor]], None]) -> None:
    """Edit model.safetensors' tensors; written to a new file first, since load_file maps the old one."""
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / "edited.safetensors", metadata={"format": "pt"})
    os.replace(path / "edited.safetensors", path / WEIGHTS)


def load(path: Path, **kwargs: Any) -> Any:
    return load_checkpoint(path, **({"with_tokenizer": False} | kwargs))


def load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load(path)
    return str(info.value)


# --- good checkpoints -----------------------------------------------------------------------------------


def test_vision_weights_are_present_and_skipped(good: Path) -> None:
    with safe_open(str(good / WEIGHTS), framework="pt") as f:
        names = list(f.keys())
    assert any(n.startswith("model.encoder.vision_tower.") for n in names)
    assert any(n.startswith("model.encoder.embed_vision.") for n in names)
    model = load(good).model
    assert not [n for n, _ in model.named_parameters() if "vision" in n]


def test_weights_and_both_layer_scalars_are_loaded(good: Path) -> None:
    model = load(good).model
    tensors = load_file(good / WEIGHTS)
    assert torch.equal(model.embed_tokens.weight, tensors["model.decoder.embed_tokens.weight"])
    for i, layer in enumerate(model.layers):
        assert torch.equal(layer.layer_scalar, tensors[f"model.decoder.layers.{i}.layer_scalar"])
        encoder_scalar = tensors[f"model.encoder.language_model.layers.{i}.layer_scalar"]
        assert torch.equal(layer.encoder_layer_scalar, encoder_scalar)
        assert not torch.equal(layer.layer_scalar, layer.encoder_layer_scalar)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_model_is_frozen_materialised_and_in_dtype(good: Path, dtype: torch.dtype) -> None:
    model = load(good, dtype=dtype).model
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    assert {n for n, p in params.items() if p.dtype != dtype} == set()
    assert {n for n, p in params.items() if p.requires_grad} == set()
    assert {n for n, t in (params | buffers).items() if t.is_meta} == set()
    assert not model.training


def test_bf16_layer_scalars_load_into_an_fp32_model(copy: Path) -> None:
    def to_bf16(tensors: dict[str, Tensor]) -> None:
        for name in [n for n in tensors if n.endswith("layer_scalar")]:
            tensors[name] = tensors[name].to(torch.bfloat16)

    rewrite_weights(copy, to_bf16)
    stored = load_file(copy / WEIGHTS)
    assert stored["model.decoder.layers.1.layer_scalar"].dtype == torch.bfloat16
    model = load(copy).model
    for i, layer in enumerate(model.layers):
        assert layer.layer_scalar.dtype == torch.float32
        assert torch.equal(layer.layer_scalar, stored[f"model.decoder.layers.{i}.layer_scalar"].float())


def test_sharded_checkpoint_loads_like_the_single_file(good: Path, tmp_path: Path) -> None:
    save_reference(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    sharded, single = load(tmp_path).model.state_dict(), load(good).model.state_dict()
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[n], single[n]) for n in single)


# --- broken checkpoints ---------------------------------------------------------------------------------


def drop_tensor(name: str) -> Callable[[Path], None]:
    def drop(tensors: dict[str, Tensor]) -> None:
        del tensors[name]

    return lambda path: rewrite_weights(path, drop)


def reshape_up_proj(path: Path) -> None:
    name = "model.decoder.layers.0.mlp.up_proj.weight"
    rewrite_weights(path, lambda tensors: tensors.update({name: tensors[name][:95].clone()}))


def set_text(**values: Any) -> Callable[[Path], None]:
    return lambda path: rewrite_json(path / "config.json", lambda data: data["text_config"].update(values))


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "no config.json": (lambda path: (path / "config.json").unlink(), "config.json is missing from"),
    "config.json not JSON": (
        lambda path: (path / "config.json").write_text('{"model_type": '),
        "config.json is not valid JSON",
    ),
    "no weights": (
        lambda path: (path / WEIGHTS).unlink(),
        "no weights in {path}: expected model.safetensors or model.safetensors.index.json",
    ),
    "missing decoder tensor": (
        drop_tensor("model.decoder.layers.1.router.per_expert_scale"),
        "checkpoint is missing tensor model.decoder.layers.1.router.per_expert_scale",
    ),
    "missing encoder scalar": (
        drop_tensor("model.encoder.language_model.layers.0.layer_scalar"),
        "checkpoint is missing tensor model.encoder.language_model.layers.0.layer_scalar",
    ),
    "unused tensor": (
        lambda path: rewrite_weights(
            path, lambda tensors: tensors.update({"model.decoder.layers.0.mlp.extra.weight": torch.ones(2)})
        ),
        "checkpoint tensor model.decoder.layers.0.mlp.extra.weight is not used by the model",
    ),
    "unsupported weight format": (
        lambda path: rewrite_json(
            path / "config.json", lambda data: data.update(quantization_config={"quant_method": "nope"})
        ),
        "config.json: quantization_config.quant_method 'nope' is not supported",
    ),
    "mis-shaped tensor": (
        reshape_up_proj,
        "tensor model.decoder.layers.0.mlp.up_proj.weight has shape (95, 64); expected (96, 64)",
    ),
    "unsupported architecture": (
        lambda path: rewrite_json(
            path / "config.json",
            lambda data: data.update(model_type="gemma4", architectures=["Gemma4ForCausalLM"]),
        ),
        "unsupported architecture: model_type='gemma4', architectures=['Gemma4ForCausalLM']",
    ),
    "unsupported rope_type": (
        set_text(rope_parameters={"sliding_attention": {"rope_type": "yarn", "rope_theta": 1e4}}),
        "rope_type 'yarn' for sliding_attention is not supported",
    ),
    "unsupported activation": (
        set_text(hidden_activation="silu"),
        "hidden_activation 'silu' is not supported",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoint_names_the_culprit(copy: Path, case: str) -> None:
    breaker, message = BROKEN[case]
    breaker(copy)
    assert message.format(path=copy) in load_error(copy)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    save_reference(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    assert f"shard {shard} listed in model.safetensors.index.json is missing" in load_error(tmp_path)


def test_config_errors_name_the_config_file(copy: Path) -> None:
    set_text(top_k_experts=9)(copy)
    assert re.search(rf"{re.escape(str(copy / 'config.json'))}: top_k_experts=9", load_error(copy))


# --- tokenizer ------------------------------------------------------------------------------------------


def test_tokenizer_and_chat_template_come_from_the_checkpoint(copy: Path) -> None:
    save_tokenizer(copy)
    template = CHAT_TEMPLATE.replace("<|turn>", "<|start|>")  # proves chat_template.jinja is read
    (copy / "chat_template.jinja").write_text(template)
    tokenizer = load_checkpoint(copy).tokenizer
    ids = tokenizer.encode("Hi there!", add_special_tokens=False)
    assert len(ids) == len("Hi there!")
    assert tokenizer.decode(ids) == "Hi there!"
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|start|>user\nhi<turn|>\n<|start|>model\n"


def test_missing_tokenizer_is_named_unless_not_wanted(good: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape("tokenizer.json is missing")):
        load_checkpoint(good)
    assert load_checkpoint(good, with_tokenizer=False).tokenizer is None


# --- generation_config.json -----------------------------------------------------------------------------

REFERENCE_DEFAULTS = (48, 0.1, 0.4, 0.8, 1, 0.005, 256)


def fields(defaults: DiffusionDefaults) -> tuple[Any, ...]:
    return (
        defaults.max_denoising_steps,
        defaults.entropy_bound,
        defaults.t_min,
        defaults.t_max,
        defaults.stability_threshold,
        defaults.confidence_threshold,
        defaults.max_new_tokens,
    )


def test_generation_config_of_nulls_gives_reference_defaults(good: Path) -> None:
    written = json.loads((good / "generation_config.json").read_text())
    assert written["max_denoising_steps"] is None and written["sampler_config"] is None
    defaults = load(good).defaults
    assert fields(defaults) == REFERENCE_DEFAULTS
    assert defaults.eos_token_ids == (1,)  # from config.json


def test_generation_config_values_are_read(copy: Path) -> None:
    DiffusionGemmaGenerationConfig(
        max_denoising_steps=32,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.3),
        t_min=0.3,
        t_max=0.9,
        stability_threshold=2,
        confidence_threshold=0.01,
        max_new_tokens=128,
        eos_token_id=[1, 106, 50],
    ).save_pretrained(copy)
    written = json.loads((copy / "generation_config.json").read_text())
    assert written["sampler_config"] == {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.3}
    defaults = load(copy).defaults
    assert fields(defaults) == (32, 0.3, 0.3, 0.9, 2, 0.01, 128)
    assert defaults.eos_token_ids == (1, 106, 50)


def test_no_generation_config_gives_reference_defaults(copy: Path) -> None:
    (copy / "generation_config.json").unlink()
    defaults = load(copy).defaults
    assert fields(defaults) == REFERENCE_DEFAULTS
    assert defaults.eos_token_ids == (1,)


# --- memory ---------------------------------------------------------------------------------------------

MB = 2**20
BUILD = """
import sys
from pathlib import Path
from tests.engine.checkpoints import save_reference
save_reference(Path(sys.argv[1]), hidden_size=256, vocab_size=81920)
"""
# Loads once to warm up (torch's one-time lazy set-up on the first module built, about 70 MB of anonymous
# memory, is not the loader's), then for each dtype: says "ready", waits for a line, loads, says "done",
# waits for a line and frees the model.
MEASURED = """
import gc, sys, torch
from engine.model.loader import load_checkpoint
def load(dtype):
    return load_checkpoint(sys.argv[1], dtype=dtype, with_tokenizer=False).model
load(torch.float32)
gc.collect()
for name in sys.argv[2:]:
    print("ready", flush=True)
    sys.stdin.readline()
    model = load(getattr(torch, name))
    print("done", flush=True)
    sys.stdin.readline()
    del model
    gc.collect()
"""


def rss_anon(pid: int) -> int:
    """Resident anonymous memory of `pid` in bytes: heap and copies, not the mapped checkpoint's pages
    (those are page cache the kernel can drop, and are shared with every other reader of the file)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/<pid>/status")


def peak_increase(proc: subprocess.Popen[str]) -> int:
    """Peak RssAnon increase of the child over one load, sampled from this process every ~1 ms.

    Sampling from outside the child is not held up by the child's GIL, so a copy made by native code
    that holds it is still seen, and the sampler's own allocations are not counted.
    """
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    base = peak = rss_anon(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    while not select.select([proc.stdout], [], [], 0.001)[0]:
        peak = max(peak, rss_anon(proc.pid))
    peak = max(peak, rss_anon(proc.pid))
    assert proc.stdout.readline().strip() == "done"
    proc.stdin.write("next\n")
    proc.stdin.flush()
    return peak - base


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_load_does_not_hold_two_copies(tmp_path: Path) -> None:
    """An ~84 MB checkpoint (80 MB of it the embedding) loaded in fp32 and in bf16 adds less than
    1.3 x its weight bytes + 40 MB of anonymous memory. fp32 -> fp32 keeps the weights in the file's
    mapped pages (~0 MB); fp32 -> bf16 casts tensor by tensor from the mapping (~0.5 x). A loader that
    read the file into memory and then copied it into tensors would add ~2 x and fail."""
    subprocess.run([sys.executable, "-c", BUILD, str(tmp_path)], cwd=ROOT, check=True, capture_output=True)
    weight_bytes = (tmp_path / WEIGHTS).stat().st_size  # tensor bytes plus a header of a few kB
    assert 60 * MB < weight_bytes < 100 * MB
    limit = 1.3 * weight_bytes + 40 * MB
    dtypes = ["float32", "bfloat16"]
    proc = subprocess.Popen(
        [sys.executable, "-c", MEASURED, str(tmp_path), *dtypes],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        increases = {dtype: peak_increase(proc) for dtype in dtypes}
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    for dtype, increase in increases.items():
        assert increase < limit, (
            f"{dtype}: loading added {increase / MB:.1f} MB of anonymous memory for a "
            f"{weight_bytes / MB:.1f} MB checkpoint (limit {limit / MB:.1f} MB)"
        )
