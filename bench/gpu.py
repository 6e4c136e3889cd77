"""GPU benchmark of the full 26B-A4B shape with random bf16 weights (issue 8). Needs one CUDA device.

No checkpoint files: `DiffusionGemma` is built directly on the GPU from the 26B-A4B text config
(docs: /work/shared/reference/diffusiongemma.md §2.4), weights drawn N(0, 0.02), norms 1. Measures:

- matmul peak: the fastest bf16 8192^3 `torch.mm` (the denominator of every TFLOP/s figure);
- denoise step at 1, 4, 16, 32 canvases, each reading a `--prompt` token prompt already in the cache:
  one model forward over the flat batch plus `denoise_step` (LM head and sampler), median of `--reps`
  CUDA-synchronised runs; with the Triton kernels (the default dispatch) and, for comparison, with the
  torch reference (`dispatch.force(False)`: attention and experts) at the smaller batches;
- one layer's MoE experts on the step's tokens: grouped matmuls vs the reference loop over experts;
- committed tok/s at 16 fixed steps per canvas (vLLM's published setting): N * 256 tokens per
  (16 denoise steps + one commit forward of the N canvases);
- time to first token of a 4,096-token prompt at batch 1: prefill (one causal forward) + 16 steps + commit;
- peak memory per concurrent request: (peak allocated during a step at N - memory held before) / N,
  with the KV cache sized for the prompt and one canvas of each request;
- achieved TFLOP/s: `bench.flops.forward_flops` (matmuls only) plus the LM head / soft-embedding
  matmuls of the sampler, over the step time.

    python bench/gpu.py --json bench/gpu.json    # on one H200
    python bench/gpu.py --smoke                  # the same code paths, tiny model, CPU, seconds

Prints a table and writes JSON; copy the figures into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import experts_in
from bench.flops import forward_flops
from engine.attention.types import LayerCache, Segment
from engine.config import ModelConfig
from engine.kernels import dispatch
from engine.kernels.grouped_experts import grouped_experts
from engine.model.cache_tensors import allocate_layer_caches
from engine.model.diffusion_gemma import DiffusionGemma, ForwardBatch
from engine.model.methods.plain import looped_experts
from engine.model.methods.selection import select_weight_methods
from engine.request import StepParams
from engine.sampler import CanvasState, LMHead, denoise_step, init_canvas
from recipes.reference_config import DIFFUSIONGEMMA_26B_TEXT

TEXT_26B: dict[str, Any] = DIFFUSIONGEMMA_26B_TEXT
# `--smoke`: the same code paths on a tiny model on the CPU (torch reference path), to check the script.
TEXT_SMOKE: dict[str, Any] = TEXT_26B | dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=6,
    layer_types=TEXT_26B["layer_types"][:6],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_global_key_value_heads=1,
    global_head_dim=32,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=32,
    sliding_window=8,
)
BLOCK_SIZE = 16
FIXED_STEPS = 16
DEVICE = torch.device("cuda")


def model_config(smoke: bool) -> ModelConfig:
    return ModelConfig.from_hf(
        {
            "model_type": "diffusion_gemma",
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "canvas_length": 16 if smoke else 256,
            "text_config": TEXT_SMOKE if smoke else TEXT_26B,
        }
    )


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def random_model(config: ModelConfig) -> DiffusionGemma:
    """The model in bf16 on the GPU, built there (no fp32 copy: 25B parameters are 50 GB in bf16)."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with DEVICE:
            model = DiffusionGemma(config, select_weight_methods(None, config, DEVICE, torch.bfloat16))
    finally:
        torch.set_default_dtype(torch.float32)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for param in model.parameters():
        if param.dim() >= 2:
            param.normal_(0.0, 0.02, generator=gen)
        else:
            param.fill_(1.0)
    model.reset_rope_buffers(DEVICE)
    return model.eval()


