"""Ahead-of-time compilation of Triton kernels for a CUDA target, without a GPU (shared by the ``aot_check`` tools).

The CPU interpreter (``TRITON_INTERPRET=1``) checks numerics but not GPU code generation. :class:`AotCompiler` lowers
one kernel variant at a time through Triton's full pipeline down to a cubin with the ``ptxas`` bundled in the triton
wheel and records its shared memory and (with the bundled ``cuobjdump``) register usage; :func:`main` is the common
command line of the per-kernel ``aot_check`` modules. Nothing here imports triton at module import time.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from typing import Any, Callable, Sequence


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin: bytes, fields: int = 3) -> str:
    """The first ``fields`` entries of ``cuobjdump -res-usage`` (``REG:<n> STACK:<n> SHARED:<n>``; STACK > 0 means
    spills); ``""`` without a cubin or without the bundled ``cuobjdump``."""
    tool = _nvidia_tool("cuobjdump")
    if not cubin or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=False).stdout
    finally:
        os.unlink(path)
    lines = [ln.strip() for ln in out.splitlines() if "REG:" in ln]
    return " ".join(lines[0].split()[:fields]) if lines else ""


def signature(fn: Any, types: dict[str, str], consts: dict[str, Any]) -> dict[str, str]:
    """Triton signature of ``fn``: ``"constexpr"`` for the names in ``consts``, ``types[name]`` else ``"i32"``."""
    return {name: ("constexpr" if name in consts else types.get(name, "i32")) for name in fn.arg_names}


class AotCompiler:
    """Compiles kernel variants for ``sm_<arch>`` and collects one report row per variant in :attr:`report`.

    Raises on construction under ``TRITON_INTERPRET=1`` (the interpreter replaces ``@triton.jit`` kernels) and on
    the first compile error.
    """

    def __init__(self, arch: int = 90, usage_fields: int = 3) -> None:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces @triton.jit kernels")
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.usage_fields = usage_fields
        self.report: list[dict[str, Any]] = []

    def build(self, fn: Any, types: dict[str, str], consts: dict[str, Any], tag: str, num_warps: int,
              num_stages: int, attrs: dict[tuple[int, ...], list] | None = None) -> None:
        """Compile ``fn`` with argument ``types`` (default ``i32``) and constexprs ``consts``; ``tag`` names the
        variant in the report."""
        import triton
        from triton.compiler import ASTSource

        src = ASTSource(fn, signature(fn, types, consts), constexprs=consts, attrs=attrs)
        kernel = triton.compile(src, target=self.target, options=dict(num_warps=num_warps, num_stages=num_stages))
        self.report.append(dict(kernel=fn.__name__, variant=tag, shared_bytes=kernel.metadata.shared,
                                usage=resource_usage(kernel.asm.get("cubin", b""), self.usage_fields)))


def main(argv: list[str] | None, description: str, compile_all: Callable[[int, tuple[str, ...]], list[dict[str, Any]]],
         dtypes: Sequence[str], widths: tuple[int, int]) -> int:
    """Command line of an ``aot_check`` module: ``--arch`` / ``--dtypes`` (default and choices: ``dtypes``), then one
    line per compiled variant (kernel and variant columns ``widths`` wide)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100)")
    p.add_argument("--dtypes", nargs="+", default=list(dtypes), choices=sorted(dtypes))
    args = p.parse_args(argv)
    kw, vw = widths
    for row in compile_all(args.arch, tuple(args.dtypes)):
        print(f"{row['kernel']:{kw}s} {row['variant']:{vw}s} shared={row['shared_bytes']:>7d} {row['usage']}")
    return 0
