"""The GPU path (issue 8): Triton kernels and grouped expert matmuls; `dispatch` decides when they run.

The plain-torch functions in `engine.model.attention`, `engine.sampler` and `Experts.looped` stay the
reference: every kernel here is tested against them (tests/kernels), on CUDA when present and under
`TRITON_INTERPRET=1` on the CPU otherwise.
"""
