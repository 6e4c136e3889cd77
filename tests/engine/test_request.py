"""SamplingParams: validation messages and resolution against the checkpoint's defaults."""

from __future__ import annotations

import pytest

from engine.config import DiffusionDefaults
from engine.request import FREE, RANGES, InvalidParams, SamplingParams, check_prompt_ids

DEFAULTS = DiffusionDefaults(max_denoising_steps=12, t_min=0.3, t_max=0.9, eos_token_ids=(1, 7))


def test_unset_fields_take_the_defaults_and_set_ones_stay() -> None:
    resolved = SamplingParams(t_min=0.5, entropy_bound=0.2).resolve(DEFAULTS)
    assert (resolved.t_min, resolved.t_max, resolved.entropy_bound) == (0.5, 0.9, 0.2)
    assert resolved.max_denoising_steps == 12 and resolved.max_tokens == DEFAULTS.max_new_tokens
    assert resolved.stop_token_ids == (1, 7)


def test_temperature_scales_the_schedule_once() -> None:
    resolved = SamplingParams(temperature=0.5).resolve(DEFAULTS)
    assert resolved.t_min == pytest.approx(0.15) and resolved.t_max == pytest.approx(0.45)
    assert resolved.temperature is None
    assert resolved.resolve(DEFAULTS) == resolved  # resolving twice changes nothing
    explicit = SamplingParams(temperature=2.0, t_min=0.1, t_max=0.2).resolve(DEFAULTS)
    assert (explicit.t_min, explicit.t_max) == pytest.approx((0.2, 0.4))
    greedy = SamplingParams(temperature=0.0).resolve(DEFAULTS)
    assert 0 < greedy.t_min < 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_denoising_steps": 0}, "max_denoising_steps"),
        ({"entropy_bound": -1.0}, "entropy_bound"),
        ({"t_min": 0.9, "t_max": 0.5}, "t_max"),
        ({"temperature": -1.0}, "temperature"),
        ({"stability_threshold": -1}, "stability_threshold"),
    ],
)
def test_out_of_range_values_say_what_to_change(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidParams, match=message):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_pinned_canvas_must_fit_the_canvas() -> None:
    SamplingParams(pinned_canvas=(FREE, 5, FREE)).check_canvas(3, 10)
    with pytest.raises(InvalidParams, match="3 positions"):
        SamplingParams(pinned_canvas=(1, 2, 3)).check_canvas(4, 10)
    with pytest.raises(InvalidParams, match="outside the vocabulary"):
        SamplingParams(pinned_canvas=(FREE, 50)).check_canvas(2, 10)


@pytest.mark.parametrize("name", ["temperature", "entropy_bound", "t_min", "t_max", "confidence_threshold"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_float_that_is_not_finite_says_so(name: str, value: float) -> None:
    with pytest.raises(InvalidParams, match=f"{name} must be a finite number, got {value}") as raised:
        SamplingParams(**{name: value})  # type: ignore[arg-type]
    assert raised.value.param == name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_denoising_steps": 1025}, "max_denoising_steps=1025 must be <= 1024"),
        ({"temperature": 10.5}, "temperature=10.5 must be <= 10"),
        ({"stability_threshold": 65}, "stability_threshold=65 must be <= 64"),
        ({"t_min": 0.0}, "t_min=0.0 must be > 0"),
    ],
)
def test_upper_and_open_bounds(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidParams, match=message) as raised:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert raised.value.param == next(iter(kwargs))
    assert SamplingParams(max_denoising_steps=1024, temperature=10, stability_threshold=64)


def test_errors_name_their_field() -> None:
    with pytest.raises(InvalidParams) as raised:
        SamplingParams(t_min=0.9, t_max=0.5)
    assert raised.value.param == "t_max"
    with pytest.raises(InvalidParams) as raised:
        SamplingParams(pinned_canvas=(1, 2, 3)).check_canvas(4, 10)
    assert raised.value.param == "pinned_canvas"
    with pytest.raises(InvalidParams, match="prompt token id 10 is outside") as raised:
        check_prompt_ids([1, 10], 10)
    assert raised.value.param == "prompt"
    check_prompt_ids([0, 9], 10)


def test_ranges_document_themselves_as_json_schema() -> None:
    assert RANGES["max_denoising_steps"].json_schema() == {"minimum": 1, "maximum": 1024}
    assert RANGES["t_min"].json_schema() == {"exclusiveMinimum": 0}
