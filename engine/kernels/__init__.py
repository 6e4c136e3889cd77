"""Triton kernels for the GPU path (issue 8); `engine.kernels.dispatch` decides when they run.

The plain-torch functions in `engine.model.attention` and `engine.sampler` stay the reference: every
kernel here is tested against them (tests/kernels), on CUDA when present and under
`TRITON_INTERPRET=1` on the CPU otherwise.
"""
