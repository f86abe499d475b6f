"""LM-Infinite's Λ cache (Han et al., NAACL 2024; spec papers/long_context.md §2, §4.1): the first ``n_global``
tokens plus the last ``n_local``, every global key seen at the distance ceiling L (default L = n_l, official
``convert_llama_model`` models/llama.py:342-349). Decoding through it equals the single-pass Λ forward (test L6),
with cache length min(P + N, n_g + n_l) (L7).

The prefill itself is Λ-shaped once P > n_l (layer ℓ+1's keys depend on layer ℓ's Λ output), so :meth:`compress`
re-runs it under :func:`shared.lambda_attention.lambda_attention_context` and puts its last logits in
``cache.prefill_logits``; ``lambda_prefill=False`` keeps the exact prefill (StreamingLLM as a decode-time policy).

``compression_ratio`` (the registry's one word): with ``n_local=None`` a row of n real tokens gets
n_l = ⌈(1 − ratio)·n⌉ − n_g; ratio 0 keeps every token local (≡ the full cache).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.cache_utils import DynamicCache

from shared.cache.base import CompressedCache, PrefillRecord, positions_from_mask
from shared.cache.scorer import kept_tokens
from shared.cache.registry import KVMethod
from shared.cache.sinks import SinkWindowLayer
from shared.lambda_attention import UNLIMITED, check_lambda_params, lambda_attention_context, rope_inv_freq


@dataclass
class LMInfinite(KVMethod):
    n_global: int = 10                 # official default 100 (utils/arguments.py:58-67); README:236 "10-100 similar"
    n_local: int | None = None         # official default = L_pretrain; None: from compression_ratio
    limit: int | None = None           # the ceiling distance L; None: L = n_local
    ceiling: bool = True               # False: global keys at their true distance (StreamingLLM, original positions)
    lambda_prefill: bool = True        # False: decode-time policy over the exact prefill
    block: int = 1024                  # query block of the chunked attention
    name: ClassVar[str] = "lm_infinite"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lambda_params(self.n_global, 1 if self.n_local is None else self.n_local, self.limit)
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block must be an int >= 1, got {self.block!r}")

    def local_sizes(self, n_real: torch.Tensor) -> torch.Tensor:
        """n_l per row [B] for rows of ``n_real`` real tokens."""
        if self.n_local is not None:
            return torch.full_like(n_real, self.n_local)
        if self.compression_ratio == 0.0:
            return torch.full_like(n_real, UNLIMITED)
        n_l = torch.tensor([kept_tokens(int(n), self.compression_ratio) - self.n_global for n in n_real])
        if bool((n_l < 1).any()):
            raise ValueError(f"compression_ratio {self.compression_ratio} leaves n_local < 1 after n_global="
                             f"{self.n_global} sinks for rows of {n_real.tolist()} tokens")
        return n_l.to(n_real.device)

    def full_sequence(self, model, n_local: int | torch.Tensor | None = None):
        """Single-pass Λ forward of ``model`` (needs n_local set, or given per row)."""
        n_l = self.n_local if n_local is None else n_local
        if n_l is None:
            raise ValueError("lm_infinite's full-sequence form needs n_local (an int)")
        return lambda_attention_context(model, self.n_global, n_l, self.limit, self.ceiling, self.block)

    def compress(self, record: PrefillRecord) -> CompressedCache:
        if record.model is None:
            raise ValueError("lm_infinite needs the record's model (RoPE frequencies, Λ prefill)")
        valid = record.valid
        n_l = self.local_sizes(valid.sum(-1))
        if self.lambda_prefill and bool((valid.sum(-1) > n_l).any()):   # else Λ ≡ causal attention on the prefill
            return self.prefill(record.model, record.input_ids, record.attention_mask, n_l)
        return self._cache(record.model, [(l.keys, l.values) for l in record.layers], valid, n_l,
                           record.attention_mask)

    @torch.no_grad()
    def prefill(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                n_local: torch.Tensor | None = None) -> CompressedCache:
        """The Λ prefill of ``input_ids`` [B, T] (every attention call Λ-shaped) straight into the Λ cache, its last
        logits in ``cache.prefill_logits`` — no exact prefill needed (spec §4.1 C3)."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        n_l = self.local_sizes(valid.sum(-1)) if n_local is None else n_local
        pos = positions_from_mask(valid.long())
        cache = DynamicCache()
        with self.full_sequence(model, n_l):
            out = model(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=pos if attention_mask is not None else None, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
        built = self._cache(model, [(l.keys, l.values) for l in cache.layers], valid, n_l,
                            None if attention_mask is None or bool(valid.all()) else valid)
        built.prefill_logits = out.logits[:, -1].float()
        return built

    def _cache(self, model, keys_values, valid, n_l, kv_mask) -> CompressedCache:
        inv = rope_inv_freq(model)
        limit = None if self.limit is None else torch.full_like(n_l, self.limit)
        pos = positions_from_mask(valid.long())
        layers = [SinkWindowLayer(k, v, pos, valid, n_global=self.n_global, n_local=n_l, limit=limit,
                                  ceiling=self.ceiling, inv_freq=inv, block=self.block) for k, v in keys_values]
        return CompressedCache(layers, method=self.name, kv_mask=kv_mask)
