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


def project_queries(module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotated queries an attention ``module`` forms from its input ``hidden`` [B, T, d] → [B, Hq, T, D]:
    q = RoPE(norm_q(x·W_Q)), with the per-head RMSNorm ``q_norm`` of models that have one (Gemma 3, Qwen 3; before
    RoPE, as their modeling code applies it) and none otherwise (Llama)."""
    B, T = hidden.shape[:2]
    D = cos.shape[-1]
    q = module.q_proj(hidden).view(B, T, -1, D)
    q = module.q_norm(q) if getattr(module, "q_norm", None) is not None else q
    return apply_rope(q.transpose(1, 2), cos, sin)


def query_scaling(module, head_dim: int) -> float:
    """The softmax scale of ``module`` (``module.scaling``: Gemma's query_pre_attn_scalar^−½), else 1/√D."""
    return float(getattr(module, "scaling", None) or head_dim ** -0.5)
