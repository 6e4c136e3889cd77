"""Sudoku recipe: the embedded default model of canvas-serve (see README.md beside this file).

`MODEL_DIR` is the shipped checkpoint directory, which the server serves when given no model path.
This module imports nothing heavy, so the service can read the constant without torch or the engine.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO_ROOT / "models" / "sudoku"
"""The trained Sudoku DiffusionGemma checkpoint (Hugging Face format) committed to the repository."""
