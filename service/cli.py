"""`canvas-serve` command line: `serve [MODEL_DIR]` (the HTTP server) and `generate` (offline).

`serve` takes vLLM's flag names where they exist, so the model guide's `vllm serve ...` command
works with `canvas-serve serve` in its place.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import uvicorn
from pydantic import ValidationError

from engine import cpu_allocator
from engine.engine_config import DEFAULT_PREFILL_CHUNK, EngineConfig
from engine.generate import generate
from engine.model.loader import CheckpointError, load_checkpoint
from engine.request import InvalidParams, SamplingParams
from service.app import create_app
from service.model_setup import SetupError, build_service
from service.serving import Service
from service.settings import QUANTIZATION_CHOICES, LoRAModule, Settings

logger = logging.getLogger("canvas_serve")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LIMITS = EngineConfig()
"""The engine's default limits, for the help texts."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canvas-serve", description="Serve block-diffusion language models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _serve_parser(commands.add_parser("serve", help="run the OpenAI-compatible HTTP server"))
    _generate_parser(commands.add_parser("generate", help="generate offline from a checkpoint directory"))
    return parser


def _serve_parser(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "model", nargs="?", default=None, help="checkpoint directory (default: the embedded Sudoku model)"
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--served-model-name")
    serve.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        help="auto (default): bfloat16 on CUDA and on CPUs with AMX-BF16 or AVX512-BF16, else float32",
    )
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument(
        "--quantization",
        "-q",
        choices=QUANTIZATION_CHOICES,
        help="weight format (default: detected from the checkpoint); fp8 or int8 quantise a plain "
        "checkpoint at load",
    )
    serve.add_argument(
        "--max-num-seqs", type=int, help=f"requests running at once (default {LIMITS.max_num_seqs})"
    )
    serve.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="tokens per forward (default: room for every running canvas plus a "
        f"{DEFAULT_PREFILL_CHUNK}-token prompt chunk)",
    )
    serve.add_argument("--max-model-len", type=int, help="positions per request (default: the model's)")
    serve.add_argument(
        "--max-waiting",
        type=int,
        help="requests waiting to run at most; beyond it new requests get 429 with Retry-After "
        f"(default {LIMITS.max_waiting}; env CANVAS_SERVE_MAX_WAITING)",
    )
    serve.add_argument(
        "--max-num-queued-reqs", dest="max_waiting", type=int, help="old name of --max-waiting"
    )
    serve.add_argument(
        "--block-size", type=int, help=f"positions per KV cache block (default {LIMITS.block_size})"
    )
    serve.add_argument("--gpu-memory-utilization", type=float)
    serve.add_argument("--kv-cache-memory-gb", type=float)
    serve.add_argument("--generation-config", help="auto | vllm | a folder with generation_config.json")
    serve.add_argument("--diffusion-config", type=json.loads, help='JSON, e.g. {"canvas_length": 256}')
    serve.add_argument("--hf-overrides", type=json.loads, help='JSON, e.g. {"diffusion_entropy_bound": 0.1}')
    serve.add_argument("--canvas-length", type=int, help="must equal the checkpoint's canvas_length")
    serve.add_argument("--attention-backend", help="accepted for vLLM compatibility")
    serve.add_argument("--enable-chunked-prefill", action="store_true", default=None, help="always on")
    serve.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse the K/V of cached prompt prefixes and earlier turns (default on; "
        "env CANVAS_SERVE_ENABLE_PREFIX_CACHING)",
    )
    serve.add_argument(
        "--cache-final-canvas",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with prefix caching, write each ended request's last canvas into the cache so the next "
        "conversation turn hits the whole answer (default on; env CANVAS_SERVE_CACHE_FINAL_CANVAS)",
    )
    serve.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the model's layers through torch.compile: small models step faster on the CPU after "
        "compiling in a warm-up before serving (needs a C++ compiler; env CANVAS_SERVE_COMPILE)",
    )
    serve.add_argument(
        "--drain-timeout", dest="drain_timeout_s", type=float, help="seconds to drain on SIGTERM"
    )
    serve.add_argument(
        "--shutdown-timeout", dest="drain_timeout_s", type=float, help="alias of --drain-timeout"
    )
    serve.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engine in its own process (default; env CANVAS_SERVE_ENGINE_PROCESS); "
        "--no-engine-process: in a thread of the API process",
    )
    serve.add_argument(
        "--engine-threads",
        type=int,
        help="torch threads of each engine process (default: the usable cores but one, shared out among "
        "the engine processes, at least 1 each)",
    )
    serve.add_argument(
        "--cpu-allocator",
        choices=cpu_allocator.CHOICES,
        help="malloc of the engine processes on the CPU: auto (default; env CANVAS_SERVE_CPU_ALLOCATOR) "
        "preloads tcmalloc where installed, else glibc's; system: glibc's",
    )
    serve.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        help="engine processes, each with its own model copy, scheduler and KV cache; a request goes to "
        "the one that was sent its prompt's prefix, or else the least busy (default 1; env "
        "CANVAS_SERVE_DATA_PARALLEL_SIZE). On the CPU, N processes of one thread outrun one of N threads "
        "for small models",
    )
    serve.add_argument("--canvas-min-interval", dest="canvas_min_interval_s", type=float)
    serve.add_argument("--log-level")
    _lora_arguments(serve.add_argument_group("LoRA adapters (vLLM's flags; see README: LoRA adapters)"))
    _access_arguments(serve.add_argument_group("access control and limits (see README: Access control)"))


