"""The per-step cost of LoRA: a mixed batch of 4 adapters + the base against the base alone.

What it measures: one denoise step's forward on the bench model (`bench/forward.py`'s ~100M-parameter
DiffusionGemma with the real model's proportions), `--canvases` canvases per request, each with a
self-conditioning input and its request's prompt already in the paged cache, then the tied LM head
over every canvas token. Five requests per step, timed interleaved in the same run:
- `plain`: the engine's model without LoRA (`enable_lora` off), every request on the base;
- `lora, base only`: the same batch on a model with LoRA enabled (4 slots), no request using an
  adapter (what a server with adapters loaded pays when a step has none: should be nothing);
- `lora, 4 adapters + base`: requests 1-4 each on its own adapter, request 5 on the base.
The LoRA cases include what the runner does per step: the slots check and the `LoRAIndex` (one
host-to-device copy). Adapters are random, rank `--rank`, on every linear of both sides (attention
q/k/v/o, dense MLP, self-conditioning MLP); `--targets all` adds the router and the experts.

Run: `python bench/lora.py --threads 1` (add `--json /tmp/lora.json`), or `--quick` for a smoke check.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import load_average, machine_header, save_random_checkpoint
from bench.forward import CANVAS_LENGTH, FULL_TEXT, QUICK_TEXT, SEED, plan_cache
from bench.timing import time_interleaved
from engine.attention.types import Segment
from engine.lora.manager import LoRAManager
from engine.lora.targets import ExpertsTarget, Target, decoder_only, model_targets
from engine.model.cache_tensors import allocate_layer_caches
from engine.model.diffusion_gemma import DiffusionGemma, ForwardBatch
from engine.model.loader import load_checkpoint
from engine.sampler import LMHead, logits_for

NUM_ADAPTERS = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Per-step cost of a mixed LoRA batch against the base.")
    parser.add_argument("--canvases", type=int, default=1, help="canvases per request (5 requests)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", choices=["linear", "all"], default="linear")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny config for a smoke check")
    return parser.parse_args(argv)


def peft_name(target: str, side: int) -> str:
    """Our target name and side -> the PEFT module name of the transformers model."""
    if side == 0:
        return f"model.encoder.language_model.{target}"
    return f"model.decoder.{target}"


def save_adapter(path: Path, targets: dict[str, Target], rank: int, seed: int, with_experts: bool) -> None:
    """A random PEFT-format adapter of `rank` on the chosen targets, both sides."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    modules = []
    for name, target in targets.items():
        is_experts = isinstance(target, ExpertsTarget)
        if (is_experts or name.endswith("router.proj")) and not with_experts:
            continue
        for side in (0, 1):
            if side == 0 and decoder_only(name):
                continue
            module = peft_name(name.rpartition(".")[0] if is_experts else name, side)
            if is_experts and name.endswith("gate_up_proj"):
                module += ".base_layer"
            num = target.num_experts if isinstance(target, ExpertsTarget) else 1
            a = 0.02 * torch.randn(num * rank, target.in_features, generator=gen)
            b = 0.02 * torch.randn(target.out_features, num * rank, generator=gen)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
            modules.append(name)
    path.mkdir(parents=True)
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(set(modules))}
    (path / "adapter_config.json").write_text(json.dumps(config))


def batch_of(
    ids: Tensor, start: int, is_causal: bool, tables: list[dict[str, list[int]]], soft: Tensor | None
) -> ForwardBatch:
    num_rows, length = ids.shape
    return ForwardBatch(
        input_ids=ids.flatten(),
        positions=torch.arange(start, start + length).repeat(num_rows),
        segments=[Segment(length, start, is_causal, table) for table in tables],
        soft_embeds=soft,
    )


