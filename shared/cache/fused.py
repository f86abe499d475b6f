"""Run CSKV decode steps through the fused Triton kernel (``kernels.latent_attention``) instead of rebuilding K/V.

``use_fused_latent_attention(model)`` registers an attention function with transformers' public
``AttentionInterface`` under the name ``"reprise_latent"`` and switches the model to it for the duration of the
block. For a one-token decode step whose layer is a :class:`~shared.cache.lowrank.LowRankLayer` with
``impl="triton"`` (per-head decomposition), attention reads the latents directly:
``o = softmax(q·RoPE(z_K B_K)ᵀ ⊕ q·K_winᵀ) (z_V B_V ⊕ V_win)`` — no rebuilt K/V. Every other call (prefill,
other caches) falls through to SDPA unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "reprise_latent"


def _latent_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = getattr(module, "_reprise_cache_layer", None)
    if layer is not None and getattr(layer, "fused_step_ready", False) and query.shape[2] == 1:
        layer.fused_step_ready = False
        out = layer.fused_attention(query[:, :, 0], scaling)          # [B, Hq, D]
        return out[:, None].to(query.dtype), None                     # HF layout [B, q_len, Hq, D]
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


AttentionInterface.register(NAME, _latent_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextmanager
def use_fused_latent_attention(model) -> Iterator[None]:
    """Temporarily route the model's attention through :func:`_latent_attention`."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