def _lora_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--enable-lora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve LoRA adapters beside the base model; a request picks one by `model` (default off, "
        "on for the embedded model and its sudoku-hard adapter; --no-enable-lora serves its base only)",
    )
    group.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        metavar="NAME=PATH",
        help="adapters to serve from the start: name=path, or vLLM's JSON "
        '\'{"name": "a", "path": "/adapters/a", "base_model_name": "..."}\'; several, or the flag again',
    )
    group.add_argument(
        "--max-loras",
        type=int,
        help=f"adapters usable in one step (default {LIMITS.max_loras})",
    )
    group.add_argument(
        "--max-lora-rank",
        type=int,
        help=f"largest adapter rank accepted (default {LIMITS.max_lora_rank})",
    )
    group.add_argument(
        "--max-cpu-loras",
        type=int,
        help="adapters kept in host memory; loading beyond is refused (default max(max-loras, 8))",
    )
    group.add_argument(
        "--allow-runtime-lora-updating",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (default off; env "
        "CANVAS_SERVE_ALLOW_RUNTIME_LORA_UPDATING, or vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING)",
    )


def _access_arguments(group: argparse._ArgumentGroup) -> None:
    # One value per flag, repeated for more (`action="append"`): with nargs="+" a model directory after
    # the flag would silently become a key.
    group.add_argument(
        "--api-key",
        action="append",
        help="require `Authorization: Bearer KEY` on every route but /health, /ready, /metrics and the "
        "page; repeatable (env CANVAS_SERVE_API_KEY, else VLLM_API_KEY: prefer these, a flag shows in ps)",
    )
    group.add_argument("--api-key-file", help="further keys, one per line (a mounted secret)")
    for flag, default in (("origins", "none: same origin only"), ("methods", "*"), ("headers", "*")):
        group.add_argument(
            f"--allowed-{flag}",
            action="append",
            help=f"CORS: allowed {flag}, repeatable, or vLLM's JSON list (default {default})",
        )
    group.add_argument(
        "--allow-credentials", action="store_true", default=None, help="CORS: allow cookies and HTTP auth"
    )
    group.add_argument("--ssl-keyfile", help="TLS private key (PEM); with --ssl-certfile: HTTPS")
    group.add_argument("--ssl-certfile", help="TLS certificate chain (PEM)")
    group.add_argument("--ssl-ca-certs", help="CA certificates for client certificates")
    group.add_argument(
        "--ssl-cert-reqs", type=int, help="client certificates: 0 not asked, 1 optional, 2 required"
    )
    group.add_argument("--root-path", help="path prefix of a path-prefixing proxy in front, e.g. /canvas")
    group.add_argument(
        "--max-request-body-bytes",
        type=int,
        help="larger request bodies get 413 (default 8 MiB; env CANVAS_SERVE_MAX_REQUEST_BODY_BYTES)",
    )


def _generate_parser(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("model", help="DiffusionGemma checkpoint directory (Hugging Face format)")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None, help="max_denoising_steps")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--quantization", "-q", choices=QUANTIZATION_CHOICES, default=None)


def settings_from(args: argparse.Namespace) -> Settings:
    """Flags given on the command line win; the environment and defaults fill the rest."""
    given: dict[str, Any] = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("command", "canvas_length")
    }
    if args.canvas_length is not None:
        given["diffusion_config"] = {**given.get("diffusion_config", {}), "canvas_length": args.canvas_length}
    for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
        if name in given:
            given[name] = [item for value in given[name] for item in _words_or_json(value)]
    if "lora_modules" in given:
        given["lora_modules"] = [parse_lora_module(value) for value in given["lora_modules"] if value]
    return Settings(**given)


