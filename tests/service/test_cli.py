"""The `canvas-serve generate` command on a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main
from tests.engine.checkpoints import save_servable


def test_generate_prints_text_and_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_servable(tmp_path)
    argv = ["generate", str(tmp_path), "--prompt", "hi", "--max-tokens", "20", "--steps", "2", "--seed", "1"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out.strip()
    assert "20 tokens, finish=length, steps per canvas=[2, 2]" in out.err or "finish=stop" in out.err
    assert main([*argv, "--chat"]) == 0


def test_a_bad_checkpoint_gives_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
