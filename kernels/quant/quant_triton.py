"""Triton kernels for the 4-bit asymmetric min-max quantizer (pack = quantize + pack, unpack = dequantize).

Same semantics and layout as :mod:`kernels.quant.quant_ref` (the spec; Eqs. Q1–Q4 there), bit-identical codes:
statistics in fp32, ``scale``/``zero`` rounded to ``x.dtype`` before the codes are computed, correctly rounded
division (``tl.div_rn``), round-half-up. A program loads the even and the odd channels of its tile separately so
that the low/high nibbles of each output byte come straight from registers (no interleave/shuffle).

On a machine without a GPU, set ``TRITON_INTERPRET=1`` *before* importing this module (``@triton.jit`` reads it at
decoration time).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.quant.quant_ref import QMAX, Int4Tensor, _stats_shape, check_int4_tensor, check_quantize_inputs

#: True when this module's kernels were built for the Triton CPU interpreter (``TRITON_INTERPRET=1``).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even. bf16 is rounded by hand because the CPU interpreter truncates
    fp32 -> bf16 (the GPU rounds to nearest even); both then agree with torch bit for bit."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _quantize_channel_groups_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, R, C,
                                    GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """axis=-1: one (scale, zero) per row and per ``GROUP`` consecutive channels. x is ``[R, C]`` contiguous."""
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    pairs = tl.arange(0, BLOCK_PAIRS)
    rmask = rows < R
    mask = rmask[:, None] & (pairs < GROUP // 2)[None, :]
    rows64 = rows.to(tl.int64)
    x_even = x_ptr + rows64[:, None] * C + (g * GROUP + 2 * pairs)[None, :]
    xe = tl.load(x_even, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_even + 1, mask=mask, other=0.0).to(tl.float32)
    mn = tl.minimum(tl.min(tl.where(mask, xe, float("inf")), axis=1), tl.min(tl.where(mask, xo, float("inf")), axis=1))
    mx = tl.maximum(tl.max(tl.where(mask, xe, -float("inf")), axis=1),
                    tl.max(tl.where(mask, xo, -float("inf")), axis=1))
    mn = tl.where(rmask, mn, 0.0)  # padded rows: keep the arithmetic finite
    mx = tl.where(rmask, mx, 0.0)
    scale_q = cast_rtne(tl.div_rn(mx - mn, 15.0), scale_ptr.dtype.element_ty)  # Eq. Q1
    zero_q = cast_rtne(mn, zero_ptr.dtype.element_ty)  # Eq. Q2
    stat_off = rows64 * (C // GROUP) + g
    tl.store(scale_ptr + stat_off, scale_q, mask=rmask)
    tl.store(zero_ptr + stat_off, zero_q, mask=rmask)
    s32 = scale_q.to(tl.float32)
    z32 = zero_q.to(tl.float32)
    safe = tl.where(s32 == 0.0, 1.0, s32)
    ce = tl.floor(tl.div_rn(xe - z32[:, None], safe[:, None]) + 0.5)  # Eq. Q3
    co = tl.floor(tl.div_rn(xo - z32[:, None], safe[:, None]) + 0.5)
    ce = tl.minimum(tl.maximum(ce, 0.0), 15.0).to(tl.uint8)
    co = tl.minimum(tl.maximum(co, 0.0), 15.0).to(tl.uint8)
    byte = ce | (co << 4)
    tl.store(packed_ptr + rows64[:, None] * (C // 2) + (g * (GROUP // 2) + pairs)[None, :], byte, mask=mask)


@triton.jit
def _quantize_token_groups_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, T, C,
                                  GROUP: tl.constexpr, BLOCK_TOK: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """axis=-2: one (scale, zero) per channel and per ``GROUP`` consecutive tokens. x is ``[M, T, C]`` contiguous."""
    pid = tl.program_id(0)  # = m * (T // GROUP) + group
    pid_c = tl.program_id(1)
    n_groups = T // GROUP
    m = pid // n_groups
    g = pid % n_groups
    toks = g * GROUP + tl.arange(0, BLOCK_TOK)
    pairs = pid_c * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    pmask = pairs < C // 2
    mask = (tl.arange(0, BLOCK_TOK) < GROUP)[:, None] & pmask[None, :]
    row = (m.to(tl.int64) * T + toks)
    x_even = x_ptr + row[:, None] * C + (2 * pairs)[None, :]
    xe = tl.load(x_even, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_even + 1, mask=mask, other=0.0).to(tl.float32)
    mn_e = tl.min(tl.where(mask, xe, float("inf")), axis=0)
    mn_o = tl.min(tl.where(mask, xo, float("inf")), axis=0)
    mx_e = tl.max(tl.where(mask, xe, -float("inf")), axis=0)
    mx_o = tl.max(tl.where(mask, xo, -float("inf")), axis=0)
    mn_e = tl.where(pmask, mn_e, 0.0)  # padded channels: keep the arithmetic finite
    mn_o = tl.where(pmask, mn_o, 0.0)
    mx_e = tl.where(pmask, mx_e, 0.0)
    mx_o = tl.where(pmask, mx_o, 0.0)
    s_e = cast_rtne(tl.div_rn(mx_e - mn_e, 15.0), scale_ptr.dtype.element_ty)  # Eq. Q1
    s_o = cast_rtne(tl.div_rn(mx_o - mn_o, 15.0), scale_ptr.dtype.element_ty)
    z_e = cast_rtne(mn_e, zero_ptr.dtype.element_ty)  # Eq. Q2
    z_o = cast_rtne(mn_o, zero_ptr.dtype.element_ty)
    stat_even = (m.to(tl.int64) * n_groups + g) * C + 2 * pairs
    tl.store(scale_ptr + stat_even, s_e, mask=pmask)
    tl.store(scale_ptr + stat_even + 1, s_o, mask=pmask)
    tl.store(zero_ptr + stat_even, z_e, mask=pmask)
    tl.store(zero_ptr + stat_even + 1, z_o, mask=pmask)
    se32 = s_e.to(tl.float32)
    so32 = s_o.to(tl.float32)
    safe_e = tl.where(se32 == 0.0, 1.0, se32)
    safe_o = tl.where(so32 == 0.0, 1.0, so32)
    ce = tl.floor(tl.div_rn(xe - z_e.to(tl.float32)[None, :], safe_e[None, :]) + 0.5)  # Eq. Q3
    co = tl.floor(tl.div_rn(xo - z_o.to(tl.float32)[None, :], safe_o[None, :]) + 0.5)
    ce = tl.minimum(tl.maximum(ce, 0.0), 15.0).to(tl.uint8)
    co = tl.minimum(tl.maximum(co, 0.0), 15.0).to(tl.uint8)
    tl.store(packed_ptr + row[:, None] * (C // 2) + pairs[None, :], ce | (co << 4), mask=mask)


@triton.jit
def _dequantize_kernel(packed_ptr, scale_ptr, zero_ptr, out_ptr, R, T, C,
                       ROW_DIV: tl.constexpr, COL_DIV: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK_PAIRS: tl.constexpr):
    """Eq. Q4 for both layouts. Rows are ``M * T`` flattened tokens; the statistic of (row, channel) lives at
    ``[m, (row % T) // ROW_DIV, channel // COL_DIV]`` (ROW_DIV = group, COL_DIV = 1 for axis=-2; 1, group for -1)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    pairs = pid_c * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    mask = (rows < R)[:, None] & (pairs < C // 2)[None, :]
    rows64 = rows.to(tl.int64)
    byte = tl.load(packed_ptr + rows64[:, None] * (C // 2) + pairs[None, :], mask=mask, other=0)
    lo = (byte & 0x0F).to(tl.float32)
    hi = (byte >> 4).to(tl.float32)
    m = rows64 // T
    t = rows64 % T
    stat_row = m * (T // ROW_DIV) + t // ROW_DIV
    n_stat_cols = C // COL_DIV
    off_e = stat_row[:, None] * n_stat_cols + ((2 * pairs) // COL_DIV)[None, :]
    off_o = stat_row[:, None] * n_stat_cols + ((2 * pairs + 1) // COL_DIV)[None, :]
    s_e = tl.load(scale_ptr + off_e, mask=mask, other=0.0).to(tl.float32)
    s_o = tl.load(scale_ptr + off_o, mask=mask, other=0.0).to(tl.float32)
    z_e = tl.load(zero_ptr + off_e, mask=mask, other=0.0).to(tl.float32)
    z_o = tl.load(zero_ptr + off_o, mask=mask, other=0.0).to(tl.float32)
    out_even = out_ptr + rows64[:, None] * C + (2 * pairs)[None, :]
    tl.store(out_even, cast_rtne(lo * s_e + z_e, out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_even + 1, cast_rtne(hi * s_o + z_o, out_ptr.dtype.element_ty), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_triton_device(t: Tensor, name: str) -> None:
    """Triton needs a CUDA tensor, or CPU tensors with the interpreter enabled before import."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRETED:
        return
    raise ValueError(f"{name} is on device '{t.device}', but impl='triton' needs a CUDA tensor, or CPU tensors with "
                     "TRITON_INTERPRET=1 set before kernels.* is imported; use impl='torch' instead")


def quantize_int4_triton(x: Tensor, group_size: int, axis: int = -1) -> Int4Tensor:
    """Triton version of :func:`kernels.quant.quant_ref.quantize_int4` (same codes, scales and zeros)."""
    axis = check_quantize_inputs(x, group_size, axis)
    check_triton_device(x, "x")
    x = x.contiguous()
    *lead, t, c = x.shape
    m = 1
    for s in lead:
        m *= s
    packed = torch.empty(*lead, t, c // 2, dtype=torch.uint8, device=x.device)
    stats_shape = _stats_shape(tuple(x.shape), group_size, axis)
    scale = torch.empty(stats_shape, dtype=x.dtype, device=x.device)
    zero = torch.empty(stats_shape, dtype=x.dtype, device=x.device)
    if x.numel() > 0:
        if axis == -1:
            rows = m * t
            block_pairs = _next_pow2(group_size // 2)
            block_rows = max(1, min(64, 2048 // block_pairs))
            grid = (triton.cdiv(rows, block_rows), c // group_size)
            _quantize_channel_groups_kernel[grid](x, packed, scale, zero, rows, c, GROUP=group_size,
                                                  BLOCK_ROWS=block_rows, BLOCK_PAIRS=block_pairs)
        else:
            block_tok = _next_pow2(group_size)
            block_pairs = max(1, min(_next_pow2(c // 2), 2048 // block_tok))
            grid = (m * (t // group_size), triton.cdiv(c // 2, block_pairs))
            _quantize_token_groups_kernel[grid](x, packed, scale, zero, t, c, GROUP=group_size,
                                                BLOCK_TOK=block_tok, BLOCK_PAIRS=block_pairs)
    return Int4Tensor(packed, scale, zero, torch.Size(x.shape), group_size, axis)


def dequantize_int4_triton(q: Int4Tensor) -> Tensor:
    """Triton version of :func:`kernels.quant.quant_ref.dequantize_int4` (Eq. Q4)."""
    check_int4_tensor(q)
    check_triton_device(q.packed, "q.packed")
    shape = tuple(q.shape)
    t, c = shape[-2], shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    out = torch.empty(shape, dtype=q.dtype, device=q.device)
    if out.numel() > 0:
        block_pairs = min(_next_pow2(c // 2), 64)
        block_rows = max(1, min(64, 2048 // block_pairs))
        row_div, col_div = (q.group_size, 1) if q.axis == -2 else (1, q.group_size)
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(c // 2, block_pairs))
        _dequantize_kernel[grid](q.packed.contiguous(), q.scale.contiguous(), q.zero.contiguous(), out, rows, t, c,
                                 ROW_DIV=row_div, COL_DIV=col_div, BLOCK_ROWS=block_rows, BLOCK_PAIRS=block_pairs)
    return out


__all__ = ["quantize_int4_triton", "dequantize_int4_triton", "INTERPRETED", "QMAX"]
