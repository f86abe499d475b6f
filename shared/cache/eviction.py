"""Token-eviction baselines at a given compression ratio: keep ``⌈(1 − ratio)·T⌉`` context tokens per KV head.

* StreamingLLM (Xiao et al., 2024): ``n_sink`` first tokens + the most recent ones.
* H2O (Zhang et al., 2023): half the budget for heavy hitters (largest attention mass accumulated over the prefill
  queries, summed over the query heads of each KV head), half for the most recent tokens.

Selection happens once, on the exact prefill; tokens decoded afterwards are appended exactly (the budget is fixed
at compression time, as kvpress does). Keys keep the RoPE of their original positions.
"""
from __future__ import annotations

import math

import torch

from shared.cache.base import CompressedCache, ExactLayer, PrefillRecord, attention_modules
from shared.cache.rope import apply_rope


def _check_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"compression ratio must be in [0, 1), got {ratio!r}")


def kept_tokens(n_tokens: int, ratio: float) -> int:
    _check_ratio(ratio)
    return max(1, math.ceil((1.0 - ratio) * n_tokens))


def _gather(record: PrefillRecord, index: list[torch.Tensor], method: str) -> CompressedCache:
    layers = []
    for rec, idx in zip(record.layers, index):
        idx = idx.sort(dim=-1).values  # keep positional order
        gi = idx[..., None].expand(-1, -1, -1, rec.keys.shape[-1])
        layers.append(ExactLayer(rec.keys.gather(2, gi), rec.values.gather(2, gi)))
    return CompressedCache(layers, method=method)


def streaming_llm_cache(record: PrefillRecord, ratio: float, n_sink: int = 4) -> CompressedCache:
    keep = kept_tokens(record.n_tokens, ratio)
    sink = min(n_sink, keep)
    T = record.n_tokens
    pos = torch.cat([torch.arange(sink), torch.arange(T - (keep - sink), T)])
    index = []
    for rec in record.layers:
        B, H = rec.keys.shape[:2]
        index.append(pos.to(rec.keys.device).expand(B, H, -1).clone())
    return _gather(record, index, "streaming_llm")


@torch.no_grad()
def h2o_scores(model, record: PrefillRecord, max_queries: int = 512, chunk: int = 256) -> list[torch.Tensor]:
    """Accumulated attention probability each key receives, per layer → [B, Hkv, T].

    Sums over the prefill queries (causal softmax, recomputed from the recorded attention inputs). To bound the
    O(T²) cost on CPU, at most ``max_queries`` evenly spaced query positions are used (all of them when T is
    smaller): an unbiased-in-spirit estimate of H2O's accumulated score.
    """
    scores = []
    T = record.n_tokens
    q_pos = torch.linspace(0, T - 1, steps=min(max_queries, T)).round().long().unique()
    for attn, rec in zip(attention_modules(model), record.layers):
        B, Hkv, _, D = rec.keys.shape
        x = rec.hidden[:, q_pos]
        q = attn.q_proj(x).view(B, len(q_pos), -1, D).transpose(1, 2)
        q = apply_rope(q, rec.cos[:, q_pos], rec.sin[:, q_pos])
        Hq = q.shape[1]
        q = q.view(B, Hkv, Hq // Hkv, len(q_pos), D)
        acc = torch.zeros(B, Hkv, T, dtype=torch.float32, device=rec.keys.device)
        for s in range(0, len(q_pos), chunk):
            qp = q_pos[s:s + chunk]
            logits = torch.einsum("bhgqd,bhkd->bhgqk", q[:, :, :, s:s + chunk].float(), rec.keys.float())
            logits = logits / math.sqrt(D)
            mask = torch.arange(T, device=logits.device)[None, :] > qp[:, None].to(logits.device)
            logits.masked_fill_(mask, float("-inf"))
            acc += logits.softmax(-1).sum(dim=(2, 3))
        scores.append(acc)
    return scores


def h2o_cache(record: PrefillRecord, ratio: float, scores: list[torch.Tensor], recent_fraction: float = 0.5
              ) -> CompressedCache:
    if not 0.0 <= recent_fraction <= 1.0:
        raise ValueError(f"recent_fraction must be in [0, 1], got {recent_fraction}")
    keep = kept_tokens(record.n_tokens, ratio)
    T = record.n_tokens
    n_recent = int(round(keep * recent_fraction))
    n_heavy = keep - n_recent
    index = []
    for rec, s in zip(record.layers, scores):
        B, H = rec.keys.shape[:2]
        recent = torch.arange(T - n_recent, T, device=s.device).expand(B, H, -1)
        older = s[..., : T - n_recent]
        heavy = older.topk(min(n_heavy, older.shape[-1]), dim=-1).indices
        index.append(torch.cat([heavy, recent], dim=-1))
    return _gather(record, index, "h2o")