def parse_lora_module(value: str) -> LoRAModule:
    """`name=path` or vLLM's JSON object `{"name", "path", "base_model_name"}` (ValueError naming it)."""
    if not value.lstrip().startswith("{"):
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(
                f"--lora-modules {value!r}: give name=path or a JSON object "
                '{"name": ..., "path": ...} (a model directory goes before --lora-modules)'
            )
        return LoRAModule(name=name, path=Path(path))
    try:
        return LoRAModule.model_validate_json(value)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in error.errors()
        )
        raise ValueError(
            f"--lora-modules {value!r}: {problems} (fields: name, path, base_model_name)"
        ) from error


def _words_or_json(value: str) -> list[str]:
    """vLLM's JSON spelling (`'["https://a.example"]'`) or a plain word."""
    if not value.lstrip().startswith("["):
        return [value]
    items = json.loads(value)
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"{value!r}: give a JSON list of strings, or plain words")
    return items


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on SIGTERM/SIGINT: stop admitting (503), wait for in-flight requests up to
    the drain timeout, abort the rest, then exit. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.service.draining:
            super().handle_exit(sig, frame)
            return
        logger.info("signal %d: draining for up to %.0fs", sig, self.service.settings.drain_timeout_s)
        self.service.draining = True
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.service.settings.drain_timeout_s
        engine = self.service.engine
        while engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if engine.num_in_flight:
            logger.warning("drain timeout: aborting %d in-flight requests", engine.num_in_flight)
            engine.abort_all()  # their responses end now; uvicorn's shutdown waits for open responses
        self.should_exit = True


def serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        service, metrics = build_service(settings)
    except (SetupError, ValidationError, ValueError) as error:
        print(f"canvas-serve: {error}", file=sys.stderr)
        return 2
    app = create_app(service, metrics)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=5,
        root_path=settings.root_path,
        ssl_keyfile=settings.ssl_keyfile,
        ssl_certfile=settings.ssl_certfile,
        ssl_ca_certs=settings.ssl_ca_certs,
        ssl_cert_reqs=settings.ssl_cert_reqs,
    )
    DrainingServer(config, service).run()
    return 0


def run_generate(args: argparse.Namespace) -> int:
    checkpoint = load_checkpoint(
        args.model, dtype=DTYPES[args.dtype], device=args.device, quantization=args.quantization
    )
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
    summary = f"steps per canvas={result.steps_per_canvas}, {elapsed:.2f}s"
    print(f"[{len(result.token_ids)} tokens, finish={result.finish_reason}, {summary}]", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    try:
        return run_generate(args)
    except (CheckpointError, InvalidParams) as err:
        print(f"canvas-serve: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
