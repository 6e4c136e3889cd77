"""The GPU path (issue 8): Triton kernels and grouped expert matmuls; `dispatch` decides when they run.

The plain-torch functions in `engine.attention.reference`, `engine.sampler` and
`engine.model.methods.plain.looped_experts` stay the reference: every kernel here is tested against them
(tests/kernels), on CUDA when present and under `TRITON_INTERPRET=1` on the CPU otherwise. Modules here
import only torch, triton and the leaf `engine.attention.types`, never `engine.model`.
"""
