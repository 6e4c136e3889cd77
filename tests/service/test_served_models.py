"""The served-model registry: what `model` resolves to, /v1/models' cards, and load/unload's checks,
statuses and waiting, against a stand-in engine that keeps an unloaded adapter while it has requests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine.lora import LoRAError
from service.errors import APIError
from service.served_models import Adapter, ServedModel, ServedModels

BASE = ServedModel("base", canvas_length=16, vocab_size=128, max_model_len=64)


class StandInEngine:
    """`call_utility` of add_lora / remove_lora / list_loras as lora.md specifies them: a removed
    adapter stays listed until its last in-flight request ends (`finish`)."""

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}
        self.in_flight: dict[str, int] = {}
        self.removing: set[str] = set()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def call_utility(self, method: str, *args: Any) -> Any:
        self.calls.append((method, args))
        if method == "add_lora":
            name, path = args
            if (Path(path) / "bad").exists():
                raise LoRAError(f"adapter {name}: lora_A of q_proj has rank 64 > max_lora_rank 16")
            self.loaded[name] = path
            return None
        if method == "remove_lora":
            (name,) = args
            self.removing.add(name)
            self._free(name)
            return None
        if method == "list_loras":
            return list(self.loaded)
        raise AssertionError(method)

    def finish(self, name: str) -> None:
        self.in_flight[name] -= 1
        self._free(name)

    def _free(self, name: str) -> None:
        if name in self.removing and not self.in_flight.get(name):
            self.loaded.pop(name, None)
            self.removing.discard(name)


def registry(tmp_path: Path, lora_enabled: bool = True) -> tuple[ServedModels, StandInEngine]:
    engine = StandInEngine()
    engine.loaded["a"] = str(tmp_path)
    served = ServedModels(BASE, engine, [Adapter("a", str(tmp_path))], lora_enabled)  # type: ignore[arg-type]
    return served, engine


def error_of(call: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        asyncio.run(call)
    return caught.value


def test_model_resolves_to_the_base_or_an_adapter_and_anything_else_is_vllms_404(tmp_path: Path) -> None:
    served, _ = registry(tmp_path)
    assert served.resolve(None) is None
    assert served.resolve("base") is None
    assert served.resolve("a") == "a"
    with pytest.raises(APIError) as caught:
        served.resolve("b")
    error = caught.value
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert error.message.startswith("The model `b` does not exist.")
    assert "`base`" in error.message and "`a`" in error.message


def test_cards_list_the_base_then_each_adapter_with_its_parent_and_folder(tmp_path: Path) -> None:
    served, _ = registry(tmp_path)
    base, adapter = served.cards()
    assert (base.id, base.parent, base.root) == ("base", None, "base")
    assert (adapter.id, adapter.parent, adapter.root) == ("a", "base", str(tmp_path))
    assert adapter.max_model_len == base.max_model_len == 64


def test_load_checks_as_vllm_does_and_then_serves_the_adapter(tmp_path: Path) -> None:
    served, engine = registry(tmp_path)
    assert (
        error_of(served.load("", str(tmp_path))).message
        == "Both 'lora_name' and 'lora_path' must be provided."
    )
    assert error_of(served.load("a", str(tmp_path))).message.startswith(
        "The lora adapter 'a' has already been loaded."
    )
    assert error_of(served.load("base", str(tmp_path))).status == 400
    missing = error_of(served.load("b", str(tmp_path / "nowhere")))
    assert missing.status == 404
    assert missing.message == f"Loading lora b failed: No adapter found for {tmp_path / 'nowhere'}"
    assert [call for call, _ in engine.calls] == []  # nothing reached the engine
    asyncio.run(served.load("b", str(tmp_path)))
    assert served.resolve("b") == "b"
    assert [card.id for card in served.cards()] == ["base", "a", "b"]
    assert engine.calls == [("add_lora", ("b", str(tmp_path)))]


def test_a_bad_adapter_is_refused_with_the_engines_message_and_not_served(tmp_path: Path) -> None:
    served, _ = registry(tmp_path)
    bad = tmp_path / "bad-adapter"
    (bad / "bad").mkdir(parents=True)
    with pytest.raises(LoRAError, match="rank 64 > max_lora_rank 16"):  # a 400 (service.errors)
        asyncio.run(served.load("c", str(bad)))
    assert served.adapter_names == ["a"]


def test_unload_refuses_new_requests_at_once_and_returns_once_the_last_one_ended(tmp_path: Path) -> None:
    served, engine = registry(tmp_path)
    engine.in_flight["a"] = 2

    async def scenario() -> list[str]:
        events: list[str] = []
        unload = asyncio.create_task(served.unload("a"))
        await asyncio.sleep(0.05)
        with pytest.raises(APIError):
            served.resolve("a")  # refused while its requests finish
        events.append(f"unloading, done={unload.done()}")
        engine.finish("a")
        await asyncio.sleep(0.1)
        events.append(f"one left, done={unload.done()}")
        engine.finish("a")
        await asyncio.wait_for(unload, 2)
        events.append("unloaded")
        return events

    assert asyncio.run(scenario()) == ["unloading, done=False", "one left, done=False", "unloaded"]
    assert "a" not in engine.loaded
    gone = error_of(served.unload("a"))
    assert (gone.status, gone.message) == (404, "The lora adapter 'a' cannot be found.")
    assert error_of(served.unload("")).status == 400


def test_without_enable_lora_load_and_unload_say_how_to_turn_it_on(tmp_path: Path) -> None:
    served, _ = registry(tmp_path, lora_enabled=False)
    for call in (served.load("b", str(tmp_path)), served.unload("a")):
        error = error_of(call)
        assert error.status == 400 and "--enable-lora" in error.message
