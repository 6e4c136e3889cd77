"""`warm_up`: run a few throw-away requests through a new engine before it serves anyone.

A compiled engine (`EngineConfig.compile`) compiles its layers in its first steps; a server that
reported ready before that would make its first users wait for the compiler. The warm-up fills the
engine with `max_num_seqs` requests of one canvas (a prompt chunk, then denoise steps with and without
the self-conditioning input, then the commit; the first asks for logprobs, so the commit's full logits,
and the compiled soft-cap lookup behind them, run too), steps them to the end and leaves no trace:
cached prompt blocks are dropped and the statistics start afresh.
"""

from __future__ import annotations

import time
from dataclasses import replace

from engine.engine import Engine
from engine.request import SamplingParams
from engine.stats import EngineStats

WARM_UP_STEPS = 2
"""Denoise steps of each warm-up canvas: the first without self-conditioning, the second with it."""


def warm_up(engine: Engine) -> float:
    """Step `max_num_seqs` throw-away requests to the end; returns the seconds it took."""
    start = time.perf_counter()
    config = engine.model.config
    canvas = config.canvas_length
    prompt = [(5 + i) % config.vocab_size for i in range(canvas)]
    params = SamplingParams(seed=0, max_tokens=canvas, max_denoising_steps=WARM_UP_STEPS)
    for index in range(engine.config.max_num_seqs):
        engine.add_request(f"warm-up-{index}", prompt, replace(params, logprobs=1) if index == 0 else params)
    while engine.has_unfinished():
        engine.step()
    engine.reset_prefix_cache()
    engine.stats = EngineStats()
    return time.perf_counter() - start
