"""The IPC codec: every contract type that crosses to or from the engine core round-trips exactly, a
field added to a contract crosses with no change to the codec, and nothing outside the registry is
encoded or built. Also the statistics snapshot: records ship once, counters overwrite."""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.client import EngineDead, UtilityError
from engine.ipc import Codec, CodecError
from engine.messages import (
    CODEC_ROOTS,
    AbortRequests,
    AddRequest,
    Admission,
    CoreFailed,
    CoreOutputs,
    EngineReady,
    RemoteError,
    UtilityCall,
    UtilityResult,
)
from engine.request import RANGES, CanvasSnapshot, InvalidParams, RequestOutput, SamplingParams, Usage
from engine.scheduler import QueueFull
from engine.snapshot import EngineSnapshot, RequestSummary, RequestsView, merge_stats, take_stats
from engine.stats import EngineStats, RequestRecord, StepRecord, StepTiming

CODEC = Codec(CODEC_ROOTS)

ids = st.lists(st.integers(0, 2**31), max_size=40)
names = st.text(max_size=24)
counts = st.integers(0, 2**62)
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


def _in_range(name: str) -> st.SearchStrategy[Any]:
    """A valid value (or None) of one numeric `SamplingParams` field."""
    allowed = RANGES[name]
    kind = int if str(SamplingParams.__annotations__[name]).startswith("int") else float  # from the field
    upper = allowed.maximum if allowed.maximum is not None else 1e6
    if kind is int:
        return st.none() | st.integers(math.ceil(allowed.minimum) + allowed.open_minimum, int(upper))
    return st.none() | st.floats(allowed.minimum, upper, exclude_min=allowed.open_minimum)


sampling_params = st.builds(
    SamplingParams,
    **{name: _in_range(name) for name in RANGES if name not in ("t_min", "t_max")},
    t_min=st.none(),
    t_max=st.none() | st.floats(0.01, 10),
    seed=st.none() | st.integers(0, 2**62),
    stop_token_ids=st.none() | st.lists(st.integers(0, 2**20), max_size=4).map(tuple),
    pinned_canvas=st.none() | st.lists(st.integers(-1, 2**20), max_size=8).map(tuple),
)
usage = st.builds(
    Usage,
    st.integers(0, 2**40),
    st.integers(0, 2**40),
    st.integers(0, 2**40),
    st.integers(0, 2**20),
    st.lists(st.integers(0, 1024), max_size=8).map(tuple),
)
canvas = st.builds(
    CanvasSnapshot,
    st.integers(0, 99),
    st.integers(0, 99),
    ids,
    st.lists(floats, max_size=8),
    counts,
    floats,
)
finish = st.none() | st.sampled_from(["stop", "length", "abort", "error"])
request_output = st.builds(
    RequestOutput, names, ids, names, st.none() | canvas, finish, st.none() | usage, st.none() | names
)
remote_error = st.builds(RemoteError, names, names, st.none() | names)
record = st.builds(RequestRecord, finish.map(lambda r: r or "abort"), floats, st.none() | floats, floats)
plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | names,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def engine_stats(draw: st.DrawFn) -> EngineStats:
    stats = EngineStats(
        num_running=draw(st.integers(0, 1000)),
        num_waiting=draw(st.integers(0, 1000)),
        kv_usage=draw(floats),
        num_steps=draw(st.integers(0, 2**50)),
        finished_by_reason=draw(st.dictionaries(st.sampled_from(["stop", "length", "abort"]), counts)),
        last_step_request_ids=tuple(draw(st.lists(names, max_size=4))),
        last_timing=StepTiming(draw(floats), draw(floats), draw(floats)),
    )
    for _ in range(draw(st.integers(0, 3))):
        stats.records.append(
            RequestRecord(
                draw(st.sampled_from(["stop", "abort"])),
                draw(floats),
                draw(st.none() | floats),
                draw(floats),
                draw(counts),
                draw(counts),
                draw(counts),
                draw(st.lists(st.integers(0, 64), max_size=4)),
            )
        )
    stats.step_records.append(StepRecord(stats.last_step, draw(counts), draw(floats)))
    return stats


