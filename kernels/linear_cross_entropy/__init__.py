"""Linear cross-entropy without materialising logits (Cut Cross-Entropy, arXiv 2411.09009).

``impl="triton"`` runs the Cut Cross-Entropy kernels (:mod:`.linear_cross_entropy_triton`, imported lazily on the
first call, so ``TRITON_INTERPRET=1`` may be set any time before it); ``"torch"`` is the materialising reference
(the spec, :mod:`.linear_cross_entropy_ref`) and ``"torch_chunked"`` its exact token-chunked variant.
:func:`causal_lm_loss` plugs it into a Hugging Face causal LM as a drop-in loss.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.linear_cross_entropy.causal_lm import causal_lm_loss
from kernels.linear_cross_entropy.linear_cross_entropy_ref import (
    REDUCTIONS,
    default_filter_eps,
    linear_cross_entropy_chunked,
    linear_cross_entropy_ref,
)

IMPLS = ("triton", "torch", "torch_chunked")
#: dtypes of ``e``/``c`` per implementation (fp64 only for the PyTorch paths, e.g. as a test oracle).
SUPPORTED_DTYPES = {
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "torch_chunked": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def resolve_filter_eps(filter_eps: str | float | None, dtype: torch.dtype) -> float | None:
    """``"auto"`` -> ``finfo(dtype).eps / 32`` (2⁻¹² for bf16, §4.3), a number -> itself, ``None`` -> no filtering.

    Raises ``ValueError`` for anything else, or a negative / non-finite number.
    """
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be 'auto', None or a finite float >= 0, got {filter_eps!r}")
        return default_filter_eps(dtype)
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)) or not math.isfinite(filter_eps) \
            or filter_eps < 0:
        raise ValueError(f"filter_eps must be 'auto', None or a finite float >= 0, got {filter_eps!r}")
    return float(filter_eps)


def check_linear_cross_entropy_inputs(e: object, c: object, targets: object, bias: object, ignore_index: object,
                                      reduction: object, shift: object, impl: str = "torch") -> None:
    """Validate the arguments of :func:`linear_cross_entropy`; raise ``ValueError`` naming the bad value and the
    allowed range. Checks target values too (one device sync)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(e, Tensor) or e.ndim < 2:
        raise ValueError(f"e must be a [..., D] tensor with at least 2 dims, got "
                         f"{tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__}")
    if e.dtype not in SUPPORTED_DTYPES[impl]:
        raise ValueError(f"e.dtype must be one of {SUPPORTED_DTYPES[impl]} for impl={impl!r}, got {e.dtype}")
    if not isinstance(c, Tensor) or c.ndim != 2:
        got = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
        raise ValueError(f"c must be a [V, D] tensor, got {got}")
    if c.shape[1] != e.shape[-1]:
        raise ValueError(f"c.shape[1] must equal the hidden size e.shape[-1] = {e.shape[-1]}, got {c.shape[1]}")
    if c.shape[0] < 1 or e.shape[-1] < 1:
        raise ValueError(f"vocabulary size V and hidden size D must be >= 1, got V={c.shape[0]}, D={e.shape[-1]}")
    if c.dtype != e.dtype:
        raise ValueError(f"c.dtype must equal e.dtype ({e.dtype}), got {c.dtype}")
    if c.device != e.device:
        raise ValueError(f"c must be on e's device {e.device}, got {c.device}")
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be an int64 tensor, got "
                         f"{targets.dtype if isinstance(targets, Tensor) else type(targets).__name__}")
    if tuple(targets.shape) != tuple(e.shape[:-1]):
        raise ValueError(f"targets.shape must equal e.shape[:-1] = {tuple(e.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.device != e.device:
        raise ValueError(f"targets must be on e's device {e.device}, got {targets.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    v = c.shape[0]
    if targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            val = int(targets[bad].flatten()[0])
            raise ValueError(f"targets must be in [0, {v}) or ignore_index={ignore_index}, got {val}")
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (v,):
            raise ValueError(f"bias must be None or a [{v}] tensor, got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
        if bias.dtype != c.dtype:
            raise ValueError(f"bias.dtype must equal c.dtype ({c.dtype}), got {bias.dtype}")
        if bias.device != e.device:
            raise ValueError(f"bias must be on e's device {e.device}, got {bias.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(shift, bool):
        raise ValueError(f"shift must be a bool, got {shift!r}")


def linear_cross_entropy(e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean", shift: bool = False,
                         filter_eps: str | float | None = "auto", vocab_sort: bool = False,
                         impl: str = "triton", chunk_size: int | None = None) -> Tensor:
    """Cross-entropy of ``logits = e @ cᵀ + bias`` against ``targets``, without materialising the logits.

    ``loss_i = logsumexp_v(e_i·c_v + b_v) − (e_i·c_{y_i} + b_{y_i})`` (Eq. (L)); gradients ``∇E = (S − Y) C``,
    ``∇C = (S − Y)ᵀ E`` (Eqs. (G)), for ``e``, ``c`` and ``bias``.

    Args:
        e: ``[..., D]`` hidden states, fp32 / fp16 / bf16 (fp64 for the torch impls).
        c: ``[V, D]`` classifier: the LM head or the tied embedding weight, same dtype as ``e``.
        targets: ``[...]`` (``e.shape[:-1]``) int64 in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` classifier bias (``c.dtype``).
        ignore_index: target value that contributes no loss and no gradient.
        reduction: ``"mean"`` (over non-ignored positions; NaN when none), ``"sum"`` or ``"none"`` (per position,
            ``targets.shape``, ``[..., T - 1]`` when ``shift``; zero at ignored positions).
        shift: predict ``targets[..., t + 1]`` from ``e[..., t, :]`` (Hugging Face causal-LM loss).
        filter_eps: gradient filtering threshold (§4.3), Triton only: ``"auto"`` = ``finfo(dtype).eps / 32``
            (2⁻¹² for bf16), a float ``>= 0``, or ``None`` for the exact gradient. The torch impls are always exact.
        vocab_sort: Triton only: order vocabulary tiles by average logit in the backward pass (§4.3).
        impl: ``"triton"`` (Cut Cross-Entropy kernels), ``"torch"`` (materialising reference) or
            ``"torch_chunked"`` (exact, chunked over tokens).
        chunk_size: tokens per chunk for ``"torch_chunked"`` (default: 256 MiB of fp32 logits per chunk).

    Returns:
        The loss in fp32 (fp64 for fp64 inputs): a scalar, or per position for ``reduction="none"``.
    """
    check_linear_cross_entropy_inputs(e, c, targets, bias, ignore_index, reduction, shift, impl)
    eps = resolve_filter_eps(filter_eps, e.dtype)
    if not isinstance(vocab_sort, bool):
        raise ValueError(f"vocab_sort must be a bool, got {vocab_sort!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    targets = targets.long()
    if impl == "torch":
        return linear_cross_entropy_ref(e, c, targets, bias, ignore_index, reduction, shift)
    if impl == "torch_chunked":
        return linear_cross_entropy_chunked(e, c, targets, bias, ignore_index, reduction, shift, chunk_size)
    from kernels.linear_cross_entropy.linear_cross_entropy_triton import INTERPRETED, linear_cross_entropy_triton

    if not (e.device.type == "cuda" or (e.device.type == "cpu" and INTERPRETED)):
        raise ValueError(f"e is on device '{e.device}', but impl='triton' needs a CUDA tensor, or CPU tensors with "
                         "TRITON_INTERPRET=1 set before the Triton module is imported; use impl='torch' instead")
    return linear_cross_entropy_triton(e, c, targets, bias, ignore_index, reduction, shift, eps, vocab_sort)


__all__ = [
    "IMPLS",
    "REDUCTIONS",
    "SUPPORTED_DTYPES",
    "causal_lm_loss",
    "check_linear_cross_entropy_inputs",
    "default_filter_eps",
    "linear_cross_entropy",
    "linear_cross_entropy_chunked",
    "linear_cross_entropy_ref",
    "resolve_filter_eps",
]
