"""Smoke check of the CPU fast-path benchmark: it runs, and the prepacked head and the soft-cap table
are bit-identical."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "cpu_paths.py"


@pytest.mark.slow
def test_quick_cpu_paths_bench_runs() -> None:
    args = [sys.executable, str(BENCH), "--quick", "--canvases", "1", "--reps", "1", "--threads", "1"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if proc.returncode == 1 and "no bf16 support" in proc.stdout:
        pytest.skip("this CPU's oneDNN has no bf16 support: the benchmark has nothing to compare")
    assert proc.returncode == 0, proc.stderr[-2000:]
    heads = [line for line in proc.stdout.splitlines() if line.startswith("LM head")]
    assert len(heads) == 2 and all("bit-identical: True" in line for line in heads), proc.stdout
    forwards = [line for line in proc.stdout.splitlines() if "'s forward" in line]
    assert len(forwards) == 2, proc.stdout
    softcaps = [line for line in proc.stdout.splitlines() if line.startswith("soft-cap")]
    assert len(softcaps) == 4 and all("bit-identical: True" in line for line in softcaps), proc.stdout
    compiled = [line for line in proc.stdout.splitlines() if "compiled forward" in line]
    assert len(compiled) == 2 and "grouped vs dense experts" in compiled[1], proc.stdout
