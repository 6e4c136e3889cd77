"""HTTP load generator for a running canvas-serve: TTFT, end-to-end latency, tok/s, steps per canvas.

Closed loop: `--concurrency` clients each send streamed `/v1/completions` requests back to back until
`--requests` have been sent. Time to first token is the arrival of the first chunk with committed
text (a block commits at once, so this is time to the first canvas); usage comes from the final
usage chunk (`stream_options.include_usage`). With `--compare-canvas`, the same load runs twice,
without and with `include_canvas`, to measure what live canvases cost in throughput.

Run against a server you started, e.g.
    canvas-serve serve /path/to/model --port 8000 &
    python bench/serve.py --url http://127.0.0.1:8000 --concurrency 8 --requests 64 --compare-canvas
or let the script start one on a random small checkpoint: `python bench/serve.py --spawn`
(add `--no-engine-process` to step its engine in a thread of the API process).

`bench/served.py` reuses the load generator and the server spawner below to compare the served path
with offline generation on the Sudoku model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import SMALL_TEXT, machine_header


@dataclass
class Sample:
    ttft_s: float | None
    e2e_s: float
    completion_tokens: int
    denoise_steps: int
    canvases: int
    canvas_chunks: int
    text: str = ""
    index: int = 0
    """The request's position in the load (so results can be matched to what was asked)."""


@dataclass
class Summary:
    label: str
    requests: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    steps_per_canvas: float
    canvas_chunks_per_request: float
    errors: int = 0
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--spawn", action="store_true", help="start a server on a random small checkpoint")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="max_denoising_steps per request")
    parser.add_argument("--fixed-steps", action="store_true", help="disable adaptive stopping")
    parser.add_argument("--compare-canvas", action="store_true", help="run without and with include_canvas")
    parser.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --spawn: the engine in its own process (default) or in a thread of the API process",
    )
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def body(index: int, args: argparse.Namespace, include_canvas: bool) -> dict[str, Any]:
    rng = random.Random(index)
    prompt = "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randrange(20, 80)))
    request: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "max_denoising_steps": args.steps,
        "seed": index,
        "stream": True,
        "stream_options": {"include_usage": True, "include_canvas": include_canvas},
    }
    if args.fixed_steps:
        request["confidence_threshold"] = 1e-9
    return request


async def one_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any], index: int = 0) -> Sample:
    start = time.perf_counter()
    ttft = None
    usage: dict[str, Any] = {}
    canvas_chunks = 0
    text = ""
    async with client.stream("POST", f"{url}/v1/completions", json=payload) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            canvas_chunks += "canvas" in chunk
            text += "".join(c.get("text") or "" for c in chunk.get("choices", []))
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - start
    return Sample(
        ttft_s=ttft,
        e2e_s=time.perf_counter() - start,
        completion_tokens=int(usage.get("completion_tokens", 0)),
        denoise_steps=int(usage.get("denoise_steps", 0)),
        canvases=int(usage.get("canvases", 0)),
        canvas_chunks=canvas_chunks,
        text=text,
        index=index,
    )


async def run_load(
    url: str, bodies: list[dict[str, Any]], concurrency: int
) -> tuple[list[Sample], int, float]:
    """`concurrency` clients in a closed loop send `bodies` (streamed completions) in order, each the
    next one as soon as its last one ended; (samples, errors, wall seconds)."""
    counter = iter(range(len(bodies)))
    samples: list[Sample] = []
    errors = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for index in counter:
            try:
                samples.append(await one_request(client, url, bodies[index], index))
            except (httpx.HTTPError, RuntimeError):
                errors += 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return samples, errors, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarise(label: str, samples: list[Sample], errors: int, wall: float) -> Summary:
    ttfts = [s.ttft_s for s in samples if s.ttft_s is not None]
    e2es = [s.e2e_s for s in samples]
    canvases = sum(s.canvases for s in samples)
    return Summary(
        label=label,
        requests=len(samples),
        wall_s=wall,
        tokens_per_s=sum(s.completion_tokens for s in samples) / wall,
        ttft_p50_s=statistics.median(ttfts) if ttfts else float("nan"),
        ttft_p99_s=percentile(ttfts, 0.99),
        e2e_p50_s=statistics.median(e2es) if e2es else float("nan"),
        e2e_p99_s=percentile(e2es, 0.99),
        steps_per_canvas=sum(s.denoise_steps for s in samples) / max(1, canvases),
        canvas_chunks_per_request=sum(s.canvas_chunks for s in samples) / max(1, len(samples)),
        errors=errors,
    )


def table(rows: list[Summary]) -> str:
    lines = [
        "| run | requests | errors | tok/s | TTFT p50 s | TTFT p99 s | e2e p50 s | e2e p99 s | steps/canvas "
        "| canvas chunks/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.requests} | {r.errors} | {r.tokens_per_s:.1f} | {r.ttft_p50_s:.2f} "
            f"| {r.ttft_p99_s:.2f} | {r.e2e_p50_s:.2f} | {r.e2e_p99_s:.2f} | {r.steps_per_canvas:.1f} "
            f"| {r.canvas_chunks_per_request:.1f} |"
        )
    return "\n".join(lines)


# -- an optional server of our own ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_random_server(
    folder: Path, concurrency: int, engine_process: bool
) -> tuple[subprocess.Popen[bytes], str]:
    from bench.common import save_random_checkpoint
    from tests.engine.checkpoints import save_tokenizer

    save_random_checkpoint(folder, SMALL_TEXT, canvas_length=64)
    save_tokenizer(folder, vocab_size=SMALL_TEXT["vocab_size"])
    flags = ["--max-num-seqs", str(concurrency)]
    return spawn_server(folder, [*flags, "--engine-process" if engine_process else "--no-engine-process"])


def spawn_server(
    model_dir: Path, flags: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`canvas-serve serve model_dir --port P --log-level warning [flags]` on a free port, once ready."""
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "serve", str(model_dir), "--port", str(port)]
    command += ["--log-level", "warning", *flags]
    process = subprocess.Popen(
        command, cwd=Path(__file__).resolve().parents[1], env={**os.environ, **(env or {})}
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(1500):
        if process.poll() is not None:
            raise RuntimeError(f"the spawned server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the spawned server did not become ready")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains, then stops its engine), then wait for it."""
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_header() | {k: v for k, v in vars(args).items() if k != "json"} | {"json": str(args.json)}
    print(json.dumps(info, default=str))
    with tempfile.TemporaryDirectory() as tmp:
        process, url = (
            spawn_random_server(Path(tmp), args.concurrency, args.engine_process)
            if args.spawn
            else (None, args.url)
        )
        try:
            modes = [False, True] if args.compare_canvas else [False]
            rows = []
            for include_canvas in modes:
                bodies = [body(i, args, include_canvas) for i in range(args.requests)]
                samples, errors, wall = asyncio.run(run_load(url, bodies, args.concurrency))
                rows.append(
                    summarise("with canvases" if include_canvas else "text only", samples, errors, wall)
                )
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            if process is not None:
                stop_server(process)
    print(table(rows))
    if len(rows) == 2:
        cost = 1 - rows[1].tokens_per_s / rows[0].tokens_per_s
        print(f"live canvases cost {100 * cost:.1f}% of throughput")
    if args.json:
        args.json.write_text(
            json.dumps({"header": info, "rows": [asdict(r) for r in rows]}, indent=2, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
