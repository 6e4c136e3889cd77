"""A plain (non-editable) wheel ships the embedded default model and its `sudoku-hard` LoRA adapter,
and the server finds them there.

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

from service.default_model import ADAPTER_FILES, CHECKOUT_ADAPTER_DIR, CHECKOUT_DIR

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


HAS_ADAPTER = all((CHECKOUT_ADAPTER_DIR / name).is_file() for name in ADAPTER_FILES)
NO_ADAPTER_YET = (
    f"{CHECKOUT_ADAPTER_DIR} holds no adapter yet (recipes/sudoku trains sudoku-hard: "
    f"{' + '.join(ADAPTER_FILES)})"
)


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


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ADAPTER, reason=NO_ADAPTER_YET)
def test_the_wheel_holds_the_default_adapter_and_serve_with_no_model_picks_it(
    wheel: Path, tmp_path: Path
) -> None:
    """The adapter's files, byte for byte, as service/embedded/sudoku_hard; installed, `canvas-serve
    serve` with no model serves the packaged model with the packaged adapter as `sudoku-hard`."""
    with zipfile.ZipFile(wheel) as archive:
        for name in ADAPTER_FILES:
            data = archive.read(f"service/embedded/sudoku_hard/{name}")
            assert sha256(data) == sha256((CHECKOUT_ADAPTER_DIR / name).read_bytes()), name
        archive.extractall(tmp_path / "site")
    site = tmp_path / "site"
    script = (
        "from service.model_setup import model_dir, with_default_adapter\n"
        "from service.settings import Settings\n"
        "settings = with_default_adapter(Settings())\n"
        "(module,) = settings.lora_modules\n"
        "print(settings.enable_lora, module.name, model_dir(settings), module.path)\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n{script}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    enabled, name, model, adapter = result.stdout.strip().splitlines()[-1].split()
    assert (enabled, name) == ("True", "sudoku-hard")
    assert Path(model) == site / "service" / "embedded" / "sudoku"
    assert Path(adapter) == site / "service" / "embedded" / "sudoku_hard"
