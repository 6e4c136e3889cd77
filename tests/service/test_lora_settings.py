"""LoRA settings from vLLM's flags: --enable-lora, --lora-modules in both of vLLM's forms, the limits,
runtime updating (our flag, our variable and vLLM's), clear refusals, and the default adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service import model_setup
from service.cli import build_parser, settings_from
from service.default_model import DEFAULT_ADAPTER_NAME
from service.model_setup import SetupError, check_adapter_names, with_default_adapter
from service.settings import LoRAModule, Settings


def parsed(*flags: str) -> Settings:
    return settings_from(build_parser().parse_args(["serve", *flags]))


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    return first, second


def test_lora_modules_in_both_of_vllms_forms_several_per_flag_and_repeated(
    folders: tuple[Path, Path],
) -> None:
    a, b = folders
    json_b = f'{{"name": "b", "path": "{b}", "base_model_name": "google/diffusion-gemma"}}'
    settings = parsed("--enable-lora", "--lora-modules", f"a={a}", json_b, "--max-loras", "2")
    assert settings.lora_modules == [
        LoRAModule(name="a", path=a),
        LoRAModule(name="b", path=b, base_model_name="google/diffusion-gemma"),
    ]
    again = parsed("--enable-lora", "--lora-modules", f"a={a}", "--lora-modules", f"b={b}")
    assert [module.name for module in again.lora_modules] == ["a", "b"]
    assert (settings.enable_lora, settings.max_loras) == (True, 2)


def test_the_limits_and_their_defaults(folders: tuple[Path, Path]) -> None:
    defaults = parsed()
    assert (defaults.enable_lora, defaults.lora_modules, defaults.max_loras) == (False, [], 1)
    assert (defaults.max_lora_rank, defaults.max_cpu_loras) == (16, None)
    assert defaults.allow_runtime_lora_updating is False
    limits = parsed("--enable-lora", "--max-lora-rank", "64", "--max-cpu-loras", "4")
    assert (limits.max_lora_rank, limits.max_cpu_loras) == (64, 4)


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("a", "give name=path or a JSON object"),
        ("=/x", "give name=path"),
        ('{"name": "a"}', "path: Field required"),
        ('{"name": "a", "path": "/x", "rank": 8}', "rank: Extra inputs are not permitted"),
        ('{"name": "a", "path": ', "Invalid JSON"),
    ],
)
def test_a_malformed_lora_module_says_what_to_write(value: str, phrase: str) -> None:
    with pytest.raises(ValueError, match="--lora-modules") as caught:
        parsed("--enable-lora", "--lora-modules", value)
    assert phrase in str(caught.value)


def test_refusals_at_start_up_name_the_flag(folders: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = folders
    with pytest.raises(ValidationError, match="--lora-modules serves adapters: add --enable-lora"):
        parsed("--lora-modules", f"a={a}")
    with pytest.raises(ValidationError, match=r"names \['a'\] more than one adapter"):
        parsed("--enable-lora", "--lora-modules", f"a={a}", f"a={b}")
    with pytest.raises(ValidationError, match="no such folder"):
        parsed("--enable-lora", "--lora-modules", f"c={tmp_path / 'nowhere'}")
    with pytest.raises(ValidationError, match="no surrounding spaces and no commas"):
        parsed("--enable-lora", "--lora-modules", f"x,y={a}")
    with pytest.raises(SetupError, match="that is the base model's served name"):
        check_adapter_names(parsed("--enable-lora", "--lora-modules", f"tiny={a}"), "tiny")


def test_runtime_updating_from_our_flag_our_variable_or_vllms(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parsed("--allow-runtime-lora-updating").allow_runtime_lora_updating is True
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    assert parsed().allow_runtime_lora_updating is True
    assert parsed("--no-allow-runtime-lora-updating").allow_runtime_lora_updating is False
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    monkeypatch.setenv("CANVAS_SERVE_ALLOW_RUNTIME_LORA_UPDATING", "1")
    assert parsed().allow_runtime_lora_updating is True


def test_the_embedded_model_comes_with_its_adapter_unless_told_otherwise(
    folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = folders
    (a / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"o_proj": 32}}))
    monkeypatch.setattr(model_setup, "default_adapter_dir", lambda: a)
    served = with_default_adapter(parsed())
    assert served.enable_lora is True
    assert served.lora_modules == [LoRAModule(name=DEFAULT_ADAPTER_NAME, path=a)]
    assert served.max_lora_rank == 32  # room for the adapter's largest rank
    assert with_default_adapter(parsed("--max-lora-rank", "64")).max_lora_rank == 64
    assert with_default_adapter(parsed("--max-lora-rank", "8")).max_lora_rank == 8  # refused at load, then
    assert with_default_adapter(parsed("--no-enable-lora")).lora_modules == []
    own = parsed("--enable-lora", "--lora-modules", f"mine={b}")
    assert with_default_adapter(own) == own
    assert with_default_adapter(parsed(str(b))).lora_modules == []  # another model: no default adapter
    monkeypatch.setattr(model_setup, "default_adapter_dir", lambda: None)
    assert with_default_adapter(parsed()) == parsed()  # the adapter is absent: the base alone
