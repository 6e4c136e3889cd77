"""`canvas-serve` command line. For now: `canvas-serve generate MODEL_DIR --prompt ...` (offline)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from engine.generate import generate
from engine.model.loader import CheckpointError, load_checkpoint
from engine.request import InvalidParams, SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canvas-serve", description="Serve block-diffusion language models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate offline from a checkpoint directory")
    gen.add_argument("model", help="DiffusionGemma checkpoint directory (Hugging Face format)")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None, help="max_denoising_steps")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def run_generate(args: argparse.Namespace) -> int:
    checkpoint = load_checkpoint(args.model, dtype=DTYPES[args.dtype], device=args.device)
    tokenizer = checkpoint.tokenizer
    assert tokenizer is not None  # load_checkpoint raises when the tokenizer files are missing
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        prompt = list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        )
    else:
        prompt = list(tokenizer(args.prompt).input_ids)
    params = SamplingParams(max_tokens=args.max_tokens, max_denoising_steps=args.steps, seed=args.seed)
    start = time.perf_counter()
    (result,) = generate(checkpoint.model, checkpoint.defaults, [prompt], params, tokenizer=tokenizer)
    elapsed = time.perf_counter() - start
    print(result.text)
    print(
        f"[{len(result.token_ids)} tokens, finish={result.finish_reason}, "
        f"steps per block={result.steps_per_block}, {elapsed:.2f}s]",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_generate(args)
    except (CheckpointError, InvalidParams) as err:
        print(f"canvas-serve: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
