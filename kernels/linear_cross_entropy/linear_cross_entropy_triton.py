"""Cut Cross-Entropy in Triton: linear cross-entropy without materialising the ``N×V`` logits.

Math (Eqs. (L), (G) of :mod:`kernels.linear_cross_entropy.linear_cross_entropy_ref`)::

    ℓ_i = logsumexp_v(e_i·c_v + b_v) − (e_i·c_{y_i} + b_{y_i})
    ∇E = (S − Y) C,   ∇C = (S − Y)ᵀ E,   ∇b = Σ_i (S − Y)_i,   S_iv = exp(z_iv − lse_i)

Kernels (grid rows are *valid* tokens only: ignored / target-less positions are dropped on the host and the kernels
read ``E`` through a row-index array, so no shifted or compacted copy of ``E`` is made):

1. ``_lse_forward_kernel`` — grid ``(N-blocks × V-splits)``. A program owns ``BLOCK_N`` tokens and one contiguous
   range of vocabulary tiles; per tile it computes ``E_blk C_tileᵀ`` in SRAM with fp32 accumulation (``tl.dot`` over
   ``BLOCK_D`` slices of ``D``), adds the bias, and folds the tile into an online max / sum-of-exp (the blockwise
   log-sum-exp of the paper's Algorithm 2). The correct-token logit (the paper's indexed matmul, Algorithm 1) is
   picked out of the same tile when ``y_i`` falls in it, so it is bit-consistent with the LSE and costs no extra
   pass over ``E``. Each program writes ``(max, sum, target-logit)`` for its split — ``3·N·splits`` floats, never
   ``N×V`` — and the splits are merged on the host (log-sum-exp rescaling). With ``vocab_sort`` it also
   accumulates the per-vocabulary sum of logits (for the ordering of step 2).
2. ``_lse_backward_kernel`` — grid ``(N-blocks × V-tiles)``. Each program recomputes its logit tile, forms
   ``D = S − Y`` (``S = exp(z − lse)`` from the saved LSE, ``−1`` at the target entries) and **skips the tile when
   every entry has ``|D_iv| < filter_eps``** (gradient filtering, §4.3: those entries cannot change a gradient at
   this precision). Surviving tiles accumulate ``(D·g) C`` into ``∇E`` and ``(D·g)ᵀ E`` into ``∇C`` (fp32 atomics)
   and ``Σ D·g`` into ``∇b``. With ``vocab_sort`` the tiles walk the vocabulary in descending-average-logit order,
   so the few high-probability tokens cluster into few tiles and more tiles are skipped (§4.3, "vocabulary
   sorting").

   The filter rule is the official kernel's (``cut-cross-entropy`` 25.1.1, ``_cce_backward_kernel``): the decision
   is taken on ``|S − Y|`` with the target entries included, before the upstream gradient ``g`` and the soft-cap
   derivative are applied; padding entries count as 0, and a tile is dropped iff *all* entries are ``< eps`` (so
   ``filter_eps = 0`` drops nothing). A tile holding a target whose probability is not within ``eps`` of 1 is
   therefore never skipped. Only the value of the target entry is computed differently: ``expm1(−ℓ_i)`` here,
   ``exp(z − lse) − 1`` in the official code (which cancels for a confident prediction). (An earlier version of
   this module left the target column out of the decision and applied it separately and exactly; it was changed to
   the official rule so that filtered gradients and kept-tile statistics are comparable with the official code and
   with the ``torch_chunked`` filtered path.)

Soft-capping (Gemma 2): both kernels cap the fp32 logit tile, ``z' = s · tanh(z / s)``, before anything else; the
backward multiplies ``D·g`` by ``1 − (z' / s)²``. ``tanh`` is ``sign(x)(1 − e^{−2|x|}) / (1 + e^{−2|x|})`` (no
libdevice call, so the CPU interpreter runs it; absolute error ~1e-7).

``∇C`` accumulates in fp32. For fp16/bf16 classifiers the vocabulary is processed in chunks of at most
``scratch_bytes`` of fp32 scratch (default 64 MiB), each chunk cast into the ``c.dtype`` gradient when done, so the
extra memory stays bounded (the official code instead accumulates in the output dtype under locks). Atomics make the
gradients run-to-run nondeterministic in the last bits on a GPU.

On a machine without a GPU, set ``TRITON_INTERPRET=1`` *before* importing this module (the dots are then done in
fp32, since the interpreter's bf16 ``tl.dot`` is wrong).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

#: True when the Triton CPU interpreter is active (``TRITON_INTERPRET=1`` set before import).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
#: Running-max initial value: finite, so masked logits (``-inf``) give ``exp(-inf - m) = 0``, never ``inf - inf``.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _dot(a, b, acc, MODE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. MODE 0: native fp16/bf16 tensor-core dot; MODE 1: fp32 IEEE dot (fp32
    inputs — no TF32 — and the CPU interpreter, whose bf16 dot is wrong)."""
    if MODE == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _softcap(z, softcap):
    """``softcap · tanh(z / softcap)``, tanh written with ``exp`` of a non-positive argument (no overflow)."""
    x = z / softcap
    a = tl.exp(-2.0 * tl.abs(x))
    th = (1.0 - a) / (1.0 + a)
    return tl.where(x < 0, -th, th) * softcap


