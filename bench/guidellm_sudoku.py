"""guidellm against `canvas-serve serve` on the Sudoku model, over the chat endpoint (issue 21, item 6).

guidellm (PyPI) is an external load generator: it is not a dependency of canvas-serve. Install it in a
venv of its own (pin torch to the CPU wheel first, or it pulls a CUDA build) and pass its executable:

    python3 -m venv /tmp/gl && /tmp/gl/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/c.txt && /tmp/gl/bin/pip install -c /tmp/c.txt guidellm
    python bench/guidellm_sudoku.py --guidellm /tmp/gl/bin/guidellm --per-band 40 --out /tmp/gl-run

The workload is the held-out Sudoku puzzles (`recipes/sudoku` evaluation set), one chat message each
(the model's chat template passes the content through), streamed, at most 82 completion tokens: the
real trained model with adaptive stopping, as users run it. The server is spawned here
(`canvas-serve serve models/sudoku`, the engine core in its own process) and `--profile` is handed to
guidellm as is (default: concurrent streams 1, 4 and 16, `--requests` each). The summary table is
read from guidellm's JSON report and printed as Markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import machine_header
from bench.serve import spawn_server, stop_server
from recipes.sudoku import MODEL_DIR
from recipes.sudoku.data import EVAL_SEED, banded_set
from recipes.sudoku.puzzles import to_string

SERVED_NAME = "sudoku"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--guidellm", required=True, help="path to the guidellm executable")
    parser.add_argument("--per-band", type=int, default=40, help="held-out puzzles per clue band")
    parser.add_argument("--streams", default="1,4,16", help="concurrent streams, one benchmark each")
    parser.add_argument("--requests", type=int, default=120, help="requests per benchmark (120: all)")
    parser.add_argument("--profile", default=None, help="guidellm --profile (overrides --streams)")
    parser.add_argument("--server-flags", default="--max-num-seqs 16", help="extra canvas-serve flags")
    parser.add_argument("--out", type=Path, required=True, help="folder for the data and the reports")
    return parser.parse_args(argv)


def write_puzzles(path: Path, per_band: int) -> int:
    """The held-out puzzles as guidellm's JSONL rows (`prompt`, `output_tokens_count`)."""
    pairs = [pair for band in banded_set(per_band, EVAL_SEED).values() for pair in band]
    with path.open("w") as f:
        for puzzle, _solution in pairs:
            f.write(json.dumps({"prompt": to_string(puzzle), "output_tokens_count": 82}) + "\n")
    return len(pairs)


def guidellm_command(args: argparse.Namespace, url: str, data: Path, report: Path) -> list[str]:
    sweep = ["--profile", args.profile] if args.profile else ["--profile", "kind=concurrent,streams=1"]
    streams = [] if args.profile else ["--override", "profile.streams", args.streams]
    return [
        args.guidellm,
        "run",
        "--backend",
        f"kind=openai_http,target={url},model={SERVED_NAME},request_format=/v1/chat/completions,max_tokens=82",
        "--tokenizer",
        f"kind=huggingface_auto,model={MODEL_DIR}",
        "--data",
        f"kind=json_file,path={data}",
        *sweep,
        *streams,
        "--constraint",
        f"kind=max_requests,count={args.requests}",
        "--output",
        f"kind=json,path={report}",
        "--disable-progress",
    ]


def strategy_label(strategy: dict[str, Any]) -> str:
    """`concurrent@16`, `constant@2.5/s`, `synchronous`, ...: what guidellm's console calls it."""
    if "streams" in strategy:
        return f"{strategy['type_']}@{strategy['streams']}"
    if "rate" in strategy:
        return f"{strategy['type_']}@{strategy['rate']:.2f}/s"
    return str(strategy["type_"])


def summary(report: dict[str, Any]) -> str:
    """One Markdown row per benchmark: requests, request rate, output tokens/s, TTFT and latency."""
    lines = [
        "| benchmark | requests ok / errored | req/s | output tok/s | TTFT p50 / p99 ms "
        "| latency p50 / p99 s |",
        "|---|---|---|---|---|---|",
    ]
    for bench in report["benchmarks"]:
        metrics = bench["metrics"]
        totals = metrics["request_totals"]
        ttft = metrics["time_to_first_token_ms"]["successful"]
        latency = metrics["request_latency"]["successful"]
        lines.append(
            f"| {strategy_label(bench['config']['strategy'])} | {totals['successful']} / {totals['errored']} "
            f"| {metrics['requests_per_second']['successful']['mean']:.2f} "
            f"| {metrics['output_tokens_per_second']['successful']['mean']:.1f} "
            f"| {ttft['percentiles']['p50']:.0f} / {ttft['percentiles']['p99']:.0f} "
            f"| {latency['percentiles']['p50']:.2f} / {latency['percentiles']['p99']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(machine_header() | {k: str(v) for k, v in vars(args).items()}))
    data, report = args.out / "puzzles.jsonl", args.out / "report.json"
    print(f"{write_puzzles(data, args.per_band)} puzzles -> {data}")
    flags = ["--served-model-name", SERVED_NAME, *args.server_flags.split()]
    process, url = spawn_server(MODEL_DIR, flags)
    try:
        subprocess.run(guidellm_command(args, url, data, report), check=True)
    finally:
        stop_server(process)
    print(summary(json.loads(report.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
