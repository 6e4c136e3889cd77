"""The CPU's bf16 fast paths on vs off, in one run: the prepacked LM head, the grouped experts and the
soft-cap table.

What it times, each pair interleaved (on, off, on, off, ...) so that other load hits both alike:
1. the tied LM head of one canvas, `hidden [256, H] @ weight.T`: `F.linear` against oneDNN's prepacked
   weight (`engine.kernels.packed_linear`, what `LMHead.prepacked` gives the runner), for the bench
   model's head (V 32,768, H 512) and the released model's (V 262,144, H 2,816; 1.5 GB of bf16);
2. one layer's MoE experts on a step's tokens: the reference loop over experts against torch's grouped
   fallback (`GroupedExperts`, selected for bf16 on the CPU), at the bench model's shapes (16 experts,
   top-4, 512 wide) and the released model's proportions (128 experts, top-8, H 2,816, I 704);
3. the soft-cap of raw bf16 logits, as the compiled engine's table lookup
   (`engine.kernels.softcap_table`) against the reference's ops, for one canvas and for one of the
   sampler's row tiles of the bench model's vocabulary, for both heads' vocabularies;
4. the whole denoise forward (`bench/forward.py`: trunk + softcapped fp32 logits) of the bench model
   and of the shipped Sudoku model (`models/sudoku`, bf16, prompts of one canvas's length), the engine's
   selection against both paths switched off (looped experts, unpacked head);
5. the bench model's forward with compiled layers (`--compile`): the engine's choice (grouped experts
   inside the layer graph, the soft-cap table) against looped experts outside it and the soft-cap's ops;
6. the Sudoku model's forward with compiled layers: its 4 experts grouped (top-2, the engine's choice
   on the CPU) against dense (every expert on every token, what `compile_layers` chose before).
Outputs are compared where the paths must agree: the head and the soft-cap bit for bit, the experts
and the forward as a max abs difference (the grouped fallback rounds its bf16 matmuls differently).

Run: `python bench/cpu_paths.py --threads 2` (about 4 minutes on the 2-core Xeon), or
`--quick` for a smoke check of a few seconds.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import forward
from bench.common import experts_in, load_average, start
from bench.timing import median_ms
from engine.kernels.grouped_experts import grouped_experts
from engine.kernels.packed_linear import pack_weight, packed_linear, packs
from engine.kernels.softcap_table import build_table, table_softcap
from engine.model.compiled import compile_layers
from engine.model.diffusion_gemma import DiffusionGemma
from engine.model.loader import load_checkpoint
from engine.model.methods.base import ExpertsMethod
from engine.model.methods.plain import DenseExperts, LoopedExperts, looped_experts
from engine.sampler import TILE_BYTES, LMHead, softcap
from service.default_model import default_model_dir

CANVAS = 256
SAMPLER_TILE_ROWS = TILE_BYTES // (4 * 32768)
"""Rows of one of the CPU sampler's tiles at the bench model's vocabulary (8)."""
HEADS = {"bench model (V 32768, H 512)": (32768, 512), "released model (V 262144, H 2816)": (262144, 2816)}
EXPERTS = {
    "bench model (16 experts, top-4, H 512, I 512)": (16, 4, 512, 512),
    "released proportions (128 experts, top-8, H 2816, I 704)": (128, 8, 2816, 704),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The CPU's bf16 fast paths on vs off.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--reps", type=int, default=7, help="timed calls of each side (median reported)")
    parser.add_argument("--canvases", type=int, nargs="+", default=[1, 4, 16], help="canvases per step")
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke check")
    return parser.parse_args(argv)


def row(label: str, on_ms: float, off_ms: float, diff: str) -> str:
    return f"{label:<62} | {on_ms:9.2f} | {off_ms:9.2f} | {off_ms / on_ms:6.2f}x | {diff}"


def head_case(name: str, vocab: int, hidden: int, reps: int) -> str:
    weight = (torch.randn(vocab, hidden) * 0.02).bfloat16()
    x = torch.randn(CANVAS, hidden).bfloat16()
    packed = pack_weight(weight)
    on, off = median_ms([lambda: packed_linear(x, packed), lambda: F.linear(x, weight)], reps)
    same = torch.equal(packed_linear(x, packed), F.linear(x, weight))
    return row(f"LM head, one canvas, {name}", on, off, f"bit-identical: {same}")


def softcap_case(name: str, vocab: int, rows: int, reps: int) -> str:
    raw = (torch.randn(rows, vocab) * 20).bfloat16()
    cap = forward.FULL_TEXT["final_logit_softcapping"]
    head = LMHead.tied(torch.zeros(vocab, 8, dtype=torch.bfloat16), cap)
    table = build_table(cap)

    def on() -> Tensor:
        return table_softcap(raw, table)

    def off() -> Tensor:
        return softcap(raw, head)

    on_ms, off_ms = median_ms([on, off], reps)
    same = torch.equal(on().view(torch.int32), off().view(torch.int32))
    return row(f"soft-cap, {rows} rows, {name}", on_ms, off_ms, f"bit-identical: {same}")


def routing(tokens: int, num: int, k: int) -> tuple[Tensor, Tensor]:
    weights, ids = torch.topk(torch.randn(tokens, num).softmax(-1), k)  # (T, k) x2
    return weights / weights.sum(-1, keepdim=True), ids


def experts_case(name: str, shape: tuple[int, int, int, int], canvases: int, reps: int) -> str:
    num, k, hidden, inter = shape
    gate_up = (torch.randn(num, 2 * inter, hidden) * 0.02).bfloat16()
    down = (torch.randn(num, hidden, inter) * 0.02).bfloat16()
    x = torch.randn(canvases * CANVAS, hidden).bfloat16()
    weights, ids = routing(x.shape[0], num, k)

    def grouped() -> Tensor:
        return grouped_experts(x, weights, ids, gate_up, down)

    def looped() -> Tensor:
        return looped_experts(x, weights, ids, gate_up, down)

    on, off = median_ms([grouped, looped], reps)
    diff = f"max abs diff {float((grouped().float() - looped().float()).abs().max()):.2e}"
    return row(f"one layer's experts, {canvases} canvases, {name}", on, off, diff)


def forward_case(
    model: DiffusionGemma,
    name: str,
    canvases: int,
    prompt_len: int,
    reps: int,
    compiled: bool = False,
    off_experts: type[ExpertsMethod] = LoopedExperts,
) -> str:
    """The engine's choice against the plain paths: eager, the head unpacked and the experts looped;
    compiled (compile `model` first), the soft-cap's ops and the experts looped outside the graph.
    `off_experts=DenseExperts` times only the experts: the same head on both sides, dense experts off."""
    config = model.config
    gen = torch.Generator().manual_seed(canvases)
    prompts = torch.randint(3, config.vocab_size, (canvases, prompt_len), generator=gen)
    noisy = torch.randint(0, config.vocab_size, (canvases, config.canvas_length), generator=gen)
    batch, caches, head = forward.prepare_ours(model, prompts, noisy, compiled=compiled)
    off_head = _plain_head(head, compiled) if off_experts is LoopedExperts else head

    def on() -> list[Tensor]:
        return forward.our_forward(model, batch, caches, head)

    def off() -> list[Tensor]:
        with experts_in(model, off_experts):
            return forward.our_forward(model, batch, caches, off_head)

    on_ms, off_ms = median_ms([on, off], reps)
    diff = max(float((a - b).abs().max()) for a, b in zip(on(), off(), strict=True))
    kind = "compiled forward" if compiled else "forward"
    label = f"{name}'s {kind}, {canvases} canvases"
    if off_experts is LoopedExperts:
        label += f" (head packed: {head.packed is not None})"
    else:
        label += ", grouped vs dense experts"
    return row(label, on_ms, off_ms, f"max abs logit diff {diff:.2e}")


def _plain_head(head: LMHead, compiled: bool) -> LMHead:
    """The head without the engine's fast path: compiled, without the soft-cap table; eager, unpacked."""
    return replace(head, table=None) if compiled else LMHead(head.weight, head.softcap, head.embed_scale)


