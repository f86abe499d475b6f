"""Compile the CSKV Triton kernels ahead of time for a CUDA target, without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) checks numerics but not GPU code generation: it accepts things the
compiler rejects (non-constexpr globals, dot shapes below 16, ...). This tool lowers every kernel variant the
dispatchers launch through Triton's full pipeline down to a cubin with the ``ptxas`` bundled in the triton wheel,
and prints shared memory (and, with ``cuobjdump``, registers/spills) per variant. Run it WITHOUT
``TRITON_INTERPRET``::

    python -m kernels.latent_attention.aot_check --arch 90
"""
from __future__ import annotations

import sys
from typing import Any

from kernels import aot

_TYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32")) -> list[dict[str, Any]]:
    """Compile every launched kernel variant for ``sm_<arch>``; raises on the first compile error."""
    compiler = aot.AotCompiler(arch, usage_fields=2)  # REG / STACK
    import triton.language as tl

    from kernels.latent_attention import latent_attention_triton as lat
    from kernels.quant import quant_triton as qt

    tl_dtype = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
    build = compiler.build

    for dt in dtypes:
        ptr = f"*{_TYPES[dt]}"
        qtypes = {"x_ptr": ptr, "packed_ptr": "*u8", "scale_ptr": ptr, "zero_ptr": ptr}
        build(qt._quantize_channel_groups_kernel, qtypes, dict(GROUP=64, BLOCK_ROWS=64, BLOCK_PAIRS=32), dt, 4, 1)
        build(qt._quantize_token_groups_kernel, qtypes, dict(GROUP=32, BLOCK_TOK=32, BLOCK_PAIRS=32), dt, 4, 1)
        build(qt._dequantize_kernel, {"packed_ptr": "*u8", "scale_ptr": ptr, "zero_ptr": ptr, "out_ptr": ptr},
              dict(ROW_DIV=32, COL_DIV=1, BLOCK_ROWS=64, BLOCK_PAIRS=32), dt, 4, 1)
        mode = 1 if dt == "fp32" else 0
        dot = tl.float32 if mode else tl_dtype[dt]
        for int4 in (False, True):
            r = 64
            types = {"q_ptr": ptr, "lk_ptr": "*u8" if int4 else ptr, "ksc_ptr": ptr, "kzp_ptr": ptr,
                     "lv_ptr": "*u8" if int4 else ptr, "vsc_ptr": ptr, "vzp_ptr": ptr, "bk_ptr": ptr,
                     "cos_ptr": ptr, "sin_ptr": ptr, "mask_ptr": "*u8", "m_ptr": "*fp32", "l_ptr": "*fp32",
                     "o_ptr": "*fp32", "qk_scale": "fp32"}
            block_r = r // 2 if int4 else r
            consts = dict(G=4, D=128, RK=r, RV=r, K_INT4=int4, V_INT4=int4, K_ROW_DIV=32 if int4 else 1, K_COL_DIV=1,
                          V_ROW_DIV=1, V_COL_DIV=r if int4 else 1, HAS_MASK=True, MODE=mode, LOW=tl_dtype[dt],
                          DOT=dot, BLOCK_G=16, BLOCK_T=32, BLOCK_DH=64, BLOCK_RK=block_r, BLOCK_RV=block_r)
            build(lat._latent_split_kernel, types, consts, f"{dt} {'int4' if int4 else 'float'} latents", 8, 2)
        ctypes = {"q_ptr": ptr, "wk_ptr": ptr, "wv_ptr": ptr, "wmask_ptr": "*u8", "bv_ptr": ptr, "m_ptr": "*fp32",
                  "l_ptr": "*fp32", "o_ptr": "*fp32", "out_ptr": ptr, "qk_scale": "fp32"}
        build(lat._latent_combine_kernel, ctypes,
              dict(G=4, D=128, RV=64, HAS_WMASK=True, MODE=mode, DOT=dot, BLOCK_G=16, BLOCK_W=16, BLOCK_D=128,
                   BLOCK_RV=64), dt, 8, 1)
    return compiler.report


def main(argv: list[str] | None = None) -> int:
    return aot.main(argv, __doc__.split("\n\n")[0], compile_all, ("fp16", "bf16", "fp32"), (34, 22))


if __name__ == "__main__":
    sys.exit(main())
