"""The page against a server started with --api-key: it asks for the key (again after a wrong one),
keeps it for the tab, sends it on every call and on the engine-view stream, and solves a Sudoku."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ui.conftest import TRAINED_SUDOKU, PageLog
from tests.ui.page import screenshot, start, wait_state
from tests.ui.server import UIServer
from tests.ui.test_page import PUZZLE, board_digits, is_valid_solution

pytestmark = [pytest.mark.ui, pytest.mark.slow]

KEY = "ui-test-key-5d2a"
STORAGE_KEY = "canvas-serve.api-key"


@pytest.fixture(scope="module")
def keyed_server(artifacts: Path) -> Iterator[UIServer]:
    """The trained embedded Sudoku model behind an API key."""
    if not (TRAINED_SUDOKU / "config.json").is_file():
        pytest.skip(f"the trained Sudoku model is not in {TRAINED_SUDOKU} yet (recipes/sudoku trains it)")
    remote = UIServer(TRAINED_SUDOKU, "sudoku", artifacts, "--api-key", KEY).start()
    yield remote
    remote.kill()


def enter_key(page: Any, key: str) -> None:
    page.locator("#api-key-dialog").wait_for(state="visible", timeout=30_000)
    page.fill("#api-key-dialog [name=api-key]", key)
    page.click("#api-key-dialog button[type=submit]")


def test_the_page_asks_for_the_key_and_solves_a_sudoku_with_it(
    keyed_server: UIServer, browser: Any, artifacts: Path
) -> None:
    page = browser.new_page()
    log = PageLog(page)
    try:
        page.goto(keyed_server.url)
        hint = page.locator("#api-key-dialog [data-field=api-key-hint]")
        enter_key(page, "not-the-key")
        page.wait_for_function(
            "el => el.textContent.includes('refused')", arg=hint.element_handle(), timeout=30_000
        )
        screenshot(page, artifacts, "api-key-refused")
        enter_key(page, KEY)
        page.wait_for_selector("#engine[data-connection=live]", timeout=30_000)
        assert not page.locator("#api-key-dialog").is_visible()
        assert page.evaluate(f"sessionStorage.getItem('{STORAGE_KEY}')") == KEY

        card = start(page, PUZZLE, seed=0)
        page.wait_for_function(
            "el => el.dataset.state !== 'solving'",
            arg=card.locator(".sudoku").element_handle(),
            timeout=120_000,
        )
        wait_state(card, "done")
        assert card.locator(".sudoku").get_attribute("data-state") == "solved"
        assert is_valid_solution(board_digits(card), PUZZLE)
        screenshot(page, artifacts, "api-key-sudoku-solved")

        # The tab keeps the key: a reload goes live without asking again.
        page.reload()
        page.wait_for_selector("#engine[data-connection=live]", timeout=30_000)
        assert not page.locator("#api-key-dialog").is_visible()
    finally:
        page.close()
    assert not [url for url in log.urls if KEY in url], "the key must never be put in a URL"
    # Chromium logs each refused call ("... status of 401 (Unauthorized)"); nothing else may go wrong.
    assert all("401" in error for error in log.errors), log.errors
