"""Run our model over hand-built segments, and the transformers reference over the same inputs."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from engine.attention.types import LayerCache, Segment
from engine.kv_cache import KVCacheManager
from engine.lora.manager import LoRAManager
from engine.model.cache_tensors import allocate_layer_caches, cache_groups
from engine.model.diffusion_gemma import DiffusionGemma, ForwardBatch
from engine.sampler import LMHead, logits_for, soft_embedding


@dataclass
class Part:
    """One segment to run: tokens of one request at `start`, causal or not, with optional soft embeds."""

    request_id: str
    token_ids: Tensor
    start: int
    is_causal: bool
    soft_embeds: Tensor | None = None
    lora_id: int | None = None
    """The adapter (a `LoRAManager` load id) of the part; None: the base model."""


@dataclass
class Harness:
    """Our model with its own paged caches and block manager."""

    model: DiffusionGemma
    block_size: int = 4
    num_blocks: int = 256
    tables: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    lora: LoRAManager | None = None
    """Applies each part's adapter (`Part.lora_id`) when set."""

    def __post_init__(self) -> None:
        config = self.model.config
        blocks = {kind: self.num_blocks for kind in set(config.layer_kinds)}
        dtype = self.model.embed_tokens.weight.dtype
        self.caches: list[LayerCache] = allocate_layer_caches(config, blocks, self.block_size, dtype, "cpu")
        self.kv = KVCacheManager(cache_groups(config, blocks), self.block_size)
        self.head = LMHead(
            self.model.embed_tokens.weight, config.final_logit_softcapping, self.model.embed_scale
        )

    def table(self, request_id: str, num_tokens: int) -> dict[str, list[int]]:
        if request_id in self.tables:  # a hand-made table overrides the manager's
            return self.tables[request_id]
        self.kv.allocate(request_id, num_tokens)
        return {g: self.kv.block_table(request_id, g) for g in self.kv.group_names}

    @torch.no_grad()
    def run(self, parts: list[Part]) -> list[Tensor]:
        """Logits (C, V) of each bidirectional part, in order; causal parts fill the cache."""
        segments = [
            Segment(
                len(p.token_ids), p.start, p.is_causal, self.table(p.request_id, p.start + len(p.token_ids))
            )
            for p in parts
        ]
        decoders = [p for p in parts if not p.is_causal]
        soft = None
        if any(p.soft_embeds is not None for p in decoders):
            hidden_size = self.model.config.hidden_size
            soft = torch.cat(
                [
                    p.soft_embeds if p.soft_embeds is not None else torch.zeros(len(p.token_ids), hidden_size)
                    for p in decoders
                ]
            ).to(self.head.weight.dtype)
        batch = ForwardBatch(
            input_ids=torch.cat([p.token_ids for p in parts]),
            positions=torch.cat([torch.arange(p.start, p.start + len(p.token_ids)) for p in parts]),
            segments=segments,
            soft_embeds=soft,
        )
        adapters = (
            nullcontext() if self.lora is None else self.lora.bind(segments, [p.lora_id for p in parts])
        )
        with adapters:
            hidden = self.model(batch, self.caches)
        return list(logits_for(hidden, self.head).split([len(p.token_ids) for p in decoders]))

    def soft(self, processed_logits: Tensor) -> Tensor:
        return soft_embedding(processed_logits, self.head)


class Reference:
    """The transformers model with one DynamicCache per request."""

    def __init__(self, model: DiffusionGemmaForBlockDiffusion) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))

    @torch.no_grad()
    def encode(self, token_ids: Tensor, start: int) -> None:
        positions = torch.arange(start, start + len(token_ids))[None]
        self.model.model.encoder(
            input_ids=token_ids[None], past_key_values=self.cache, position_ids=positions
        )

    @torch.no_grad()
    def decode(self, canvas: Tensor, self_conditioning_logits: Tensor | None = None) -> Tensor:
        sc = None if self_conditioning_logits is None else self_conditioning_logits[None]
        out = self.model(
            decoder_input_ids=canvas[None], past_key_values=self.cache, self_conditioning_logits=sc
        )
        return out.logits[0]
