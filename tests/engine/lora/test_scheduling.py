"""The scheduler's LoRA rules with plain ints (no torch): at most `max_loras` distinct adapters per step,
held-back requests passed a bounded number of times, work and outputs that carry the adapter, and
cached blocks keyed by adapter load."""

from __future__ import annotations

from engine.lora.admission import pick_admissible
from engine.request import Request, SamplingParams
from tests.engine.test_scheduler import Harness, Script, assert_finished_as_scripted, make, script


def add(h: Harness, request_id: str, s: Script, lora_id: int | None) -> None:
    name = None if lora_id is None else f"adapter-{lora_id}"
    h.sched.add_request(request_id, list(s.prompt), s.params(), lora_name=name, lora_id=lora_id)
    h.runner.scripts[request_id] = s


def adapters_of(h: Harness, step: int) -> set[int]:
    out = h.outputs[step]
    return {w.lora_id for w in [*out.causal, *out.denoise] if w.lora_id is not None}


def test_every_step_holds_at_most_max_loras_adapters_and_all_finish() -> None:
    h = make(max_num_seqs=4, max_loras=2)
    loras = [1, 2, None, 3, 4, 1, None, 3, 2, 4]
    for i, lora in enumerate(loras):
        add(h, f"r{i}", script(i, prompt_len=3 + i, max_tokens=12, steps=(1 + i % 3,)), lora)
    h.run()
    assert all(len(adapters_of(h, step)) <= 2 for step in range(len(h.outputs)))
    assert max(len(adapters_of(h, step)) for step in range(len(h.outputs))) == 2
    assert_finished_as_scripted(h)  # the rule delays requests, never changes them
    for i, lora in enumerate(loras):
        expected = None if lora is None else f"adapter-{lora}"
        assert {e.lora_name for e in h.events[f"r{i}"]} == {expected}
    works = [w for out in h.outputs for w in [*out.causal, *out.denoise]]
    assert {(w.request_id, w.lora_id) for w in works} == {(f"r{i}", lora) for i, lora in enumerate(loras)}


def test_base_requests_and_running_adapters_pass_a_held_back_request() -> None:
    h = make(max_num_seqs=4, max_loras=1)
    add(h, "a1", script(1, max_tokens=40), 1)
    add(h, "b", script(2, max_tokens=8), 2)  # held back: adapter 1 holds the one slot
    add(h, "base", script(3, max_tokens=8), None)
    add(h, "a2", script(4, max_tokens=8), 1)
    h.step()
    assert {r.request_id for r in h.sched.running} == {"a1", "base", "a2"}
    assert [r.request_id for r in h.sched.waiting] == ["b"]
    h.run()
    assert_finished_as_scripted(h)


def test_a_held_back_request_does_not_starve() -> None:
    """Adapter 1 has a request arriving every step; adapter 2's request is passed at most max_num_seqs
    times, then admission waits behind it until adapter 1's requests drain."""
    max_num_seqs = 3
    h = make(max_num_seqs=max_num_seqs, max_loras=1)
    add(h, "first", script(0, max_tokens=8), 1)
    add(h, "held", script(1, max_tokens=8), 2)
    started_at = None
    for step in range(200):
        add(h, f"more{step}", script(100 + step, max_tokens=8), 1)
        h.step()
        if started_at is None and any(r.request_id == "held" for r in h.sched.running):
            started_at = step
            break
    assert started_at is not None, "the request with the second adapter never started"
    held = h.sched.requests["held"]
    assert held.num_lora_passes == max_num_seqs


def test_pick_admissible_with_plain_requests() -> None:
    params = SamplingParams(max_tokens=1)

    def request(request_id: str, lora_id: int | None, passes: int = 0) -> Request:
        r = Request(request_id, [1], params, 0, 0.0, lora_id=lora_id)
        r.num_lora_passes = passes
        return r

    running = [request("x", 1), request("y", 2)]
    waiting = [request("new", 3), request("base", None), request("same", 2)]
    pick = pick_admissible(waiting, running, max_loras=2, max_passes=4)
    assert pick is not None and pick.request.request_id == "base"
    assert [r.request_id for r in pick.passed] == ["new"]
    pick.admitted()
    assert waiting[0].num_lora_passes == 1
    assert pick_admissible(waiting, running, max_loras=3, max_passes=4) is not None
    waiting[0].num_lora_passes = 4  # passed enough: hold the line
    assert pick_admissible(waiting, running, max_loras=2, max_passes=4) is None
    assert pick_admissible([request("free", None)], [], max_loras=1, max_passes=0) is not None


def test_cached_blocks_are_keyed_by_adapter_load() -> None:
    h = make(max_num_seqs=1, prefix_caching=True)
    prompt = script(7, prompt_len=13, max_tokens=8)
    for request_id, lora in [("base", None), ("one", 1), ("one-again", 1), ("two", 2), ("base-again", None)]:
        add(h, request_id, Script(prompt.prompt, prompt.seed, 8), lora)
        h.run()
    cached = {r.request_id: r.num_cached_tokens for r in h.sched.newly_finished}
    assert cached == {"base": 0, "one": 0, "one-again": 12, "two": 0, "base-again": 12}
