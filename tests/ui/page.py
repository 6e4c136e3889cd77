"""Driving the live canvas page from tests: start a generation, find it in the engine view."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

LONG_RUN = {"max_denoising_steps": 1024}
"""With the untrained model a canvas never converges, so this runs for a minute or more on the CPU."""
TIMEOUT_MS = 60_000


def start(page: Any, prompt: str, **knobs: Any) -> Any:
    """Fill the form, press Start, and return the new generation's card."""
    page.select_option("[name=api]", "completions")
    page.fill("[name=prompt]", prompt)
    for name, value in knobs.items():
        page.fill(f"[name={name}]", str(value))
    before = page.locator(".generation").count()
    page.click("#start")
    page.wait_for_function("n => document.querySelectorAll('.generation').length > n", arg=before)
    number = page.locator(".generation").first.get_attribute("data-number")
    return page.locator(f".generation[data-number='{number}']")


def wait_state(card: Any, state: str, timeout_ms: int = TIMEOUT_MS) -> None:
    card.page.wait_for_function(
        "([el, state]) => el.dataset.state === state", arg=[card.element_handle(), state], timeout=timeout_ms
    )


def filled_text(field: Any, timeout_ms: int = TIMEOUT_MS) -> str:
    """The text of `field` once the page has filled it in (fields start empty and fill asynchronously)."""
    filled = "el => el.textContent.length > 0"
    field.page.wait_for_function(filled, arg=field.element_handle(), timeout=timeout_ms)
    return str(field.text_content())


def engine_id(card: Any) -> str:
    """The engine's id of the card's request (the API id + "-0"), once the first chunk arrived."""
    return f"{filled_text(card.locator('[data-field=id]'))}-0"


def engine_row(page: Any, request_id: str) -> Any:
    return page.locator(f"#engine tr[data-request-id='{request_id}']")


def wait_until(condition: Any, timeout_s: float = 30.0, interval_s: float = 0.2) -> Any:
    """Poll `condition()` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout_s
    value = condition()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = condition()
    assert value, f"condition not met after {timeout_s}s"
    return value


def screenshot(page: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