summary = st.builds(
    RequestSummary,
    names,
    st.sampled_from(["waiting", "running", "preempted"]),
    st.integers(0, 99),
    st.integers(0, 9999),
    st.lists(st.integers(0, 99), max_size=4).map(tuple),
    st.integers(0, 9999),
    st.integers(0, 9999),
    st.none() | st.integers(1, 9999),
    st.none() | st.integers(1, 1024),
    st.booleans(),
    st.integers(0, 9),
    floats,
)
snapshot = st.builds(
    EngineSnapshot,
    engine_stats(),
    st.none() | st.builds(RequestsView, st.lists(summary, max_size=3), st.lists(summary, max_size=3)),
)
messages = st.one_of(
    st.builds(AddRequest, names, ids, st.none() | sampling_params, st.booleans(), floats),
    st.builds(AbortRequests, st.lists(names, max_size=4)),
    st.builds(UtilityCall, st.integers(0, 2**40), names, st.lists(plain, max_size=3)),
    st.builds(
        CoreOutputs,
        st.none() | snapshot,
        st.lists(st.builds(Admission, names, st.none() | remote_error), max_size=3),
        st.lists(request_output, max_size=4),
        st.lists(st.builds(UtilityResult, counts, plain, st.none() | remote_error), max_size=2),
    ),
    st.builds(CoreFailed, names),
)


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN, and exactly the same types all the way down (a tuple is no list)."""
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list | tuple | deque):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_every_message_round_trips_exactly(message: Any) -> None:
    decoded = CODEC.decode(CODEC.encode(message))
    assert same(decoded, message), (decoded, message)


def test_the_ready_report_round_trips() -> None:
    from engine.config import DiffusionDefaults
    from engine.engine_config import EngineConfig

    ready = EngineReady(EngineConfig(max_num_seqs=3), DiffusionDefaults(eos_token_ids=(1, 7)), 512)
    assert same(CODEC.decode(CODEC.encode(ready)), ready)


def test_contract_checks_run_again_on_the_receiving_side() -> None:
    """A payload that breaks `SamplingParams`' ranges is refused as it is decoded, naming the field."""
    data = CODEC.encode(AddRequest("r", [1], SamplingParams(max_tokens=3), False, 0.0))
    tampered = data.replace(b"\xaamax_tokens\x03", b"\xaamax_tokens\x00")
    assert tampered != data
    with pytest.raises(CodecError, match="max_tokens=0 must be >= 1"):
        CODEC.decode(tampered)


def test_only_registered_message_types_are_encoded_or_built() -> None:
    with pytest.raises(CodecError, match="not a registered message type"):
        CODEC.encode(Usage(1, 2, 3, 4))
    with pytest.raises(CodecError, match="not a registered message type"):
        CODEC.encode({"request_id": "r"})

    @dataclass(frozen=True)
    class Intruder:
        path: str

    foreign = Codec([Intruder]).encode(Intruder("/etc/passwd"))
    with pytest.raises(CodecError, match=r"'.*Intruder' is not a registered message type"):
        CODEC.decode(foreign)
    with pytest.raises(CodecError, match="not a message"):
        CODEC.decode(b"\x01\x02garbage")


# A contract as another developer might grow it: new fields, one of a new nested type.
@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class GrownUsage:
    prompt_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class GrownOutput:
    request_id: str
    usage: GrownUsage | None = None
    logprobs: list[list[TokenLogprob]] | None = None
    grammar: dict[str, Any] | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GrownBatch:
    outputs: list[GrownOutput] = field(default_factory=list)


def test_fields_added_to_a_contract_cross_without_a_change_to_the_codec() -> None:
    batch = GrownBatch(
        [
            GrownOutput(
                "r",
                GrownUsage(5, cached_tokens=3),
                [[TokenLogprob(7, -0.25), TokenLogprob(9, -1.5)]],
                {"type": "json_schema", "schema": {"type": "object"}},
                (1, 2),
            )
        ]
    )
    codec = Codec([GrownBatch])
    decoded = codec.decode(codec.encode(batch))
    assert same(decoded, batch)
    assert isinstance(decoded.outputs[0].logprobs[0][1], TokenLogprob)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (InvalidParams("t_max=0.1 is below t_min", "t_max"), InvalidParams),
        (QueueFull("1024 requests are waiting"), QueueFull),
        (UtilityError("the engine has no method 'x'"), UtilityError),
        (EngineDead("gone"), EngineDead),
        (ZeroDivisionError("division by zero"), RuntimeError),
    ],
)
def test_errors_are_raised_again_as_their_own_class(error: Exception, kind: type[Exception]) -> None:
    (admission,) = CODEC.decode(
        CODEC.encode(CoreOutputs(admissions=[Admission("r", RemoteError.of(error))]))
    ).admissions
    remote = admission.error
    raised = remote.exception()
    assert type(raised) is kind
    assert str(error) in str(raised)
    if isinstance(error, InvalidParams):
        assert isinstance(raised, InvalidParams) and raised.param == "t_max"


def test_stats_snapshots_ship_each_record_once_and_overwrite_the_rest() -> None:
    live, mirror = EngineStats(), EngineStats()
    live.num_steps, live.num_output_tokens, live.finished_by_reason = 3, 40, {"stop": 1}
    live.records.append(RequestRecord("stop", 0.1, 0.2, 0.3, 4, 5, 6, [6]))
    merge_stats(
        mirror, CODEC.decode(CODEC.encode(CoreOutputs(EngineSnapshot(take_stats(live))))).snapshot.stats
    )
    assert not live.records, "a taken record leaves the live stats"
    live.num_steps = 5
    live.records.append(RequestRecord("abort", 0.1, None, 0.3, 4, 0, 1, []))
    merge_stats(mirror, take_stats(live))
    assert (
        mirror.num_steps == 5 and mirror.num_output_tokens == 40 and mirror.finished_by_reason == {"stop": 1}
    )
    assert [r.finish_reason for r in mirror.drain_records()] == ["stop", "abort"]
    merge_stats(mirror, take_stats(live))
    assert mirror.drain_records() == []