def cases(args: argparse.Namespace) -> Iterator[str]:
    shrink = 8 if args.quick else 1
    for name, (vocab, hidden) in HEADS.items():
        yield head_case(name, vocab // shrink**2, hidden // shrink, args.reps)
    for name, (num, k, hidden, inter) in EXPERTS.items():
        for canvases in args.canvases:
            yield experts_case(name, (num, k, hidden // shrink, inter // shrink), canvases, args.reps)
    for (name, (vocab, _)), rows in itertools.product(HEADS.items(), (CANVAS, SAMPLER_TILE_ROWS)):
        yield softcap_case(name, vocab // shrink**2, rows, args.reps)
    model = forward.bench_model(args.quick, torch.bfloat16)
    for canvases in args.canvases:
        yield forward_case(model, "bench model", canvases, 128, args.reps)
    sudoku = load_checkpoint(default_model_dir(), dtype=torch.bfloat16, with_tokenizer=False).model
    for canvases in args.canvases:
        yield forward_case(sudoku, "Sudoku model", canvases, sudoku.config.canvas_length, args.reps)
    compile_layers(model)
    for canvases in args.canvases:
        yield forward_case(model, "bench model", canvases, 128, args.reps, compiled=True)
    torch._dynamo.reset()  # the bench model's graphs would fill dynamo's cache for the shared functions
    compile_layers(sudoku)
    for canvases in args.canvases:
        length = sudoku.config.canvas_length
        yield forward_case(sudoku, "Sudoku model", canvases, length, args.reps, True, DenseExperts)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start(args.threads)
    if not packs(torch.zeros(1, 1, dtype=torch.bfloat16)):
        print("this CPU's oneDNN has no bf16 support: the engine packs nothing here")
        return 1
    print(f"{'case':<62} | {'on ms':>9} | {'off ms':>9} | {'gain':>7} | agreement", flush=True)
    for line in cases(args):
        print(line, flush=True)
    print(
        "on: prepacked head / grouped experts / soft-cap table; off: F.linear / the loop / the soft-cap's "
        f"ops; load average {load_average()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
