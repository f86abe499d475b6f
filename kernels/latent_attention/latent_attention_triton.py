"""Fused Triton decode attention over a CSKV per-head low-rank latent cache (+ exact recent window).

Math (Eqs. 1–5 of :mod:`kernels.latent_attention.latent_attention_ref`)::

    k_j = RoPE_j(lk_j B_K[h]),   s_j = scale · q · k_j,   p = softmax([s_latent, s_window])
    o   = Σ_j p_j (lv_j B_V[h]) + Σ_w p_w wv_w  =  (Σ_j p_j lv_j) B_V[h] + Σ_w p_w wv_w        (Eq. 5)

Two kernels, flash-decoding style:

1. ``_latent_split_kernel`` — grid ``(B·Hkv, S)``: program ``(b, h, s)`` streams the latent tokens of split ``s``
   once, for *all* ``groups`` query heads of KV head ``h`` (GQA: each latent tile is read once). Per tile of
   ``BLOCK_T`` tokens: rebuild the key tile in registers (``lk_tile @ B_K[h]``, split into the two RoPE halves so
   ``rotate_half`` needs no shuffle: ``[k₁, k₂] -> [k₁c₁ - k₂s₁, k₂c₂ + k₁s₂]``), scores for all query heads, online
   softmax (base 2), and ``acc += p @ lv_tile`` *in latent space* (``r_v`` channels, Eq. 5). It writes
   ``(m, l, acc)`` per split — never a ``D``-wide value.
2. ``_latent_combine_kernel`` — grid ``(B·Hkv,)``: the exact window is handled here as one more "split" (online
   softmax over ``wk``/``wv``), the latent splits are merged with the usual log-sum-exp rescaling, and the merged
   latent accumulator is projected once by ``B_V[h]`` (Eq. 5).

Int4 latents (:class:`~kernels.quant.Int4Tensor`) are dequantized in registers: byte ``i`` of a row holds channels
``2i`` (low nibble) and ``2i+1`` (high nibble), so the kernel multiplies the low nibbles by the even rows of ``B_K``
and the high nibbles by the odd rows (``lk B = lk_even B_even + lk_odd B_odd``) — no interleave needed. The
statistic of (token ``t``, channel ``c``) is at ``[t // ROW_DIV, c // COL_DIV]`` (keys: ``ROW_DIV = group``).

On a machine without a GPU, set ``TRITON_INTERPRET=1`` *before* importing this module.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.quant.quant_ref import Int4Tensor
from kernels.quant.quant_triton import INTERPRETED, cast_rtne

LOG2E = 1.4426950408889634
#: Running-max initial value: finite, so fully-masked tiles give ``exp2(-inf - m) = 0`` and never ``inf - inf``.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _dot(a, b, MODE: tl.constexpr):
    """MODE 0: native fp16/bf16 tensor-core dot with fp32 accumulation; MODE 1: fp32 IEEE dot (fp32 inputs, and
    bf16 under the CPU interpreter, whose bf16 dot is wrong)."""
    if MODE == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dequant_pairs(ptr, sc_ptr, zp_ptr, row_off, offs_t, offs_pair, mask,
                   s_t, s_r, ss_t, ss_c, ROW_DIV: tl.constexpr, COL_DIV: tl.constexpr, LOW: tl.constexpr):
    """Load a packed int4 tile ``[BLOCK_T, BLOCK_PAIRS]`` and return the dequantized even and odd channels (Eq. Q4),
    rounded to the latent dtype ``LOW`` like the reference dequantizer."""
    byte = tl.load(ptr + row_off + offs_t[:, None] * s_t + offs_pair[None, :] * s_r, mask=mask, other=0)
    lo = (byte & 0x0F).to(tl.float32)
    hi = (byte >> 4).to(tl.float32)
    st = sc_ptr + (offs_t // ROW_DIV)[:, None] * ss_t
    st_z = zp_ptr + (offs_t // ROW_DIV)[:, None] * ss_t
    c_even = ((2 * offs_pair) // COL_DIV)[None, :] * ss_c
    c_odd = ((2 * offs_pair + 1) // COL_DIV)[None, :] * ss_c
    s_e = tl.load(st + c_even, mask=mask, other=0.0).to(tl.float32)
    s_o = tl.load(st + c_odd, mask=mask, other=0.0).to(tl.float32)
    z_e = tl.load(st_z + c_even, mask=mask, other=0.0).to(tl.float32)
    z_o = tl.load(st_z + c_odd, mask=mask, other=0.0).to(tl.float32)
    return cast_rtne(lo * s_e + z_e, LOW), cast_rtne(hi * s_o + z_o, LOW)


@triton.jit
def _latent_split_kernel(
    q_ptr, s_qb, s_qh, s_qd,
    lk_ptr, s_lkb, s_lkh, s_lkt, s_lkr,
    ksc_ptr, kzp_ptr, s_ksb, s_ksh, s_kst, s_ksc,
    lv_ptr, s_lvb, s_lvh, s_lvt, s_lvr,
    vsc_ptr, vzp_ptr, s_vsb, s_vsh, s_vst, s_vsc,
    bk_ptr, s_bkh, s_bkr, s_bkd,
    cos_ptr, s_cb, s_ct, s_cd,
    sin_ptr, s_sb, s_st, s_sd,
    mask_ptr, s_mb, s_mt,
    m_ptr, l_ptr, o_ptr,
    T, HKV, TOKENS_PER_SPLIT, NUM_SPLITS, qk_scale,
    G: tl.constexpr, D: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr,
    K_INT4: tl.constexpr, V_INT4: tl.constexpr,
    K_ROW_DIV: tl.constexpr, K_COL_DIV: tl.constexpr, V_ROW_DIV: tl.constexpr, V_COL_DIV: tl.constexpr,
    HAS_MASK: tl.constexpr, MODE: tl.constexpr, LOW: tl.constexpr, DOT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DH: tl.constexpr,
    BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    t_start = split * TOKENS_PER_SPLIT
    t_end = tl.minimum(t_start + TOKENS_PER_SPLIT, T)
    HALF: tl.constexpr = D // 2

    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    offs_dh = tl.arange(0, BLOCK_DH)
    dmask = offs_dh < HALF
    offs_tt = tl.arange(0, BLOCK_T)

    q_rows = q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh
    qm = gmask[:, None] & dmask[None, :]
    q1 = tl.load(q_rows + offs_dh[None, :] * s_qd, mask=qm, other=0.0).to(DOT)
    q2 = tl.load(q_rows + (HALF + offs_dh)[None, :] * s_qd, mask=qm, other=0.0).to(DOT)

    # B_K[h], split by RoPE half (columns) and, for int4, by even/odd latent channel (rows).
    bk_base = bk_ptr + h * s_bkh
    offs_rk = tl.arange(0, BLOCK_RK)
    if K_INT4:
        rk_valid = offs_rk < RK // 2
        bmask = rk_valid[:, None] & dmask[None, :]
        rows_e = (2 * offs_rk)[:, None] * s_bkr
        rows_o = (2 * offs_rk + 1)[:, None] * s_bkr
        bk_e1 = tl.load(bk_base + rows_e + offs_dh[None, :] * s_bkd, mask=bmask, other=0.0).to(DOT)
        bk_e2 = tl.load(bk_base + rows_e + (HALF + offs_dh)[None, :] * s_bkd, mask=bmask, other=0.0).to(DOT)
        bk_o1 = tl.load(bk_base + rows_o + offs_dh[None, :] * s_bkd, mask=bmask, other=0.0).to(DOT)
        bk_o2 = tl.load(bk_base + rows_o + (HALF + offs_dh)[None, :] * s_bkd, mask=bmask, other=0.0).to(DOT)
    else:
        rk_valid = offs_rk < RK
        bmask = rk_valid[:, None] & dmask[None, :]
        rows = offs_rk[:, None] * s_bkr
        bk_1 = tl.load(bk_base + rows + offs_dh[None, :] * s_bkd, mask=bmask, other=0.0).to(DOT)
        bk_2 = tl.load(bk_base + rows + (HALF + offs_dh)[None, :] * s_bkd, mask=bmask, other=0.0).to(DOT)

    offs_rv = tl.arange(0, BLOCK_RV)
    if V_INT4:
        rv_valid = offs_rv < RV // 2
        acc_e = tl.zeros([BLOCK_G, BLOCK_RV], dtype=tl.float32)
        acc_o = tl.zeros([BLOCK_G, BLOCK_RV], dtype=tl.float32)
    else:
        rv_valid = offs_rv < RV
        acc = tl.zeros([BLOCK_G, BLOCK_RV], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_G], dtype=tl.float32) + _NEG_BIG
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)

    lk_row = b * s_lkb + h * s_lkh
    lv_row = b * s_lvb + h * s_lvh
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + offs_tt
        tmask = offs_t < t_end
        # Eq. 1: key tile rebuilt from latents, in two RoPE halves.
        if K_INT4:
            kmask = tmask[:, None] & rk_valid[None, :]
            ke, ko = _dequant_pairs(lk_ptr, ksc_ptr + b * s_ksb + h * s_ksh, kzp_ptr + b * s_ksb + h * s_ksh,
                                    lk_row, offs_t, offs_rk, kmask, s_lkt, s_lkr, s_kst, s_ksc,
                                    K_ROW_DIV, K_COL_DIV, LOW)
            ke = ke.to(DOT)
            ko = ko.to(DOT)
            k1 = _dot(ke, bk_e1, MODE) + _dot(ko, bk_o1, MODE)
            k2 = _dot(ke, bk_e2, MODE) + _dot(ko, bk_o2, MODE)
        else:
            kmask = tmask[:, None] & rk_valid[None, :]
            lat = tl.load(lk_ptr + lk_row + offs_t[:, None] * s_lkt + offs_rk[None, :] * s_lkr,
                          mask=kmask, other=0.0).to(DOT)
            k1 = _dot(lat, bk_1, MODE)
            k2 = _dot(lat, bk_2, MODE)
        # RoPE, rotate_half convention: [k1, k2] -> [k1*cos1 - k2*sin1, k2*cos2 + k1*sin2].
        cmask = tmask[:, None] & dmask[None, :]
        c_rows = cos_ptr + b * s_cb + offs_t[:, None] * s_ct
        s_rows = sin_ptr + b * s_sb + offs_t[:, None] * s_st
        c1 = tl.load(c_rows + offs_dh[None, :] * s_cd, mask=cmask, other=0.0).to(tl.float32)
        c2 = tl.load(c_rows + (HALF + offs_dh)[None, :] * s_cd, mask=cmask, other=0.0).to(tl.float32)
        s1 = tl.load(s_rows + offs_dh[None, :] * s_sd, mask=cmask, other=0.0).to(tl.float32)
        s2 = tl.load(s_rows + (HALF + offs_dh)[None, :] * s_sd, mask=cmask, other=0.0).to(tl.float32)
        r1 = (k1 * c1 - k2 * s1).to(DOT)
        r2 = (k2 * c2 + k1 * s2).to(DOT)
        # Eq. 3 for all query heads of this KV head (base-2 scores: qk_scale = scale * log2(e)).
        qk = (_dot(q1, tl.trans(r1), MODE) + _dot(q2, tl.trans(r2), MODE)) * qk_scale
        valid = tmask
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * s_mb + offs_t * s_mt, mask=tmask, other=0) != 0)
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pd = p.to(DOT)
        # Eq. 5: accumulate p @ lv in latent space.
        vmask = tmask[:, None] & rv_valid[None, :]
        if V_INT4:
            ve, vo = _dequant_pairs(lv_ptr, vsc_ptr + b * s_vsb + h * s_vsh, vzp_ptr + b * s_vsb + h * s_vsh,
                                    lv_row, offs_t, offs_rv, vmask, s_lvt, s_lvr, s_vst, s_vsc,
                                    V_ROW_DIV, V_COL_DIV, LOW)
            acc_e = acc_e * alpha[:, None] + _dot(pd, ve.to(DOT), MODE)
            acc_o = acc_o * alpha[:, None] + _dot(pd, vo.to(DOT), MODE)
        else:
            lat_v = tl.load(lv_ptr + lv_row + offs_t[:, None] * s_lvt + offs_rv[None, :] * s_lvr,
                            mask=vmask, other=0.0).to(DOT)
            acc = acc * alpha[:, None] + _dot(pd, lat_v, MODE)
        m_i = m_new

    part = bh.to(tl.int64) * NUM_SPLITS + split
    tl.store(m_ptr + part * G + offs_g, m_i, mask=gmask)
    tl.store(l_ptr + part * G + offs_g, l_i, mask=gmask)
    o_rows = o_ptr + (part * G + offs_g)[:, None] * RV
    omask = gmask[:, None] & rv_valid[None, :]
    if V_INT4:
        tl.store(o_rows + (2 * offs_rv)[None, :], acc_e, mask=omask)
        tl.store(o_rows + (2 * offs_rv + 1)[None, :], acc_o, mask=omask)
    else:
        tl.store(o_rows + offs_rv[None, :], acc, mask=omask)


@triton.jit
def _latent_combine_kernel(
    q_ptr, s_qb, s_qh, s_qd,
    wk_ptr, s_wkb, s_wkh, s_wkw, s_wkd,
    wv_ptr, s_wvb, s_wvh, s_wvw, s_wvd,
    wmask_ptr, s_wmb, s_wmw,
    bv_ptr, s_bvh, s_bvr, s_bvd,
    m_ptr, l_ptr, o_ptr,
    out_ptr, s_ob, s_oh, s_od,
    HKV, NUM_SPLITS, W, qk_scale,
    G: tl.constexpr, D: tl.constexpr, RV: tl.constexpr,
    HAS_WMASK: tl.constexpr, MODE: tl.constexpr, DOT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_RV: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_r = tl.arange(0, BLOCK_RV)
    rmask = offs_r < RV
    part0 = bh.to(tl.int64) * NUM_SPLITS

    # Log-sum-exp merge, pass 1: the largest running max over the latent splits.
    m_lat = tl.zeros([BLOCK_G], dtype=tl.float32) + _NEG_BIG
    for s in range(0, NUM_SPLITS):
        m_s = tl.load(m_ptr + (part0 + s) * G + offs_g, mask=gmask, other=_NEG_BIG)
        m_lat = tl.maximum(m_lat, m_s)

    # The exact recent window (post-RoPE keys), as one more split: online softmax in D space.
    q = tl.load(q_ptr + b * s_qb + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(DOT)
    m_w = tl.zeros([BLOCK_G], dtype=tl.float32) + _NEG_BIG
    l_w = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    offs_ww = tl.arange(0, BLOCK_W)
    for w0 in range(0, W, BLOCK_W):
        offs_w = w0 + offs_ww
        wvalid = offs_w < W
        kvmask = wvalid[:, None] & dmask[None, :]
        kw = tl.load(wk_ptr + b * s_wkb + h * s_wkh + offs_w[:, None] * s_wkw + offs_d[None, :] * s_wkd,
                     mask=kvmask, other=0.0).to(DOT)
        vw = tl.load(wv_ptr + b * s_wvb + h * s_wvh + offs_w[:, None] * s_wvw + offs_d[None, :] * s_wvd,
                     mask=kvmask, other=0.0).to(DOT)
        if HAS_WMASK:
            wvalid = wvalid & (tl.load(wmask_ptr + b * s_wmb + offs_w * s_wmw, mask=wvalid, other=0) != 0)
        qk = _dot(q, tl.trans(kw), MODE) * qk_scale
        qk = tl.where(wvalid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_w, tl.max(qk, axis=1))
        alpha = tl.exp2(m_w - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_w = l_w * alpha + tl.sum(p, axis=1)
        acc_w = acc_w * alpha[:, None] + _dot(p.to(DOT), vw, MODE)
        m_w = m_new

    # Pass 2: rescale and sum the latent-space partials.
    m_all = tl.maximum(m_lat, m_w)
    acc = tl.zeros([BLOCK_G, BLOCK_RV], dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        m_s = tl.load(m_ptr + (part0 + s) * G + offs_g, mask=gmask, other=_NEG_BIG)
        l_s = tl.load(l_ptr + (part0 + s) * G + offs_g, mask=gmask, other=0.0)
        o_s = tl.load(o_ptr + ((part0 + s) * G + offs_g)[:, None] * RV + offs_r[None, :],
                      mask=gmask[:, None] & rmask[None, :], other=0.0)
        wgt = tl.exp2(m_s - m_all)
        acc += wgt[:, None] * o_s
        l_sum += wgt * l_s
    alpha_w = tl.exp2(m_w - m_all)
    l_sum += alpha_w * l_w
    inv = tl.where(l_sum > 0.0, 1.0 / tl.where(l_sum > 0.0, l_sum, 1.0), 0.0)  # no attendable key -> 0
    # Eq. 5: project the normalized latent-space output once by B_V[h].
    lat = (acc * inv[:, None]).to(DOT)
    bv = tl.load(bv_ptr + h * s_bvh + offs_r[:, None] * s_bvr + offs_d[None, :] * s_bvd,
                 mask=rmask[:, None] & dmask[None, :], other=0.0).to(DOT)
    out = _dot(lat, bv, MODE) + acc_w * (alpha_w * inv)[:, None]
    tl.store(out_ptr + b * s_ob + (h * G + offs_g)[:, None] * s_oh + offs_d[None, :] * s_od,
             out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _latent_args(lat: Tensor | Int4Tensor, dummy: Tensor) -> tuple[list, bool, int, int, int]:
    """Pointer/stride arguments for one latent operand: ``(args, is_int4, rank, row_div, col_div)``."""
    if isinstance(lat, Int4Tensor):
        scale = lat.scale.contiguous()
        zero = lat.zero.contiguous()
        row_div, col_div = (lat.group_size, 1) if lat.axis == -2 else (1, lat.group_size)
        p = lat.packed
        args = [p, *p.stride(), scale, zero, *scale.stride()]
        return args, True, int(lat.shape[-1]), row_div, col_div
    args = [lat, *lat.stride(), dummy, dummy, 0, 0, 0, 0]
    return args, False, int(lat.shape[-1]), 1, 1


def _default_num_splits(batch_heads: int, n_tiles: int, block_t: int, device: torch.device) -> int:
    if device.type == "cuda":
        target_programs = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        min_tiles_per_split = max(1, 256 // block_t)  # each split re-reads B_K; keep it amortized
    else:  # interpreter: few programs are fastest, but keep >1 split so the combine path is exercised
        target_programs = 2 * batch_heads
        min_tiles_per_split = 1
    splits = max(1, triton.cdiv(target_programs, batch_heads))
    return max(1, min(splits, triton.cdiv(n_tiles, min_tiles_per_split)))


def latent_decode_attention_triton(q: Tensor, lk: Tensor | Int4Tensor, lv: Tensor | Int4Tensor, bk: Tensor,
                                   bv: Tensor, cos: Tensor, sin: Tensor,
                                   wk: Tensor | None = None, wv: Tensor | None = None,
                                   key_mask: Tensor | None = None, window_mask: Tensor | None = None,
                                   scale: float | None = None, *, block_t: int | None = None,
                                   num_splits: int | None = None) -> Tensor:
    """Launch the fused split + combine kernels (module doc, Eqs. 1–5). Inputs are assumed validated by
    :func:`kernels.latent_attention.latent_decode_attention`; ``block_t``/``num_splits`` override the heuristics."""
    b, hq, d = q.shape
    hkv = bk.shape[0]
    groups = hq // hkv
    t = int(lk.shape[2])
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qk_scale = scale * LOG2E
    device = q.device
    low = q.dtype
    mode = 1 if (low == torch.float32 or (INTERPRETED and low == torch.bfloat16)) else 0
    dot_dtype = tl.float32 if mode == 1 else _TL_DTYPE[low]
    dummy = torch.empty(1, dtype=low, device=device)

    k_args, k_int4, rk, k_row_div, k_col_div = _latent_args(lk, dummy)
    v_args, v_int4, rv, v_row_div, v_col_div = _latent_args(lv, dummy)
    cos3 = cos[None] if cos.ndim == 2 else cos
    sin3 = sin[None] if sin.ndim == 2 else sin
    cs = (0 if cos3.shape[0] == 1 else cos3.stride(0), cos3.stride(1), cos3.stride(2))
    ss = (0 if sin3.shape[0] == 1 else sin3.stride(0), sin3.stride(1), sin3.stride(2))
    has_mask = key_mask is not None
    km = key_mask.to(torch.uint8) if has_mask else torch.empty(1, 1, dtype=torch.uint8, device=device)

    block_g = max(16, _next_pow2(groups))
    if block_t is None:  # 32 x 8 warps: no register spills on sm_90 (ptxas: 110 regs fp16, 149 int4)
        block_t = 32 if device.type == "cuda" else 16
    block_dh = max(16, _next_pow2(d // 2))
    block_rk = max(16, _next_pow2(rk // 2 if k_int4 else rk))
    block_rv = max(16, _next_pow2(rv // 2 if v_int4 else rv))
    n_tiles = triton.cdiv(t, block_t)
    if t == 0:
        splits = 0
    else:
        splits = num_splits if num_splits is not None else _default_num_splits(b * hkv, n_tiles, block_t, device)
        splits = max(1, min(int(splits), n_tiles))
        tiles_per_split = triton.cdiv(n_tiles, splits)
        splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty split
    tokens_per_split = (triton.cdiv(n_tiles, splits) * block_t) if splits else block_t

    m_part = torch.empty(b * hkv, max(splits, 1), groups, dtype=torch.float32, device=device)
    l_part = torch.empty_like(m_part)
    o_part = torch.empty(b * hkv, max(splits, 1), groups, rv, dtype=torch.float32, device=device)
    if splits > 0:
        _latent_split_kernel[(b * hkv, splits)](
            q, *q.stride(),
            *k_args, *v_args,
            bk, *bk.stride(),
            cos3, *cs, sin3, *ss,
            km, *(km.stride() if has_mask else (0, 0)),
            m_part, l_part, o_part,
            t, hkv, tokens_per_split, splits, qk_scale,
            G=groups, D=d, RK=rk, RV=rv, K_INT4=k_int4, V_INT4=v_int4,
            K_ROW_DIV=k_row_div, K_COL_DIV=k_col_div, V_ROW_DIV=v_row_div, V_COL_DIV=v_col_div,
            HAS_MASK=has_mask, MODE=mode, LOW=_TL_DTYPE[low], DOT=dot_dtype,
            BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_DH=block_dh, BLOCK_RK=block_rk, BLOCK_RV=block_rv,
            num_warps=8, num_stages=2,
        )

    w = 0 if wk is None else int(wk.shape[2])
    if w == 0:
        wk_t = wv_t = torch.empty(1, 1, 1, 1, dtype=low, device=device)
        wks = wvs = (0, 0, 0, 0)
    else:
        wk_t, wv_t = wk, wv
        wks, wvs = wk.stride(), wv.stride()
    has_wmask = window_mask is not None and w > 0
    wm = window_mask.to(torch.uint8) if has_wmask else torch.empty(1, 1, dtype=torch.uint8, device=device)
    out = torch.empty(b, hq, d, dtype=low, device=device)
    block_d = max(16, _next_pow2(d))
    _latent_combine_kernel[(b * hkv,)](
        q, *q.stride(),
        wk_t, *wks, wv_t, *wvs,
        wm, *(wm.stride() if has_wmask else (0, 0)),
        bv, *bv.stride(),
        m_part, l_part, o_part,
        out, *out.stride(),
        hkv, splits, w, qk_scale,
        G=groups, D=d, RV=rv, HAS_WMASK=has_wmask, MODE=mode, DOT=dot_dtype,
        BLOCK_G=block_g, BLOCK_W=16, BLOCK_D=block_d, BLOCK_RV=max(16, _next_pow2(rv)),
        num_warps=8 if block_d * max(16, _next_pow2(rv)) >= 8192 else 4, num_stages=1,
    )
    return out
