"""`--dtype auto`: bf16 on CUDA and on CPUs that multiply bf16 natively, fp32 elsewhere; the start-up log
says which and why."""

from __future__ import annotations

import torch

from service.model_setup import auto_cpu_dtype, cpu_flags, device_and_dtype, dtype_choice
from service.settings import Settings


def test_native_bf16_flags_pick_bfloat16() -> None:
    assert auto_cpu_dtype({"avx2", "avx512f", "avx512_bf16"}) == (torch.bfloat16, "the CPU has avx512_bf16")
    dtype, reason = auto_cpu_dtype({"amx_bf16", "amx_tile", "avx512_bf16"})
    assert dtype == torch.bfloat16 and reason == "the CPU has amx_bf16 and avx512_bf16"


def test_no_native_bf16_picks_float32() -> None:
    # AVX512 alone (Zen 3, Skylake) or no flags at all (not Linux): bf16 matmuls would be emulated.
    assert auto_cpu_dtype({"avx2", "avx512f", "avx512bw"})[0] == torch.float32
    assert auto_cpu_dtype(set())[0] == torch.float32


def test_auto_on_this_cpu_follows_its_flags_and_says_why() -> None:
    native = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    settings = Settings(device="cpu")
    device, dtype = device_and_dtype(settings)
    assert device == torch.device("cpu") and dtype == (torch.bfloat16 if native else torch.float32)
    expected = f"the CPU has {' and '.join(native)}" if native else "the CPU has no AMX-BF16 or AVX512-BF16"
    assert (
        dtype_choice(settings, device, dtype)
        == f"{str(dtype).removeprefix('torch.')} (--dtype auto: {expected})"
    )


def test_explicit_dtype_wins() -> None:
    assert device_and_dtype(Settings(device="cpu", dtype="float32"))[1] == torch.float32
    settings = Settings(device="cpu", dtype="bfloat16")
    assert device_and_dtype(settings)[1] == torch.bfloat16
    assert dtype_choice(settings, torch.device("cpu"), torch.bfloat16) == "bfloat16 (--dtype bfloat16)"
