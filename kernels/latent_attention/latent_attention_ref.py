"""Decode attention over a CSKV low-rank latent cache — plain-PyTorch reference (the spec) and naive baselines.

CSKV (arXiv 2409.10593; spec: papers/cskv.md) caches latents ``X A_K`` / ``X A_V`` and rebuilds keys and values
from them. With the *per-head (grouped)* decomposition used here, KV head ``h`` owns ``B_K[h] ∈ R^{r_k × D}`` and
``B_V[h] ∈ R^{r_v × D}``; for one decode step of one layer, query head ``i`` (KV head ``h = i // groups``)::

    k_j   = RoPE_j(lk_j B_K[h])                      (Eq. 1: rebuild, then RoPE — CSKV applies RoPE after B_K)
    v_j   = lv_j B_V[h]                               (Eq. 2)
    s_j   = scale · q_i · k_j      for latent tokens j;   s_w = scale · q_i · wk_w  for exact window tokens w (Eq. 3)
    p     = softmax([s_latent, s_window])             (one softmax over both branches of the bi-branch cache)
    o_i   = Σ_j p_j v_j + Σ_w p_w wv_w                (Eq. 4)

RoPE uses the HF ``rotate_half`` convention: ``RoPE(x) = x ⊙ cos + rotate_half(x) ⊙ sin`` with
``rotate_half(x) = cat(-x₂, x₁)``. The reference rebuilds K/V explicitly; the fused kernel instead uses
``Σ_j p_j (lv_j B_V) = (Σ_j p_j lv_j) B_V`` (Eq. 5) and never materializes V.

Latents may be float tensors or :class:`~kernels.quant.Int4Tensor` (dequantized here with the reference dequantizer,
Eq. Q4 of :mod:`kernels.quant.quant_ref`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.quant.quant_ref import Int4Tensor, dequantize_int4

Latent = Tensor | Int4Tensor


def rotate_half(x: Tensor) -> Tensor:
    """HF convention: ``rotate_half(x) = cat(-x₂, x₁)`` over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``RoPE(x) = x ⊙ cos + rotate_half(x) ⊙ sin`` (cos/sin broadcast against ``x``)."""
    return x * cos + rotate_half(x) * sin


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """HF-style (non-interleaved) RoPE tables ``[..., head_dim]`` for integer ``positions`` (computed in fp32)."""
    if head_dim % 2 != 0 or head_dim < 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim}")
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _dense(latent: Latent) -> Tensor:
    return dequantize_int4(latent) if isinstance(latent, Int4Tensor) else latent


def _bcast_rope(t: Tensor) -> Tensor:
    """cos/sin ``[T, D]`` -> ``[1, 1, T, D]``; ``[B, T, D]`` -> ``[B, 1, T, D]``."""
    return t[None, None] if t.ndim == 2 else t[:, None]


def _joint_mask(key_mask: Tensor | None, window_mask: Tensor | None, b: int, t: int, w: int,
                device: torch.device) -> Tensor | None:
    if key_mask is None and window_mask is None:
        return None
    km = key_mask if key_mask is not None else torch.ones(b, t, dtype=torch.bool, device=device)
    wm = window_mask if window_mask is not None else torch.ones(b, w, dtype=torch.bool, device=device)
    return torch.cat((km.bool(), wm.bool()), dim=1)


def rebuild_keys_values(lk: Latent, lv: Latent, bk: Tensor, bv: Tensor, cos: Tensor, sin: Tensor,
                        dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Eqs. 1–2: ``K = RoPE(lk B_K[h])``, ``V = lv B_V[h]`` as ``[B, Hkv, T, D]`` (computed in ``dtype``)."""
    lk_d, lv_d = _dense(lk), _dense(lv)
    dt = dtype or lk_d.dtype
    k = torch.einsum("bhtr,hrd->bhtd", lk_d.to(dt), bk.to(dt))
    k = apply_rope(k, _bcast_rope(cos).to(dt), _bcast_rope(sin).to(dt))
    v = torch.einsum("bhtr,hrd->bhtd", lv_d.to(dt), bv.to(dt))
    return k, v


