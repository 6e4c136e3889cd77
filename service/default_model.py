"""Where the embedded default model (the Sudoku solver trained by recipes/sudoku) and its LoRA adapter
`sudoku-hard` (trained on the hardest puzzles by recipes/sudoku) live.

One copy of their files exists, `models/sudoku/` and `models/sudoku-hard/` in the repository. A wheel
installs them as the package data `service/embedded/sudoku/` and `service/embedded/sudoku_hard/`
(pyproject.toml maps the one to the other), so a plain `pip install .` serves them; a checkout, an
editable install and the tests read them in place. `canvas-serve serve` with no model serves the base
and, when its files are there, the adapter (see `service.model_setup.with_default_adapter`).
"""

from __future__ import annotations

from pathlib import Path

INSTALLED_DIR = Path(__file__).resolve().parent / "embedded" / "sudoku"
"""In an installed wheel."""
CHECKOUT_DIR = Path(__file__).resolve().parents[1] / "models" / "sudoku"
"""In a checkout (or an editable install of one)."""

DEFAULT_ADAPTER_NAME = "sudoku-hard"
"""The served name (`model`) of the default model's adapter."""
INSTALLED_ADAPTER_DIR = Path(__file__).resolve().parent / "embedded" / "sudoku_hard"
"""The adapter in an installed wheel (a package name takes no hyphen)."""
CHECKOUT_ADAPTER_DIR = Path(__file__).resolve().parents[1] / "models" / "sudoku-hard"
"""The adapter in a checkout."""
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""PEFT's files of an adapter folder."""


def default_model_dir() -> Path:
    """The directory holding the embedded model's config.json: the installed copy, else the checkout's.
    When neither has it, where it would be (the caller says it is missing there): the checkout's folder
    in a checkout, else the installed one."""
    for folder in (INSTALLED_DIR, CHECKOUT_DIR):
        if (folder / "config.json").is_file():
            return folder
    return CHECKOUT_DIR if CHECKOUT_DIR.parent.is_dir() else INSTALLED_DIR


def default_adapter_dir() -> Path | None:
    """The folder holding the `sudoku-hard` adapter's files, installed copy first; None when neither
    holds both (the default model is then served alone)."""
    for folder in (INSTALLED_ADAPTER_DIR, CHECKOUT_ADAPTER_DIR):
        if all((folder / name).is_file() for name in ADAPTER_FILES):
            return folder
    return None
