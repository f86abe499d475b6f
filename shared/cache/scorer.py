"""Token eviction by score (kvpress's ScorerPress idea): a method writes only :meth:`ScorerMethod.score`.

For every layer and KV head, keep ``n_kept = ⌈(1 − compression_ratio)·T⌉`` of the T context tokens: the
``protected`` most recent ones (a method's exact recent window) and the highest-scoring of the rest. Selection
happens once, on the exact prefill; tokens decoded afterwards are appended exactly (the budget is fixed at
compression time, as kvpress does). Keys keep the RoPE of their original positions.

Scores are ratio-independent, so they are computed once per record and reused at every ratio
(``record.memo``). Left-padded rows keep ``⌈(1 − ratio)·T_row⌉`` real tokens; the slots a shorter row does not
fill hold padding, placed first and masked through ``cache.kv_mask`` — a padded row decodes as it would alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from shared.cache.base import CompressedCache, ExactLayer, LayerRecord, PrefillRecord, attention_modules
from shared.cache.registry import KVMethod, check_ratio


def kept_tokens(n_tokens: int, compression_ratio: float) -> int:
    """``max(1, ⌈(1 − compression_ratio)·n_tokens⌉)`` tokens survive eviction."""
    check_ratio(compression_ratio)
    return max(1, math.ceil(round((1.0 - compression_ratio) * n_tokens, 9)))


@dataclass
class ScorerMethod(KVMethod):
    """Base of score-based eviction. Subclasses implement :meth:`score`; optionally :meth:`protected`."""

    def score(self, module, layer: LayerRecord, valid: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """[B, Hkv, T] importance of each context token (higher = keep), independent of the ratio. ``module`` is
        the layer's attention module (for q_proj), ``valid`` [B, T] marks real tokens."""
        raise NotImplementedError

    def protected(self, n_kept: int) -> int:
        """How many of the most recent tokens are always kept when ``n_kept`` tokens survive (default 0)."""
        return 0

    def _scores(self, record: PrefillRecord) -> list[torch.Tensor]:
        key = (type(self).__name__,) + tuple((f.name, getattr(self, f.name)) for f in fields(self)
                                             if f.name != "compression_ratio")
        if key not in record.memo:
            mods = attention_modules(record.model) if record.model is not None else [None] * len(record.layers)
            valid = record.valid
            record.memo[key] = [self.score(m, l, valid).float() for m, l in zip(mods, record.layers)]
        return record.memo[key]

    def compress(self, record: PrefillRecord) -> CompressedCache:
        valid = record.valid                                                   # [B, T]
        B, T = valid.shape
        n_real = valid.sum(-1).tolist()
        n_kept = [kept_tokens(int(n), self.compression_ratio) for n in n_real]
        S = max(n_kept)
        layers = []
        for rec, s in zip(record.layers, self._scores(record)):
            H, D = rec.keys.shape[1], rec.keys.shape[-1]
            index = torch.empty(B, H, S, dtype=torch.long, device=rec.keys.device)
            for b in range(B):
                pad = T - int(n_real[b])
                n_rec = min(self.protected(n_kept[b]), n_kept[b])
                recent = torch.arange(T - n_rec, T, device=index.device).expand(H, -1)
                older = s[b, :, pad:T - n_rec]
                top = older.topk(n_kept[b] - n_rec, dim=-1).indices + pad
                chosen = torch.cat([top, recent], dim=-1).sort(dim=-1).values   # keep positional order
                fill = torch.arange(S - n_kept[b], device=index.device).expand(H, -1)  # padding slots (masked)
                index[b] = torch.cat([fill, chosen], dim=-1)
            gi = index[..., None].expand(-1, -1, -1, D)
            layers.append(ExactLayer(rec.keys.gather(2, gi), rec.values.gather(2, gi)))
        kv_mask = None
        if S != min(n_kept) or record.attention_mask is not None:
            kv_mask = torch.stack([torch.arange(S) >= S - k for k in n_kept]).to(valid.device)
        return CompressedCache(layers, method=self.name, kv_mask=kv_mask)
