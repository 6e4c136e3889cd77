"""A plain (non-editable) wheel ships the embedded default model, and the server finds it there.

The wheel is built offline (`pip wheel --no-deps --no-build-isolation`, setuptools from this venv) from
a copy of exactly what the Dockerfile copies, so the build leaves nothing in the checkout.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from service.default_model import CHECKOUT_DIR

REPO = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ["pyproject.toml", "README.md", "engine", "service", "models"]
"""The Docker build context (.dockerignore's allowlist)."""
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    result = subprocess.run(
        [*command, "-q", "-w", str(out), str(source)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (built,) = out.glob("canvas_serve-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_holds_the_default_model_every_module_and_the_page(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in MODEL_FILES:
            data = archive.read(f"service/embedded/sudoku/{name}")
            assert sha256(data) == sha256((CHECKOUT_DIR / name).read_bytes()), name
    sources = {
        path.relative_to(REPO).as_posix()
        for package in ("engine", "service")
        for path in (REPO / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    missing = sources - names
    assert not missing, f"not in the wheel (add their package to pyproject.toml's packages): {missing}"
    assert "service/static/index.html" in names


@pytest.mark.slow
def test_an_installed_wheel_serves_the_embedded_model_with_no_checkout_around(
    wheel: Path, tmp_path: Path
) -> None:
    """The wheel unpacked as site-packages would hold it, imported from elsewhere: `canvas-serve serve`
    with no model resolves to the packaged copy, and that copy loads."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    script = (
        "from service.model_setup import model_dir\n"
        "from service.settings import Settings\n"
        "from engine.model.loader import load_checkpoint\n"
        "path = model_dir(Settings())\n"
        "load_checkpoint(path)\n"
        "print(path)\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n{script}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == site / "service" / "embedded" / "sudoku"  # served as "sudoku", as from a checkout
