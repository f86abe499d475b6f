"""Compile the Cut Cross-Entropy Triton kernels ahead of time for a CUDA target, without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) checks numerics but runs every dot in fp32 (``MODE=1``), so the native
fp16/bf16 path (``MODE=0``) and GPU code generation are never exercised on a CPU machine. This tool lowers every
kernel variant that :func:`kernels.linear_cross_entropy.linear_cross_entropy` launches on a GPU through Triton's
full pipeline down to a cubin (``ptxas`` ships in the triton wheel) and prints shared memory and, with
``cuobjdump``, registers/spills. Run it WITHOUT ``TRITON_INTERPRET``::

    python -m kernels.linear_cross_entropy.aot_check --arch 90
"""
from __future__ import annotations

import sys
from typing import Any

from kernels import aot

_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_UNIT_STRIDES = ("stride_ed", "stride_cd", "stride_ded", "stride_dcd")
_DIV16 = ("stride_en", "stride_cv", "stride_den", "stride_dcv", "D", "M", "V")


def _absent(**present: bool) -> dict[str, None]:
    """``None`` constexprs for the optional pointer arguments that a variant does not pass."""
    return {name: None for name, on in present.items() if not on}


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")) -> list[dict[str, Any]]:
    """Compile every launched variant for ``sm_<arch>`` with the GPU block configs; raises on the first error."""
    compiler = aot.AotCompiler(arch, usage_fields=3)  # REG / STACK (> 0: spills) / SHARED

    from kernels.linear_cross_entropy import linear_cross_entropy_triton as lce

    def build(fn, types: dict[str, str], consts: dict[str, Any], tag: str, num_warps: int, num_stages: int) -> None:
        # As the JIT specialises a real launch: unit inner strides become constants, and pointers, row strides and
        # sizes that are multiples of 16 (every shape of the benchmark) carry tt.divisibility=16 — without these
        # hints Triton neither vectorises nor pipelines the loads and the report would be meaningless.
        consts = {name: 1 for name in _UNIT_STRIDES if name in fn.arg_names} | consts
        sig = aot.signature(fn, types, consts)
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name not in consts and (sig[name].startswith("*") or name in _DIV16)}
        compiler.build(fn, types, consts, tag, num_warps, num_stages, attrs=attrs)

    for dt in dtypes:
        ptr = _PTR[dt]
        mode = 1 if dt == "fp32" else 0
        fw, bw = (lce.GPU_FORWARD_FP32, lce.GPU_BACKWARD_FP32) if dt == "fp32" else (lce.GPU_FORWARD, lce.GPU_BACKWARD)
        variants = [(b, s, False) for b in (False, True) for s in (False, True)] + [(False, True, True)]
        for has_bias, sort, cap in variants:
            types = {"E": ptr, "C": ptr, "Bias": ptr, "Rows": "*i64", "Tgt": "*i64", "MaxPart": "*fp32",
                     "SumPart": "*fp32", "TgtPart": "*fp32", "LogitSum": "*fp32", "stride_ed": "i32",
                     "stride_cd": "i32", "softcap": "fp32"}
            consts: dict[str, Any] = dict(BLOCK_N=fw.block_n, BLOCK_V=fw.block_v, BLOCK_D=fw.block_d,
                                          HAS_BIAS=has_bias, SUM_LOGITS=sort, HAS_SOFTCAP=cap, MODE=mode)
            consts |= _absent(Bias=has_bias, LogitSum=sort)
            build(lce._lse_forward_kernel, types, consts, f"{dt} bias={has_bias} sum_logits={sort} softcap={cap}",
                  fw.num_warps, fw.num_stages)
            types = {"E": ptr, "C": ptr, "Bias": ptr, "Rows": "*i64", "Tgt": "*i64", "Lse": "*fp32",
                     "TgtD": "*fp32", "G": "*fp32", "Order": "*i32", "DE": "*fp32", "DC": "*fp32", "DBias": "*fp32",
                     "Counter": "*i32", "filter_eps": "fp32", "softcap": "fp32"}
            consts = dict(BLOCK_N=bw.block_n, BLOCK_V=bw.block_v, BLOCK_D=bw.block_d, HAS_BIAS=has_bias,
                          HAS_ORDER=sort, COMPUTE_DE=True, COMPUTE_DC=True, COMPUTE_DBIAS=has_bias,
                          HAS_COUNTER=False, HAS_SOFTCAP=cap, MODE=mode)
            consts |= _absent(Bias=has_bias, Order=sort)
            build(lce._lse_backward_kernel, types, consts, f"{dt} bias={has_bias} order={sort} softcap={cap}",
                  bw.num_warps, bw.num_stages)
    return compiler.report


def main(argv: list[str] | None = None) -> int:
    return aot.main(argv, __doc__.split("\n\n")[0], compile_all, ("bf16", "fp16", "fp32"), (22, 34))


if __name__ == "__main__":
    sys.exit(main())
