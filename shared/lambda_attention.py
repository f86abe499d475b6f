"""Λ-shaped attention (LM-Infinite: Han et al., NAACL 2024, §3; spec papers/long_context.md §2) as an attention
function for transformers' ``AttentionInterface``, chunked over query blocks, plus the dense two-logit reference.

For query i and key j ≤ i (positions absolute, RoPE R_m in HF's rotate-half convention, q̃_i = R_i q_i and
k̃_j = R_j k_j the rotated tensors HF hands to attention):

    Local(i)  = {j : i − j < n_l}                     logit = q̃_i·k̃_j·s        = q_iᵀ R_{j−i} k_j·s
    Global(i) = {j < n_g} \\ Local(i)                   logit = (R_{L−i} q̃_i)·(R_{−j} k̃_j)·s = q_iᵀ R_{−L} k_j·s
    every other key is masked; each key counts once (official models/lambda_attention.py:59-67 masks global keys
    that are local), s = 1/√d.

The global logit is the RoPE logit at distance exactly L (the "distance ceiling" min(i − j, L) = L): the official
code keeps global keys unrotated and rotates q at ``min(limit, kv_len − 1)`` (models/llama.py:150-158); we compute
the same product from HF's already-rotated tensors, as spec §2 says. ``ceiling=False`` gives global keys their true
distance (the "Λ without ceiling" ablation; with n_l and n_g this is StreamingLLM at original positions).
Ceiling-only ablation: n_g ≥ T (no mask), n_l = L.

GQA: queries are viewed [B, Hkv, G, T, D] and contracted with the Hkv key heads directly (no ``repeat_kv`` copy;
the official code is MHA-only, llama.py:125-127). Positions come per row ([B, T] / [B, S]), so left-padded rows and
a cache whose slots are not contiguous positions (first n_g + last n_l) are handled by the same function.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

UNLIMITED = 2 ** 40  # n_local for "every earlier token is local" (compression_ratio 0)


def check_lambda_params(n_global, n_local, limit=None) -> None:
    """ValueError naming the bad value: n_local ≥ 1, n_global ≥ 0, limit ≥ 1 (ints)."""
    for name, v, lo in (("n_global", n_global, 0), ("n_local", n_local, 1), ("limit", limit, 1)):
        if name == "limit" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def rope_inv_freq(model) -> torch.Tensor:
    """The RoPE inverse frequencies of ``model`` (its decoder's ``rotary_emb``); ValueError if it has no RoPE (Λ's
    ceiling is a RoPE distance) or a RoPE with an attention scaling ≠ 1 (YaRN-style; not supported here). A model
    with one RoPE per layer type (Gemma 3: ``full_attention_inv_freq``, ``sliding_attention_inv_freq``) gives its
    full-attention layers' frequencies: Λ applies to those only (sliding-window layers keep their own window,
    :mod:`shared.cache.sliding`)."""
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    inv = getattr(rotary, "inv_freq", None)
    if inv is None:
        inv = getattr(rotary, "full_attention_inv_freq", None)
    if inv is None:
        raise ValueError(f"Λ-attention needs a RoPE model; {type(model).__name__} has no rotary_emb.inv_freq")
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if scaling != 1.0:
        raise ValueError(f"Λ-attention supports RoPE with attention_scaling 1.0 only, got {scaling}")
    return inv.detach().float()


def rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """R_pos x for x [B, H, T, D] and positions pos [B, T] (any integer, negative or beyond the training range):
    x·cos(pos·θ) + rotate_half(x)·sin(pos·θ), angles formed in float64."""
    ang = pos.double()[..., None] * inv_freq.double().to(pos.device)             # [B, T, D/2]
    ang = torch.cat([ang, ang], -1)[:, None]                                     # [B, 1, T, D]
    x1, x2 = x.chunk(2, dim=-1)
    return x * ang.cos().to(x.dtype) + torch.cat([-x2, x1], -1) * ang.sin().to(x.dtype)


def _per_row(v, B: int, device) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.long, device=device)
    return t.expand(B).clone() if t.dim() == 0 else t


def lambda_attention(q, k, v, q_pos, k_pos, *, n_global: int, n_local, limit=None, inv_freq: torch.Tensor,
                     scaling: float, ceiling: bool = True, k_valid: torch.Tensor | None = None,
                     block: int = 1024) -> torch.Tensor:
    """Λ-attention output [B, T, Hq, D] of rotated q [B, Hq, T, D] over rotated k, v [B, Hkv, S, D].

    ``q_pos`` [B, T], ``k_pos`` [B, S] absolute positions (keys sorted by position in each row); ``n_local`` and
    ``limit`` (L, default n_local) an int or one per row [B]; ``k_valid`` [B, S] False = padding. Queries are
    processed in blocks of ``block``: each block reads the n_g global keys and only the key slots that can be local
    to it (official blockwise band: lambda_attention.py:92-120), so memory is O(block·(n_g + block + n_l))."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of KV heads {Hkv}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    G, dev = Hq // Hkv, q.device
    n_l = _per_row(n_local, B, dev)
    L = n_l if limit is None else _per_row(limit, B, dev)
    valid = torch.ones(B, S, dtype=torch.bool, device=dev) if k_valid is None else k_valid.bool()
    # global key slots: a prefix of the (position-sorted) slots
    n_gslots = int((valid & (k_pos < n_global)).sum(-1).max()) if n_global > 0 else 0
    if n_gslots:
        g_slots = int(max(torch.searchsorted(k_pos[b].contiguous(), n_global).item() for b in range(B)))
        kg, vg, pg, valg = k[:, :, :g_slots], v[:, :, :g_slots], k_pos[:, :g_slots], valid[:, :g_slots]
        kg_c = rotate(kg, -pg, inv_freq) if ceiling else kg                     # R_{−j} k̃_j = k_j (unrotated)
    out = torch.empty(B, T, Hq, D, dtype=q.dtype, device=dev)
    for s in range(0, T, block):
        e = min(T, s + block)
        qb, qp = q[:, :, s:e], q_pos[:, s:e]
        # key slots that can be local to this block: positions in (min q − n_l, max q]
        lo = min(int(torch.searchsorted(k_pos[b].contiguous(), int(qp[b].min() - n_l[b] + 1)).item())
                 for b in range(B))
        hi = max(int(torch.searchsorted(k_pos[b].contiguous(), int(qp[b].max()), right=True).item())
                 for b in range(B))
        kl, vl, pl = k[:, :, lo:hi], v[:, :, lo:hi], k_pos[:, lo:hi]
        dist = qp[:, :, None] - pl[:, None, :]                                  # i − j  [B, t, s]
        local = valid[:, lo:hi][:, None] & (dist >= 0) & (dist < n_l[:, None, None])
        if n_gslots:
            dg = qp[:, :, None] - pg[:, None, :]
            glob = valg[:, None] & (pg[:, None, :] < n_global) & (dg >= n_l[:, None, None])
            # ceiling: (R_{L−i} q̃_i)·(R_{−j} k̃_j) = RoPE logit at distance exactly L (spec §2). Both branches in one
            # softmax, by one fused SDPA call over the keys [global; local] with the head dim doubled:
            #   Q = [q̃ | R_{L−i} q̃],  K_global = [0 | R_{−j} k̃],  K_local = [k̃ | 0]  ->  Q·K = the two logits
            qc = rotate(qb, L[:, None] - qp, inv_freq) if ceiling else qb
            qb = torch.cat([qb, qc], -1)
            kb = torch.cat([torch.cat([torch.zeros_like(kg_c), kg_c], -1),
                            torch.cat([kl, torch.zeros_like(kl)], -1)], 2)
            vb = torch.cat([vg, vl], 2)
            mask = torch.cat([glob, local], -1)
        else:
            kb, vb, mask = kl, vl, local
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scaling,
                                           enable_gqa=G > 1)
        o = o.nan_to_num(0.0)                                   # a query with no visible key (padding) reads 0
        out[:, s:e] = o.transpose(1, 2)
    return out