def sync_time(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median seconds of `fn` over `reps` runs, synchronising the device around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_tflops(n: int, reps: int = 20) -> float:
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    best = min(sync_time(lambda: torch.mm(a, b), reps=1, warmup=0) for _ in range(reps))
    return 2 * n**3 / best / 1e12


class Bench:
    """N requests with a prompt in the cache and one canvas each, over one set of paged caches."""

    def __init__(self, model: DiffusionGemma, num_requests: int, prompt_len: int) -> None:
        config = model.config
        self.model, self.config, self.prompt_len = model, config, prompt_len
        self.canvas = config.canvas_length
        blocks_per_request = -(-(prompt_len + self.canvas) // BLOCK_SIZE)
        num_blocks = {kind: num_requests * blocks_per_request for kind in set(config.layer_kinds)}
        self.caches: list[LayerCache] = allocate_layer_caches(
            config, num_blocks, BLOCK_SIZE, torch.bfloat16, DEVICE
        )
        self.tables = [
            {kind: list(range(r * blocks_per_request, (r + 1) * blocks_per_request)) for kind in num_blocks}
            for r in range(num_requests)
        ]
        self.head = LMHead(model.embed_tokens.weight, config.final_logit_softcapping, model.embed_scale)
        self.params = StepParams(
            max_steps=FIXED_STEPS,
            t_min=0.4,
            t_max=0.8,
            entropy_bound=0.1,
            stability_threshold=1,
            confidence_threshold=-1.0,  # never stop early: fixed steps
        )
        self.states: list[CanvasState] = []

    def forward(
        self, segments: list[Segment], tokens: torch.Tensor, soft: torch.Tensor | None
    ) -> torch.Tensor:
        positions = torch.cat([torch.arange(s.start_pos, s.end_pos) for s in segments]).to(DEVICE)
        return self.model(ForwardBatch(tokens, positions, segments, soft), self.caches)

    def prefill(self) -> None:
        """Every request's prompt as one causal segment each, in one forward."""
        n = len(self.tables)
        segments = [Segment(self.prompt_len, 0, True, t) for t in self.tables]
        tokens = torch.randint(3, self.config.vocab_size, (n * self.prompt_len,), device=DEVICE)
        self.forward(segments, tokens, None)

    def new_canvases(self) -> None:
        self.states = [
            init_canvas(self.canvas, self.config.vocab_size, 1, torch.Generator(device=DEVICE).manual_seed(i))
            for i in range(len(self.tables))
        ]

    def step(self) -> None:
        """One denoise step of every canvas: forward over N bidirectional segments, then the sampler."""
        if any(s.step >= FIXED_STEPS for s in self.states):
            self.new_canvases()
        segments = [Segment(self.canvas, self.prompt_len, False, t) for t in self.tables]
        tokens = torch.cat([s.tokens for s in self.states])
        soft = None
        if self.states[0].self_cond is not None:
            soft = torch.cat([s.self_cond for s in self.states if s.self_cond is not None])
        hidden = self.forward(segments, tokens, soft)
        denoise_step(hidden, self.head, self.states, [self.params] * len(self.states))

    def commit(self) -> None:
        """The committed canvases as causal segments (writes the cache at [prompt, prompt + 256))."""
        segments = [Segment(self.canvas, self.prompt_len, True, t) for t in self.tables]
        self.forward(segments, torch.cat([s.argmax for s in self.states]), None)


def sampler_flops(config: ModelConfig, num_canvases: int) -> float:
    """LM head plus the soft-embedding matmul: 2 * 2 * V * H per canvas token."""
    return float(4 * config.vocab_size * config.hidden_size * config.canvas_length * num_canvases)


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0


@torch.no_grad()
def measure_batch(
    model: DiffusionGemma, n: int, prompt_len: int, reps: int, torch_ref: bool
) -> dict[str, Any]:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    held = allocated()
    bench = Bench(model, n, prompt_len)
    bench.prefill()
    bench.new_canvases()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = sync_time(bench.step, reps=reps, warmup=2)
    peak = (torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else 0) - held
    commit = sync_time(bench.commit, reps=max(1, reps // 3))
    flops = forward_flops(model.config, n, prompt_len) + sampler_flops(model.config, n)
    row: dict[str, Any] = {
        "canvases": n,
        "step_ms": step * 1e3,
        "step_ms_per_canvas": step * 1e3 / n,
        "commit_ms": commit * 1e3,
        "committed_tok_s": n * bench.canvas / (FIXED_STEPS * step + commit),
        "peak_gib_per_request": peak / n / 2**30,
        "tflops": flops / step / 1e12,
    }
    if torch_ref:
        with dispatch.force(False), experts_in(model):
            row["torch_step_ms"] = sync_time(bench.step, reps=max(1, reps // 2), warmup=1) * 1e3
    del bench
    return row | expert_times(model, n * model.config.canvas_length, reps)


@torch.no_grad()
def expert_times(model: DiffusionGemma, num_tokens: int, reps: int) -> dict[str, float]:
    """One layer's experts on `num_tokens` tokens: grouped matmuls vs the reference loop over experts."""
    layer = model.layers[0]
    gen = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    x = torch.randn(num_tokens, model.config.hidden_size, device=DEVICE, generator=gen).to(torch.bfloat16)
    weights, expert_ids = layer.router(x)
    experts = layer.experts
    grouped = sync_time(
        lambda: grouped_experts(x, weights, expert_ids, experts.gate_up_proj, experts.down_proj), reps
    )
    looped = sync_time(
        lambda: looped_experts(x, weights, expert_ids, experts.gate_up_proj, experts.down_proj), reps
    )
    return {"moe_grouped_ms": grouped * 1e3, "moe_loop_ms": looped * 1e3}


@torch.no_grad()
def time_to_first_token(model: DiffusionGemma, prompt_len: int, reps: int) -> dict[str, float]:
    bench = Bench(model, 1, prompt_len)
    prefill = sync_time(bench.prefill, reps=reps)
    bench.new_canvases()
    step = sync_time(bench.step, reps=reps, warmup=1)
    commit = sync_time(bench.commit, reps=reps)
    return {
        "prompt": prompt_len,
        "prefill_ms": prefill * 1e3,
        "step_ms": step * 1e3,
        "ttft_ms": (prefill + FIXED_STEPS * step + commit) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--canvases", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens in the cache per canvas")
    parser.add_argument("--ttft-prompt", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--torch-ref-max", type=int, default=4, help="also time the torch path up to N")
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script only")
    args = parser.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = torch.device("cpu")
        args.ttft_prompt, args.prompt = min(args.ttft_prompt, 64), min(args.prompt, 32)
    else:
        assert torch.cuda.is_available(), "bench/gpu.py needs a CUDA device (or --smoke on the CPU)"
        assert dispatch.use_kernels(DEVICE), "Triton is not importable: the kernels would not run"

    start = time.perf_counter()
    peak = matmul_peak_tflops(256 if args.smoke else 8192)
    model = random_model(model_config(args.smoke))
    weights_gib = allocated() / 2**30
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (smoke)"
    print(f"{name}: bf16 matmul peak {peak:.1f} TFLOP/s; weights {weights_gib:.1f} GiB")
    rows = []
    for n in args.canvases:
        try:
            row = measure_batch(model, n, args.prompt, args.reps, n <= args.torch_ref_max)
        except torch.OutOfMemoryError as error:
            row = {"canvases": n, "error": f"out of memory: {error}"}
        except Exception as error:
            # One failing batch (a kernel that does not compile on this GPU, say) must not cost the
            # rest of a scarce device run: the error is recorded and the next batch runs.
            row = {"canvases": n, "error": f"{type(error).__name__}: {error}"}
        row["mfu"] = row.get("tflops", 0.0) / peak
        rows.append(row)
        print(json.dumps(row))
    ttft = time_to_first_token(model, args.ttft_prompt, max(1, args.reps // 2))
    print_table(rows, ttft, peak)
    result = {
        "device": name,
        "torch": torch.__version__,
        "matmul_peak_tflops": peak,
        "weights_gib": weights_gib,
        "prompt": args.prompt,
        "fixed_steps": FIXED_STEPS,
        "batches": rows,
        "ttft": ttft,
        "wall_s": time.perf_counter() - start,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def print_table(rows: list[dict[str, Any]], ttft: dict[str, float], peak: float) -> None:
    header = ["N", "step ms", "ms/canvas", "torch ms", "tok/s@16", "GiB/req", "TFLOP/s", "MFU"]
    header += ["moe grp", "moe loop"]
    print("\n" + " ".join(f"{h:>9}" for h in header))
    for r in rows:
        if "error" in r:
            print(f"{r['canvases']:>9} {r['error'][:70]}")
            continue
        cells = [
            f"{r['canvases']}",
            f"{r['step_ms']:.1f}",
            f"{r['step_ms_per_canvas']:.1f}",
            f"{r['torch_step_ms']:.1f}" if "torch_step_ms" in r else "-",
            f"{r['committed_tok_s']:.0f}",
            f"{r['peak_gib_per_request']:.2f}",
            f"{r['tflops']:.1f}",
            f"{r['mfu']:.1%}",
            f"{r['moe_grouped_ms']:.2f}",
            f"{r['moe_loop_ms']:.2f}",
        ]
        print(" ".join(f"{c:>9}" for c in cells))
    print(
        f"TTFT, {ttft['prompt']}-token prompt: {ttft['ttft_ms']:.0f} ms (prefill {ttft['prefill_ms']:.0f} ms"
        f" + {FIXED_STEPS} x {ttft['step_ms']:.1f} ms + commit); matmul peak {peak:.0f} TFLOP/s"
    )


if __name__ == "__main__":
    main()
