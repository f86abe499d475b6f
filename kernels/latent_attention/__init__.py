"""Decode attention over a CSKV per-head low-rank latent cache: ``impl="triton"`` (fused kernel) or ``"torch"``.

The math (Eqs. 1–5) is in :mod:`kernels.latent_attention.latent_attention_ref` (the spec); the kernel design in
:mod:`kernels.latent_attention.latent_attention_triton` (imported lazily, on the first ``impl="triton"`` call, so
``TRITON_INTERPRET=1`` may be set any time before that call).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.latent_attention.latent_attention_ref import (
    apply_rope,
    joint_rebuild_attention,
    latent_decode_attention_ref,
    naive_rebuild_attention,
    rope_cos_sin,
)
from kernels.quant.quant_ref import SUPPORTED_DTYPES, Int4Tensor, check_int4_tensor

IMPLS = ("triton", "torch")


def _check_tensor(name: str, t: object, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-d, got shape {tuple(t.shape)}")
    return t


def _check_shape(name: str, t: Tensor | Int4Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"{name} must have shape {tuple(want)}, got {tuple(t.shape)}")


def check_latent_attention_inputs(q: Tensor, lk: Tensor | Int4Tensor, lv: Tensor | Int4Tensor, bk: Tensor,
                                  bv: Tensor, cos: Tensor, sin: Tensor, wk: Tensor | None, wv: Tensor | None,
                                  key_mask: Tensor | None, window_mask: Tensor | None, scale: float | None) -> None:
    """Validate shapes, dtypes and devices of :func:`latent_decode_attention`; raise ``ValueError`` naming the bad
    value and the allowed range."""
    _check_tensor("q", q, 3)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q.dtype must be one of float16/bfloat16/float32, got {q.dtype}")
    b, hq, d = q.shape
    if d < 2 or d % 2 != 0:
        raise ValueError(f"head_dim q.shape[2] must be even and >= 2 (RoPE halves), got {d}")
    for name, lat in (("lk", lk), ("lv", lv)):
        if isinstance(lat, Int4Tensor):
            check_int4_tensor(lat)
            if lat.ndim != 4:
                raise ValueError(f"{name} must be 4-d [B, Hkv, T, r], got shape {tuple(lat.shape)}")
        else:
            _check_tensor(name, lat, 4)
        if lat.dtype != q.dtype:
            raise ValueError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {lat.dtype}")
        if lat.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {lat.device}")
        if lat.shape[-1] < 1:
            raise ValueError(f"{name} rank (last dim) must be >= 1, got {lat.shape[-1]}")
    bsz, hkv, t, rk = lk.shape
    if bsz != b:
        raise ValueError(f"lk batch size must equal q's ({b}), got {bsz}")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads lk.shape[1] (>= 1), got {hkv}")
    rv = lv.shape[-1]
    _check_shape("lv", lv, (b, hkv, t, rv))
    for name, bm, r in (("bk", bk, rk), ("bv", bv, rv)):
        _check_tensor(name, bm, 3)
        _check_shape(name, bm, (hkv, r, d))
        if bm.dtype != q.dtype:
            raise ValueError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {bm.dtype}")
    for name, cs in (("cos", cos), ("sin", sin)):
        if not isinstance(cs, Tensor) or cs.ndim not in (2, 3):
            raise ValueError(f"{name} must be a [T, D] or [B, T, D] tensor, got "
                             f"{tuple(cs.shape) if isinstance(cs, Tensor) else type(cs).__name__}")
        if tuple(cs.shape[-2:]) != (t, d) or (cs.ndim == 3 and cs.shape[0] != b):
            raise ValueError(f"{name} must have shape {(t, d)} or {(b, t, d)}, got {tuple(cs.shape)}")
        if cs.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be one of float16/bfloat16/float32, got {cs.dtype}")
    if (wk is None) != (wv is None):
        raise ValueError(f"wk and wv must both be given or both be None, got wk={type(wk).__name__}, "
                         f"wv={type(wv).__name__}")
    w = 0
    if wk is not None:
        _check_tensor("wk", wk, 4)
        w = wk.shape[2]
        if w < 0:  # pragma: no cover - torch shapes are non-negative
            raise ValueError(f"window length W must be >= 0, got {w}")
        for name, wt in (("wk", wk), ("wv", wv)):
            _check_tensor(name, wt, 4)
            _check_shape(name, wt, (b, hkv, w, d))
            if wt.dtype != q.dtype:
                raise ValueError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {wt.dtype}")
    for name, m, n in (("key_mask", key_mask, t), ("window_mask", window_mask, w)):
        if m is None:
            continue
        _check_tensor(name, m, 2)
        if m.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor (True = attend), got {m.dtype}")
        _check_shape(name, m, (b, n))
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite float > 0 (default 1/sqrt(D)), got {scale!r}")
    for name, x in (("bk", bk), ("bv", bv), ("cos", cos), ("sin", sin), ("wk", wk), ("wv", wv),
                    ("key_mask", key_mask), ("window_mask", window_mask)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")


def latent_decode_attention(q: Tensor, lk: Tensor | Int4Tensor, lv: Tensor | Int4Tensor, bk: Tensor, bv: Tensor,
                            cos: Tensor, sin: Tensor, wk: Tensor | None = None, wv: Tensor | None = None, *,
                            key_mask: Tensor | None = None, window_mask: Tensor | None = None,
                            scale: float | None = None, impl: str = "triton", block_t: int | None = None,
                            num_splits: int | None = None) -> Tensor:
    """One decode step of attention over a CSKV latent cache plus an exact recent window (one layer).

    ``o = softmax([q·RoPE(lk B_K)ᵀ, q·wkᵀ]·scale) [lv B_V ; wv]`` (Eqs. 1–4), computed by the kernel as
    ``Σ_j p_j (lv_j B_V) = (Σ_j p_j lv_j) B_V`` (Eq. 5: accumulate in latent space, project once).

    Args:
        q: ``[B, Hq, D]`` query, RoPE already applied at the current position.
        lk, lv: key/value latents ``[B, Hkv, T, r_k]`` / ``[B, Hkv, T, r_v]``, same dtype as ``q``, or
            :class:`~kernels.quant.Int4Tensor` (keys usually ``axis=-2``, values ``axis=-1``; any axis works).
        bk, bv: per-KV-head up-projections ``[Hkv, r_k, D]`` / ``[Hkv, r_v, D]``.
        cos, sin: RoPE tables of the latent positions, ``[T, D]`` (shared) or ``[B, T, D]`` (HF rotate_half).
        wk, wv: exact recent window ``[B, Hkv, W, D]`` (keys post-RoPE), or None (W = 0).
        key_mask, window_mask: bool ``[B, T]`` / ``[B, W]``, True = attend (left padding); None = all valid.
        scale: softmax scale, default ``1/sqrt(D)``.
        impl: ``"triton"`` (fused kernel) or ``"torch"`` (reference, fp32 math).
        block_t, num_splits: Triton tiling overrides (tokens per tile, power of 2 >= 16; number of splits >= 1).

    Returns:
        ``[B, Hq, D]`` in ``q.dtype``; GQA: query head ``i`` reads KV head ``i // (Hq // Hkv)``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_latent_attention_inputs(q, lk, lv, bk, bv, cos, sin, wk, wv, key_mask, window_mask, scale)
    if block_t is not None and (not isinstance(block_t, int) or block_t < 16 or block_t & (block_t - 1)):
        raise ValueError(f"block_t must be a power of 2 >= 16, got {block_t!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    if impl == "torch":
        return latent_decode_attention_ref(q, lk, lv, bk, bv, cos, sin, wk, wv, key_mask, window_mask, scale)
    from kernels.latent_attention.latent_attention_triton import latent_decode_attention_triton
    from kernels.quant.quant_triton import check_triton_device

    check_triton_device(q, "q")
    return latent_decode_attention_triton(q, lk, lv, bk, bv, cos, sin, wk, wv, key_mask, window_mask, scale,
                                          block_t=block_t, num_splits=num_splits)


__all__ = [
    "latent_decode_attention",
    "latent_decode_attention_ref",
    "naive_rebuild_attention",
    "joint_rebuild_attention",
    "check_latent_attention_inputs",
    "apply_rope",
    "rope_cos_sin",
    "IMPLS",
]
