"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469).

The last ``window_size`` prompt tokens (the observation window) vote: for each KV head, the attention their queries
pay to every earlier token, summed over the window's queries and averaged over the query heads sharing the KV head
(GQA), then smoothed along the sequence with a 1-D pooling of width ``kernel_size`` (clusters, not isolated
tokens). Per head, the top-scoring tokens are kept together with the whole observation window::

    s_h[j] = pool_k( Σ_{i ∈ window} mean_{q ∈ group(h)} softmax(q_i·K_hᵀ/√d)[j] ),   keep window ∪ top-(n − w) of s_h
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from shared.cache.base import LayerRecord
from shared.cache.eviction import accumulated_attention
from shared.cache.scorer import ScorerMethod

POOLINGS = ("max", "avg")


@dataclass
class SnapKV(ScorerMethod):
    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "max"              # the official code's default (maxpool); kvpress uses avg
    needs: ClassVar[frozenset[str]] = frozenset({"scores"})
    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("window_size", "kernel_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be an int >= 1, got {v!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (centred pooling), got {self.kernel_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def protected(self, n_kept: int) -> int:
        return self.window_size

    def score(self, module, layer: LayerRecord, valid: torch.Tensor) -> torch.Tensor:
        B, Hkv, T, _ = layer.keys.shape
        w = min(self.window_size, T)
        group = module.config.num_attention_heads // Hkv
        s = accumulated_attention(module, layer, valid, torch.arange(T - w, T)) / group   # mean over the group
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(s.view(B * Hkv, 1, T), kernel_size=self.kernel_size, stride=1, padding=self.kernel_size // 2)
        return pooled.view(B, Hkv, T)
