"""RoPE in HF's rotate-half convention (the layout transformers uses after un-permuting GGUF Q/K)."""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], cos/sin [B, T, D]:  RoPE(x) = x·cos + rotate_half(x)·sin."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
