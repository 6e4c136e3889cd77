"""`warm_up`: throw-away requests run to the end and leave no trace in the cache or the statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import lm_head
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.llm import LLM
from engine.model.loader import load_checkpoint
from engine.request import SamplingParams
from engine.warm_up import WARM_UP_STEPS, warm_up
from tests.engine.checkpoints import save_reference, save_tokenizer


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    save_reference(folder, seed=4)
    save_tokenizer(folder)
    return folder


def test_warm_up_runs_every_slot_and_leaves_no_trace(path: Path) -> None:
    loaded = load_checkpoint(path, with_tokenizer=False)
    engine = Engine(loaded.model, loaded.defaults, None, EngineConfig(max_num_seqs=3, max_model_len=128))
    steps: list[int] = []
    original = engine.step

    def counted() -> list:  # type: ignore[type-arg]
        outputs = original()
        steps.append(len(outputs))
        return outputs

    engine.step = counted  # type: ignore[method-assign]
    assert warm_up(engine) > 0
    assert len(steps) >= WARM_UP_STEPS + 1  # a prefill, then the denoise steps
    assert not engine.has_unfinished()
    assert all(engine.scheduler.kv.num_cached_blocks(g) == 0 for g in engine.scheduler.kv.group_names)
    assert not engine.stats.records and engine.stats.total_timing.total_s == 0
    prompts = [[2, *range(10, 20)], [2, *range(30, 45)]]
    params = [SamplingParams(seed=i, max_tokens=20) for i in range(2)]
    fresh_loaded = load_checkpoint(path, with_tokenizer=False)
    fresh = Engine(
        fresh_loaded.model, fresh_loaded.defaults, None, EngineConfig(max_num_seqs=3, max_model_len=128)
    )
    want = [r.token_ids for r in LLM(fresh).generate(prompts, params)]
    assert [r.token_ids for r in LLM(engine).generate(prompts, params)] == want


def test_warm_up_runs_the_commits_logits_through_the_soft_cap_table(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One warm-up request asks for logprobs, so a compiled engine's soft-cap lookup (built on first
    use) is compiled before the server is ready, not on a user's first logprobs request."""
    loaded = load_checkpoint(path, dtype=torch.bfloat16, with_tokenizer=False)
    engine = Engine(loaded.model, loaded.defaults, None, EngineConfig(max_num_seqs=2, max_model_len=128))
    engine.runner.head = engine.runner.head.with_table()  # what `compile=True` builds
    calls: list[tuple[int, ...]] = []
    lookup = lm_head.table_softcap

    def counted(raw: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(raw.shape))
        return lookup(raw, table)

    monkeypatch.setattr(lm_head, "table_softcap", counted)
    warm_up(engine)
    assert calls and all(shape[-1] == loaded.model.config.vocab_size for shape in calls)
