"""The page's model picker: the base and each LoRA adapter from /v1/models; a generation sent with
the adapter picked runs with it, and the engine view says so."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.adapters import save_adapter
from tests.ui.page import LONG_RUN, engine_id, engine_row, filled_text, screenshot, start, wait_until
from tests.ui.server import UIServer
from tests.ui.test_page import PUZZLE

pytestmark = [pytest.mark.ui, pytest.mark.slow]


@pytest.fixture(scope="module")
def lora_server(
    untrained_model: Path, artifacts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UIServer]:
    adapter = save_adapter(untrained_model, tmp_path_factory.mktemp("ui-adapter") / "hard", seed=1)
    flags = ["--enable-lora", "--lora-modules", f"hard={adapter}"]
    remote = UIServer(untrained_model, "sudoku-untrained", artifacts, *flags).start()
    yield remote
    remote.kill()


def test_the_picker_lists_the_adapters_and_a_generation_runs_with_the_one_picked(
    lora_server: UIServer, new_page: Any, artifacts: Path
) -> None:
    page, _ = new_page(lora_server.url)
    picker = page.locator("[name=model]")
    page.wait_for_function("() => document.querySelectorAll('[name=model] option').length === 2")
    assert picker.locator("option").all_text_contents() == [
        "sudoku-untrained (base)",
        "hard (adapter of sudoku-untrained)",
    ]
    assert "adapters hard" in filled_text(page.locator("#engine [data-field=model]"))
    picker.select_option("hard")
    card = start(page, PUZZLE, **LONG_RUN)
    assert "[hard]" in str(card.locator("[data-field=title]").text_content())
    request_id = engine_id(card)
    row = engine_row(page, request_id)
    wait_until(lambda: row.count() == 1 and row.locator("td").nth(2).text_content() == "hard")
    screenshot(page, artifacts, "lora-picker")
    running = lora_server.status()["running"]
    assert [r["lora_name"] for r in running if r["id"] == request_id] == ["hard"]
    card.locator("[data-action=stop]").click()
