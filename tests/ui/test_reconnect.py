"""The page survives a server restart: the engine view reconnects, a cut generation can be restarted."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ui.page import LONG_RUN, engine_id, engine_row, screenshot, start, wait_state
from tests.ui.server import UIServer

pytestmark = [pytest.mark.ui, pytest.mark.slow]

NETWORK_ERRORS = ("net::ERR_CONNECTION_REFUSED", "net::ERR_EMPTY_RESPONSE", "Failed to load resource")


@pytest.fixture
def restartable(untrained_model: Path, artifacts: Path) -> Iterator[UIServer]:
    remote = UIServer(untrained_model, "restartable", artifacts).start()
    yield remote
    remote.kill()


def test_the_page_reconnects_after_a_server_restart(
    restartable: UIServer, new_page: Any, artifacts: Path
) -> None:
    page, log = new_page(restartable.url, allow_errors=True)
    card = start(page, "1", **LONG_RUN)
    first_id = engine_id(card)
    engine_row(page, first_id).wait_for(timeout=30_000)

    restartable.kill()  # SIGKILL by PID: a crash, not a drain
    wait_state(card, "error")
    assert card.locator("[data-field=error]").text_content()
    page.wait_for_selector("#engine[data-connection=offline]", timeout=30_000)
    screenshot(page, artifacts, "server-gone")

    restartable.start()  # the same port
    page.wait_for_selector("#engine[data-connection=live]", timeout=30_000)
    card.locator("[data-action=restart]").click()
    wait_state(card, "streaming")
    second_id = engine_id(card)
    assert second_id != first_id
    engine_row(page, second_id).wait_for(timeout=30_000)
    card.locator("[data-action=stop]").click()
    wait_state(card, "stopped")
    # A graceful stop is not held up by the page's open engine-events stream.
    restartable.signal(signal.SIGTERM)
    assert restartable.wait(20) == 0
    page.wait_for_selector("#engine[data-connection=offline]", timeout=30_000)
    # Only the refused connections while the server was down were logged.
    unexpected = [e for e in log.errors if not any(n in e for n in NETWORK_ERRORS)]
    assert not unexpected, unexpected
