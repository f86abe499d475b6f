"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469).

The last ``window_size`` prompt tokens (the observation window) vote: for each KV head, the attention their queries
pay to every earlier token, summed over the window's queries and averaged over the query heads sharing the KV head
(GQA), then smoothed along the sequence with a 1-D pooling of width ``kernel_size`` (clusters, not isolated
tokens). Per head, the top-scoring tokens are kept together with the whole observation window::

    s_h[j] = pool_k( Σ_{i ∈ window} mean_{q ∈ group(h)} softmax(q_i·K_hᵀ/√d)[j] ),   keep window ∪ top-(n − w) of s_h

Settings (official code FasterDecoding/SnapKV @e216ddc, ``snapkv/monkeypatch/snapkv_utils.py``):

* the official **default** is window 64, kernel 5, **avg** pooling (``SnapKVCluster.__init__`` line 24,
  ``init_snapkv`` line 81); max pooling with kernel 7 is its LongBench configuration; RefreshKV's SnapKV baseline is
  window 1, kernel 7, max, max over the GQA group (spec long_context.md §2). kvpress: window 64, kernel 5, avg, mean.
* the official code pools only the tokens *before* the window (``attn_weights_sum`` over ``[: -window_size]``,
  lines 55-59: avg pads with zeros, max with −inf) and scores each query head (MHA). ``pool_scope="prefix"`` does
  that (golden parity: tests/parity/test_parity_snapkv.py); ``"all"`` (this class's original behaviour, kept as the
  default so the committed CSKV/MatryoshkaKV tables stay byte-identical) pools the whole sequence, window included,
  so the last ⌊kernel/2⌋ pre-window tokens also see the window's votes.
* ``group``: how the query heads of one KV head combine — ``"mean"`` (kvpress) or ``"max"`` (RefreshKV).
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
GROUPS = ("mean", "max")
POOL_SCOPES = ("all", "prefix")


@dataclass
class SnapKV(ScorerMethod):
    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "max"              # official default: avg (window 64, kernel 5); max: its LongBench setting
    group: str = "mean"               # "max": RefreshKV's baseline (max over the GQA group)
    pool_scope: str = "all"           # "prefix": the official code (pool only the tokens before the window)
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
        for key, allowed in (("pooling", POOLINGS), ("group", GROUPS), ("pool_scope", POOL_SCOPES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")

    def protected(self, n_kept: int) -> int:
        return self.window_size

    def score(self, module, layer: LayerRecord, valid: torch.Tensor) -> torch.Tensor:
        B, Hkv, T, _ = layer.keys.shape
        w = min(self.window_size, T)
        group = module.config.num_attention_heads // Hkv
        if self.group == "mean":
            s = accumulated_attention(module, layer, valid, torch.arange(T - w, T)) / group   # mean over the group
        else:
            s = accumulated_attention(module, layer, valid, torch.arange(T - w, T), group_max=True)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        n = T if self.pool_scope == "all" else T - w              # "prefix": the window's votes are not pooled
        pooled = pool(s[..., :n].reshape(B * Hkv, 1, n), kernel_size=self.kernel_size, stride=1,
                      padding=self.kernel_size // 2).view(B, Hkv, n)
        if n < T:      # window tokens are protected (always kept); their score is never compared
            pooled = torch.cat([pooled, s.new_full((B, Hkv, T - n), float("inf"))], -1)
        return pooled