class Case:
    """One model with its caches, prefilled for the step's requests, and the step to time."""

    def __init__(
        self,
        model: DiffusionGemma,
        manager: LoRAManager | None,
        load_ids: list[int | None],
        args: argparse.Namespace,
    ) -> None:
        config, weight = model.config, model.embed_tokens.weight
        self.model, self.manager = model, manager
        num = len(load_ids) * args.canvases
        self.load_ids = [i for i in load_ids for _ in range(args.canvases)]  # one segment per canvas
        gen = torch.Generator().manual_seed(SEED)
        prompts = torch.randint(3, config.vocab_size, (num, args.prompt_len), generator=gen)
        canvases = torch.randint(0, config.vocab_size, (num, CANVAS_LENGTH), generator=gen)
        soft = torch.randn(num * CANVAS_LENGTH, config.hidden_size, generator=gen).to(weight.dtype)
        blocks, tables = plan_cache(config, num, args.prompt_len + CANVAS_LENGTH)
        self.caches = allocate_layer_caches(config, blocks, 16, weight.dtype, weight.device)
        self.head = LMHead(weight, config.final_logit_softcapping, model.embed_scale)
        prefill = batch_of(prompts, 0, True, tables, None)
        with torch.inference_mode(), self._bound(prefill):
            model(prefill, self.caches)
        self.batch = batch_of(canvases, args.prompt_len, False, tables, soft)

    def _bound(self, batch: ForwardBatch) -> Any:
        if self.manager is None:
            return nullcontext()
        return self.manager.bind(batch.segments, self.load_ids)

    @torch.inference_mode()
    def step(self) -> list[Tensor]:
        with self._bound(self.batch):
            hidden = self.model(self.batch, self.caches)  # (N * C, H)
        return [logits_for(tile, self.head) for tile in hidden.split(CANVAS_LENGTH)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_header() | {k: v for k, v in vars(args).items() if k != "json"}
    print("  ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_random_checkpoint(root / "base", QUICK_TEXT if args.quick else FULL_TEXT, CANVAS_LENGTH, SEED)
        plain = load_checkpoint(root / "base", with_tokenizer=False).model
        lora_model = load_checkpoint(root / "base", with_tokenizer=False).model
        manager = LoRAManager(lora_model, NUM_ADAPTERS, args.rank, NUM_ADAPTERS)
        targets = model_targets(plain)
        ids = []
        for i in range(NUM_ADAPTERS):
            save_adapter(root / f"a{i}", targets, args.rank, SEED + i, args.targets == "all")
            ids.append(manager.add(f"a{i}", root / f"a{i}").load_id)
    base_ids: list[int | None] = [None] * (NUM_ADAPTERS + 1)
    mixed_ids: list[int | None] = [*ids, None]
    cases = {
        "plain": Case(plain, None, base_ids, args),
        "lora, base only": Case(lora_model, manager, base_ids, args),
        "lora, 4 adapters + base": Case(lora_model, manager, mixed_ids, args),
    }
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(cases["plain"].step(), cases["lora, base only"].step(), strict=True)
    )
    print(f"base only with LoRA enabled vs plain: max_abs_diff={diff:.3e}", flush=True)
    steps: list[Callable[[], Any]] = [c.step for c in cases.values()]
    timings = time_interleaved(steps, args.warmup, args.reps)
    medians = {name: statistics.median(t.wall) * 1e3 for name, t in zip(cases, timings, strict=True)}
    bests = {name: min(t.wall) * 1e3 for name, t in zip(cases, timings, strict=True)}
    plain_ms = medians["plain"]
    print(
        f"\n{'case':>26} | {'median ms':>9} | {'best ms':>8} | "
        f"{'vs plain (median)':>17} | {'vs plain (best)':>15}"
    )
    for name in cases:
        print(
            f"{name:>26} | {medians[name]:>9.1f} | {bests[name]:>8.1f} | "
            f"{medians[name] / plain_ms - 1:>+16.1%} | {bests[name] / bests['plain'] - 1:>+14.1%}"
        )
    print(
        f"{NUM_ADAPTERS + 1} requests x {args.canvases} canvas(es) of {CANVAS_LENGTH}; "
        f"load average now {load_average()}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"header": info, "median_ms": medians, "best_ms": bests, "max_abs_diff": diff}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
