"""On-policy chains (`recipes/sudoku/rollout.py`): a chain steps exactly as the engine's sampler steps
a canvas, done chains restart on new puzzles, and the LoRA trainer grades its steps on them."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.model.loader import load_checkpoint
from engine.request import StepParams
from engine.sampler import denoise_step, init_canvas
from recipes.sudoku.data import TrainSampler, dug_pool, split_dug
from recipes.sudoku.dense_forward import decode_canvases, encode_prompts, lm_head
from recipes.sudoku.lora import LoRATrainConfig, LoRATrainer
from recipes.sudoku.rollout import ChainRules, Chains
from recipes.sudoku.train import mean_row
from tests.recipes.helpers import tiny_checkpoint

RULES = ChainRules(max_steps=6, t_min=0.8, t_max=1.2, entropy_bound=0.3, confidence_threshold=0.005)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-base"))


def _sampler(data_dir: Path) -> TrainSampler:
    pool, orders = split_dug(dug_pool(4, data_dir=data_dir))
    return TrainSampler(pool, random.Random(0), 22, 40, dig_orders=orders, dug_fraction=1.0)


def test_a_chain_steps_as_the_engine_sampler_steps_its_canvas(base_dir: Path, tmp_path: Path) -> None:
    model = load_checkpoint(base_dir, with_tokenizer=False).model.eval()
    config = model.config
    chains = Chains(
        _sampler(tmp_path), 1, RULES, config.hidden_size, config.vocab_size, torch.Generator().manual_seed(7)
    )
    state = init_canvas(chains.canvas.shape[1], config.vocab_size, 1, torch.Generator().manual_seed(7))
    params = StepParams(RULES.max_steps, RULES.t_min, RULES.t_max, RULES.entropy_bound, 1, 0.005)
    assert torch.equal(chains.canvas[0], state.tokens)
    with torch.no_grad():
        cache = encode_prompts(model, chains.puzzles.prompts)
        for _ in range(4):
            hidden = decode_canvases(model, cache, chains.canvas, chains.soft)  # (1, C, H)
            done = chains.advance(hidden, lm_head(model))
            result = denoise_step(hidden[0], lm_head(model), [state], [params])[0]
            assert torch.equal(chains.canvas[0], state.tokens)
            assert state.self_cond is not None and torch.equal(chains.soft[0], state.self_cond)
            assert torch.equal(chains.last_argmax[0], state.argmax)
            assert bool(done[0]) == result.finished
    assert int(chains.steps[0]) == 4


def test_done_chains_restart_on_new_puzzles_and_the_others_keep_their_state(tmp_path: Path) -> None:
    chains = Chains(_sampler(tmp_path), 3, RULES, 8, 32, torch.Generator().manual_seed(0))
    chains.steps += 2
    chains.soft += 1.0
    chains.last_argmax.zero_()
    before = (chains.puzzles.targets.clone(), chains.canvas.clone())
    chains.restart(torch.tensor([False, True, False]))
    assert chains.steps.tolist() == [2, 0, 2]
    assert float(chains.soft[1].abs().max()) == 0.0 and float(chains.soft[0].min()) == 1.0
    assert int(chains.last_argmax[1].min()) == -1 and int(chains.last_argmax[2].max()) == 0
    for row in (0, 2):
        assert torch.equal(chains.puzzles.targets[row], before[0][row])
        assert torch.equal(chains.canvas[row], before[1][row])
    assert not torch.equal(chains.canvas[1], before[1][1]), "a restarted chain starts from fresh noise"


def test_chains_end_at_the_step_cap(base_dir: Path, tmp_path: Path) -> None:
    model = load_checkpoint(base_dir, with_tokenizer=False).model.eval()
    rules = ChainRules(max_steps=2, confidence_threshold=0.0)  # never confident: only the cap ends them
    chains = Chains(
        _sampler(tmp_path), 2, rules, model.config.hidden_size, model.config.vocab_size, torch.Generator()
    )
    with torch.no_grad():
        cache = encode_prompts(model, chains.puzzles.prompts)
        first = chains.advance(decode_canvases(model, cache, chains.canvas, chains.soft), lm_head(model))
        second = chains.advance(decode_canvases(model, cache, chains.canvas, chains.soft), lm_head(model))
    assert first.tolist() == [False, False] and second.tolist() == [True, True]


def test_the_trainer_grades_chain_steps_and_changes_only_the_adapter(base_dir: Path, tmp_path: Path) -> None:
    config = LoRATrainConfig(
        rank=2, batch_size=3, pool_size=4, compile=False, steps=4, warmup=1, lr=1e-2, rollout_fraction=0.5
    )
    trainer = LoRATrainer(config, base_dir, tmp_path / "a", tmp_path / "s.pt", tmp_path)
    frozen = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    rows = [trainer.train_step() for _ in range(4)]
    chain_rows = [r for r in rows if r.get("chain") == 1.0]
    assert chain_rows and len(chain_rows) < 4, "seed 0 draws both kinds of step in four"
    assert all({"loss", "grid_acc", "chain_steps", "chain_done"} <= r.keys() for r in chain_rows)
    assert trainer.chains is not None and int(trainer.chains.steps.max()) >= 1
    after = trainer.model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), "the base weights must stay frozen"


def test_before_rollout_from_the_run_is_the_plain_run(base_dir: Path, tmp_path: Path) -> None:
    plain = LoRATrainConfig(rank=2, batch_size=3, pool_size=4, compile=False, steps=3, warmup=1, lr=1e-2)
    late = replace(plain, rollout_fraction=0.5, rollout_from=0.5)  # 3 steps are far from half of 60 min
    runs = [
        LoRATrainer(c, base_dir, tmp_path / n, tmp_path / f"{n}.pt", tmp_path)
        for c, n in ((plain, "p"), (late, "l"))
    ]
    losses = [[trainer.train_step()["loss"] for _ in range(3)] for trainer in runs]
    assert losses[0] == losses[1]
    assert runs[1].chains is None


def test_a_log_window_mixing_both_kinds_of_step_averages_each_column_over_the_rows_that_have_it() -> None:
    rows = [{"loss": 1.0, "chain": 1.0, "chain_steps": 4.0}, {"loss": 3.0, "hard": 0.5}]
    assert mean_row(rows) == {"loss": 2.0, "chain": 1.0, "chain_steps": 4.0, "hard": 0.5}
