"""Sliding-window layers (Gemma 2/3, Qwen-style ``layer_types``): a KV method compresses only the layers that attend
the whole context; a local layer keeps exactly the model's own window.

A model whose config says ``layer_types[ℓ] == "sliding_attention"`` with ``sliding_window = W`` lets a query at
position p attend the keys at positions (p − W, p] (transformers' ``sliding_window_overlay``: W keys counting its
own). Such a layer's memory is already bounded by W, whatever the context: there is nothing for a KV-cache method to
select, and a method that attended beyond W on it would change the model. :func:`keep_model_windows` (called by
every registered method, :meth:`shared.cache.registry.KVMethod.__call__`) therefore replaces the cache layer of every
sliding-window layer with a :class:`SlidingWindowLayer` built from the exact prefill:

* it stores the last W − 1 positions (what the next query sees besides itself; HF's ``DynamicSlidingWindowLayer``
  keeps the same), at their absolute positions, with left padding marked invalid;
* a query at p attends keys with p − W < position ≤ p through the model's own attention function (same kernel, same
  softcapping), so a multi-token forced forward is the n single steps (``supports_forced_forward``);
* ``reads`` counts the key slots attended per decoded query (× KV heads), as the other eviction layers do.

Models without ``layer_types`` (Llama, SmolLM2, Mistral without it) have no such layer: the function is the identity.
"""
from __future__ import annotations

import torch

from shared.cache.base import CompressedCache, CompressedLayer, PrefillRecord, model_attention, positions_from_mask
from shared.models import decoder_layers


def _layer_types(model) -> tuple[list[str] | None, int | None]:
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config        # multimodal wrappers (Gemma 3 4B+) nest it
    return getattr(config, "layer_types", None), getattr(config, "sliding_window", None)


def has_sliding_layers(model) -> bool:
    kinds, _ = _layer_types(model)
    return bool(kinds) and "sliding_attention" in kinds


def sliding_windows(model) -> list[int | None]:
    """Per decoder layer: the window W of a sliding-window layer, None for a layer attending the whole context."""
    n_layers = len(decoder_layers(model))
    kinds, window = _layer_types(model)
    if not kinds:
        return [None] * n_layers
    if len(kinds) != n_layers:
        raise ValueError(f"config.layer_types has {len(kinds)} entries for {n_layers} decoder layers")
    if window is None and "sliding_attention" in kinds:
        raise ValueError("config.layer_types names sliding_attention layers but config.sliding_window is None")
    return [int(window) if kind == "sliding_attention" else None for kind in kinds]


class SlidingWindowLayer(CompressedLayer):
    """The exact sliding window of one local layer: the last W − 1 positions stored, W attended per query."""

    supports_forced_forward = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, window: int):
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.window = window
        positions = positions_from_mask(valid.long())
        self.next_pos = torch.where(valid, positions, -1).max(-1).values + 1      # [B]
        self.seen = keys.shape[2]
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values, self.positions, self.valid = keys, values, positions, valid
        self.reads: list[int] = []
        self._q_pos = None
        self._trim()

    def get_seq_length(self) -> int:
        return self.seen

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[2]
        self._q_pos = self.next_pos[:, None] + torch.arange(n, device=self.next_pos.device)      # [B, n]
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.positions = torch.cat([self.positions, self._q_pos], 1)
        self.valid = torch.cat([self.valid, torch.ones_like(self._q_pos, dtype=torch.bool)], 1)
        self.next_pos = self.next_pos + n
        self.seen += n
        return self.keys, self.values

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        qp, kp = self._q_pos[:, :, None], self.positions[:, None, :]                # [B, n, 1], [B, 1, S]
        mask = self.valid[:, None, :] & (kp <= qp) & (kp > qp - self.window)         # [B, n, S]
        # a boolean mask, as the router's own; model_attention gives an eager model its additive form
        out = model_attention(module, query, self.keys, self.values, mask[:, None], scaling, **kwargs)
        self.reads += [int(c) * self.keys.shape[1] for c in mask[0].sum(-1)]
        self._trim()
        return out

    def _trim(self) -> None:
        """Keep the last W − 1 slots (what the next query can see besides itself), in their own storage."""
        drop = self.keys.shape[2] - max(self.window - 1, 0)
        if drop > 0:
            self.keys, self.values = self.keys[:, :, drop:].clone(), self.values[:, :, drop:].clone()
            self.positions, self.valid = self.positions[:, drop:].clone(), self.valid[:, drop:].clone()


def keep_model_windows(record: PrefillRecord, cache: CompressedCache) -> CompressedCache:
    """``cache`` with the layer of every sliding-window layer of ``record.model`` replaced by the model's exact
    window (module docstring); the identity for a model without sliding-window layers or a record without a model."""
    if record.model is None or not has_sliding_layers(record.model):
        return cache
    windows = sliding_windows(record.model)
    if len(windows) != len(cache.layers):
        raise ValueError(f"the model has {len(windows)} layer types but the cache {len(cache.layers)} layers")
    valid = record.valid
    for i, (w, rec) in enumerate(zip(windows, record.layers)):
        if w is not None:
            cache.layers[i] = SlidingWindowLayer(rec.keys, rec.values, valid, w)
    return cache