@triton.jit
def _logit_tile(E, rows, n_mask, stride_en, stride_ed, C, vids, v_mask, stride_cv, stride_cd, Bias, stride_bv, D,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                MODE: tl.constexpr):
    """``z = E[rows] C[vids]ᵀ + b[vids]`` for one ``[BLOCK_N, BLOCK_V]`` tile, fp32, summed over ``BLOCK_D`` slices."""
    offs_d = tl.arange(0, BLOCK_D)
    e_ptrs = E + rows[:, None] * stride_en + offs_d[None, :] * stride_ed
    c_ptrs = C + vids[None, :] * stride_cv + offs_d[:, None] * stride_cd
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = (d0 + offs_d) < D
        e = tl.load(e_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        c = tl.load(c_ptrs, mask=d_mask[:, None] & v_mask[None, :], other=0.0)
        acc = _dot(e, c, acc, MODE)
        e_ptrs += BLOCK_D * stride_ed
        c_ptrs += BLOCK_D * stride_cd
    if HAS_BIAS:
        acc += tl.load(Bias + vids * stride_bv, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lse_forward_kernel(
    E, stride_en, stride_ed, C, stride_cv, stride_cd, Bias, stride_bv, Rows, Tgt,
    MaxPart, SumPart, TgtPart, LogitSum,
    M, V, D, BLOCKS_PER_SPLIT, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, SUM_LOGITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MODE: tl.constexpr,
):
    """Blockwise LSE + indexed correct-token logit (Algorithms 1–2) for ``BLOCK_N`` tokens × one vocabulary split."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(M, BLOCK_N)
    pid_n = pid % num_n  # tokens fastest: concurrent programs share the same C tiles through L2
    pid_s = pid // num_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    rows = tl.load(Rows + offs_n, mask=n_mask, other=0).to(tl.int64)
    tgt = tl.load(Tgt + offs_n, mask=n_mask, other=-1).to(tl.int64)

    m_i = tl.full((BLOCK_N,), _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    blk_start = pid_s * BLOCKS_PER_SPLIT
    blk_end = tl.minimum(blk_start + BLOCKS_PER_SPLIT, tl.cdiv(V, BLOCK_V))
    for blk in range(blk_start, blk_end):
        vids = (blk * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        v_mask = vids < V
        z = _logit_tile(E, rows, n_mask, stride_en, stride_ed, C, vids, v_mask, stride_cv, stride_cd, Bias,
                        stride_bv, D, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, MODE)
        if HAS_SOFTCAP:  # z' = s · tanh(z / s), before masking (tanh(-inf) would give -s)
            z = _softcap(z, softcap)
        # Algorithm 1 (indexed matmul): the correct-token logit, taken from the tile that holds y_i.
        t_i += tl.sum(tl.where(vids[None, :] == tgt[:, None], z, 0.0), axis=1)
        if SUM_LOGITS:  # per-vocabulary logit sums over valid tokens, for vocabulary sorting
            col = tl.sum(tl.where(n_mask[:, None] & v_mask[None, :], z, 0.0), axis=0)
            tl.atomic_add(LogitSum + vids, col, mask=v_mask)
        # Algorithm 2 (blockwise LSE): online max / sum of exp, fp32.
        z = tl.where(v_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    out = pid_s * M + offs_n
    tl.store(MaxPart + out, m_i, mask=n_mask)
    tl.store(SumPart + out, l_i, mask=n_mask)
    tl.store(TgtPart + out, t_i, mask=n_mask)


@triton.jit
def _lse_backward_kernel(
    E, stride_en, stride_ed, C, stride_cv, stride_cd, Bias, stride_bv, Rows, Tgt, Lse, TgtD, G, Order,
    DE, stride_den, stride_ded, DC, stride_dcv, stride_dcd, DBias, Counter,
    M, V, D, pos_start, pos_end, filter_eps, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ORDER: tl.constexpr, COMPUTE_DE: tl.constexpr, COMPUTE_DC: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr, HAS_COUNTER: tl.constexpr, HAS_SOFTCAP: tl.constexpr, MODE: tl.constexpr,
):
    """Eqs. (G) for one ``[BLOCK_N, BLOCK_V]`` tile of ``D = S − Y``; the tile is skipped when every
    ``|D_iv| < filter_eps`` (the official rule, target entries included).

    Vocabulary positions ``[pos_start, pos_end)`` (in ``Order`` when sorting) are this launch's chunk; ``DC`` is the
    chunk's fp32 scratch, row ``pos - pos_start``.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(M, BLOCK_N)
    pid_n = pid % num_n
    pid_v = pid // num_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    rows = tl.load(Rows + offs_n, mask=n_mask, other=0).to(tl.int64)
    tgt = tl.load(Tgt + offs_n, mask=n_mask, other=-1).to(tl.int64)
    pos = pos_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    v_mask = pos < pos_end
    if HAS_ORDER:
        vids = tl.load(Order + pos, mask=v_mask, other=0).to(tl.int64)
    else:
        vids = pos

    z = _logit_tile(E, rows, n_mask, stride_en, stride_ed, C, vids, v_mask, stride_cv, stride_cd, Bias,
                    stride_bv, D, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, MODE)
    if HAS_SOFTCAP:
        z = _softcap(z, softcap)                                  # z' = s · tanh(z / s)
    lse = tl.load(Lse + offs_n, mask=n_mask, other=0.0)
    s = tl.exp(z - lse[:, None])                                  # S = exp(z' − lse)
    tgt_d = tl.load(TgtD + offs_n, mask=n_mask, other=0.0)     # D_iy = S_iy − 1 = expm1(−ℓ_i), no cancellation
    s = tl.where(vids[None, :] == tgt[:, None], tgt_d[:, None], s)   # D = S − Y
    s = tl.where(n_mask[:, None] & v_mask[None, :], s, 0.0)
    # Gradient filtering (§4.3): every |D| below eps -> the tile cannot change a gradient; skip both matmuls.
    if tl.max(tl.max(tl.abs(s), axis=1), axis=0) >= filter_eps:
        if HAS_COUNTER:
            tl.atomic_add(Counter, 1)
        g = tl.load(G + offs_n, mask=n_mask, other=0.0)
        ds = s * g[:, None]                                       # ∇z' = D · g
        if HAS_SOFTCAP:
            zs = z / softcap
            ds = ds * (1.0 - zs * zs)                             # ∇z = ∇z' · (1 − tanh²(z / s))
        if COMPUTE_DBIAS:
            tl.atomic_add(DBias + vids, tl.sum(ds, axis=0), mask=v_mask)
        if MODE == 0:
            ds_in = ds.to(C.dtype.element_ty)
        else:
            ds_in = ds
        offs_d = tl.arange(0, BLOCK_D)
        if COMPUTE_DE:  # ∇E[rows] += (S·g) C[vids]   (Eq. G, ∇E)
            c_ptrs = C + vids[:, None] * stride_cv + offs_d[None, :] * stride_cd
            de_ptrs = DE + rows[:, None] * stride_den + offs_d[None, :] * stride_ded
            for d0 in range(0, D, BLOCK_D):
                d_mask = (d0 + offs_d) < D
                c = tl.load(c_ptrs, mask=v_mask[:, None] & d_mask[None, :], other=0.0)
                de = _dot(ds_in, c, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), MODE)
                tl.atomic_add(de_ptrs, de, mask=n_mask[:, None] & d_mask[None, :])
                c_ptrs += BLOCK_D * stride_cd
                de_ptrs += BLOCK_D * stride_ded
        if COMPUTE_DC:  # ∇C[vids] += (S·g)ᵀ E[rows]   (Eq. G, ∇C)
            ds_t = tl.trans(ds_in)
            e_ptrs = E + rows[:, None] * stride_en + offs_d[None, :] * stride_ed
            dc_ptrs = DC + (pos - pos_start)[:, None] * stride_dcv + offs_d[None, :] * stride_dcd
            for d0 in range(0, D, BLOCK_D):
                d_mask = (d0 + offs_d) < D
                e = tl.load(e_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                dc = _dot(ds_t, e, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32), MODE)
                tl.atomic_add(dc_ptrs, dc, mask=v_mask[:, None] & d_mask[None, :])
                e_ptrs += BLOCK_D * stride_ed
                dc_ptrs += BLOCK_D * stride_dcd


# ------------------------------------------------------------------------------------------------------ launchers
@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch settings (powers of two, ``>= 16`` for ``tl.dot``)."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


#: Tiles for the CPU interpreter: small shapes, few programs (each program is interpreted op by op).
INTERPRETER_FORWARD = BlockConfig(16, 32, 32)
INTERPRETER_BACKWARD = BlockConfig(16, 32, 32)
#: GPU defaults, sized for H100/A100 but not tuned on a GPU yet: ``python -m kernels.linear_cross_entropy.aot_check``
#: shows both compile (sm_90) to cp.async-pipelined wgmma loops without register spills (96 / 112 KiB shared).
GPU_FORWARD = BlockConfig(128, 128, 64, num_warps=8, num_stages=3)
GPU_BACKWARD = BlockConfig(128, 128, 64, num_warps=8, num_stages=3)
#: fp32 inputs use IEEE fp32 dots (no tensor cores, no TF32): smaller tiles keep them out of register spills.
GPU_FORWARD_FP32 = BlockConfig(64, 128, 32, num_warps=8, num_stages=2)
GPU_BACKWARD_FP32 = BlockConfig(64, 64, 32, num_warps=8, num_stages=2)


def default_config(kind: str, dtype: torch.dtype) -> BlockConfig:
    """Tiles used when :class:`TritonOptions` gives none: ``kind`` is ``"forward"`` or ``"backward"``."""
    if INTERPRETED:
        return INTERPRETER_FORWARD if kind == "forward" else INTERPRETER_BACKWARD
    if dtype == torch.float32:
        return GPU_FORWARD_FP32 if kind == "forward" else GPU_BACKWARD_FP32
    return GPU_FORWARD if kind == "forward" else GPU_BACKWARD


@dataclass
class TritonOptions:
    """Knobs of :func:`linear_cross_entropy_triton` that do not change the result beyond rounding."""

    filter_eps: float | None = None
    vocab_sort: bool = False
    num_splits: int | None = None
    forward_config: BlockConfig | None = None
    backward_config: BlockConfig | None = None
    scratch_bytes: int = 1 << 26
    softcap: float | None = None
    #: if a dict, backward stores ``tiles_total`` / ``tiles_computed`` (tiles that survived filtering) in it.
    stats: dict | None = field(default=None)


def _mode(dtype: torch.dtype) -> int:
    return 1 if (INTERPRETED or dtype == torch.float32) else 0


def _num_splits(num_n: int, num_v_blocks: int, device: torch.device, requested: int | None) -> int:
    if requested is not None:
        return max(1, min(requested, num_v_blocks))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(num_v_blocks, triton.cdiv(4 * sms, num_n)))


