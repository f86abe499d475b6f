"""Linear cross-entropy (loss over a vocabulary from hidden states and a classifier) — plain-PyTorch reference.

Cut Cross-Entropy (Wijmans et al., arXiv 2411.09009; spec: papers/cut_cross_entropy.md). For token ``i`` with
hidden state ``e_i`` (``E ∈ R^{N×D}``), classifier ``C ∈ R^{V×D}``, optional bias ``b ∈ R^V`` and target ``y_i``::

    z_i      = C e_i + b                                        (logits, one row of E Cᵀ + b)
    ℓ_i      = logsumexp_v(z_iv) − z_{i,y_i}                    (L)  LSE minus the indexed logit
    ∇z_i     = (softmax(z_i) − onehot(y_i)) · g_i               (g_i: upstream gradient of ℓ_i)
    ∇E       = (S − Y) C,   ∇C = (S − Y)ᵀ E,   ∇b = Σ_i (S − Y)_i        (G)  the backward pass

With a final-logit soft-cap ``s`` (Gemma 2) the logits are ``z'_i = s · tanh(z_i / s)``; (L) uses ``z'`` and (G)
multiplies ``S − Y`` (softmax of ``z'``) by ``∂z'/∂z = 1 − tanh²(z / s) = 1 − (z' / s)²`` elementwise.

(L) and (G) are labels local to this package. The paper (§4) writes the same loss as the indexed matmul of the
correct-token logit (its Algorithm 1) minus the linear-log-sum-exp (forward Algorithm 2, backward Algorithm 3).

This module is the spec:

* :func:`linear_cross_entropy_ref` materialises the ``N×V`` logits (matmul in the input dtype, softmax/LSE in fp32,
  as ``F.cross_entropy((e @ c.T).float(), t)`` — the paper's "baseline").
* :func:`linear_cross_entropy_chunked` is exact and bounds memory by processing tokens in chunks (the
  TorchTune-style "chunked" baseline of the paper's Table 1): forward keeps only the per-token LSE, backward
  recomputes each chunk's logits. Given ``filter_eps`` it also applies the Triton kernel's gradient filter
  (§4.3; :func:`filter_tiles`) with the same tiles, optionally over the sorted vocabulary, so filtering can be run
  and measured on the CPU at real shapes; :func:`gradient_filter_stats` counts the kept tiles.

Conventions shared with the Triton kernel:

* ``shift=True`` predicts ``targets[..., t + 1]`` from ``e[..., t, :]`` (the Hugging Face causal-LM loss); the last
  position has no target.
* ``ignore_index`` positions contribute nothing; ``"mean"`` divides by the number of non-ignored positions (NaN when
  there are none, like ``F.cross_entropy``); ``"none"`` returns ``targets.shape`` (``[..., T - 1]`` when shifted) with
  zeros at ignored positions.
* The loss is returned in fp32 (fp64 for fp64 inputs), whatever the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Reductions accepted by every implementation.
REDUCTIONS = ("mean", "sum", "none")


def default_filter_eps(dtype: torch.dtype) -> float:
    """Gradient-filter threshold for ``filter_eps="auto"``: ``finfo(dtype).eps / 32`` as in the official code.

    The paper (§4.3) skips a tile of the softmax when every entry is below the precision at which it would change a
    gradient in ``dtype``: 2⁻¹² for bf16 (eps 2⁻⁷), 2⁻¹⁵ for fp16 (eps 2⁻¹⁰), 2⁻²⁸ for fp32.
    """
    return torch.finfo(dtype).eps / 32


def aligned_targets(targets: Tensor, ignore_index: int, shift: bool) -> Tensor:
    """Targets aligned with the positions of ``e``: with ``shift`` position ``t`` predicts ``targets[..., t + 1]``
    and the last position gets ``ignore_index``."""
    if not shift:
        return targets
    out = torch.full_like(targets, ignore_index)
    out[..., :-1] = targets[..., 1:]
    return out


def reduce_loss(nll: Tensor, valid: Tensor, reduction: str, shift: bool) -> Tensor:
    """Reduce per-position losses ``nll`` (zero where ``valid`` is False) as ``F.cross_entropy`` with
    ``ignore_index`` does; ``"none"`` drops the target-less last position when ``shift``."""
    if reduction == "mean":
        return nll.sum() / valid.sum()
    if reduction == "sum":
        return nll.sum()
    return nll[..., :-1] if shift else nll


def linear_cross_entropy_ref(e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None = None,
                             ignore_index: int = -100, reduction: str = "mean", shift: bool = False,
                             softcap: float | None = None) -> Tensor:
    """Reference linear cross-entropy (Eq. (L)), materialising all ``N×V`` logits.

    Logits are computed in the input dtype (``e @ cᵀ + b``, as a model's LM head would), then the log-sum-exp and
    the indexed logit in fp32 (fp64 inputs stay fp64). Inputs are not validated here; use
    :func:`kernels.linear_cross_entropy.linear_cross_entropy` (``impl="torch"``).

    Args:
        e: ``[..., D]`` hidden states.
        c: ``[V, D]`` classifier (LM head / tied embedding weight).
        targets: ``[...]`` int64 in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` classifier bias.
        ignore_index, reduction, shift: see the module docstring.
        softcap: optional final-logit soft-cap ``s``: ``z' = s · tanh(z / s)``, applied in fp32 (fp64) — the
            official Triton kernel also caps its fp32 accumulator; its ``torch_compile`` path caps in the input dtype.
    """
    t = aligned_targets(targets, ignore_index, shift)
    logits = F.linear(e, c, bias)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = apply_softcap(logits.to(acc), softcap)                       # z' = s · tanh(z / s)
    nll = F.cross_entropy(logits.flatten(0, -2), t.flatten(), ignore_index=ignore_index,
                          reduction="none").view(t.shape)
    return reduce_loss(nll, t != ignore_index, reduction, shift)


def apply_softcap(z: Tensor, softcap: float | None) -> Tensor:
    """Final-logit soft-capping (Gemma 2): ``z' = softcap · tanh(z / softcap)``; identity when ``softcap`` is None."""
    if softcap is None:
        return z
    return torch.tanh(z / softcap) * softcap


def default_filter_block(dtype: torch.dtype) -> tuple[int, int]:
    """``(block_n, block_v)`` tile of the gradient filter: the tile of the Triton backward kernel on a GPU for this
    dtype (fp16/bf16: 128×128, the official kernel's default backward tile too; fp32/fp64: 64×64)."""
    return (128, 128) if dtype in (torch.float16, torch.bfloat16) else (64, 64)


def tile_max_abs(d: Tensor, block_n: int, block_v: int, order: Tensor | None = None) -> Tensor:
    """``max |d|`` over each ``block_n × block_v`` tile of ``d`` (``[n, V]``), vocabulary columns taken in ``order``
    (vocabulary sorting) when given; ragged edge tiles are padded with zeros, as the kernels mask them.

    Returns ``[ceil(n / block_n), ceil(V / block_v)]``.
    """
    a = d.abs()
    if order is not None:
        a = a.index_select(1, order)
    n, v = a.shape
    nb, nvb = -(-n // block_n), -(-v // block_v)
    a = F.pad(a, (0, nvb * block_v - v, 0, nb * block_n - n))
    return a.view(nb, block_n, nvb, block_v).amax(dim=(1, 3))


def filter_tiles(d: Tensor, filter_eps: float, block_n: int, block_v: int, order: Tensor | None = None) -> Tensor:
    """Gradient filtering (§4.3), the official kernel's rule: a tile of ``D = S − Y`` (target entries included,
    before the upstream gradient and the soft-cap derivative) is dropped when every entry has ``|D_iv| < eps``;
    returns ``keep`` (bool, ``[ceil(n / block_n), ceil(V / block_v)]``), i.e. ``max_tile |D| >= eps``."""
    return tile_max_abs(d, block_n, block_v, order) >= filter_eps


def _zero_dropped_tiles(d: Tensor, keep: Tensor, block_n: int, block_v: int, inv_order: Tensor | None) -> None:
    """In place: ``D_iv = 0`` where tile ``(i // block_n, pos(v) // block_v)`` is not kept (``pos`` = position of
    ``v`` in the sorted vocabulary order, ``inv_order``, or ``v``)."""
    n, v = d.shape
    pos = inv_order if inv_order is not None else torch.arange(v, device=d.device)
    row_tile = torch.arange(n, device=d.device) // block_n
    drop = ~keep[row_tile][:, pos // block_v]
    d.masked_fill_(drop, 0.0)


def _row_lse_parts(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(m, l, ℓ)`` per row: ``m = max_v z``, ``l = log Σ_v exp(z − m)`` (so ``lse = m + l``) and
    ``ℓ = (m − z_y) + l`` — exact to fp32 relative precision even for a confident prediction (``ℓ ≪ ulp(lse)``),
    as ``log_softmax`` is."""
    m = z.amax(dim=-1)
    l = torch.log(torch.exp(z - m[:, None]).sum(-1))
    return m, l, (m - z.gather(1, t[:, None]).squeeze(1)) + l


def _softmax_minus_onehot(z: Tensor, m: Tensor, l: Tensor, t: Tensor, nll: Tensor) -> Tensor:
    """``D = S − Y`` with ``S_iv = exp((z_iv − m_i) − l_i)`` and the target entries ``D_{i,y_i} = expm1(−ℓ_i)``
    (not ``S_iy − 1``, which cancels catastrophically when ``S_iy ≈ 1``)."""
    d = torch.exp(z - m[:, None] - l[:, None])
    d.scatter_(1, t[:, None], torch.expm1(-nll)[:, None])
    return d


def _vocab_order(logit_sum: Tensor) -> Tensor:
    """§4.3 vocabulary sorting, as the Triton path: descending sum of logits over the valid tokens, stable (the
    official code sorts ascending by average logit; the grouping of high-probability tokens is the same)."""
    return torch.argsort(logit_sum, descending=True, stable=True)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-valid-token NLL ``ℓ_i`` (Eq. (L)) over token chunks; backward recomputes each chunk's logits (Eqs. (G)),
    optionally with gradient filtering on ``block_n × block_v`` tiles of ``S − Y`` over the valid tokens."""

    @staticmethod
    def forward(ctx, ev: Tensor, c: Tensor, bias: Tensor | None, t: Tensor,  # type: ignore[override]
                softcap: float | None, chunk_size: int, filter_eps: float | None, block: tuple[int, int], vocab_sort: bool) -> Tensor:
        acc = torch.float64 if ev.dtype == torch.float64 else torch.float32
        n = ev.shape[0]
        mx = torch.empty(n, dtype=acc, device=ev.device)
        lg = torch.empty(n, dtype=acc, device=ev.device)
        nll = torch.empty(n, dtype=acc, device=ev.device)
        sort = vocab_sort and filter_eps is not None
        logit_sum = torch.zeros(c.shape[0], dtype=acc, device=ev.device) if sort else None
        for s in range(0, n, chunk_size):
            z = apply_softcap(F.linear(ev[s:s + chunk_size], c, bias).to(acc), softcap)   # z' = s·tanh(z/s)
            # ℓ = lse − z'_y = (m − z'_y) + log Σ exp(z' − m)
            mx[s:s + chunk_size], lg[s:s + chunk_size], nll[s:s + chunk_size] = _row_lse_parts(z, t[s:s + chunk_size])
            if logit_sum is not None:
                logit_sum += z.sum(0)
        order = _vocab_order(logit_sum) if logit_sum is not None else None
        ctx.save_for_backward(ev, c, bias, t, mx, lg, nll, order)
        ctx.cfg = (softcap, chunk_size, filter_eps, block)
        return nll

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        ev, c, bias, t, mx, lg, nll, order = ctx.saved_tensors
        softcap, chunk, eps, (bn, bv) = ctx.cfg
        need_e, need_c, need_b = ctx.needs_input_grad[:3]
        acc = mx.dtype
        g = g.to(acc)
        inv = None
        if order is not None:
            inv = torch.empty_like(order)
            inv[order] = torch.arange(order.numel(), device=order.device)
        de = torch.empty_like(ev) if need_e else None
        dc = torch.zeros(c.shape, dtype=acc, device=c.device) if need_c else None
        db = torch.zeros(c.shape[0], dtype=acc, device=c.device) if need_b else None
        for s in range(0, ev.shape[0], chunk):
            es = ev[s:s + chunk]
            z = apply_softcap(F.linear(es, c, bias).to(acc), softcap)
            sl = slice(s, s + chunk)
            p = _softmax_minus_onehot(z, mx[sl], lg[sl], t[sl], nll[sl])  # D = S − Y from the saved (m, l, ℓ)
            if eps is not None:  # drop tiles with max |D| < eps (chunks start on a block_n boundary)
                _zero_dropped_tiles(p, filter_tiles(p, eps, bn, bv, order), bn, bv, inv)
            p.mul_(g[s:s + chunk, None])                                  # ∇z' = (S − Y)·g
            if softcap is not None:
                p.mul_(1 - (z / softcap) ** 2)                            # ∇z = ∇z' · (1 − tanh²(z/s))
            if need_b:
                db += p.sum(0)
            dz = p.to(ev.dtype)
            if need_e:
                de[s:s + chunk] = dz @ c                                  # ∇E = ∇Z C
            if need_c:
                if dz.dtype == acc:                                       # ∇C += ∇Zᵀ E, in place: no V×D
                    dc.addmm_(dz.T, es)                                   # temporary per chunk
                else:
                    dc += (dz.T @ es).to(acc)                             # ∇C = ∇Zᵀ E
        return (de, dc.to(c.dtype) if need_c else None, db.to(bias.dtype) if need_b else None,
                None, None, None, None, None, None)


def default_chunk_size(vocab: int, budget_bytes: int = 1 << 28) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take at most ``budget_bytes`` (256 MiB)."""
    return max(1, budget_bytes // (4 * max(vocab, 1)))


def _valid_rows(e: Tensor, targets: Tensor, ignore_index: int, shift: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, rows, t_valid)``: aligned targets, flat indices of the non-ignored positions, their targets."""
    t = aligned_targets(targets, ignore_index, shift)
    flat = t.reshape(-1)
    rows = (flat != ignore_index).nonzero().squeeze(1)
    return t, rows, flat[rows]


def _chunk_for_filter(chunk_size: int, block_n: int) -> int:
    """Chunks start on a tile boundary: a multiple of ``block_n`` tokens (at least one tile)."""
    return max(block_n, chunk_size // block_n * block_n)


def linear_cross_entropy_chunked(e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None = None,
                                 ignore_index: int = -100, reduction: str = "mean", shift: bool = False,
                                 chunk_size: int | None = None, softcap: float | None = None,
                                 filter_eps: float | None = None, filter_block: tuple[int, int] | None = None,
                                 vocab_sort: bool = False) -> Tensor:
    """Linear cross-entropy over token chunks; exact (same result as :func:`linear_cross_entropy_ref`) unless
    ``filter_eps`` is a number.

    Memory: one ``chunk_size × V`` logit block at a time (default: :func:`default_chunk_size`, ≤ 256 MiB) plus a
    per-token fp32 LSE; backward recomputes each chunk's logits and accumulates ``∇C`` in fp32. Only non-ignored
    positions are computed (compacted, as the Triton kernel's rows).

    With ``filter_eps`` (resolved, ``>= 0``) the backward applies the gradient filter of the Triton kernel: tiles of
    ``filter_block = (block_n, block_v)`` (default :func:`default_filter_block`) over (valid tokens in order ×
    vocabulary, sorted by :func:`_vocab_order` when ``vocab_sort``) whose entries all have ``|S − Y| < filter_eps``
    contribute nothing (:func:`filter_tiles`); chunk sizes are rounded to a multiple of ``block_n``.
    """
    d = e.shape[-1]
    t, rows, tv = _valid_rows(e, targets, ignore_index, shift)
    bn, bv = filter_block or default_filter_block(e.dtype)
    chunk_size = chunk_size or default_chunk_size(c.shape[0])
    if filter_eps is not None:
        chunk_size = _chunk_for_filter(chunk_size, bn)
    ev = e.reshape(-1, d).index_select(0, rows)
    nll_v = _ChunkedLinearCrossEntropy.apply(ev, c, bias, tv, softcap, chunk_size, filter_eps, (bn, bv), vocab_sort)
    nll = torch.zeros(t.numel(), dtype=nll_v.dtype, device=nll_v.device).index_add(0, rows, nll_v).view(t.shape)
    return reduce_loss(nll, t != ignore_index, reduction, shift)


@torch.no_grad()
def filter_stats_chunked(e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                          ignore_index: int = -100, shift: bool = False, softcap: float | None = None,
                          filter_eps: float | None = None, filter_block: tuple[int, int] | None = None,
                          vocab_sort: bool = False, chunk_size: int | None = None) -> dict:
    """How many tiles of the softmax gradient ``S − Y`` the gradient filter keeps (§4.3), without materialising the
    ``N×V`` matrix: chunks of ``chunk_size`` valid tokens (rounded to ``block_n``), one logit chunk at a time.

    Tiles and rule are those of the backward passes (:func:`filter_tiles`): ``block_n`` consecutive valid tokens ×
    ``block_v`` vocabulary entries (in sorted order with ``vocab_sort``, which costs one extra pass over the logits
    for the per-vocabulary logit sums); a tile is kept when ``max |S − Y| >= filter_eps``. ``filter_eps=None`` means
    ``finfo(e.dtype).eps / 32`` (the ``"auto"`` threshold). Inputs are not validated here; use
    :func:`kernels.linear_cross_entropy.gradient_filter_stats`.

    Returns ``{"blocks_total", "blocks_kept", "fraction_kept", "tokens", "vocab", "filter_eps", "block_n",
    "block_v", "vocab_sort"}``.
    """
    eps = default_filter_eps(e.dtype) if filter_eps is None else float(filter_eps)
    bn, bv = filter_block or default_filter_block(e.dtype)
    _, rows, tv = _valid_rows(e, targets, ignore_index, shift)
    ev = e.reshape(-1, e.shape[-1]).index_select(0, rows)
    m, v = ev.shape[0], c.shape[0]
    acc = torch.float64 if e.dtype == torch.float64 else torch.float32
    chunk = _chunk_for_filter(chunk_size or default_chunk_size(v), bn)
    order = None
    if vocab_sort:
        logit_sum = torch.zeros(v, dtype=acc, device=e.device)
        for s in range(0, m, chunk):
            logit_sum += apply_softcap(F.linear(ev[s:s + chunk], c, bias).to(acc), softcap).sum(0)
        order = _vocab_order(logit_sum)
    kept = 0
    for s in range(0, m, chunk):
        z = apply_softcap(F.linear(ev[s:s + chunk], c, bias).to(acc), softcap)
        m_, l_, nll = _row_lse_parts(z, tv[s:s + chunk])
        p = _softmax_minus_onehot(z, m_, l_, tv[s:s + chunk], nll)                  # D = S − Y
        kept += int(filter_tiles(p, eps, bn, bv, order).sum())
    total = -(-m // bn) * -(-v // bv)
    return {"blocks_total": total, "blocks_kept": kept, "fraction_kept": kept / total if total else float("nan"),
            "tokens": m, "vocab": v, "filter_eps": eps, "block_n": bn, "block_v": bv, "vocab_sort": vocab_sort}


__all__ = [
    "REDUCTIONS",
    "aligned_targets",
    "apply_softcap",
    "default_chunk_size",
    "default_filter_block",
    "default_filter_eps",
    "filter_tiles",
    "filter_stats_chunked",
    "linear_cross_entropy_chunked",
    "linear_cross_entropy_ref",
    "reduce_loss",
    "tile_max_abs",
]
