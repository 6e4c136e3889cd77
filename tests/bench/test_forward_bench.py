"""Smoke check of the denoise-forward benchmark: it runs, and ours agrees with the reference."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "forward.py"


@pytest.mark.slow
def test_quick_forward_bench_runs_and_agrees_with_the_reference(tmp_path: Path) -> None:
    out = tmp_path / "forward.json"
    args = [
        sys.executable,
        str(BENCH),
        "--quick",
        "--canvases",
        "1",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--json",
        str(out),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diffs = [float(d) for d in re.findall(r"max_abs_diff=(\S+)", proc.stdout)]
    assert len(diffs) == 1, proc.stdout
    assert diffs[0] < 1e-3
    assert out.is_file()
