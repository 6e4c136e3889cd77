"""`canvas-serve serve` with no model: the embedded Sudoku model with its `sudoku-hard` LoRA adapter,
picked by `model` (skipped, with the reason, until models/sudoku-hard holds the adapter)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from service.default_model import ADAPTER_FILES, CHECKOUT_ADAPTER_DIR, DEFAULT_ADAPTER_NAME
from service.model_setup import DEFAULT_MODEL_DIR
from tests.server_process import Process, free_port, serve_command

PUZZLE = "..589.2.1784.5.....92346..75.7283...6..514..2.1....3...7.4.196.....357....1.784.3"
HAS_ADAPTER = all((CHECKOUT_ADAPTER_DIR / name).is_file() for name in ADAPTER_FILES)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="the embedded Sudoku model is missing"
    ),
    pytest.mark.skipif(
        not HAS_ADAPTER,
        reason=f"{CHECKOUT_ADAPTER_DIR} holds no adapter yet (recipes/sudoku trains sudoku-hard: "
        f"{' + '.join(ADAPTER_FILES)})",
    ),
]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    port = free_port()
    argv = [*serve_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    log = tmp_path_factory.mktemp("default-serve") / "server.log"
    with Process(argv, port, log) as server:
        yield server


def test_serve_with_no_model_serves_sudoku_and_its_sudoku_hard_adapter(default_server: Process) -> None:
    client = openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="x", max_retries=0)
    base, adapter = client.models.list().data
    assert (base.id, adapter.id) == ("sudoku", DEFAULT_ADAPTER_NAME)
    assert adapter.model_extra["parent"] == "sudoku"
    assert Path(adapter.model_extra["root"]) == CHECKOUT_ADAPTER_DIR
    for model in ("sudoku", DEFAULT_ADAPTER_NAME):
        response = client.completions.create(model=model, prompt=PUZZLE, seed=0)
        assert response.model == model
        (choice,) = response.choices
        assert choice.finish_reason == "stop", choice
        assert len(choice.text) == 81 and choice.text.isdigit(), choice.text
