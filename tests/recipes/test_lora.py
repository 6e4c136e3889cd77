"""The `sudoku-hard` LoRA recipe: its adapter files are PEFT's (PEFT on transformers gives the training
forward's logits), the saved adapter loads back, and a few trainer steps change only the adapter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from engine.generate import generate
from engine.model.loader import load_checkpoint
from engine.request import SamplingParams
from engine.sampler import soft_embedding
from recipes.sudoku import MODEL_DIR, tokens
from recipes.sudoku import lora as lora_module
from recipes.sudoku.adapter_generate import generate_with_adapter
from recipes.sudoku.dense_forward import head_logits, lm_head
from recipes.sudoku.lora import ADAPTER_DIR, LoRATrainConfig, LoRATrainer, main
from recipes.sudoku.lora_adapter import Adapter, LoRASpec, load_adapter, our_module, peft_module
from recipes.sudoku.lora_validate import Validation
from recipes.sudoku.puzzles import from_string
from tests.recipes.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-base"))


def _random_adapter(base_dir: Path, spec: LoRASpec) -> Adapter:
    """The base with `spec`'s deltas, B drawn non-zero so that every delta changes the logits."""
    model = load_checkpoint(base_dir, with_tokenizer=False).model.eval()
    generator = torch.Generator().manual_seed(1)
    adapter = Adapter.attach(model, spec, generator)
    for module in adapter.modules.values():
        for weight in module.lora_B.values():
            with torch.no_grad():
                weight.normal_(0, 0.1, generator=generator)
    return adapter


def _ours(
    adapter: Adapter, prompts: torch.Tensor, canvases: torch.Tensor, processed: torch.Tensor | None
) -> torch.Tensor:
    """Logits of the training forward with the adapter: (B, C, V)."""
    head = lm_head(adapter.model)
    passes = adapter.passes()
    soft = None if processed is None else soft_embedding(processed, head)
    cache = passes.encode(adapter.model, prompts)
    return head_logits(passes.decode(adapter.model, cache, canvases, soft), head)


def _transformers(
    model: torch.nn.Module, prompts: torch.Tensor, canvases: torch.Tensor, processed: torch.Tensor | None
) -> torch.Tensor:
    """Logits of transformers' encoder pass over the prompts, then its decoder over the canvases."""
    reference = model.get_base_model() if isinstance(model, PeftModel) else model
    cache = DynamicCache(config=reference.config.get_text_config(decoder=True))
    reference.model.encoder(input_ids=prompts, past_key_values=cache)
    out = reference(decoder_input_ids=canvases, past_key_values=cache, self_conditioning_logits=processed)
    return out.logits  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "spec",
    [
        LoRASpec(rank=4, alpha=8.0, use_rslora=True),
        LoRASpec(rank=2, alpha=4.0, use_rslora=False, mlp=False),
        LoRASpec(rank=3, alpha=3.0, attention=False, self_conditioning=False),
        LoRASpec(rank=2, alpha=4.0, use_rslora=True, mlp=False, experts=True),
        LoRASpec(rank=3, alpha=6.0, attention=False, mlp=False, experts=True),
    ],
)
def test_peft_gives_the_training_forward_logits(base_dir: Path, tmp_path: Path, spec: LoRASpec) -> None:
    adapter = _random_adapter(base_dir, spec)
    adapter.save(tmp_path / "adapter", str(base_dir))
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    wrapped = {name for name, module in peft.named_modules() if hasattr(module, "lora_A") and module.lora_A}
    ours = {
        key.removesuffix(".lora_A.weight") for key in adapter.state_dict() if key.endswith(".lora_A.weight")
    }
    assert ours == wrapped, "PEFT wraps exactly the modules the adapter file holds deltas for"
    assert all(our_module(name.removeprefix("base_model.model.")) for name in ours)
    generator = torch.Generator().manual_seed(2)
    prompts = torch.randint(tokens.BLANK, tokens.BLANK + 10, (2, tokens.CANVAS_LENGTH), generator=generator)
    prompts[:, 0] = 2  # <bos>
    canvases = torch.randint(0, tokens.VOCAB_SIZE, (2, tokens.CANVAS_LENGTH), generator=generator)
    processed = torch.randn(2, tokens.CANVAS_LENGTH, tokens.VOCAB_SIZE, generator=generator)
    with torch.no_grad():
        for soft in (None, processed):
            expected = _transformers(peft, prompts, canvases, soft)
            torch.testing.assert_close(
                _ours(adapter, prompts, canvases, soft), expected, atol=1e-4, rtol=1e-4
            )
            with peft.disable_adapter():
                base = _transformers(peft, prompts, canvases, soft)
            assert (expected - base).abs().max() > 1e-2, "the adapter should change the logits"