def latent_decode_attention_ref(q: Tensor, lk: Latent, lv: Latent, bk: Tensor, bv: Tensor, cos: Tensor, sin: Tensor,
                                wk: Tensor | None = None, wv: Tensor | None = None,
                                key_mask: Tensor | None = None, window_mask: Tensor | None = None,
                                scale: float | None = None,
                                compute_dtype: torch.dtype | None = torch.float32,
                                out_dtype: torch.dtype | None = None) -> Tensor:
    """Reference decode attention over latent + exact-window tokens (Eqs. 1–4 of the module doc).

    Shapes: ``q [B, Hq, D]``; ``lk [B, Hkv, T, r_k]``, ``lv [B, Hkv, T, r_v]`` (or Int4Tensor);
    ``bk [Hkv, r_k, D]``, ``bv [Hkv, r_v, D]``; ``cos``/``sin`` ``[T, D]`` or ``[B, T, D]``; ``wk``/``wv``
    ``[B, Hkv, W, D]`` or None; ``key_mask [B, T]`` / ``window_mask [B, W]`` bool (True = attend) or None.
    ``compute_dtype``: dtype of every intermediate (fp32 default; fp64 for a ground truth); ``None`` runs in the
    input dtype, to measure the reference's own low-precision error (flash-attn tolerance rule). ``out_dtype``
    defaults to ``q.dtype`` (pass ``torch.float64`` to keep a fp64 ground truth unrounded). A query row with
    no attendable key returns zeros. Inputs are not validated here: use
    :func:`kernels.latent_attention.latent_decode_attention` for that.
    """
    b, hq, d = q.shape
    hkv = bk.shape[0]
    groups = hq // hkv
    dt = compute_dtype or q.dtype
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    k, v = rebuild_keys_values(lk, lv, bk, bv, cos, sin, dt)
    t = k.shape[2]
    w = 0
    if wk is not None and wk.shape[2] > 0:
        w = wk.shape[2]
        k = torch.cat((k, wk.to(dt)), dim=2)
        v = torch.cat((v, wv.to(dt)), dim=2)
    qg = q.to(dt).reshape(b, hkv, groups, d)
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, k) * scale  # Eq. 3
    mask = _joint_mask(key_mask, window_mask if w > 0 else None, b, t, w, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    if mask is not None:  # fully masked rows: softmax gives NaN; define the output as 0
        p = torch.where(mask.any(dim=-1)[:, None, None, None], p, torch.zeros_like(p))
    out = torch.einsum("bhgt,bhtd->bhgd", p, v)  # Eq. 4
    return out.reshape(b, hq, d).to(out_dtype or q.dtype)


def naive_rebuild_attention(q: Tensor, lk: Latent, lv: Latent, bk: Tensor, bv: Tensor, cos: Tensor, sin: Tensor,
                            wk: Tensor | None = None, wv: Tensor | None = None,
                            key_mask: Tensor | None = None, window_mask: Tensor | None = None,
                            scale: float | None = None) -> Tensor:
    """Benchmark baseline: rebuild the full K/V (Eqs. 1–2) in the input dtype every step, then SDPA (GQA-aware)."""
    b, hq, d = q.shape
    k, v = rebuild_keys_values(lk, lv, bk, bv, cos, sin)
    t = k.shape[2]
    w = 0 if wk is None else wk.shape[2]
    if w > 0:
        k = torch.cat((k, wk), dim=2)
        v = torch.cat((v, wv), dim=2)
    mask = _joint_mask(key_mask, window_mask if w > 0 else None, b, t, w, q.device)
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=attn_mask, scale=scale,
                                         enable_gqa=hq != k.shape[1])
    return out[:, :, 0, :]


def joint_rebuild_attention(q: Tensor, latent_k: Tensor, latent_v: Tensor, bk_joint: Tensor, bv_joint: Tensor,
                            cos: Tensor, sin: Tensor, scale: float | None = None) -> Tensor:
    """The paper's *joint* decomposition, naive path (as ``shared/tools/gpu_decode_anchor.py``): one latent of
    ``r`` channels per token for all KV heads, ``B ∈ R^{r × (Hkv·D)}``; every step rebuilds
    ``T × r × Hkv·D`` MACs per layer (Eq. 1 for all heads at once), then SDPA.

    Shapes: ``q [B, Hq, D]``, ``latent_k``/``latent_v [B, T, r]``, ``bk_joint``/``bv_joint [r, Hkv·D]``,
    ``cos``/``sin [T, D]``.
    """
    b, hq, d = q.shape
    t = latent_k.shape[1]
    hkv = bk_joint.shape[1] // d
    k = (latent_k @ bk_joint).view(b, t, hkv, d).transpose(1, 2)
    k = apply_rope(k, _bcast_rope(cos), _bcast_rope(sin))
    v = (latent_v @ bv_joint).view(b, t, hkv, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, scale=scale, enable_gqa=hq != hkv)
    return out[:, :, 0, :]
