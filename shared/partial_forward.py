"""Re-run a decoder-only HF model from layer ``l`` onwards with the hidden state that entered ``l`` cached.

Greedy searches over per-layer settings (e.g. MatryoshkaKV's rank search) score one candidate change at layer l
many times; only layers ≥ l depend on it. :func:`capture_layer_inputs` runs the model once and keeps every decoder
layer's input hidden state and keyword arguments (mask, RoPE cos/sin, positions); :func:`forward_from` replays
layers ``start … L−1`` + final norm + LM head. ``forward_from(captured, 0)`` equals a full forward (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.models import decoder


@dataclass
class LayerInputs:
    hidden: list[torch.Tensor]   # input hidden state of each decoder layer [B, T, d_model]
    kwargs: list[dict]           # keyword arguments each layer was called with
    logits: torch.Tensor         # the full forward's logits [B, T, V]


@torch.no_grad()
def capture_layer_inputs(model, input_ids: torch.Tensor) -> LayerInputs:
    inner = decoder(model)
    hidden: list = [None] * len(inner.layers)
    kwargs: list = [None] * len(inner.layers)
    handles = []
    for i, layer in enumerate(inner.layers):
        def hook(module, args, kw, i=i):
            hidden[i] = args[0] if args else kw["hidden_states"]
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return LayerInputs(hidden, kwargs, logits)


@torch.no_grad()
def forward_from(model, captured: LayerInputs, start: int, final_hidden: bool = False) -> torch.Tensor:
    """Logits (or, with ``final_hidden``, the normed last hidden state) recomputed from layer ``start``."""
    inner = decoder(model)
    if not 0 <= start < len(inner.layers):
        raise ValueError(f"start must be in [0, {len(inner.layers)}), got {start}")
    h = captured.hidden[start]
    for j in range(start, len(inner.layers)):
        out = inner.layers[j](h, **captured.kwargs[j])
        h = out[0] if isinstance(out, tuple) else out
    h = inner.norm(h)
    return h if final_hidden else model.lm_head(h)