def test_each_side_matters(base_dir: Path) -> None:
    """Zeroing only the encoder-side deltas changes the logits: the prompt pass runs them."""
    adapter = _random_adapter(base_dir, LoRASpec(rank=4))
    prompts = torch.full((1, tokens.CANVAS_LENGTH), tokens.BLANK)
    canvases = torch.randint(
        0, tokens.VOCAB_SIZE, (1, tokens.CANVAS_LENGTH), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        both = _ours(adapter, prompts, canvases, None)
        for module in adapter.modules.values():
            if "encoder" in module.lora_B:
                module.lora_B["encoder"].zero_()
        assert (both - _ours(adapter, prompts, canvases, None)).abs().max() > 1e-3


def test_target_modules_name_only_text_projections() -> None:
    pattern = LoRASpec().target_modules()

    assert re.fullmatch(pattern, "model.encoder.language_model.layers.3.self_attn.q_proj")
    assert re.fullmatch(pattern, "model.decoder.layers.11.mlp.down_proj")
    assert re.fullmatch(pattern, "model.decoder.self_conditioning.up_proj")
    assert not re.fullmatch(pattern, "model.encoder.vision_tower.encoder.layers.0.self_attn.q_proj.linear")
    assert not re.fullmatch(pattern, "model.encoder.language_model.self_conditioning.up_proj")
    assert not re.fullmatch(pattern, "model.decoder.layers.0.router.proj")
    for path in (
        "model.encoder.language_model.layers.1.mlp.up_proj",
        "model.decoder.self_conditioning.up_proj",
    ):
        assert peft_module(*our_module(path)) == path
    with pytest.raises(ValueError, match="has no encoder-side module"):
        peft_module("self_conditioning.up_proj", "encoder")


def test_trainer_steps_change_only_the_adapter_and_save_it(base_dir: Path, tmp_path: Path) -> None:
    config = LoRATrainConfig(
        rank=4, alpha=4.0, batch_size=4, pool_size=4, compile=False, steps=3, warmup=1, lr=1e-2
    )
    trainer = LoRATrainer(config, base_dir, tmp_path / "adapter", tmp_path / "state.pt", tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    trainer.run(tmp_path / "log.jsonl")
    assert trainer.step == 3
    after = {k: v for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before), "the base weights must stay frozen"
    assert any(float(m.lora_B["decoder"].abs().max()) > 0 for m in trainer.adapter.modules.values())
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["r"] == 4 and config_json["use_rslora"] is True
    loaded = load_adapter(load_checkpoint(base_dir, with_tokenizer=False).model, tmp_path / "adapter")
    saved = trainer.adapter.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())


def test_bf16_base_trains_fp32_deltas_close_to_the_fp32_forward(base_dir: Path, tmp_path: Path) -> None:
    """`--dtype bfloat16`: the frozen base runs in bf16, the deltas and their gradients stay fp32, and the
    bf16 forward's logits follow the fp32 forward's for the same deltas (within bf16 rounding)."""
    config = LoRATrainConfig(
        rank=4,
        alpha=4.0,
        batch_size=4,
        pool_size=4,
        compile=False,
        steps=2,
        warmup=1,
        lr=1e-2,
        dtype="bfloat16",
    )
    trainer = LoRATrainer(config, base_dir, tmp_path / "adapter", tmp_path / "state.pt", tmp_path)
    assert trainer.model.embed_tokens.weight.dtype == torch.bfloat16
    trainer.run(tmp_path / "log.jsonl")
    deltas = list(trainer.adapter.parameters())
    assert all(p.dtype == torch.float32 for p in deltas)
    grads = [p.grad for p in deltas if p.grad is not None]  # the prompt pass skips the last layer's MLP
    assert len(grads) > len(deltas) // 2 and all(g.dtype == torch.float32 for g in grads)
    assert any(float(m.lora_B["decoder"].abs().max()) > 0 for m in trainer.adapter.modules.values())
    fp32 = load_adapter(load_checkpoint(base_dir, with_tokenizer=False).model, tmp_path / "adapter")
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(tokens.BLANK, tokens.BLANK + 10, (2, tokens.CANVAS_LENGTH), generator=generator)
    prompts[:, 0] = 2  # <bos>
    canvases = torch.randint(0, tokens.VOCAB_SIZE, (2, tokens.CANVAS_LENGTH), generator=generator)
    with torch.no_grad():
        low = _ours(trainer.adapter, prompts, canvases, None)
        full = _ours(fp32, prompts, canvases, None)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.15, rtol=0.05)


