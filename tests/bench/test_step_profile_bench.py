"""Smoke check of the step benchmark's dense-vs-grouped comparison on the shipped Sudoku model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "step_profile.py"


@pytest.mark.slow
def test_compiled_dense_against_grouped_experts_runs() -> None:
    args = [sys.executable, str(BENCH), "--compile", "--dense-experts", "--model", "sudoku"]
    args += ["--dtype", "bf16", "--canvases", "1", "--reps", "1", "--warmup", "0"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("sudoku bf16 canvases=1")]
    assert "dense" in line and "engine's" in line, line
