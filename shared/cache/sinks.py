"""Attention sinks in the shared cache layer (transformers 5 removed ``SinkCache``, PR #41107): a layer that keeps
the first ``n_global`` tokens (sinks / LM-Infinite's global branch) and the last ``n_local`` tokens, at their
**absolute** positions, and attends through the Λ function (:func:`shared.lambda_attention.lambda_attention`).

* ``ceiling=True``: LM-Infinite's decode cache (official lambda_attention.py:84-91, 195-202: first global + last
  local); a global key's logit is the RoPE logit at distance L — the key is re-rotated by R_{(t−L)−g} for query t
  (spec §4.1), i.e. q̃_t·R_{(t−L)−g}k̃_g = (R_{L−t}q̃_t)·(R_{−g}k̃_g).
* ``ceiling=False``: StreamingLLM with original positions (sinks at their true distance).

The layer tracks each slot's position and validity (left padding) per row; ``get_seq_length`` reports the number
of positions seen (what HF's mask sizes and ``shared.kv_eval``'s step masks count), the stored slots are
``n_stored`` ≤ n_g + n_l after every step (eviction happens after the step's attention, so a multi-token forced
update attends as its n single steps would).
"""
from __future__ import annotations

import torch

from shared.cache.base import CompressedLayer
from shared.lambda_attention import lambda_attention


def pack_kept(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots to gather so that each row keeps its ``keep`` [B, S] slots in order, right-aligned; rows keeping fewer
    get filler slots in front, marked invalid. Returns (index [B, S'], valid [B, S'])."""
    counts = keep.sum(-1)
    width = int(counts.max()) if keep.numel() else 0
    index = torch.zeros(keep.shape[0], width, dtype=torch.long, device=keep.device)
    valid = torch.zeros(keep.shape[0], width, dtype=torch.bool, device=keep.device)
    for b in range(keep.shape[0]):
        idx = keep[b].nonzero().flatten()
        index[b, width - len(idx):] = idx
        valid[b, width - len(idx):] = True
    return index, valid


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] at slots index [B, S'] → [B, H, S', D]."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


class SinkWindowLayer(CompressedLayer):
    """First n_global + last n_local tokens of each row, absolute positions, Λ/StreamingLLM attention."""

    supports_forced_forward = True

    def __init__(self, keys, values, positions, valid, *, n_global: int, n_local: torch.Tensor,
                 limit: torch.Tensor | None, ceiling: bool, inv_freq: torch.Tensor, block: int = 1024):
        super().__init__()
        self.keys, self.values = keys.clone(), values.clone()
        self.positions, self.valid = positions.clone(), valid.clone()
        self.dtype, self.device = keys.dtype, keys.device
        self.n_global, self.n_local, self.limit = n_global, n_local, limit
        self.ceiling, self.inv_freq, self.block = ceiling, inv_freq, block
        self.next_pos = torch.where(valid, positions, -1).max(-1).values + 1      # [B]
        self.seen = keys.shape[2]
        self.reads: list[int] = []       # key slots attended by each decoded query (all KV heads of row 0)
        self._q_pos = None
        self._evict()

    @property
    def n_stored(self) -> int:
        return self.keys.shape[2]

    def get_seq_length(self) -> int:
        return self.seen

    def _evict(self) -> None:
        """Keep what the next query (position next_pos) can attend: j < n_g, or next_pos − j < n_l + ... i.e. the
        last n_l positions up to and including the newest token (cache = min(P+N, n_g + n_l) slots)."""
        last = (self.next_pos - 1)[:, None]
        keep = self.valid & ((self.positions < self.n_global) | (last - self.positions < self.n_local[:, None]))
        if bool(keep.all()):
            return
        index, valid = pack_kept(keep)
        self.keys, self.values = gather_slots(self.keys, index), gather_slots(self.values, index)
        self.positions, self.valid = self.positions.gather(1, index), valid

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[2]
        pos = self.next_pos[:, None] + torch.arange(n, device=self.next_pos.device)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.positions = torch.cat([self.positions, pos], 1)
        self.valid = torch.cat([self.valid, torch.ones_like(pos, dtype=torch.bool)], 1)
        self.next_pos = self.next_pos + n
        self.seen += n
        self._q_pos = pos
        return self.keys, self.values

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        out = lambda_attention(query, self.keys, self.values, self._q_pos, self.positions, n_global=self.n_global,
                               n_local=self.n_local, limit=self.limit, inv_freq=self.inv_freq, scaling=scaling,
                               ceiling=self.ceiling, k_valid=self.valid, block=self.block)
        qp, kp = self._q_pos[0, :, None], self.positions[0, None, :]          # keys each query of row 0 attends
        seen = self.valid[0] & (kp <= qp) & ((kp < self.n_global) | (qp - kp < self.n_local[0]))
        self.reads += [int(n) * self.keys.shape[1] for n in seen.sum(-1)]
        self._evict()
        return out
