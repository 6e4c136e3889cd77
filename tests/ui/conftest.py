"""Browser tests of the live canvas page: Debian's Chromium driven by Playwright, against the real server.

Nothing here downloads a browser. `chromium` finds /usr/bin/chromium (or $CANVAS_SERVE_CHROMIUM); when it
is missing and we run as root with apt-get, it installs Debian's `chromium` package, else it skips
with the reason (fails instead under CANVAS_SERVE_UI_STRICT=1). Screenshots and server logs go to
artifacts/ui/ (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.server_process import REPO
from tests.ui.server import UIServer

ARTIFACTS = REPO / "artifacts" / "ui"
TRAINED_SUDOKU = REPO / "models" / "sudoku"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
APT_TIMEOUT_S = 900


def _apt_install_chromium(path: Path) -> str | None:
    """Install Debian's chromium package (apt-get update first if the plain install fails); None when
    `path` then exists, else why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root"
    if shutil.which("apt-get") is None:
        return "no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    result = None
    for commands in ([install], [["apt-get", "update", "-q"], install]):
        for command in commands:
            result = subprocess.run(command, env=env, capture_output=True, timeout=APT_TIMEOUT_S, check=False)
        if path.is_file():
            return None
    return result.stderr.decode(errors="replace")[-500:] if result is not None else "apt-get failed"


def missing(reason: str) -> NoReturn:
    """Skip, or fail where CI set CANVAS_SERVE_UI_STRICT=1 (a missing browser must not pass silently)."""
    if os.environ.get("CANVAS_SERVE_UI_STRICT") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system Chromium's path (installed with apt if missing, as root only)."""
    path = os.environ.get("CANVAS_SERVE_CHROMIUM", "/usr/bin/chromium")
    if not Path(path).is_file():
        why = _apt_install_chromium(Path(path))
        if why is not None:
            missing(
                f"no Chromium at {path} and could not install Debian's chromium ({why}): "
                "apt-get install chromium, or set CANVAS_SERVE_CHROMIUM"
            )
    return path


@pytest.fixture(scope="session")
def browser(chromium: str) -> Iterator[Any]:
    """One headless Chromium (a persistent context on a fresh profile); each page is a tab."""
    try:
        from playwright import sync_api
    except ImportError:
        missing("Playwright for Python is missing: pip install -e '.[ui]'")
    with (
        tempfile.TemporaryDirectory(prefix="canvas-serve-chromium-") as profile,
        sync_api.sync_playwright() as p,
    ):
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        yield context
        context.close()


class PageLog:
    """What one tab logged: console errors, uncaught exceptions, and every URL it asked for."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        self.urls: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("request", lambda r: self.urls.append(r.url))


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., tuple[Any, PageLog]]]:
    """Open tabs on a server's page; at teardown every tab must have logged no console error, unless
    it was opened with `allow_errors=True` (a test that restarts the server)."""
    opened: list[tuple[Any, PageLog, bool]] = []

    def open_page(url: str, allow_errors: bool = False) -> tuple[Any, PageLog]:
        page = browser.new_page()
        log = PageLog(page)
        opened.append((page, log, allow_errors))
        page.goto(url)
        page.wait_for_selector("#engine[data-connection=live]", timeout=30_000)
        return page, log

    yield open_page
    errors = [(log.errors, page.url) for page, log, allowed in opened if not allowed and log.errors]
    for page, _, _ in opened:
        page.close()
    assert not errors, f"console errors: {errors}"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Sudoku-shaped model that never converges (random weights): its requests run to max steps."""
    path = tmp_path_factory.mktemp("ui-model") / "sudoku-untrained"
    from recipes.sudoku.checkpoint import init_checkpoint

    init_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def server(untrained_model: Path, artifacts: Path) -> Iterator[UIServer]:
    """The shared server for the page tests (max 8 running requests)."""
    remote = UIServer(untrained_model, "sudoku-untrained", artifacts, "--max-num-seqs", "8").start()
    yield remote
    remote.kill()


@pytest.fixture(scope="session")
def sudoku_server(artifacts: Path) -> Iterator[UIServer]:
    """The trained embedded model, when models/sudoku/ holds it."""
    if not (TRAINED_SUDOKU / "config.json").is_file():
        pytest.skip(f"the trained Sudoku model is not in {TRAINED_SUDOKU} yet (recipes/sudoku trains it)")
    remote = UIServer(TRAINED_SUDOKU, "sudoku", artifacts).start()
    yield remote
    remote.kill()
