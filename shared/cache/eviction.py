"""Token-eviction baselines on the shared scoring base (:mod:`shared.cache.scorer`).

* StreamingLLM (Xiao et al., 2024): ``n_sink`` first tokens + the most recent ones.
* H2O (Zhang et al., 2023): half the budget for the most recent tokens, half for heavy hitters — the largest
  attention mass accumulated over the prefill queries, summed over the query heads of each KV head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from shared.cache.base import LayerRecord
from shared.cache.rope import project_queries, query_scaling
from shared.cache.scorer import ScorerMethod


@dataclass
class StreamingLLM(ScorerMethod):
    """Score = recency, with the first ``n_sink`` real tokens (attention sinks) above every other token."""

    n_sink: int = 4
    name: ClassVar[str] = "streaming_llm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be an int >= 0, got {self.n_sink!r}")

    def score(self, module, layer: LayerRecord, valid: torch.Tensor) -> torch.Tensor:
        T = valid.shape[1]
        j = (valid.long().cumsum(-1) - 1).float()                              # index among real tokens
        s = torch.where(j < self.n_sink, 2.0 * T - j, j)                       # sinks first (earliest first)
        return s[:, None].expand(-1, layer.keys.shape[1], -1)


@torch.no_grad()
def accumulated_attention(module, layer: LayerRecord, valid: torch.Tensor, q_pos: torch.Tensor,
                          chunk: int = 256, group_max: bool = False) -> torch.Tensor:
    """Σ over queries ``q_pos`` (and the query heads of each KV head) of causal softmax attention → [B, Hkv, T];
    ``group_max``: per query head Σ over the queries, then the max over the query heads of each KV head.

    Recomputed from the recorded attention input: q = RoPE(norm_q(x·W_Q)) (:func:`project_queries`), logits =
    q·Kᵀ·s with the module's own scale s (1/√d unless the model says otherwise); padding keys are masked."""
    B, Hkv, T, D = layer.keys.shape
    q = project_queries(module, layer.hidden[:, q_pos], layer.cos[:, q_pos], layer.sin[:, q_pos])
    scale = query_scaling(module, D)
    Hq = q.shape[1]
    q = q.view(B, Hkv, Hq // Hkv, len(q_pos), D)
    shape = (B, Hkv, Hq // Hkv, T) if group_max else (B, Hkv, T)
    acc = torch.zeros(shape, dtype=torch.float32, device=layer.keys.device)
    for s in range(0, len(q_pos), chunk):
        qp = q_pos[s:s + chunk].to(layer.keys.device)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, s:s + chunk].float(), layer.keys.float())
        logits = logits * scale                        # = / √d bit for bit when 1/√d is a power of 2 (d = 64, 256)
        mask = torch.arange(T, device=logits.device)[None, :] > qp[:, None]             # causal [q, k]
        mask = mask[None] | ~valid[:, None, :]                                          # + padding keys [B, q, k]
        logits = logits.masked_fill(mask[:, None, None], float("-inf"))
        probs = logits.softmax(-1).nan_to_num(0.0) * valid[:, qp][:, None, None, :, None]  # pad queries: nothing
        acc += probs.sum(dim=3) if group_max else probs.sum(dim=(2, 3))   # (the sum path: bytes as before)
    return acc.amax(2) if group_max else acc


@dataclass
class H2O(ScorerMethod):
    """Heavy hitters: accumulated attention over the prefill queries. To bound the O(T²) CPU cost, at most
    ``max_queries`` evenly spaced query positions are used (all of them when T is smaller)."""

    max_queries: int = 512
    recent_fraction: float = 0.5
    needs: ClassVar[frozenset[str]] = frozenset({"scores"})
    name: ClassVar[str] = "h2o"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError(f"recent_fraction must be in [0, 1], got {self.recent_fraction!r}")
        if isinstance(self.max_queries, bool) or not isinstance(self.max_queries, int) or self.max_queries < 1:
            raise ValueError(f"max_queries must be an int >= 1, got {self.max_queries!r}")

    def protected(self, n_kept: int) -> int:
        return int(round(n_kept * self.recent_fraction))

    def score(self, module, layer: LayerRecord, valid: torch.Tensor) -> torch.Tensor:
        T = valid.shape[1]
        q_pos = torch.linspace(0, T - 1, steps=min(self.max_queries, T)).round().long().unique()
        return accumulated_attention(module, layer, valid, q_pos)