def _forward(e2: Tensor, c: Tensor, bias: Tensor | None, rows: Tensor, tgt: Tensor, opts: TritonOptions,
             sum_logits: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token ``lse`` and ``nll`` (fp32, ``[M]``) and, if ``sum_logits``, the per-vocabulary logit sums."""
    m, v, d = rows.numel(), c.shape[0], c.shape[1]
    cfg = opts.forward_config or default_config("forward", e2.dtype)
    logit_sum = torch.zeros(v, dtype=torch.float32, device=c.device) if sum_logits else None
    if m == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=e2.device)
        return empty, empty, logit_sum
    num_n = triton.cdiv(m, cfg.block_n)
    num_vb = triton.cdiv(v, cfg.block_v)
    splits = _num_splits(num_n, num_vb, e2.device, opts.num_splits)
    per_split = triton.cdiv(num_vb, splits)
    splits = triton.cdiv(num_vb, per_split)
    parts = torch.empty(3, splits, m, dtype=torch.float32, device=e2.device)
    _lse_forward_kernel[(num_n * splits,)](
        e2, e2.stride(0), e2.stride(1), c, c.stride(0), c.stride(1),
        bias, bias.stride(0) if bias is not None else 0, rows, tgt,
        parts[0], parts[1], parts[2], logit_sum,
        m, v, d, per_split, 1.0 if opts.softcap is None else float(opts.softcap),
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        HAS_BIAS=bias is not None, SUM_LOGITS=sum_logits, HAS_SOFTCAP=opts.softcap is not None,
        MODE=_mode(e2.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    mx, sm, tg = parts[0], parts[1], parts[2]
    m_all = mx.max(dim=0).values
    log_l = torch.log((sm * torch.exp(mx - m_all)).sum(dim=0))  # merge the splits' (max, sum-of-exp)
    # ℓ = (max − z_y) + log Σ exp(z − max): the first difference is exact when z_y is the max, so a confident
    # prediction's small loss keeps fp32 relative precision instead of ulp(lse) (as log_softmax does).
    return m_all + log_l, (m_all - tg.sum(dim=0)) + log_l, logit_sum


def _backward(e2: Tensor, c: Tensor, bias: Tensor | None, rows: Tensor, tgt: Tensor, lse: Tensor, nll: Tensor,
              g: Tensor,
              order: Tensor | None, opts: TritonOptions, need_e: bool, need_c: bool,
              need_b: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(∇E [N_all, D], ∇C [V, D], ∇b [V])`` in the input dtypes (``None`` where not needed)."""
    m, (v, d) = rows.numel(), c.shape
    cfg = opts.backward_config or default_config("backward", e2.dtype)
    mode = _mode(e2.dtype)
    f32 = torch.float32
    de = None
    if need_e:
        de = torch.zeros(e2.shape, dtype=f32, device=e2.device)
    dc = torch.zeros(c.shape, dtype=c.dtype, device=c.device) if need_c else None
    db = torch.zeros(v, dtype=f32, device=c.device) if need_b else None
    eps = -1.0 if opts.filter_eps is None else float(opts.filter_eps)
    counter = torch.zeros(1, dtype=torch.int32, device=e2.device) if opts.stats is not None else None
    num_n = triton.cdiv(m, cfg.block_n) if m else 0
    tgt_d = torch.expm1(-nll)  # the target entries of S − Y, S_iy − 1 = expm1(−ℓ_i)
    tiles_total = 0
    direct = need_c and c.dtype == f32 and order is None
    if direct or not need_c:
        chunk = v  # one pass: accumulate straight into the fp32 gradient (or no ∇C at all)
    else:
        chunk = max(cfg.block_v, (opts.scratch_bytes // (4 * d)) // cfg.block_v * cfg.block_v)
    dummy = torch.zeros(1, dtype=f32, device=e2.device)
    for p0 in range(0, v, chunk):
        p1 = min(v, p0 + chunk)
        if need_c:
            scratch = dc if direct else torch.zeros(p1 - p0, d, dtype=f32, device=c.device)
        else:
            scratch = dummy.view(1, 1)
        if m:
            num_vb = triton.cdiv(p1 - p0, cfg.block_v)
            tiles_total += num_n * num_vb
            _lse_backward_kernel[(num_n * num_vb,)](
                e2, e2.stride(0), e2.stride(1), c, c.stride(0), c.stride(1),
                bias, bias.stride(0) if bias is not None else 0, rows, tgt, lse, tgt_d, g, order,
                de if need_e else dummy, de.stride(0) if need_e else 0, de.stride(1) if need_e else 0,
                scratch, scratch.stride(0), scratch.stride(1), db if need_b else dummy,
                counter if counter is not None else dummy,
                m, v, d, p0, p1, eps, 1.0 if opts.softcap is None else float(opts.softcap),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                HAS_BIAS=bias is not None, HAS_ORDER=order is not None,
                COMPUTE_DE=need_e, COMPUTE_DC=need_c, COMPUTE_DBIAS=need_b,
                HAS_COUNTER=counter is not None, HAS_SOFTCAP=opts.softcap is not None, MODE=mode,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        if need_c and not direct:
            if order is None:
                dc[p0:p1] = scratch
            else:
                dc.index_copy_(0, order[p0:p1].long(), scratch.to(c.dtype))
    if opts.stats is not None:
        opts.stats["tiles_total"] = tiles_total
        opts.stats["tiles_computed"] = int(counter.item())
    return (de.to(e2.dtype) if need_e else None, dc,
            db.to(bias.dtype) if (need_b and bias is not None) else None)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Per-valid-token NLL ``ℓ`` (``[M]``, fp32) from ``E`` (read at ``rows``), ``C``, ``b``; backward Eqs. (G)."""

    @staticmethod
    def forward(ctx, e: Tensor, c: Tensor, bias: Tensor | None, rows: Tensor, tgt: Tensor,  # type: ignore[override]
                opts: TritonOptions) -> Tensor:
        e2 = e.reshape(-1, e.shape[-1])
        sort = opts.vocab_sort and any(ctx.needs_input_grad[:3])
        lse, nll, logit_sum = _forward(e2, c, bias, rows, tgt, opts, sum_logits=sort)
        order = None
        if sort:
            # §4.3 vocabulary sorting: descending average logit, so high-probability tokens share tiles.
            order = torch.argsort(logit_sum, descending=True, stable=True).to(torch.int32)
        ctx.save_for_backward(e, c, bias, rows, tgt, lse, nll, order)
        ctx.opts = opts
        return nll

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        e, c, bias, rows, tgt, lse, nll, order = ctx.saved_tensors
        need_e, need_c, need_b = ctx.needs_input_grad[:3]
        e2 = e.reshape(-1, e.shape[-1])
        de, dc, db = _backward(e2, c, bias, rows, tgt, lse, nll, g.float().contiguous(), order, ctx.opts,
                               need_e, need_c, need_b and bias is not None)
        return (de.view(e.shape) if de is not None else None), dc, db, None, None, None


def linear_cross_entropy_triton(e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None = None,
                                ignore_index: int = -100, reduction: str = "mean", shift: bool = False,
                                filter_eps: float | None = None, vocab_sort: bool = False,
                                options: TritonOptions | None = None, softcap: float | None = None) -> Tensor:
    """Cut Cross-Entropy (Eq. (L) forward, Eqs. (G) backward) with the Triton kernels of this module.

    Inputs are not validated here (use :func:`kernels.linear_cross_entropy.linear_cross_entropy`); ``filter_eps``
    is already resolved (``None`` = exact, no filtering). ``options`` carries tiling overrides and ``stats``;
    ``softcap`` (validated) caps the logits, ``z' = s · tanh(z / s)``.
    """
    from kernels.linear_cross_entropy.linear_cross_entropy_ref import aligned_targets

    # sorting only pays off in a backward pass; under no_grad the per-vocabulary logit sums are skipped
    opts = replace(options or TritonOptions(), filter_eps=filter_eps, vocab_sort=vocab_sort and torch.is_grad_enabled(),
                   softcap=softcap)
    t = aligned_targets(targets, ignore_index, shift)
    flat_t = t.reshape(-1)
    valid = flat_t != ignore_index
    rows = valid.nonzero().squeeze(1)
    tgt = flat_t[rows].contiguous()
    e = e.contiguous()
    nll = LinearCrossEntropyFunction.apply(e, c, bias, rows, tgt, opts)
    if reduction == "mean":
        return nll.sum() / rows.numel()  # NaN when every position is ignored, like F.cross_entropy
    if reduction == "sum":
        return nll.sum()
    full = torch.zeros(flat_t.numel(), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll).view(t.shape)
    return full[..., :-1] if shift else full


__all__ = [
    "BlockConfig",
    "INTERPRETED",
    "LinearCrossEntropyFunction",
    "TritonOptions",
    "linear_cross_entropy_triton",
]
