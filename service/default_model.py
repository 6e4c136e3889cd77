"""Where the embedded default model (the Sudoku solver trained by recipes/sudoku) lives.

One copy of its files exists, `models/sudoku/` in the repository. A wheel installs it as the package
data `service/embedded/sudoku/` (pyproject.toml maps the one to the other), so a plain `pip install .`
serves it; a checkout, an editable install and the tests read it in place.
"""

from __future__ import annotations

from pathlib import Path

INSTALLED_DIR = Path(__file__).resolve().parent / "embedded" / "sudoku"
"""In an installed wheel."""
CHECKOUT_DIR = Path(__file__).resolve().parents[1] / "models" / "sudoku"
"""In a checkout (or an editable install of one)."""


def default_model_dir() -> Path:
    """The directory holding the embedded model's config.json: the installed copy, else the checkout's.
    When neither has it, where it would be (the caller says it is missing there): the checkout's folder
    in a checkout, else the installed one."""
    for folder in (INSTALLED_DIR, CHECKOUT_DIR):
        if (folder / "config.json").is_file():
            return folder
    return CHECKOUT_DIR if CHECKOUT_DIR.parent.is_dir() else INSTALLED_DIR
