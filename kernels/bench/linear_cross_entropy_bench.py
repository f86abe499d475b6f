"""Benchmark: linear cross-entropy (loss over a vocabulary from hidden states) — every implementation side by side.

Methods (same random bf16 inputs as ``shared/tools/gpu_cce_anchor.py``: ``e ~ N(0, 1)``, ``c ~ N(0, 1/D)``):

* ``cce_ours`` — :func:`kernels.linear_cross_entropy.linear_cross_entropy` ``impl="triton"`` (gradient filtering
  ``"auto"``, no vocabulary sorting: the official default).
* ``cce_ours_sorted`` — the same with ``vocab_sort=True``.
* ``cce_ours_exact`` — the same without gradient filtering (``filter_eps=None``; the paper's "no filter" ablation).
* ``cce_official`` — PyPI ``cut-cross-entropy`` (``cut_cross_entropy.linear_cross_entropy(..., impl="cce")``).
* ``liger`` — ``liger-kernel``'s ``LigerFusedLinearCrossEntropyLoss``.
* ``torch`` — ``F.cross_entropy((e @ c.T).float(), t)`` (the paper's baseline).
* ``torch_compile`` — ``torch.compile`` of the same function.
* ``torch_chunked`` — our exact token-chunked PyTorch version (TorchTune-style chunked baseline).

Passes: ``fw`` (loss with inputs requiring grad: what the forward keeps for backward counts), ``bw`` (backward
only; forward run untimed before each rep) and ``fw+bw``. Time: median of ``--reps`` CUDA-event timings after
``--warmup`` untimed calls. Memory: ``torch.cuda.max_memory_allocated()`` during the pass minus the memory allocated
before it (inputs excluded, gradients included). A method that is not installed is recorded as ``not installed``.
CPU ``--tiny``: Triton interpreter, tiny shapes, ``time.perf_counter``; memory is ``n/a``.

Usage::

    python -m kernels.bench.linear_cross_entropy_bench --device cuda --out reports/cut_cross_entropy_kernels
    python -m kernels.bench.linear_cross_entropy_bench --device cpu --tiny --out /tmp/cce_tiny
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import math
import platform
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kernels.bench import common


@dataclass(frozen=True)
class LossShape:
    """One classifier-head setting: ``N`` tokens, hidden size ``D``, vocabulary ``V``."""

    name: str
    n: int
    d: int
    v: int


SHAPES = {
    "gemma2-2b": LossShape("gemma2-2b", 8192, 2304, 256000),   # the paper's headline setting (Table 1)
    "smollm2-135m": LossShape("smollm2-135m", 8192, 576, 49152),
    "llama3-8b": LossShape("llama3-8b", 8192, 4096, 128256),
}
TINY_SHAPES = {"tiny": LossShape("tiny", 32, 32, 250)}
METHODS = ("cce_ours", "cce_ours_sorted", "cce_ours_exact", "cce_official", "liger", "torch", "torch_compile",
           "torch_chunked")
PASSES = ("fw", "bw", "fw+bw")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: The paper's A100 numbers for the Gemma-2 setting (Table 1; PyTorch 2.4.1): (ms, MB) per pass, for context.
PAPER_GEMMA2_A100 = {
    "cce": {"fw": (46.4, 1.1), "fw+bw": (134.8, 1164.0)},
    "torch": {"fw": (81.9, 24000.0), "fw+bw": (208.8, 28000.0)},
    "torch_compile": {"fw": (49.9, 4000.0), "fw+bw": (144.0, 16000.0)},
}


class NotInstalled(Exception):
    """An optional peer implementation is not importable."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common.BenchParser(__doc__.split("\n\n")[0], out="reports/cut_cross_entropy_kernels", reps=(20, 2),
                           warmup=(3, 1))
    p.add_argument("--shapes", nargs="+", default=None, help=f"subset of {tuple(SHAPES)} (tiny: 'tiny')")
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {METHODS}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    args = p.parse_bench_args(argv)
    table = TINY_SHAPES if args.tiny else SHAPES
    names = args.shapes or list(table)
    for n in names:
        if n not in table:
            raise ValueError(f"--shapes must be among {tuple(table)}, got {n!r}")
    args.shape_list = [table[n] for n in names]
    args.methods = args.methods or list(METHODS)
    for m in args.methods:
        if m not in METHODS:
            raise ValueError(f"--methods must be among {METHODS}, got {m!r}")
    common.check_device(args)
    if args.device == "cpu" and not args.tiny:
        raise ValueError("--device cpu runs only with --tiny (the Triton interpreter is 100-1000x slower)")
    return args