def test_an_unknown_training_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match=r"float16.*float32, bfloat16"):
        LoRATrainConfig(dtype="float16")


def test_self_cond_rounds_are_at_least_one() -> None:
    with pytest.raises(ValueError, match="self_cond_rounds 0"):
        LoRATrainConfig(self_cond_rounds=0)


def test_command_line_run_and_resume(base_dir: Path, tmp_path: Path) -> None:
    argv = [
        "--base",
        str(base_dir),
        "--out",
        str(tmp_path / "hard"),
        "--data",
        str(tmp_path),
        "--threads",
        "1",
    ]
    argv += ["--rank", "2", "--batch-size", "2", "--pool-size", "4", "--compile", "false", "--steps", "2"]
    argv += ["--own-canvas", "true", "--self-cond-prob", "1.0"]
    assert main(argv) == 0
    assert (tmp_path / "hard" / "adapter_model.safetensors").is_file()
    assert main([*argv, "--resume", "--steps", "3"]) == 0
    assert torch.load(tmp_path / "hard-state.pt", weights_only=False)["step"] == 3


def test_engine_serves_the_saved_adapter(base_dir: Path, tmp_path: Path) -> None:
    """`adapter_generate` (eval.py --adapter): a zero adapter generates as the base does; a trained-like
    one (random B) changes the outputs."""
    checkpoint = load_checkpoint(base_dir, with_tokenizer=False)
    prompts = [[2, *([tokens.BLANK] * 81)], [2, *([tokens.BLANK + 1] * 81)]]
    params = [SamplingParams(seed=i, max_denoising_steps=4) for i in range(2)]
    base = generate(checkpoint.model, checkpoint.defaults, prompts, params)
    zero = Adapter.attach(
        load_checkpoint(base_dir, with_tokenizer=False).model, LoRASpec(rank=4), torch.Generator()
    )
    zero.save(tmp_path / "zero", str(base_dir))
    served = generate_with_adapter(checkpoint.model, checkpoint.defaults, prompts, params, tmp_path / "zero")
    assert [r.token_ids for r in served] == [r.token_ids for r in base]
    _random_adapter(base_dir, LoRASpec(rank=4, experts=True)).save(tmp_path / "random", str(base_dir))
    served = generate_with_adapter(
        checkpoint.model, checkpoint.defaults, prompts, params, tmp_path / "random"
    )
    assert [r.token_ids for r in served] != [r.token_ids for r in base]


