"""4-bit asymmetric min-max quantization (CSKV/KIVI quantizer): ``impl="torch"`` (the spec) or ``impl="triton"``.

Layout of :class:`Int4Tensor` and the equations: see :mod:`kernels.quant.quant_ref`. The Triton module is imported
lazily, on the first ``impl="triton"`` call, so ``TRITON_INTERPRET=1`` may be set any time before that call.
"""
from __future__ import annotations

from torch import Tensor

from kernels.quant import quant_ref
from kernels.quant.quant_ref import (
    SCHEMES,
    STES,
    Int4Tensor,
    _FakeQuantSTE,
    cat_int4_tokens,
    check_int4_tensor,
    check_quantize_inputs,
    check_scheme,
    check_ste,
    clip_mask,
    head_group_size,
    quant_error,
)

IMPLS = ("torch", "triton")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _check_official_impl(scheme: str, impl: str) -> None:
    check_scheme(scheme)
    if scheme == "official" and impl != "torch":
        raise ValueError(f"scheme='official' (the CSKV code's integer zero point) is implemented only with "
                         f"impl='torch', got impl={impl!r}")


def quantize_int4(x: Tensor, group_size: int, axis: int = -1, impl: str = "torch",
                  scheme: str = "reprise") -> Int4Tensor:
    """Quantize ``x [..., T, C]`` to packed 4-bit codes + per-group (scale, zero) (Eqs. Q1–Q3, quant_ref).

    ``axis=-2``: stats per channel over ``group_size`` consecutive tokens (CSKV keys, group 32);
    ``axis=-1``: stats per token over ``group_size`` consecutive channels (CSKV values; ``group_size=C`` = row;
    the official code's per-head groups: ``head_group_size(r, n_kv)``).
    ``scheme``: ``"reprise"`` (zero = min; default) or ``"official"`` (integer zero point clamped to [0, 15], Eqs.
    O1–O3 of quant_ref; ``impl="torch"`` only — ``"triton"`` raises ``ValueError``).
    """
    _check_impl(impl)
    _check_official_impl(scheme, impl)
    if impl == "torch":
        return quant_ref.quantize_int4(x, group_size, axis, scheme)
    from kernels.quant.quant_triton import quantize_int4_triton

    return quantize_int4_triton(x, group_size, axis)


def dequantize_int4(q: Int4Tensor, impl: str = "torch") -> Tensor:
    """``x̂ = code * scale + zero`` (Eq. Q4) in ``q.dtype``."""
    _check_impl(impl)
    if impl == "torch":
        return quant_ref.dequantize_int4(q)
    from kernels.quant.quant_triton import dequantize_int4_triton

    return dequantize_int4_triton(q)


def fake_quant_int4(x: Tensor, group_size: int, axis: int = -1, impl: str = "torch", scheme: str = "reprise",
                    ste: str = "identity") -> Tensor:
    """QAT fake quantization (CSKV §3.3): ``dequantize(quantize(x))`` forward; STE backward, ``ste="identity"``
    (∂x̂/∂x := I, default) or ``"clipped"`` (the official code's: zero where x is at/outside the representable range).
    ``scheme="official"`` runs the official forward op for op (bit-exact; ``impl="torch"`` only)."""
    _check_impl(impl)
    _check_official_impl(scheme, impl)
    check_ste(ste)
    if impl == "torch":
        return quant_ref.fake_quant_int4(x, group_size, axis, scheme, ste)
    axis = check_quantize_inputs(x, group_size, axis)
    mask_fn = (lambda t: clip_mask(t, group_size, axis, scheme)) if ste == "clipped" else None
    return _FakeQuantSTE.apply(x, lambda t: dequantize_int4(quantize_int4(t, group_size, axis, impl=impl), impl=impl),
                               mask_fn)


__all__ = [
    "Int4Tensor",
    "quantize_int4",
    "dequantize_int4",
    "fake_quant_int4",
    "cat_int4_tokens",
    "check_int4_tensor",
    "clip_mask",
    "head_group_size",
    "quant_error",
    "IMPLS",
    "SCHEMES",
    "STES",
]
