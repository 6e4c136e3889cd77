"""The live canvas page in headless Chromium against the real server (see conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.server_process import REPO
from tests.ui.page import (
    LONG_RUN,
    engine_id,
    engine_row,
    filled_text,
    screenshot,
    start,
    wait_state,
    wait_until,
)
from tests.ui.server import UIServer

pytestmark = [pytest.mark.ui, pytest.mark.slow]

PUZZLE = "..589.2.1784.5.....92346..75.7283...6..514..2.1....3...7.4.196.....357....1.784.3"
DOCS_SCREENSHOT = REPO / "docs" / "ui.png"
WIKI_PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
WIKI_SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def board_digits(card: Any) -> str:
    return "".join(c or "." for c in card.locator(".board .cell").all_text_contents())


def is_valid_solution(grid: str, puzzle: str) -> bool:
    rows = [grid[9 * r : 9 * r + 9] for r in range(9)]
    cols = [grid[c::9] for c in range(9)]
    boxes = [
        "".join(grid[9 * (3 * (b // 3) + r) + 3 * (b % 3) + c] for r in range(3) for c in range(3))
        for b in range(9)
    ]
    units_ok = all(sorted(unit) == list("123456789") for unit in rows + cols + boxes)
    return len(grid) == 81 and units_ok and all(p in (".", g) for p, g in zip(puzzle, grid, strict=True))


def test_the_page_loads_only_from_its_own_server(server: UIServer, new_page: Any) -> None:
    page, log = new_page(server.url)
    assert page.title().startswith("canvas-serve")
    # The engine panel fills in from its first snapshot poll; the form defaults come with it.
    assert "sudoku-untrained" in filled_text(page.locator("#engine [data-field=model]"))
    assert page.locator("[name=max_denoising_steps]").input_value() == "48"  # the checkpoint's default
    foreign = [url for url in log.urls if not url.startswith((server.url, "data:"))]
    assert not foreign, foreign
    assert {f"{server.url}/static/app.js", f"{server.url}/static/style.css"} <= set(log.urls)


def test_the_canvas_streams_and_the_board_marks_conflicts(
    server: UIServer, new_page: Any, artifacts: Path
) -> None:
    page, _ = new_page(server.url)
    card = start(page, PUZZLE, max_denoising_steps=40, seed=3)
    page.wait_for_function(
        "el => el.querySelectorAll('.tok.renoised').length > 0", arg=card.element_handle(), timeout=60_000
    )
    assert card.locator(".tok").count() == 82  # the Sudoku canvas: 81 cells + <eos>
    assert card.locator(".board .cell.clue").count() == sum(c != "." for c in PUZZLE)
    assert "canvas 0 · step" in card.locator("[data-field=counters]").text_content()
    screenshot(page, artifacts, "untrained-streaming")
    wait_state(card, "done")
    # Random weights do not solve Sudoku: the final board is invalid and its conflicts are marked.
    assert card.locator(".sudoku").get_attribute("data-state") == "invalid"
    assert card.locator(".board .cell.conflict").count() > 0
    assert "finish:" in card.locator("[data-field=summary]").text_content()


def test_board_and_renoise_rules_in_the_browser(server: UIServer, new_page: Any) -> None:
    page, _ = new_page(server.url)
    result = page.evaluate(
        """async () => {
          const s = await import('/static/sudoku.js');
          const c = await import('/static/canvas_view.js');
          const solution = SOLUTION, puzzle = PUZZLE;
          const swapped = [...solution]; [swapped[2], swapped[3]] = [swapped[3], swapped[2]];
          const changedClue = [...solution]; changedClue[0] = '9';
          const prev = {canvas_index: 0, token_ids: [1, 2, 3], confidence: [90, 90, 90]};
          // position 1 changed while unsure (re-noised), 2 changed but confident (settled)
          return {
            solved: s.isSolved([...solution], puzzle),
            swappedSolved: s.isSolved(swapped, puzzle),
            swappedConflicts: [2, 3].every((p) => s.conflicts(swapped, puzzle).has(p)),
            changedClue: s.conflicts(changedClue, puzzle).has(0),
            renoised: [...c.renoisedPositions(
              prev, {canvas_index: 0, token_ids: [1, 5, 6], confidence: [9, 9, 90]})].sort(),
            newBlock: c.renoisedPositions(
              prev, {canvas_index: 1, token_ids: [4, 5, 6], confidence: [1, 1, 1]}).size,
          };
        }""".replace("SOLUTION", f"'{WIKI_SOLUTION}'").replace("PUZZLE", f"'{WIKI_PUZZLE}'")
    )
    assert result == {
        "solved": True,
        "swappedSolved": False,
        "swappedConflicts": True,
        "changedClue": True,
        "renoised": [1],
        "newBlock": 0,
    }


def test_a_sudoku_is_solved_on_the_board(sudoku_server: UIServer, new_page: Any, artifacts: Path) -> None:
    page, _ = new_page(sudoku_server.url)
    card = start(page, PUZZLE, seed=0)
    page.wait_for_function(
        "el => el.dataset.state !== 'solving'", arg=card.locator(".sudoku").element_handle(), timeout=120_000
    )
    wait_state(card, "done")
    assert card.locator(".sudoku").get_attribute("data-state") == "solved"
    grid = board_digits(card)
    assert is_valid_solution(grid, PUZZLE), grid
    assert card.locator(".board .cell.conflict").count() == 0
    assert card.locator("[data-field=text]").text_content().startswith(grid)
    path = screenshot(page, artifacts, "sudoku-solved")
    if os.environ.get("CANVAS_SERVE_UPDATE_DOCS_SCREENSHOT"):
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOT)


def test_requests_from_two_tabs_share_the_engine_and_the_page_stays_responsive(
    server: UIServer, new_page: Any, artifacts: Path
) -> None:
    first, _ = new_page(server.url)
    second, _ = new_page(server.url)
    cards = [
        start(first, PUZZLE, **LONG_RUN),
        start(first, "1", **LONG_RUN),
        start(second, PUZZLE, **LONG_RUN),
    ]
    ids = [engine_id(card) for card in cards]
    for page in (first, second):
        for request_id in ids:
            engine_row(page, request_id).wait_for(timeout=30_000)
    # Each tab marks its own requests in the engine view, and sees the other tab's too.
    assert [engine_row(first, i).get_attribute("class") for i in ids] == [
        "running mine",
        "running mine",
        "running",
    ]
    assert "mine" in engine_row(second, ids[2]).get_attribute("class")
    running = {row["id"] for row in server.status()["running"]}
    assert set(ids) <= running
    wait_until(lambda: "3 canvases denoised" in first.locator("[data-field=last-step]").text_content())

    first.bring_to_front()  # a background tab's frames are paused (it catches up when shown again)
    measured = measure_responsiveness(first, seconds=4.0)
    (artifacts / "responsiveness.json").write_text(json.dumps(measured, indent=2))
    assert measured["canvases_per_s"] > 2, measured  # canvases really were streaming meanwhile
    assert measured["frames_per_s"] > 5, measured  # and were drawn as they came
    assert measured["mean_render_ms"] < 16, measured  # one frame's work fits in a 60 Hz frame
    # Timer lateness also counts other processes starving the browser on a busy 2-core machine
    # (seen: p95 10-80 ms), so its bound is loose; the page's own work is the render time above.
    assert measured["p95_timer_lag_ms"] < 500, measured
    screenshot(first, artifacts, "two-tabs-first")
    screenshot(second, artifacts, "two-tabs-second")
    first.click("#stop-all")
    second.click("#stop-all")
    for card in cards:
        wait_state(card, "stopped")


def measure_responsiveness(page: Any, seconds: float) -> dict[str, float]:
    """Frames rendered, render cost per frame and event-loop lag (a 50 ms timer's lateness)."""
    read = "() => { const s = window.canvasServe.stats; return {...s, lagSamples: [...s.lagSamples]}; }"
    before = page.evaluate(read)
    time.sleep(seconds)
    after = page.evaluate(read)
    frames = after["frames"] - before["frames"]
    lags = after["lagSamples"][-int(seconds * 20) :] or [0.0]
    return {
        "seconds": seconds,
        "canvases_per_s": (after["canvases"] - before["canvases"]) / seconds,
        "frames_per_s": frames / seconds,
        "mean_render_ms": (after["renderMsTotal"] - before["renderMsTotal"]) / max(frames, 1),
        "max_render_ms": after["renderMsMax"],
        "p95_timer_lag_ms": statistics.quantiles(lags, n=20)[-1] if len(lags) > 1 else lags[0],
        "max_timer_lag_ms": max(lags),
    }


def test_stop_aborts_the_request_on_the_server(server: UIServer, new_page: Any) -> None:
    page, _ = new_page(server.url)
    card = start(page, PUZZLE, **LONG_RUN)
    request_id = engine_id(card)
    engine_row(page, request_id).wait_for(timeout=30_000)
    aborted = server.status()["totals"]["finished"].get("abort", 0)
    card.locator("[data-action=stop]").click()
    wait_state(card, "stopped")

    def gone_and_counted() -> bool:
        status = server.status()
        in_engine = {row["id"] for row in status["running"] + status["waiting"]}
        return request_id not in in_engine and status["totals"]["finished"].get("abort", 0) > aborted

    wait_until(gone_and_counted, timeout_s=30)
    engine_row(page, request_id).wait_for(state="detached", timeout=10_000)
    # A stopped generation can be started again: a new request, which Stop all stops too.
    card.locator("[data-action=restart]").click()
    wait_state(card, "streaming")
    wait_until(lambda: engine_id(card) != request_id)
    page.click("#stop-all")
    wait_state(card, "stopped")


def test_the_schema_box_constrains_the_output(server: UIServer, new_page: Any) -> None:
    """The untrained model's output validates anyway; a box that is not JSON stops the start; a schema
    the server refuses shows its 400 (which the browser also logs: errors allowed)."""
    page, _ = new_page(server.url, allow_errors=True)
    page.fill("[name=schema]", "{not json")
    page.fill("[name=prompt]", PUZZLE)
    before = page.locator(".generation").count()
    page.click("#start")
    assert "JSON schema:" in filled_text(page.locator("#schema-hint"))
    assert page.locator(".generation").count() == before
    page.fill("[name=schema]", json.dumps({"type": "integer", "minimum": 10, "maximum": 99}))
    card = start(page, PUZZLE, max_denoising_steps=2, seed=1)
    wait_state(card, "done")
    assert 10 <= int(card.locator("[data-field=text]").text_content() or "") <= 99
    page.fill("[name=schema]", json.dumps({"type": "integer", "not": {"const": 5}}))
    card = start(page, PUZZLE, max_denoising_steps=2)
    wait_state(card, "error")
    assert "'not' (negation)" in (card.locator("[data-field=error]").text_content() or "")


def test_a_schemas_pinned_skeleton_is_drawn_distinctly(
    server: UIServer, new_page: Any, artifacts: Path
) -> None:
    """The text a schema forces (here the digits both enum values start with) is pinned into the
    canvas from its first step: framed cells that never change; the free cells around them do."""
    page, _ = new_page(server.url)
    page.fill("[name=schema]", json.dumps({"enum": [123456781, 123456789]}))
    card = start(page, PUZZLE, max_denoising_steps=4, seed=2)
    pinned = card.locator(".tok.pinned")
    page.wait_for_function("el => el.querySelectorAll('.tok.pinned').length > 0", arg=card.element_handle())
    assert pinned.all_text_contents() == list("12345678")
    assert [
        int(p) for p in pinned.evaluate_all("cells => cells.map(c => c.title.split(' ')[0].slice(1))")
    ] == list(range(8))
    assert all(
        title.endswith("· pinned") for title in pinned.evaluate_all("cells => cells.map(c => c.title)")
    )
    assert card.locator(".tok:not(.pinned)").count() == 82 - 8
    assert "pinned 8" in card.locator("[data-field=counters]").text_content()
    screenshot(page, artifacts, "pinned-skeleton")
    wait_state(card, "done")
    assert card.locator("[data-field=text]").text_content() in ("123456781", "123456789")
