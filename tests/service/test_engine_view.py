"""The engine view's last step lists the requests that had work in it, not every running request."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.outputs import RunnerOutput, SchedulerOutput
from engine.request import SamplingParams
from service.engine_view import EngineView
from service.model_setup import build_service
from service.settings import Settings
from tests.engine.checkpoints import CANVAS, save_servable


def test_the_last_step_lists_only_the_requests_it_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = save_servable(tmp_path)
    settings = Settings(
        model=model, device="cpu", max_num_seqs=2, max_num_batched_tokens=CANVAS, engine_process=False
    )
    service, metrics = build_service(settings)  # room for one canvas a step
    engine = service.engine.engine  # stepped here, synchronously: the loop thread is never started
    served: list[tuple[str, ...]] = []
    execute = engine.runner.execute

    def spy(scheduled: SchedulerOutput) -> RunnerOutput:
        served.append(tuple(w.request_id for w in [*scheduled.causal, *scheduled.denoise]))
        return execute(scheduled)

    monkeypatch.setattr(engine.runner, "execute", spy)
    for i in range(2):
        params = SamplingParams(max_tokens=2 * CANVAS, max_denoising_steps=3, seed=i, stop_token_ids=())
        engine.add_request(f"r{i}", [2, 5, 6], params)
    view = EngineView(service, metrics)
    partial_steps = 0
    while engine.has_unfinished():
        engine.step()
        snapshot = view.snapshot()
        ids = snapshot["last_step"]["request_ids"]
        assert ids == list(dict.fromkeys(served[-1])), (ids, served[-1])
        running = [row["id"] for row in snapshot["running"]]
        assert set(ids) <= {"r0", "r1"}
        partial_steps += len(running) == 2 and len(ids) == 1
    assert partial_steps > 0, "with one canvas a step, two running requests must take turns"
