"""Linear cross-entropy (loss over a vocabulary from hidden states and a classifier) — plain-PyTorch reference.

Cut Cross-Entropy (Wijmans et al., arXiv 2411.09009; spec: papers/cut_cross_entropy.md). For token ``i`` with
hidden state ``e_i`` (``E ∈ R^{N×D}``), classifier ``C ∈ R^{V×D}``, optional bias ``b ∈ R^V`` and target ``y_i``::

    z_i      = C e_i + b                                        (logits, one row of E Cᵀ + b)
    ℓ_i      = logsumexp_v(z_iv) − z_{i,y_i}                    (L)  LSE minus the indexed logit
    ∇z_i     = (softmax(z_i) − onehot(y_i)) · g_i               (g_i: upstream gradient of ℓ_i)
    ∇E       = (S − Y) C,   ∇C = (S − Y)ᵀ E,   ∇b = Σ_i (S − Y)_i        (G)  the backward pass

(L) and (G) are labels local to this package. The paper (§4) writes the same loss as the indexed matmul of the
correct-token logit (its Algorithm 1) minus the linear-log-sum-exp (forward Algorithm 2, backward Algorithm 3).

This module is the spec:

* :func:`linear_cross_entropy_ref` materialises the ``N×V`` logits (matmul in the input dtype, softmax/LSE in fp32,
  as ``F.cross_entropy((e @ c.T).float(), t)`` — the paper's "baseline").
* :func:`linear_cross_entropy_chunked` is exact and bounds memory by processing tokens in chunks (the
  TorchTune-style "chunked" baseline of the paper's Table 1): forward keeps only the per-token LSE, backward
  recomputes each chunk's logits.

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
                             ignore_index: int = -100, reduction: str = "mean", shift: bool = False) -> Tensor:
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
    """
    t = aligned_targets(targets, ignore_index, shift)
    logits = F.linear(e, c, bias)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    nll = F.cross_entropy(logits.to(acc).flatten(0, -2), t.flatten(), ignore_index=ignore_index,
                          reduction="none").view(t.shape)
    return reduce_loss(nll, t != ignore_index, reduction, shift)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token NLL ``ℓ_i`` (Eq. (L)) over token chunks; backward recomputes each chunk's logits (Eqs. (G))."""

    @staticmethod
    def forward(ctx, e2: Tensor, c: Tensor, bias: Tensor | None, t: Tensor, ignore_index: int,  # type: ignore[override]
                chunk_size: int) -> Tensor:
        acc = torch.float64 if e2.dtype == torch.float64 else torch.float32
        n = e2.shape[0]
        valid = t != ignore_index
        safe_t = torch.where(valid, t, 0)
        lse = torch.empty(n, dtype=acc, device=e2.device)
        nll = torch.empty(n, dtype=acc, device=e2.device)
        for s in range(0, n, chunk_size):
            z = F.linear(e2[s:s + chunk_size], c, bias).to(acc)
            lse_s = torch.logsumexp(z, dim=-1)
            lse[s:s + chunk_size] = lse_s
            nll[s:s + chunk_size] = lse_s - z.gather(1, safe_t[s:s + chunk_size, None]).squeeze(1)
        nll = torch.where(valid, nll, 0)
        ctx.save_for_backward(e2, c, bias, safe_t, valid, lse)
        ctx.chunk_size = chunk_size
        return nll

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        e2, c, bias, safe_t, valid, lse = ctx.saved_tensors
        need_e, need_c, need_b = ctx.needs_input_grad[:3]
        chunk = ctx.chunk_size
        acc = lse.dtype
        g = torch.where(valid, g.to(acc), 0)
        de = torch.empty_like(e2) if need_e else None
        dc = torch.zeros(c.shape, dtype=acc, device=c.device) if need_c else None
        db = torch.zeros(c.shape[0], dtype=acc, device=c.device) if need_b else None
        for s in range(0, e2.shape[0], chunk):
            es = e2[s:s + chunk]
            z = F.linear(es, c, bias).to(acc)
            p = torch.exp(z - lse[s:s + chunk, None])                     # S: softmax via the saved LSE
            p.scatter_add_(1, safe_t[s:s + chunk, None], -torch.ones_like(p[:, :1]))   # S − Y
            p.mul_(g[s:s + chunk, None])
            if need_b:
                db += p.sum(0)
            dz = p.to(e2.dtype)
            if need_e:
                de[s:s + chunk] = dz @ c                                  # ∇E = (S − Y) C
            if need_c:
                dc += (dz.T @ es).to(acc)                                 # ∇C = (S − Y)ᵀ E
        return (de, dc.to(c.dtype) if need_c else None, db.to(bias.dtype) if need_b else None, None, None, None)


def default_chunk_size(vocab: int, budget_bytes: int = 1 << 28) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take at most ``budget_bytes`` (256 MiB)."""
    return max(1, budget_bytes // (4 * max(vocab, 1)))


def linear_cross_entropy_chunked(e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None = None,
                                 ignore_index: int = -100, reduction: str = "mean", shift: bool = False,
                                 chunk_size: int | None = None) -> Tensor:
    """Exact linear cross-entropy over token chunks (same result as :func:`linear_cross_entropy_ref`).

    Memory: one ``chunk_size × V`` logit block at a time (default: :func:`default_chunk_size`, ≤ 256 MiB) plus a
    per-token fp32 LSE; backward recomputes each chunk's logits and accumulates ``∇C`` in fp32.
    """
    t = aligned_targets(targets, ignore_index, shift)
    d = e.shape[-1]
    chunk_size = chunk_size or default_chunk_size(c.shape[0])
    nll = _ChunkedLinearCrossEntropy.apply(e.reshape(-1, d), c, bias, t.reshape(-1), ignore_index, chunk_size)
    return reduce_loss(nll.view(t.shape), t != ignore_index, reduction, shift)


__all__ = [
    "REDUCTIONS",
    "aligned_targets",
    "default_chunk_size",
    "default_filter_eps",
    "linear_cross_entropy_chunked",
    "linear_cross_entropy_ref",
    "reduce_loss",
]
