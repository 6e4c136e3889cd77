"""Smoke check of the LoRA step-cost benchmark: it runs, and a base-only step with LoRA on equals plain."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "lora.py"


@pytest.mark.slow
def test_quick_lora_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "lora.json"
    args = [sys.executable, str(BENCH), "--quick", "--reps", "1", "--warmup", "0", "--targets", "all"]
    proc = subprocess.run([*args, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"max_abs_diff=0\.000e\+00", proc.stdout), proc.stdout
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) == {"plain", "lora, base only", "lora, 4 adapters + base"}
