"""The grouped-matmul experts against the reference loop over experts (`looped_experts`)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import dispatch
from engine.kernels.grouped_experts import grouped_experts, grouped_mm_fits
from engine.model.layers import Experts
from engine.model.methods import plain
from engine.model.methods.plain import GroupedExperts, LoopedExperts, looped_experts
from engine.model.methods.selection import plain_experts_method
from tests.engine.checkpoints import tiny_model_config


def experts(num: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device) -> Experts:
    module = Experts.__new__(Experts)
    torch.nn.Module.__init__(module)
    module.method = LoopedExperts()
    gen = torch.Generator().manual_seed(num * hidden + inter)
    module.gate_up_proj = torch.nn.Parameter(torch.randn(num, 2 * inter, hidden, generator=gen) * 0.2)
    module.down_proj = torch.nn.Parameter(torch.randn(num, hidden, inter, generator=gen) * 0.2)
    return module.to(device=device, dtype=dtype).requires_grad_(False)


def routing(
    tokens: int, num: int, k: int, used: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k routing over the first `used` experts (the rest get no tokens); weights (T, k) fp32."""
    gen = torch.Generator().manual_seed(tokens * 31 + num)
    ids = torch.stack([torch.randperm(used, generator=gen)[:k] for _ in range(tokens)])  # (T, k)
    weights = torch.rand(tokens, k, generator=gen)
    return weights.to(device), ids.to(device)


@pytest.mark.parametrize(
    ("tokens", "num", "k", "used", "hidden", "inter"),
    [(1, 4, 1, 4, 32, 16), (7, 4, 2, 4, 64, 24), (50, 8, 2, 3, 32, 16), (129, 8, 4, 8, 64, 32)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matches_loop(
    tokens: int,
    num: int,
    k: int,
    used: int,
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    module = experts(num, hidden, inter, dtype, device)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(device, dtype)
    weights, ids = routing(tokens, num, k, used, device)
    assert grouped_mm_fits(x, module.gate_up_proj, module.down_proj)
    got = grouped_experts(x, weights, ids, module.gate_up_proj, module.down_proj)
    expected = looped_experts(x, weights, ids, module.gate_up_proj, module.down_proj)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        return
    # bf16: the two paths round in different places; each must be as close to fp32 as the other.
    exact_module = module.float()
    exact = looped_experts(x.float(), weights, ids, exact_module.gate_up_proj, exact_module.down_proj)
    loop_error = (expected.float() - exact).abs().max()
    assert (got.float() - exact).abs().max() <= 2 * loop_error + 1e-3


def test_forward_takes_grouped_path_only_when_selected(device: torch.device) -> None:
    """The method is picked once (per device, dtype and widths), and `forward` runs only that one."""
    config = tiny_model_config()
    with dispatch.force(True):
        selected = plain_experts_method(config, device, torch.float32)
    with dispatch.force(False):
        reference = plain_experts_method(config, device, torch.float32)
    assert isinstance(selected, GroupedExperts) and type(reference) is LoopedExperts
    module = experts(4, 32, 16, torch.float32, device)
    x = torch.randn(9, 32, device=device)
    weights, ids = routing(9, 4, 2, 4, device)
    calls: list[str] = []

    class Counted(LoopedExperts):
        def apply(self, layer: torch.nn.Module, *args: torch.Tensor) -> torch.Tensor:
            calls.append("loop")
            return super().apply(layer, *args)

    module.method = GroupedExperts()
    grouped = module(x, weights, ids)
    module.method = Counted()
    torch.testing.assert_close(module(x, weights, ids), grouped, atol=1e-5, rtol=1e-5)
    assert calls == ["loop"]


def test_layout_rules() -> None:
    """Rows must be 16-byte multiples; on the CPU the fallback has no weight gradient, so training loops."""
    cpu = torch.device("cpu")
    aligned = experts(4, 32, 16, torch.float32, cpu)
    assert grouped_mm_fits(torch.zeros(3, 32), aligned.gate_up_proj, aligned.down_proj)
    odd = experts(4, 32, 6, torch.float32, cpu)  # 6 fp32 = 24 bytes
    assert not grouped_mm_fits(torch.zeros(3, 32), odd.gate_up_proj, odd.down_proj)
    aligned.requires_grad_(True)
    assert not grouped_mm_fits(torch.zeros(3, 32), aligned.gate_up_proj, aligned.down_proj)
    with torch.no_grad():
        assert grouped_mm_fits(torch.zeros(3, 32), aligned.gate_up_proj, aligned.down_proj)
    half = torch.zeros(3, 32, dtype=torch.float16)
    assert not grouped_mm_fits(half, aligned.gate_up_proj, aligned.down_proj)


def test_cpu_selects_grouped_for_bf16_inference_only() -> None:
    """bf16 on the CPU serves through torch's grouped fallback (faster than the loop); fp32 keeps the
    reference loop, and a training step on grouped weights still loops (no weight gradient)."""
    config = tiny_model_config()
    cpu = torch.device("cpu")
    with dispatch.force(None):
        assert isinstance(plain_experts_method(config, cpu, torch.bfloat16), GroupedExperts)
        assert type(plain_experts_method(config, cpu, torch.float32)) is LoopedExperts


def test_a_large_cpu_step_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above `CPU_GROUPED_MAX_ROWS` (token, expert) rows the CPU's loop is the faster path."""
    module = experts(4, 32, 16, torch.bfloat16, torch.device("cpu"))
    module.method = GroupedExperts()
    x = torch.randn(9, 32).bfloat16()
    weights, ids = routing(9, 4, 2, 4, torch.device("cpu"))
    assert GroupedExperts.groups(module, x, ids)
    monkeypatch.setattr(plain, "CPU_GROUPED_MAX_ROWS", 17)
    assert not GroupedExperts.groups(module, x, ids)  # 18 rows
    assert torch.equal(
        module(x, weights, ids), looped_experts(x, weights, ids, module.gate_up_proj, module.down_proj)
    )
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert GroupedExperts.groups(module, x, ids)  # compiled layers group at every size: no graph split


def test_compiled_grouped_experts_gather_their_rows_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under compilation the rows are gathered back and summed in fp32 instead of `index_add_`: the same
    sum, rounded once (fp32: equal to the loop within rounding)."""
    gen = torch.Generator().manual_seed(4)
    tokens, hidden, inter, num, k = 23, 32, 16, 4, 2
    x = torch.randn(tokens, hidden, generator=gen)
    gate_up = torch.randn(num, 2 * inter, hidden, generator=gen) * 0.3
    down = torch.randn(num, hidden, inter, generator=gen) * 0.3
    weights, ids = torch.topk(torch.rand(tokens, num, generator=gen).softmax(-1), k)
    want = looped_experts(x, weights, ids, gate_up, down)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = grouped_experts(x, weights, ids, gate_up, down)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
