"""4-bit asymmetric min-max quantization (CSKV/KIVI quantizer): ``impl="torch"`` (the spec) or ``impl="triton"``.

Layout of :class:`Int4Tensor` and the equations: see :mod:`kernels.quant.quant_ref`. The Triton module is imported
lazily, on the first ``impl="triton"`` call, so ``TRITON_INTERPRET=1`` may be set any time before that call.
"""
from __future__ import annotations

from torch import Tensor

from kernels.quant import quant_ref
from kernels.quant.quant_ref import (
    Int4Tensor,
    _FakeQuantSTE,
    cat_int4_tokens,
    check_int4_tensor,
    check_quantize_inputs,
)

IMPLS = ("torch", "triton")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def quantize_int4(x: Tensor, group_size: int, axis: int = -1, impl: str = "torch") -> Int4Tensor:
    """Quantize ``x [..., T, C]`` to packed 4-bit codes + per-group (scale, zero) (Eqs. Q1–Q3, quant_ref).

    ``axis=-2``: stats per channel over ``group_size`` consecutive tokens (CSKV keys, group 32);
    ``axis=-1``: stats per token over ``group_size`` consecutive channels (CSKV values; ``group_size=C`` = row).
    """
    _check_impl(impl)
    if impl == "torch":
        return quant_ref.quantize_int4(x, group_size, axis)
    from kernels.quant.quant_triton import quantize_int4_triton

    return quantize_int4_triton(x, group_size, axis)


def dequantize_int4(q: Int4Tensor, impl: str = "torch") -> Tensor:
    """``x̂ = code * scale + zero`` (Eq. Q4) in ``q.dtype``."""
    _check_impl(impl)
    if impl == "torch":
        return quant_ref.dequantize_int4(q)
    from kernels.quant.quant_triton import dequantize_int4_triton

    return dequantize_int4_triton(q)


def fake_quant_int4(x: Tensor, group_size: int, axis: int = -1, impl: str = "torch") -> Tensor:
    """QAT fake quantization (CSKV §3.3): ``dequantize(quantize(x))`` forward, identity gradient (STE) backward."""
    _check_impl(impl)
    check_quantize_inputs(x, group_size, axis)
    return _FakeQuantSTE.apply(x, group_size, axis,
                               lambda t, g, a: quantize_int4(t, g, a, impl=impl),
                               lambda q: dequantize_int4(q, impl=impl))


__all__ = [
    "Int4Tensor",
    "quantize_int4",
    "dequantize_int4",
    "fake_quant_int4",
    "cat_int4_tokens",
    "check_int4_tensor",
    "IMPLS",
]
