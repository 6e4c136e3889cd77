"""`--compile`: the dense experts equal the loop, compiled layers give the eager logits, and a compiled
engine generates through them.

Outputs are compared as logits within a tolerance, not as tokens: fused kernels round differently
from eager ones, and a sampled token can flip on a 1e-6 difference (on another CPU, another time).
Inductor compiles C++ on the CPU, so these take a few tens of seconds (one compilation per kind of
layer, shared by every test in the process).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.engine import Engine
from engine.generate import lockstep_config
from engine.llm import LLM
from engine.model import compiled as compiled_module
from engine.model.compiled import compile_layers
from engine.model.loader import load_checkpoint
from engine.model.methods.plain import (
    DenseExperts,
    GroupedExperts,
    LoopedExperts,
    dense_experts,
    gelu_tanh,
    gelu_tanh_by_sigmoid,
    looped_experts,
)
from engine.request import SamplingParams
from tests.engine.checkpoints import save_reference, save_tokenizer
from tests.engine.model_harness import Harness, Part


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_experts_equal_the_loop(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts, top_k = 37, 16, 8, 4, 2
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.3).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=gen) * 0.3).to(dtype)
    probs = torch.rand(tokens, experts, generator=gen)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    want = looped_experts(x, weights, ids, gate_up, down)
    got = dense_experts(x, weights, ids, gate_up, down)
    assert got.dtype == want.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sigmoid_gelu_is_the_tanh_gelu(dtype: torch.dtype) -> None:
    """What compiled layers run for `gelu_tanh`: the same function, rounded as F.gelu rounds."""
    x = torch.linspace(-12, 12, 20001).to(dtype)
    want = torch.nn.functional.gelu(x, approximate="tanh")
    got = gelu_tanh_by_sigmoid(x)
    assert got.dtype == dtype
    tolerance = 2e-6 if dtype == torch.float32 else 8e-3  # bf16: at most one rounding step apart
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    compiled = torch.compile(gelu_tanh, dynamic=False)
    torch.testing.assert_close(compiled(x), want, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(gelu_tanh(x), want, atol=0, rtol=0)  # eager: F.gelu itself


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny checkpoints: 4 experts top-2 (dense when compiled in fp32) and 8 top-2 (the loop, eager)."""
    paths = {}
    for name, experts in (("dense", 4), ("looped", 8)):
        path = tmp_path_factory.mktemp(name)
        save_reference(path, seed=3, num_experts=experts)
        save_tokenizer(path)
        paths[name] = path
    return paths


@pytest.mark.parametrize("kind", ["dense", "looped"])
def test_a_compiled_engine_generates_through_compiled_layers(checkpoints: dict[str, Path], kind: str) -> None:
    prompts = [[2, *range(10, 10 + n)] for n in (5, 12, 23)]
    params = [SamplingParams(seed=i, max_tokens=40, stop_token_ids=()) for i in range(len(prompts))]
    loaded = load_checkpoint(checkpoints[kind], with_tokenizer=False)
    lockstep = lockstep_config(loaded.model, loaded.defaults, prompts, params, 16)
    engine = Engine(loaded.model, loaded.defaults, None, replace(lockstep, compile=True))
    assert {type(layer.experts.method) for layer in loaded.model.layers} == (
        {DenseExperts} if kind == "dense" else {LoopedExperts}
    )
    assert {getattr(layer.forward, "func", None) for layer in loaded.model.layers} == {
        compiled_module._compiled_forward
    }
    results = LLM(engine).generate(prompts, params)
    assert [len(r.token_ids) for r in results] == [40, 40, 40]
    assert all(steps > 0 for r in results for steps in r.steps_per_canvas)


