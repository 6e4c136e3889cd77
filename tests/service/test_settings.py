"""Settings: the engine's limits under EngineConfig's names and defaults, from flags or the environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.engine_config import EngineConfig
from service.cli import build_parser, settings_from
from service.model_setup import engine_threads, usable_cpus
from service.settings import Settings


def test_the_engine_limits_default_to_the_engine_config() -> None:
    assert Settings().engine_config(kv_cache_bytes=None) == EngineConfig()
    assert Settings().max_waiting == 1024


def test_max_waiting_from_the_flag_its_old_name_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def parsed(*flags: str) -> Settings:
        return settings_from(build_parser().parse_args(["serve", *flags]))

    assert parsed("--max-waiting", "3").engine_config(None).max_waiting == 3
    assert parsed("--max-num-queued-reqs", "5").max_waiting == 5
    monkeypatch.setenv("CANVAS_SERVE_MAX_WAITING", "7")
    assert parsed().max_waiting == 7
    assert parsed("--max-waiting", "2").max_waiting == 2


def test_the_engine_config_checks_the_settings_before_any_model_loads() -> None:
    with pytest.raises(ValidationError, match="max_waiting=-1 must be >= 0"):
        Settings(max_waiting=-1)
    with pytest.raises(ValidationError, match="max_num_seqs=0 must be >= 1"):
        Settings(max_num_seqs=0)


def test_the_help_says_what_max_waiting_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-waiting MAX_WAITING requests waiting to run at most" in help_text
    assert "CANVAS_SERVE_MAX_WAITING" in help_text


def engine_config_of(*flags: str) -> EngineConfig:
    """The engine config `canvas-serve serve FLAGS` would run with (the environment included)."""
    return settings_from(build_parser().parse_args(["serve", *flags])).engine_config(None)


@pytest.mark.parametrize(
    ("field", "flag", "default"),
    [
        ("enable_prefix_caching", "enable-prefix-caching", True),
        ("cache_final_canvas", "cache-final-canvas", True),
        ("compile", "compile", False),
    ],
)
def test_a_switch_has_its_default_both_flags_and_an_environment_variable(
    monkeypatch: pytest.MonkeyPatch, field: str, flag: str, default: bool
) -> None:
    def parsed(*flags: str) -> bool:
        value = getattr(engine_config_of(*flags), field)
        assert isinstance(value, bool)
        return value

    assert parsed() is default
    assert parsed(f"--{flag}") is True
    assert parsed(f"--no-{flag}") is False
    monkeypatch.setenv(f"CANVAS_SERVE_{field.upper()}", str(not default).lower())
    assert parsed() is (not default)
    assert parsed(f"--{flag}" if default else f"--no-{flag}") is default


def test_where_the_engine_runs_from_the_flags_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    def parsed(*flags: str) -> Settings:
        return settings_from(build_parser().parse_args(["serve", *flags]))

    assert parsed().engine_process is True and parsed().engine_threads is None
    assert parsed("--no-engine-process").engine_process is False
    assert parsed("--engine-threads", "3").engine_threads == 3
    monkeypatch.setenv("CANVAS_SERVE_ENGINE_PROCESS", "0")
    assert parsed().engine_process is False
    assert parsed("--engine-process").engine_process is True
    with pytest.raises(ValidationError, match="engine_threads"):
        parsed("--engine-threads", "0")


def test_engine_threads_leave_one_usable_core_to_the_api(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == cores
    cpu_max.write_text("150000 100000\n")  # a container's `cpu: 1.5` limit
    assert usable_cpus(cpu_max) == min(cores, 2)
    assert usable_cpus(tmp_path / "no-cgroup") == cores
    assert engine_threads(Settings()) == max(1, usable_cpus() - 1)
    assert engine_threads(Settings(engine_threads=5)) == 5