@pytest.mark.skipif(
    not (ADAPTER_DIR / "adapter_model.safetensors").is_file()
    or not (MODEL_DIR / "model.safetensors").is_file(),
    reason="the shipped model or the sudoku-hard adapter is absent (train it with recipes/sudoku/lora.py)",
)
def test_shipped_adapter_loads_in_peft_with_the_training_forward_logits() -> None:
    adapter = load_adapter(load_checkpoint(MODEL_DIR, with_tokenizer=False).model.eval(), ADAPTER_DIR)
    config = json.loads((ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "models/sudoku"
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(MODEL_DIR, dtype=torch.float32)
    peft = PeftModel.from_pretrained(reference, ADAPTER_DIR).eval()
    puzzle = "..589.2.1784.5.....92346..75.7283...6..514..2.1....3...7.4.196.....357....1.784.3"
    prompts = torch.tensor([tokens.prompt_ids(from_string(puzzle))])
    canvases = torch.randint(
        0, tokens.VOCAB_SIZE, (1, tokens.CANVAS_LENGTH), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        expected = _transformers(peft, prompts, canvases, None)
        torch.testing.assert_close(_ours(adapter, prompts, canvases, None), expected, atol=1e-4, rtol=1e-4)
        with peft.disable_adapter():
            assert (expected - _transformers(peft, prompts, canvases, None)).abs().max() > 1e-3


def test_validation_keeps_the_best_adapter(base_dir: Path, tmp_path: Path) -> None:
    """With validation after every step, the output holds the deltas of the first validated step (the
    tiny random model solves nothing, so no later one is better) and `-last` the latest ones."""
    config = LoRATrainConfig(
        rank=4, batch_size=2, pool_size=4, compile=False, steps=3, warmup=1, lr=1e-2,
        eval_minutes=1e-9, eval_size=2,
    )  # fmt: skip
    trainer = LoRATrainer(config, base_dir, tmp_path / "hard", tmp_path / "state.pt", tmp_path)
    first: dict[str, torch.Tensor] = {}
    original = trainer.validate

    def remember_first() -> dict[str, object]:
        if not first:
            first.update(trainer.adapter.state_dict())
        return original()

    trainer.validate = remember_first  # type: ignore[method-assign]
    trainer.run(tmp_path / "log.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    valid = [row for row in rows if row.get("kind") == "valid"]
    assert [row["step"] for row in valid] == [1, 2, 3]
    assert [row["kept"] for row in valid] == [True, False, False]
    assert all(row["solved"] == 0.0 and row["median_steps"] is None for row in valid)
    model = load_checkpoint(base_dir, with_tokenizer=False).model
    best = load_adapter(model, tmp_path / "hard").state_dict()
    assert all(torch.equal(first[k], v) for k, v in best.items())
    last = load_adapter(load_checkpoint(base_dir, with_tokenizer=False).model, tmp_path / "hard-last")
    assert all(torch.equal(v, trainer.adapter.state_dict()[k]) for k, v in last.state_dict().items())
    assert any(not torch.equal(first[k], v) for k, v in last.state_dict().items())


def test_a_validation_is_better_within_the_median_bound_then_with_more_solved_then_fewer_steps() -> None:
    assert Validation(0.5, 12.0).better(None)
    assert Validation(0.6, 11.0).better(Validation(0.5, 12.0))
    assert Validation(0.5, 11.0).better(Validation(0.5, 12.0))
    assert not Validation(0.5, 12.0).better(Validation(0.5, 12.0))
    assert not Validation(0.4, 3.0).better(Validation(0.5, 12.0))
    assert not Validation(0.64, 18.0).better(Validation(0.62, 12.0)), "past 12 steps misses the target"
    assert Validation(0.62, 12.0).better(Validation(0.64, 18.0))
    assert Validation(0.3, 20.0).better(Validation(0.2, 13.0)), "past the bound: more solved still wins"


def test_own_canvas_reaches_the_loss_on_self_conditioned_steps(
    base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bool, bool]] = []
    original = lora_module.training_loss

    def spy(*args: object, **kwargs: object) -> object:
        seen.append((bool(args[3]), bool(kwargs["own_canvas"])))
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lora_module, "training_loss", spy)
    config = LoRATrainConfig(
        rank=2,
        batch_size=2,
        pool_size=4,
        compile=False,
        steps=6,
        warmup=1,
        own_canvas=True,
        self_cond_prob=0.5,
    )
    LoRATrainer(config, base_dir, tmp_path / "a", tmp_path / "s.pt", tmp_path).run(tmp_path / "log.jsonl")
    assert {own for self_cond, own in seen if self_cond} == {True}
    assert {own for self_cond, own in seen if not self_cond} <= {False}
    assert any(self_cond for self_cond, _ in seen)
