"""Linear cross-entropy without materialising logits (Cut Cross-Entropy, arXiv 2411.09009).

``impl="triton"`` runs the Cut Cross-Entropy kernels (:mod:`.linear_cross_entropy_triton`, imported lazily on the
first call, so ``TRITON_INTERPRET=1`` may be set any time before it); ``"torch"`` is the materialising reference
(the spec, :mod:`.linear_cross_entropy_ref`) and ``"torch_chunked"`` its token-chunked variant (exact by default;
with a numeric ``filter_eps`` it applies the Triton kernel's gradient filter, so filtering runs on the CPU at real
shapes). :func:`gradient_filter_stats` counts the tiles the filter keeps. :func:`causal_lm_loss` plugs it into a
Hugging Face causal LM as a drop-in loss (picking up Gemma's ``final_logit_softcapping``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.linear_cross_entropy.causal_lm import causal_lm_loss
from kernels.linear_cross_entropy.linear_cross_entropy_ref import (
    REDUCTIONS,
    apply_softcap,
    default_filter_block,
    default_filter_eps,
    filter_stats_chunked,
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


#: impls that implement gradient filtering (a numeric ``filter_eps``).
FILTER_IMPLS = ("triton", "torch_chunked")


def resolve_filter_eps(filter_eps: str | float | None, dtype: torch.dtype, impl: str = "triton") -> float | None:
    """``"auto"`` -> ``finfo(dtype).eps / 32`` (2⁻¹² for bf16, §4.3) for ``impl="triton"`` and ``None`` (exact) for
    the torch impls; a number -> itself; ``None`` -> no filtering.

    Raises ``ValueError`` for anything else, a negative / non-finite number, or a number ``> 0`` for ``impl="torch"``
    (the materialising reference does not filter; ``0`` filters nothing and is accepted).
    """
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be 'auto', None or a finite float >= 0, got {filter_eps!r}")
        return default_filter_eps(dtype) if impl == "triton" else None
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)) or not math.isfinite(filter_eps) \
            or filter_eps < 0:
        raise ValueError(f"filter_eps must be 'auto', None or a finite float >= 0, got {filter_eps!r}")
    if impl not in FILTER_IMPLS and filter_eps > 0:
        raise ValueError(f"filter_eps={filter_eps!r} needs impl in {FILTER_IMPLS} (impl={impl!r} is always exact; "
                         "pass 'auto', None or 0)")
    return float(filter_eps)


def check_softcap(softcap: object) -> None:
    """``softcap`` must be None or a finite number > 0 (``ValueError`` otherwise)."""
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) \
            or softcap <= 0:
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")


def check_filter_block(filter_block: object, impl: str) -> None:
    """``filter_block`` must be None or ``(block_n, block_v)`` ints >= 1 (Triton: powers of two >= 16)."""
    if filter_block is None:
        return
    ok = isinstance(filter_block, (tuple, list)) and len(filter_block) == 2 and all(
        isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in filter_block)
    if ok and impl == "triton":
        ok = all(b >= 16 and b & (b - 1) == 0 for b in filter_block)
    if not ok:
        need = "powers of two >= 16" if impl == "triton" else "ints >= 1"
        raise ValueError(f"filter_block must be None or (block_n, block_v), {need}, for impl={impl!r}, "
                         f"got {filter_block!r}")


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
                         impl: str = "triton", chunk_size: int | None = None, *, softcap: float | None = None,
                         filter_block: tuple[int, int] | None = None) -> Tensor:
    """Cross-entropy of ``logits = e @ cᵀ + bias`` against ``targets``, without materialising the logits.

    ``loss_i = logsumexp_v(z_iv) − z_{i,y_i}`` with ``z_i = C e_i + b`` (Eq. (L)); gradients ``∇E = (S − Y) C``,
    ``∇C = (S − Y)ᵀ E``, ``∇b = Σ_i (S − Y)_i`` (Eqs. (G)). With ``softcap = s``: ``z' = s · tanh(z / s)`` replaces
    ``z`` in (L), and (G) uses ``(S − Y) ⊙ (1 − (z' / s)²)``.

    Args:
        e: ``[..., D]`` hidden states, fp32 / fp16 / bf16 (fp64 for the torch impls).
        c: ``[V, D]`` classifier: the LM head or the tied embedding weight, same dtype as ``e``.
        targets: ``[...]`` (``e.shape[:-1]``) int64 in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` classifier bias (``c.dtype``).
        ignore_index: target value that contributes no loss and no gradient.
        reduction: ``"mean"`` (over non-ignored positions; NaN when none), ``"sum"`` or ``"none"`` (per position,
            ``targets.shape``, ``[..., T - 1]`` when ``shift``; zero at ignored positions).
        shift: predict ``targets[..., t + 1]`` from ``e[..., t, :]`` (Hugging Face causal-LM loss).
        filter_eps: gradient filtering threshold (§4.3): drop a ``filter_block`` tile of ``S − Y`` whose entries
            all have ``|S − Y| < filter_eps`` (the official rule). ``"auto"`` (default) = ``finfo(dtype).eps / 32``
            (2⁻¹² for bf16) for ``impl="triton"`` and exact for the torch impls; a float ``>= 0`` filters with
            ``"triton"`` and ``"torch_chunked"`` (``impl="torch"`` accepts only 0); ``None``: exact gradient.
        vocab_sort: with filtering, order vocabulary tiles by descending average logit in the backward pass (§4.3)
            (``"triton"``, ``"torch_chunked"``); no effect on an exact gradient.
        impl: ``"triton"`` (Cut Cross-Entropy kernels), ``"torch"`` (materialising reference) or
            ``"torch_chunked"`` (chunked over tokens).
        chunk_size: tokens per chunk for ``"torch_chunked"`` (default: 256 MiB of fp32 logits per chunk; rounded
            to a multiple of ``block_n`` when filtering).
        softcap: final-logit soft-cap (Gemma 2 ``final_logit_softcapping``), a finite float ``> 0`` or None.
        filter_block: ``(block_n, block_v)`` filter tile. None: for ``"torch_chunked"``
            :func:`default_filter_block` (the Triton backward tile on a GPU: 128×128 for fp16/bf16, 64×64 fp32);
            for ``"triton"`` the kernel's backward config (16×32 under the CPU interpreter). Given, it sets the
            Triton backward tile too (powers of two >= 16).

    Returns:
        The loss in fp32 (fp64 for fp64 inputs): a scalar, or per position for ``reduction="none"``.
    """
    check_linear_cross_entropy_inputs(e, c, targets, bias, ignore_index, reduction, shift, impl)
    eps = resolve_filter_eps(filter_eps, e.dtype, impl)
    check_softcap(softcap)
    check_filter_block(filter_block, impl)
    softcap = None if softcap is None else float(softcap)
    if not isinstance(vocab_sort, bool):
        raise ValueError(f"vocab_sort must be a bool, got {vocab_sort!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    targets = targets.long()
    if impl == "torch":
        return linear_cross_entropy_ref(e, c, targets, bias, ignore_index, reduction, shift, softcap)
    if impl == "torch_chunked":
        return linear_cross_entropy_chunked(e, c, targets, bias, ignore_index, reduction, shift, chunk_size, softcap,
                                            eps, None if filter_block is None else tuple(filter_block), vocab_sort)
    from kernels.linear_cross_entropy.linear_cross_entropy_triton import (
        INTERPRETED,
        BlockConfig,
        TritonOptions,
        default_config,
        linear_cross_entropy_triton,
    )

    if not (e.device.type == "cuda" or (e.device.type == "cpu" and INTERPRETED)):
        raise ValueError(f"e is on device '{e.device}', but impl='triton' needs a CUDA tensor, or CPU tensors with "
                         "TRITON_INTERPRET=1 set before the Triton module is imported; use impl='torch' instead")
    options = None
    if filter_block is not None:
        base = default_config("backward", e.dtype)
        options = TritonOptions(backward_config=BlockConfig(filter_block[0], filter_block[1], base.block_d,
                                                            base.num_warps, base.num_stages))
    return linear_cross_entropy_triton(e, c, targets, bias, ignore_index, reduction, shift, eps, vocab_sort, options,
                                       softcap)


def gradient_filter_stats(e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                          ignore_index: int = -100, shift: bool = False, softcap: float | None = None,
                          filter_eps: str | float = "auto", filter_block: tuple[int, int] | None = None,
                          vocab_sort: bool = False, chunk_size: int | None = None) -> dict:
    """Tiles of ``S − Y`` that the gradient filter keeps, counted chunk-wise (never ``N×V`` at once).

    ``blocks_kept`` is the number of ``filter_block`` tiles (default :func:`default_filter_block`) over (valid tokens
    × vocabulary, sorted when ``vocab_sort``) with ``max |S − Y| >= filter_eps`` (``"auto"``:
    ``finfo(e.dtype).eps / 32``) — the tiles the filtered backward (Triton or ``torch_chunked``) computes.

    Returns ``{"blocks_total", "blocks_kept", "fraction_kept", "tokens", "vocab", "filter_eps", "block_n",
    "block_v", "vocab_sort"}``.
    """
    check_linear_cross_entropy_inputs(e, c, targets, bias, ignore_index, "mean", shift, "torch_chunked")
    eps = resolve_filter_eps(filter_eps, e.dtype, "triton")
    if eps is None:
        raise ValueError("filter_eps must be 'auto' or a finite float >= 0 for gradient_filter_stats, got None")
    check_softcap(softcap)
    check_filter_block(filter_block, "torch_chunked")
    if not isinstance(vocab_sort, bool):
        raise ValueError(f"vocab_sort must be a bool, got {vocab_sort!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    return filter_stats_chunked(e, c, targets.long(), bias, ignore_index=ignore_index, shift=shift,
                                softcap=None if softcap is None else float(softcap), filter_eps=eps,
                                filter_block=None if filter_block is None else tuple(filter_block),
                                vocab_sort=vocab_sort, chunk_size=chunk_size)


__all__ = [
    "FILTER_IMPLS",
    "IMPLS",
    "REDUCTIONS",
    "SUPPORTED_DTYPES",
    "apply_softcap",
    "causal_lm_loss",
    "check_filter_block",
    "check_linear_cross_entropy_inputs",
    "check_softcap",
    "default_filter_block",
    "default_filter_eps",
    "gradient_filter_stats",
    "linear_cross_entropy",
    "linear_cross_entropy_chunked",
    "linear_cross_entropy_ref",
    "resolve_filter_eps",
]
