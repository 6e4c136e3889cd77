"""Prefix caching on vs off: TTFT and throughput of shared-system-prompt and multi-turn chat traffic.

Three servers of the same build on one random small checkpoint (`bench.common.SMALL_TEXT`, canvas 64,
char-level tokenizer: one token per character): "on" with prefix caching (the default), "no-tail" with
prefix caching but `--no-cache-final-canvas` (an ended request's last canvas is not written, as before
`engine.cache_tail`), and "off" with `--no-enable-prefix-caching`. They take turns running the same
two workloads, round after round, so that background load on a shared machine falls on all alike:

- shared: `--requests` streamed completions, `--concurrency` at a time, each a 2,000-token system prompt
  plus a short distinct question;
- chat: `--conversations` conversations of `--turns` turns, one request at a time per conversation;
  turn k sends the system prompt, every earlier question and answer, and the new question, as token
  ids: the answer's ids are the model's own (read back from the streamed text, which the char
  tokenizer decodes one token name per id), followed by the stop id when a stop id ended it, as a chat
  template closing the model's turn with its end-of-turn token would send them. (The bench model is
  random: its answers are mostly `<unusedN>` tokens, which re-tokenising the text would split.)
  `--think-s` is a user's pause before each next turn (0: the next turn is sent at once).

Each round starts with `POST /reset_prefix_cache` on the caching servers, so every round pays one cold
system prompt. TTFT is the first streamed chunk with committed text (the first canvas). The hit rate
is cached prompt tokens over prompt tokens; the "on" server's `cache_tail_tokens` counter says how
many tokens the tail passes wrote.

    python bench/prefix_cache.py --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import SMALL_TEXT, load_average, machine_header
from bench.serve import percentile, spawn_server, stop_server

ALPHABET = "abcdefghijklmnopqrstuvwxyz ,."


@dataclass
class Result:
    ttft_s: float
    e2e_s: float
    completion_tokens: int
    cached_tokens: int
    text: str
    prompt_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Row:
    workload: str
    caching: str
    requests: int
    ttft_p50_s: float
    ttft_p99_s: float
    tokens_per_s: float
    cached_fraction: float
    """Cached prompt tokens over system-prompt tokens sent."""
    hit_rate: float = 0.0
    """Cached prompt tokens over prompt tokens."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=12, help="shared-prompt requests per round")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=3, help="conversations per round")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--think-s", type=float, default=0.0, help="a user's pause before each next turn")
    parser.add_argument("--rounds", type=int, default=2, help="on/off alternations")
    parser.add_argument("--max-tokens", type=int, default=64, help="one canvas of the bench model")
    parser.add_argument("--steps", type=int, default=4, help="max_denoising_steps")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(length))


async def complete(
    client: httpx.AsyncClient, url: str, prompt: str | list[int], args: argparse.Namespace
) -> Result:
    payload = {
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "max_denoising_steps": args.steps,
        "seed": len(prompt),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft: float | None = None
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    finish_reason = None
    async with client.stream("POST", f"{url}/v1/completions", json=payload) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{response.status_code}: {response.text} (prompt of {len(prompt)} chars)")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                finish_reason = choice.get("finish_reason") or finish_reason
                if choice.get("text"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    pieces.append(choice["text"])
    e2e = time.perf_counter() - start
    details = usage.get("prompt_tokens_details") or {}
    return Result(
        ttft if ttft is not None else e2e,
        e2e,
        int(usage.get("completion_tokens", 0)),
        int(details.get("cached_tokens", 0)),
        "".join(pieces),
        int(usage.get("prompt_tokens", 0)),
        finish_reason,
    )


async def shared_workload(url: str, system: str, seed: int, args: argparse.Namespace) -> list[Result]:
    rng = random.Random(seed)
    questions = iter([text(rng, rng.randrange(12, 40)) for _ in range(args.requests)])
    results: list[Result] = []

    async def worker(client: httpx.AsyncClient) -> None:
        for question in questions:
            results.append(await complete(client, url, system + question, args))

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(args.concurrency)))
    return results


class TokenIds:
    """Text to token ids and back for the bench's char-level tokenizer: every id decodes to its name."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.stop_id = int(self.tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def of_output(self, output: str) -> list[int]:
        """The ids of a streamed output: one per `<...>` name or character (special tokens, dropped from
        the text, are lost: then the next prompt differs from the cache there)."""
        names = re.findall(r"<[^<>]*>|.", output, flags=re.DOTALL)
        return [int(i) for i in self.tokenizer.convert_tokens_to_ids(names)]


async def chat_workload(url: str, system: str, seed: int, args: argparse.Namespace) -> list[Result]:
    """Conversations run side by side; within one, turn k+1 waits for turn k's answer."""
    ids: TokenIds = args.token_ids

    async def conversation(client: httpx.AsyncClient, index: int) -> list[Result]:
        rng = random.Random(seed * 1000 + index)
        history = ids.encode(system)
        results = []
        for turn in range(args.turns):
            if turn:
                await asyncio.sleep(args.think_s)
            history += ids.encode("\nuser: " + text(rng, rng.randrange(12, 40)) + "\nassistant: ")
            result = await complete(client, url, history, args)
            history += ids.of_output(result.text) + ([ids.stop_id] if result.finish_reason == "stop" else [])
            results.append(result)
        return results

    async with httpx.AsyncClient(timeout=600) as client:
        per_conversation = await asyncio.gather(*(conversation(client, i) for i in range(args.conversations)))
    return [r for results in per_conversation for r in results]