# ------------------------------------------------------------------------------------------------------ methods
def _baseline(e: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((e @ c.T).float(), t)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _make_method(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function of method ``name``; raises :class:`NotInstalled` for a missing optional package."""
    if name in ("cce_ours", "cce_ours_sorted", "cce_ours_exact"):
        from kernels.linear_cross_entropy import linear_cross_entropy

        sort = name == "cce_ours_sorted"
        eps = None if name == "cce_ours_exact" else "auto"
        return lambda e, c, t: linear_cross_entropy(e, c, t, impl="triton", vocab_sort=sort, filter_eps=eps)
    if name == "torch_chunked":
        from kernels.linear_cross_entropy import linear_cross_entropy

        return lambda e, c, t: linear_cross_entropy(e, c, t, impl="torch_chunked")
    if name == "torch":
        return _baseline
    if name == "torch_compile":
        return torch.compile(_baseline, dynamic=False)
    if name == "cce_official":
        try:
            from cut_cross_entropy import linear_cross_entropy as official
        except ImportError as err:
            raise NotInstalled(repr(err)) from err
        return lambda e, c, t: official(e, c, t, impl="cce")
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as err:
            raise NotInstalled(repr(err)) from err
        lig = LigerFusedLinearCrossEntropyLoss()
        return lambda e, c, t: lig(c, e, t)
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")


# ------------------------------------------------------------------------------------------------------ measuring
def _measure(fn: Callable, e: torch.Tensor, c: torch.Tensor, t: torch.Tensor, pass_: str, device: str, reps: int,
             warmup: int) -> tuple[float, float | None, float]:
    """(median ms, peak MiB above the pre-pass allocation or None on CPU, loss) of one pass."""

    def fwd() -> torch.Tensor:
        e.grad = c.grad = None
        return fn(e, c, t)

    def step() -> torch.Tensor:
        if pass_ == "fw":
            return fwd()
        loss = fwd()
        loss.backward()
        return loss

    for _ in range(warmup):
        loss = step()
        del loss
    common.sync(device)
    times: list[float] = []
    peaks: list[int] = []
    loss_val = math.nan
    for _ in range(reps):
        if pass_ == "bw":
            loss = fwd()
            common.sync(device)
            timed = common.time_call(loss.backward, device, memory=True)
        else:
            timed = common.time_call(step, device, memory=True)
            loss = timed.value
        times.append(timed.ms)
        if timed.peak_bytes is not None:
            peaks.append(timed.peak_bytes)
        loss_val = float(loss.detach().float())
        del loss, timed
    peak = statistics.median(peaks) / 2**20 if peaks else None
    return statistics.median(times), peak, loss_val


def _status(err: BaseException) -> str:
    if isinstance(err, NotInstalled):
        return "not installed"
    if common.is_oom(err):
        return "OOM"
    return common.error_status(err)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every (shape, method, pass); returns the JSON document."""
    device, dtype = args.device, DTYPES[args.dtype]
    rows: list[dict[str, Any]] = []
    cases = [(s, m) for s in args.shape_list for m in args.methods]
    fns: dict[str, Any] = {}
    for shape, method in common.progress(cases, "linear-CE bench"):
        g = torch.Generator(device=device).manual_seed(args.seed)
        e = torch.randn(shape.n, shape.d, device=device, dtype=dtype, generator=g).requires_grad_()
        c = (torch.randn(shape.v, shape.d, device=device, dtype=dtype, generator=g) / shape.d ** 0.5).requires_grad_()
        t = torch.randint(0, shape.v, (shape.n,), device=device, generator=g)
        try:
            if method not in fns:
                fns[method] = _make_method(method)
            fn: Any = fns[method]
        except Exception as err:  # noqa: BLE001 - a missing peer is a result, not a crash
            fn = err
        for pass_ in PASSES:
            row: dict[str, Any] = {"shape": shape.name, "N": shape.n, "D": shape.d, "V": shape.v, "method": method,
                                   "pass": pass_, "median_ms": None, "peak_MiB": None, "loss": None, "status": "ok"}
            if isinstance(fn, BaseException):
                row["status"] = _status(fn)
            else:
                try:
                    ms, mib, loss = _measure(fn, e, c, t, pass_, device, args.reps, args.warmup)
                    row.update(median_ms=round(ms, 3), peak_MiB=None if mib is None else round(mib, 1),
                               loss=round(loss, 5))
                except Exception as err:  # noqa: BLE001 - OOM / unsupported shape is recorded, the run goes on
                    row["status"] = _status(err)
            rows.append(row)
            e.grad = c.grad = None
            common.free(device)
        del e, c, t
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "triton_interpreter": device == "cpu",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cut-cross-entropy": _version("cut-cross-entropy"),
        "liger-kernel": _version("liger-kernel"),
        "dtype": args.dtype,
        "reps": args.reps,
        "warmup": args.warmup,
        "timing": "CUDA events, median" if device == "cuda" else "time.perf_counter, median",
        "memory": "torch.cuda.max_memory_allocated delta (MiB)" if device == "cuda" else "n/a",
        "paper_gemma2_a100": PAPER_GEMMA2_A100,
    }
    return {"meta": meta, "results": rows}


def _fmt(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def render_markdown(doc: dict[str, Any]) -> str:
    """One table per shape: a row per method, time and peak memory per pass."""
    meta, rows = doc["meta"], doc["results"]
    lines = [
        "# Linear cross-entropy kernels (Cut Cross-Entropy)", "",
        f"Device: {meta['device']} · torch {meta['torch']} · triton {meta['triton']} · cut-cross-entropy "
        f"{meta['cut-cross-entropy']} · liger-kernel {meta['liger-kernel']} · dtype {meta['dtype']} · "
        f"{meta['timing']} of {meta['reps']} reps · memory: {meta['memory']}", "",
        "Paper (A100, Gemma-2 2B, Table 1): CCE fw 46.4 ms / 1.1 MB, fw+bw 134.8 ms / 1164 MB; PyTorch fw 81.9 ms / "
        "24000 MB, fw+bw 208.8 ms / 28000 MB; torch.compile fw 49.9 ms / 4000 MB, fw+bw 144.0 ms / 16000 MB.", "",
    ]
    shapes: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        shapes.setdefault(r["shape"], []).append(r)
    for name, rs in shapes.items():
        n, d, v = rs[0]["N"], rs[0]["D"], rs[0]["V"]
        lines += [f"## {name} (N={n}, D={d}, V={v})", "",
                  "| method | fw ms | fw MiB | bw ms | bw MiB | fw+bw ms | fw+bw MiB | loss | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        by_method: dict[str, dict[str, dict[str, Any]]] = {}
        for r in rs:
            by_method.setdefault(r["method"], {})[r["pass"]] = r
        for method, ps in by_method.items():
            cells = []
            for p in PASSES:
                r = ps.get(p, {})
                cells += [_fmt(r.get("median_ms")), _fmt(r.get("peak_MiB"), 1)]
            loss = next((ps[p]["loss"] for p in PASSES if p in ps and ps[p]["loss"] is not None), None)
            statuses = sorted({ps[p]["status"] for p in PASSES if p in ps})
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_fmt(loss, 4)} | {'; '.join(statuses)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point: measure, then write ``<out>.json`` and ``<out>.md``; returns the JSON document."""
    args = _parse_args(argv)
    common.use_interpreter_on_cpu(args.device)
    doc = run(args)
    common.write_reports(args.out, doc, render_markdown(doc), sort_keys=False)
    return doc


if __name__ == "__main__":
    main()
