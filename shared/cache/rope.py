"""RoPE in HF's rotate-half convention (the layout transformers uses after un-permuting GGUF Q/K).

One implementation for the project: the kernels' reference (``kernels.latent_attention``) owns it; this module
adapts the broadcast for cache tensors.
"""
from __future__ import annotations

import torch

from kernels.latent_attention.latent_attention_ref import apply_rope as _apply_rope


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], cos/sin [B, T, D]:  RoPE(x) = x·cos + rotate_half(x)·sin."""
    return _apply_rope(x, cos[:, None], sin[:, None])