def summarise(workload: str, caching: str, results: list[Result], wall: float, prompt_chars: int) -> Row:
    ttfts = [r.ttft_s for r in results]
    return Row(
        workload=workload,
        caching=caching,
        requests=len(results),
        ttft_p50_s=statistics.median(ttfts),
        ttft_p99_s=percentile(ttfts, 0.99),
        tokens_per_s=sum(r.completion_tokens for r in results) / wall,
        cached_fraction=sum(r.cached_tokens for r in results) / max(1, prompt_chars),
        hit_rate=sum(r.cached_tokens for r in results) / max(1, sum(r.prompt_tokens for r in results)),
    )


MODES = {"on": [], "no-tail": ["--no-cache-final-canvas"], "off": ["--no-enable-prefix-caching"]}
"""Server flags per mode."""


def run_rounds(urls: dict[str, str], args: argparse.Namespace) -> list[Row]:
    """Rotate the servers' order round by round; pool each mode's results."""
    system = text(random.Random(0), args.system_tokens)
    pooled: dict[tuple[str, str], tuple[list[Result], float, int]] = {}
    for round_index in range(args.rounds):
        order = list(urls)[round_index % len(urls) :] + list(urls)[: round_index % len(urls)]
        for caching in order:
            url = urls[caching]
            if caching != "off":
                httpx.post(f"{url}/reset_prefix_cache", timeout=60).raise_for_status()
            for workload in ("shared", "chat"):
                run = shared_workload if workload == "shared" else chat_workload
                start = time.perf_counter()
                results = asyncio.run(run(url, system, round_index, args))
                wall = time.perf_counter() - start
                chars = sum(len(system) for _ in results)  # a lower bound for chat (history grows)
                old = pooled.get((workload, caching), ([], 0.0, 0))
                pooled[workload, caching] = (old[0] + results, old[1] + wall, old[2] + chars)
                row = summarise(workload, caching, results, wall, chars)
                print(f"round {round_index} load {load_average()}: {json.dumps(asdict(row))}", flush=True)
    return [summarise(w, c, *pooled[w, c]) for w in ("shared", "chat") for c in urls]


def counter(url: str, name: str) -> float:
    """A Prometheus counter's value from the server's /metrics (0 when absent)."""
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def table(rows: list[Row]) -> str:
    lines = [
        "| workload | prefix caching | requests | TTFT p50 s | TTFT p99 s | tok/s | cached / system tokens "
        "| hit rate |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.caching} | {r.requests} | {r.ttft_p50_s:.3f} | {r.ttft_p99_s:.3f} "
            f"| {r.tokens_per_s:.1f} | {r.cached_fraction:.2f} | {r.hit_rate:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_header() | {k: v for k, v in vars(args).items() if k != "json"}
    print(json.dumps(info, default=str))
    from bench.common import save_random_checkpoint
    from tests.engine.checkpoints import save_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "small"
        save_random_checkpoint(folder, SMALL_TEXT, canvas_length=64)
        save_tokenizer(folder, vocab_size=SMALL_TEXT["vocab_size"])
        args.token_ids = TokenIds(folder)
        servers = {
            mode: spawn_server(folder, ["--max-num-seqs", "8", *flags]) for mode, flags in MODES.items()
        }
        try:
            rows = run_rounds({mode: url for mode, (_, url) in servers.items()}, args)
            tail_tokens = counter(servers["on"][1], "canvas_serve_cache_tail_tokens_total")
        finally:
            for process, _ in servers.values():
                stop_server(process)
    print(table(rows))
    for workload in ("shared", "chat"):
        by_mode = {r.caching: r for r in rows if r.workload == workload}
        on, no_tail, off = by_mode["on"], by_mode["no-tail"], by_mode["off"]
        print(
            f"{workload}: TTFT p50 {off.ttft_p50_s / on.ttft_p50_s:.1f}x lower with caching "
            f"({off.ttft_p50_s / no_tail.ttft_p50_s:.1f}x without the tail pass), throughput "
            f"{on.tokens_per_s / off.tokens_per_s:.2f}x ({no_tail.tokens_per_s / off.tokens_per_s:.2f}x)"
        )
    requests = sum(r.requests for r in rows if r.caching == "on")
    print(f"tail passes of the 'on' server: {tail_tokens:.0f} tokens, {tail_tokens / requests:.1f} a request")
    if args.json:
        payload = {"header": info, "rows": [asdict(r) for r in rows], "cache_tail_tokens": tail_tokens}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
