"""Smoke check of the forward's floor: it runs on the quick config and its parts add up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "forward_floor.py"


@pytest.mark.slow
def test_quick_forward_floor_runs() -> None:
    args = [sys.executable, str(BENCH), "--quick", "--canvases", "1", "--reps", "1", "--threads", "1"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [line for line in proc.stdout.splitlines() if line.strip().startswith("1 |")]
    cells = [cell.strip() for cell in row.split("|")]
    matmuls, attention, head, cast, lookup, floor = (float(c) for c in cells[1:7])
    assert floor == pytest.approx(matmuls + attention + head + min(cast, lookup), abs=0.02), row
    assert all(part > 0 for part in (matmuls, attention, head, cast, lookup)), row
