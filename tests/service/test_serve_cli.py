"""`canvas-serve serve` that cannot start: exit code 2 and one clear line, never a traceback.

The invocations run side by side (each one imports torch), once per module.
"""

from __future__ import annotations

import subprocess

import pytest

from service.model_setup import DEFAULT_MODEL_DIR
from tests.server_process import REPO, free_port, serve_command

HAS_EMBEDDED_MODEL = (DEFAULT_MODEL_DIR / "config.json").is_file()

Refusal = tuple[int, str]
"""(exit code, stderr)"""


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Refusal]:
    folder = tmp_path_factory.mktemp("serve-cli")
    cases = {
        "missing": [str(folder / "no-such-model")],
        "empty folder": [str(folder)],
        "bad flag": [str(folder), "--max-num-seqs", "0"],
    }
    if not HAS_EMBEDDED_MODEL:  # with it, `serve` alone would start serving
        cases["no model"] = []
    processes = {
        name: subprocess.Popen(
            [*serve_command(), "serve", *args, "--port", str(free_port())],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in cases.items()
    }
    results = {}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=120)
        results[name] = (process.returncode, stderr)
    return results


def assert_refused(refusal: Refusal, *phrases: str) -> None:
    code, stderr = refusal
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("canvas-serve: "), stderr
    for phrase in phrases:
        assert phrase in stderr, stderr


@pytest.mark.skipif(HAS_EMBEDDED_MODEL, reason="the embedded default model is present")
def test_no_model_and_no_embedded_model(refusals: dict[str, Refusal]) -> None:
    assert_refused(refusals["no model"], "no model given", "canvas-serve serve /path/to/model")


def test_a_model_path_that_does_not_exist(refusals: dict[str, Refusal]) -> None:
    assert_refused(refusals["missing"], "no-such-model", "does not exist")


def test_a_folder_without_a_checkpoint(refusals: dict[str, Refusal]) -> None:
    assert_refused(refusals["empty folder"], "config.json is missing")


def test_an_out_of_range_flag(refusals: dict[str, Refusal]) -> None:
    assert_refused(refusals["bad flag"], "max_num_seqs")