def lambda_attention_reference(q, k, v, q_pos, k_pos, *, n_global: int, n_local, limit=None,
                               inv_freq: torch.Tensor, scaling: float, ceiling: bool = True,
                               k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Dense two-logit reference [B, T, Hq, D]: the full rotated logit matrix and the full stationary (ceiling)
    logit matrix, combined per (i, j) by the Λ mask (official dense form: models/llama.py:48-52); GQA by repeating
    KV heads. O(T·S) memory: for tests."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    n_l = _per_row(n_local, B, q.device)
    L = n_l if limit is None else _per_row(limit, B, q.device)
    kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    rot = q @ kr.transpose(-1, -2) * scaling
    if ceiling:
        stat = rotate(q, L[:, None] - q_pos, inv_freq) @ rotate(kr, -k_pos, inv_freq).transpose(-1, -2) * scaling
    else:
        stat = rot
    dist = q_pos[:, :, None] - k_pos[:, None, :]
    valid = torch.ones(B, S, dtype=torch.bool, device=q.device) if k_valid is None else k_valid.bool()
    local = (dist >= 0) & (dist < n_l[:, None, None]) & valid[:, None]
    glob = (dist >= n_l[:, None, None]) & (k_pos[:, None, :] < n_global) & valid[:, None]
    logits = torch.where(local[:, None], rot, torch.where(glob[:, None], stat, torch.full_like(rot, float("-inf"))))
    p = logits.float().softmax(-1).nan_to_num(0.0).to(q.dtype)
    return (p @ vr).transpose(1, 2)


# ---- the full-sequence form (an attention function on the project's router) ---------------------------------------
def _lambda_forward(module, query, key, value, attention_mask, scaling, **kwargs) -> torch.Tensor:
    cfg = module._reprise_lambda
    B, _, T, _ = query.shape
    if key.shape[2] != T:
        raise ValueError("the full-sequence Λ form attends a whole sequence without a cache; decode through the "
                         "Λ cache (shared.cache.lm_infinite) instead")
    pos = kwargs.get("position_ids")
    pos = torch.arange(T, device=query.device)[None].expand(B, -1) if pos is None else pos.expand(B, -1)
    k_valid = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool and attention_mask.dim() == 4:
        k_valid = attention_mask[:, 0, -1, :].expand(B, -1)   # left padding: the last query sees every real key
    return lambda_attention(query, key, value, pos, pos, k_valid=k_valid, scaling=scaling, **cfg)


@contextmanager
def lambda_attention_context(model, n_global: int, n_local, limit=None, ceiling: bool = True,
                             block: int = 1024) -> Iterator[None]:
    """While active, every attention call of ``model`` (a full-sequence forward, no cache) is Λ-shaped with
    (n_g, n_l, L) — routed through the project's one attention router (``shared.cache.base``). A sliding-window
    layer (Gemma 3's local layers) keeps the model's own attention: its window already bounds it."""
    from shared.cache.base import attention_modules, routed_attention
    from shared.cache.sliding import sliding_windows

    if not torch.is_tensor(n_local):
        check_lambda_params(n_global, n_local, limit)
    inv = rope_inv_freq(model)
    cfg = dict(n_global=n_global, n_local=n_local, limit=limit, ceiling=ceiling, block=block, inv_freq=inv)
    mods = [m for m, w in zip(attention_modules(model), sliding_windows(model)) if w is None]
    with routed_attention(model):
        for m in mods:
            m._reprise_lambda = cfg
            m._reprise_attend = _lambda_forward
        try:
            yield
        finally:
            for m in mods:
                m._reprise_attend = None
                m._reprise_lambda = None
