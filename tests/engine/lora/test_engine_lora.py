"""The engine's LoRA API end to end: add / remove / list, requests picking adapters by name, mixed
batches that change nothing for their neighbours, unloading that waits for requests in flight, the
prefix cache keyed by adapter load, and both engine clients (in-process and the core process)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.async_engine import AsyncEngine
from engine.core_client import EngineCoreClient
from engine.engine import Engine
from engine.engine_config import EngineConfig
from engine.lora import LoRAError, UnknownLoRA
from engine.model.loader import load_checkpoint, load_tokenizer
from engine.request import RequestOutput, SamplingParams
from engine.snapshot import RequestsView
from tests.engine.checkpoints import CANVAS, save_servable
from tests.engine.core_build import build_engine_at
from tests.engine.lora.peft_adapters import EVERY_LINEAR, EXPERTS, make_adapter

PROMPT = [2, *range(40, 60)]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_engine")
    base = save_servable(root / "base", seed=4)
    make_adapter(
        base,
        root / "every",
        seed=1,
        r=4,
        lora_alpha=16,
        target_modules=EVERY_LINEAR,
        target_parameters=EXPERTS,
    )
    make_adapter(
        base,
        root / "attn",
        seed=2,
        r=2,
        lora_alpha=8,
        target_modules=r"model\.(encoder\.language_model|decoder)\..*\.(q_proj|v_proj)",
    )
    return {"base": base, "every": root / "every", "attn": root / "attn"}


def engine(paths: dict[str, Path], dtype: torch.dtype = torch.float32, **config: int | bool) -> Engine:
    checkpoint = load_checkpoint(paths["base"], dtype=dtype, with_tokenizer=False)
    limits = {"max_num_seqs": 4, "max_model_len": 128} | config
    return Engine(checkpoint.model, checkpoint.defaults, None, EngineConfig(**limits))  # type: ignore[arg-type]


def params(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=2 * CANVAS, max_denoising_steps=4, seed=seed, stop_token_ids=())


def run(engine: Engine, requests: dict[str, str | None], seed: int = 7) -> dict[str, list[RequestOutput]]:
    """Add each request id with its adapter (same prompt and seed), step until all finish."""
    for request_id, lora in requests.items():
        engine.add_request(request_id, PROMPT, params(seed), lora_name=lora)
    outputs: dict[str, list[RequestOutput]] = {r: [] for r in requests}
    while engine.has_unfinished():
        for output in engine.step():
            outputs[output.request_id].append(output)
    return outputs


def tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def test_mixed_batches_equal_each_request_alone(paths: dict[str, Path]) -> None:
    """Token for token, so in bf16: fp32 matmuls are not row-invariant on every CPU (on an AMD EPYC,
    MKL's sgemm rounds the rows of a product of fewer than 12 rows differently from the same rows in a
    larger one, and the experts' row counts depend on the batch), oneDNN's bf16 ones are. The logits
    of a mixed fp32 batch equal each request's to 1e-4 in test_parity."""
    bf16 = torch.bfloat16
    mixed = engine(paths, bf16, enable_lora=True, max_loras=2)
    mixed.add_lora("every", str(paths["every"]))
    mixed.add_lora("attn", str(paths["attn"]))
    assert mixed.list_loras() == ["attn", "every"]
    together = run(mixed, {"b": None, "e": "every", "a": "attn"})
    for request_id, lora in {"b": None, "e": "every", "a": "attn"}.items():
        alone = engine(paths, bf16, enable_lora=True, enable_prefix_caching=False)
        if lora is not None:
            alone.add_lora(lora, str(paths[lora]))
        assert tokens(run(alone, {request_id: lora})[request_id]) == tokens(together[request_id]), request_id
        assert all(o.lora_name == lora for o in together[request_id])
    assert tokens(together["e"]) != tokens(together["b"])  # the adapter changes what is generated
    plain = run(engine(paths, bf16), {"b": None})["b"]  # LoRA off: the base is untouched
    assert tokens(plain) == tokens(together["b"])


def test_a_compiled_engine_serves_adapters(paths: dict[str, Path]) -> None:
    """--compile with LoRA on: the deltas run eagerly between the compiled parts (their logits equal
    PEFT's: test_parity); here the engine runs a mixed batch through them."""
    mixed = engine(paths, enable_lora=True, max_loras=2, compile=True)
    mixed.add_lora("every", str(paths["every"]))
    outputs = {r: tokens(o) for r, o in run(mixed, {"b": None, "e": "every"}).items()}
    assert all(len(ids) == 2 * CANVAS for ids in outputs.values())
    assert outputs["e"] != outputs["b"]


def test_errors_name_what_to_change(paths: dict[str, Path]) -> None:
    off = engine(paths)
    with pytest.raises(LoRAError, match="enable_lora"):
        off.add_lora("every", str(paths["every"]))
    with pytest.raises(UnknownLoRA, match="'every'"):
        off.add_request("r", PROMPT, params(1), lora_name="every")
    assert off.list_loras() == []
    on = engine(paths, enable_lora=True, max_lora_rank=2)
    with pytest.raises(LoRAError, match="rank 4, above max_lora_rank=2"):
        on.add_lora("every", str(paths["every"]))
    on.add_lora("attn", str(paths["attn"]))
    with pytest.raises(LoRAError, match="already loaded"):
        on.add_lora("attn", str(paths["attn"]))
    with pytest.raises(UnknownLoRA, match="'nope' is not loaded"):
        on.add_request("r", PROMPT, params(1), lora_name="nope")
    with pytest.raises(UnknownLoRA):
        on.remove_lora("nope")
    assert not on.has_unfinished()


def test_unloading_waits_for_requests_in_flight(paths: dict[str, Path]) -> None:
    eng = engine(paths, enable_lora=True)
    eng.add_lora("attn", str(paths["attn"]))
    eng.add_request("r", PROMPT, params(1), lora_name="attn")
    eng.step()
    eng.remove_lora("attn")
    assert eng.list_loras() == ["attn"]  # still serving its request
    with pytest.raises(UnknownLoRA, match="being unloaded"):
        eng.add_request("late", PROMPT, params(1), lora_name="attn")
    with pytest.raises(LoRAError, match="being unloaded"):
        eng.add_lora("attn", str(paths["attn"]))
    finished = []
    while eng.has_unfinished():
        finished += [o for o in eng.step() if o.finished]
    assert [o.finish_reason for o in finished] == ["length"]
    assert eng.list_loras() == []
    eng.add_lora("attn", str(paths["attn"]))  # the name is free again
    assert eng.list_loras() == ["attn"]


def test_an_abort_releases_the_adapter(paths: dict[str, Path]) -> None:
    eng = engine(paths, enable_lora=True)
    eng.add_lora("attn", str(paths["attn"]))
    eng.add_request("r", PROMPT, params(1), lora_name="attn")
    eng.remove_lora("attn")
    eng.abort("r")
    assert eng.list_loras() == []


def test_the_prefix_cache_is_not_shared_across_adapters_or_loads(paths: dict[str, Path]) -> None:
    eng = engine(paths, enable_lora=True, block_size=4)
    eng.add_lora("attn", str(paths["attn"]))

    ids = iter(range(100))

    def cached(lora: str | None) -> int:
        """The prompt tokens a new request of `lora` read from the prefix cache."""
        request_id = f"q{next(ids)}"
        final = run(eng, {request_id: lora})[request_id][-1]
        assert final.usage is not None
        return final.usage.cached_tokens

    assert cached(None) == 0
    assert cached("attn") == 0  # the base's blocks are not the adapter's
    assert cached("attn") > 0  # the adapter's own blocks are
    assert cached(None) > 0
    eng.remove_lora("attn")
    eng.add_lora("attn", str(paths["attn"]))  # a reload under the same name
    assert cached("attn") == 0


def test_the_engine_view_shows_each_requests_adapter(paths: dict[str, Path]) -> None:
    eng = engine(paths, enable_lora=True)
    eng.add_lora("attn", str(paths["attn"]))
    eng.add_request("a", PROMPT, params(1), lora_name="attn")
    eng.add_request("b", PROMPT, params(1))
    eng.step()
    view = RequestsView.of(eng.scheduler.running, eng.scheduler.waiting)
    assert {r.request_id: r.lora_name for r in view.running + view.waiting} == {"a": "attn", "b": None}


async def _through_client(client: AsyncEngine | EngineCoreClient, adapter: str) -> list[RequestOutput]:
    with pytest.raises(UnknownLoRA, match="'attn' is not loaded"):
        await client.submit(PROMPT, params(3), lora_name="attn")
    await client.call_utility("add_lora", "attn", adapter)
    assert await client.call_utility("list_loras") == ["attn"]
    with pytest.raises(LoRAError, match="already loaded"):
        await client.call_utility("add_lora", "attn", adapter)
    with pytest.raises(LoRAError, match="does not exist"):
        await client.call_utility("add_lora", "other", adapter + "-missing")
    outputs = [o async for o in client.generate(PROMPT, params(3), lora_name="attn")]
    await client.call_utility("remove_lora", "attn")
    assert await client.call_utility("list_loras") == []
    with pytest.raises(UnknownLoRA):
        await client.call_utility("remove_lora", "attn")
    return outputs


def expected_tokens(paths: dict[str, Path]) -> list[int]:
    eng = engine(paths, enable_lora=True)
    eng.add_lora("attn", str(paths["attn"]))
    eng.add_request("x", PROMPT, params(3), lora_name="attn")
    return tokens(_drain(eng))


def _drain(eng: Engine) -> list[RequestOutput]:
    outputs = []
    while eng.has_unfinished():
        outputs += eng.step()
    return outputs


def test_the_in_process_client(paths: dict[str, Path]) -> None:
    client = AsyncEngine(engine(paths, enable_lora=True))

    async def go() -> list[RequestOutput]:
        client.start()
        try:
            return await _through_client(client, str(paths["attn"]))
        finally:
            client.shutdown()

    outputs = asyncio.run(go())
    assert tokens(outputs) == expected_tokens(paths)
    assert {o.lora_name for o in outputs} == {"attn"}


@pytest.fixture
def core_client(paths: dict[str, Path]) -> Iterator[tuple[EngineCoreClient, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    build = functools.partial(
        build_engine_at, str(paths["base"]), enable_lora=True, max_num_seqs=4, max_model_len=128
    )
    client = EngineCoreClient(build, load_tokenizer(paths["base"]), num_threads=1)

    async def start() -> None:
        client.start()

    loop.run_until_complete(start())
    yield client, loop
    client.shutdown()
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()


def test_the_engine_process_client(
    paths: dict[str, Path], core_client: tuple[EngineCoreClient, asyncio.AbstractEventLoop]
) -> None:
    client, loop = core_client
    outputs = loop.run_until_complete(_through_client(client, str(paths["attn"])))
    assert tokens(outputs) == expected_tokens(paths)
    assert {o.lora_name for o in outputs} == {"attn"}