@pytest.mark.parametrize("kind", ["dense", "looped"])
def test_compiled_layers_give_the_eager_logits(checkpoints: dict[str, Path], kind: str) -> None:
    """One step holding two prompt prefills and a self-conditioned canvas, compiled against eager (fp32)."""
    logits = {}
    for compiled in (False, True):
        model = load_checkpoint(checkpoints[kind], with_tokenizer=False).model
        if compiled:
            compile_layers(model)
        harness = Harness(model)
        gen = torch.Generator().manual_seed(5)
        prompt = torch.randint(5, 100, (11,), generator=gen)
        harness.run([Part("a", prompt, 0, True), Part("b", prompt[:7], 0, True)])
        canvas = torch.randint(5, 100, (16,), generator=gen)
        soft = torch.randn(16, model.config.hidden_size, generator=gen)
        logits[compiled] = harness.run(
            [Part("a", canvas, 11, False, soft), Part("b", canvas, 7, False), Part("c", prompt[:5], 0, True)]
        )
    for got, want in zip(logits[True], logits[False], strict=True):
        # Fused loops sum in another order: on an AMD EPYC one logit of 2,048 was 1.4e-5 off.
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_grouped_experts_compile_into_the_layer_in_bf16(checkpoints: dict[str, Path]) -> None:
    """bf16 on the CPU: the grouped experts (no host sync, static shapes) stay grouped and compile into
    the layer's graph; the compiled logits are no further from fp32's than eager bf16's are (fused
    kernels round differently), and a compiled engine's head looks its soft-cap up in a table."""
    logits = {}
    for dtype, compiled in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        model = load_checkpoint(checkpoints["looped"], dtype=dtype, with_tokenizer=False).model
        if compiled:
            compile_layers(model)
        harness = Harness(model)
        gen = torch.Generator().manual_seed(7)
        prompt = torch.randint(5, 100, (13,), generator=gen)
        harness.run([Part("a", prompt, 0, True)])
        (logits[dtype, compiled],) = harness.run(
            [Part("a", torch.randint(5, 100, (16,), generator=gen), 13, False)]
        )
        if dtype == torch.bfloat16:
            assert {type(layer.experts.method) for layer in model.layers} == {GroupedExperts}
    want = logits[torch.float32, False]
    eager_error = (logits[torch.bfloat16, False] - want).abs().max()
    compiled_error = (logits[torch.bfloat16, True] - want).abs().max()
    assert 0 < compiled_error <= 2 * eager_error, (compiled_error, eager_error)
    loaded = load_checkpoint(checkpoints["looped"], dtype=torch.bfloat16, with_tokenizer=False)
    prompts, params = [[2, *range(10, 19)]], [SamplingParams(seed=0, max_tokens=20, stop_token_ids=())]
    lockstep = lockstep_config(loaded.model, loaded.defaults, prompts, params, 16)
    engine = Engine(loaded.model, loaded.defaults, None, replace(lockstep, compile=True))
    assert engine.runner.head.table is not None
    assert [len(r.token_ids) for r in LLM(engine).generate(prompts, params)] == [20]


def test_few_experts_run_dense_only_where_they_would_stay_out_of_the_graph(
    checkpoints: dict[str, Path],
) -> None:
    """4 experts, top-2: fp32 loads them looped (the tiny widths do not meet grouped_mm's alignment),
    which compiled runs dense; bf16 loads them grouped, which on the CPU compile into the layer and stay
    grouped; on CUDA grouped ones stay eager, so they would run dense there."""
    for dtype, loaded, compiled in (
        (torch.float32, LoopedExperts, DenseExperts),
        (torch.bfloat16, GroupedExperts, GroupedExperts),
    ):
        model = load_checkpoint(checkpoints["dense"], dtype=dtype, with_tokenizer=False).model
        assert {type(layer.experts.method) for layer in model.layers} == {loaded}
        compile_layers(model)
        assert {type(layer.experts.method) for layer in model.layers} == {compiled}
    assert not compiled_module._in_graph(GroupedExperts(), torch.device("cuda"))
    assert compiled_module._in_graph(GroupedExperts(), torch.device("cpu"))
    assert not compiled_module._in_graph(LoopedExperts(), torch.device("cpu"))
    assert compiled_module._in_graph(DenseExperts(), torch.device("cuda"))
