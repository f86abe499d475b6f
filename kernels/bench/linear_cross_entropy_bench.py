"""Benchmark: linear cross-entropy (loss over a vocabulary from hidden states) — every implementation side by side.

Methods, in fair pairs (ours vs the official ``cut-cross-entropy`` with the same filtering/sorting setting):

* ``cce_ours`` — :func:`kernels.linear_cross_entropy.linear_cross_entropy` ``impl="triton"``, gradient filtering
  ``"auto"`` (``finfo(dtype).eps / 32``) **with** vocabulary sorting: the official default. Pairs with
  ``cce_official``.
* ``cce_official`` — PyPI ``cut-cross-entropy`` ``linear_cross_entropy(..., impl="cce")`` with its defaults: in
  25.1.1 ``filter_eps="high"`` (= ``eps / 32``) and, whenever it filters, vocabulary sorting (its forward returns the
  average logits and the backward sorts by them).
* ``cce_ours_unsorted`` — ``cce_ours`` without vocabulary sorting (filtering only; the official code has no
  filtered-unsorted setting).
* ``cce_ours_exact`` — no filtering (``filter_eps=None``; the paper's "no filter" ablation). Pairs with
  ``cce_official_exact`` (official ``filter_eps=None``, which also turns its sorting off).
* ``liger`` — ``liger-kernel``'s ``LigerFusedLinearCrossEntropyLoss``.
* ``torch`` — ``F.cross_entropy((e @ c.T).float(), t)`` (the paper's baseline; soft-capped when the shape has a cap).
* ``torch_compile`` — ``torch.compile`` of the same function.
* ``torch_chunked`` — our exact token-chunked PyTorch version (TorchTune-style chunked baseline).

Shapes: Gemma 3 270M (``D=640``, ``V=262144``) at ``N=8192`` and ``16384`` tokens, the paper's Gemma 2 2B setting
(``N=8192``, ``D=2304``, ``V=256000``; Table 1) without and with Gemma 2's final-logit soft-cap (30), and, on request,
SmolLM2-135M and Llama-3-8B heads.

Inputs (``--inputs``): ``random`` — ``e ~ N(0, 1)``, ``c ~ N(0, 1/D)`` (as ``shared/tools/gpu_cce_anchor.py``): a
near-uniform softmax, so gradient filtering skips almost nothing; ``peaked`` (default) — ``e_i = α c_{y_i} + N(0, 1)``
with ``α`` found by bisection so that the fraction of ``S − Y`` tiles kept by the filter (unsorted, the kernel's
backward tile, ``eps / 32``; :func:`kernels.linear_cross_entropy.gradient_filter_stats` on the first 1024 tokens)
equals ``--kept-fraction``. Its default, 0.51, is a realistic proxy: Gemma 3 270M (the project's Q4_K_M weights,
dequantized) on 1023 tokens of this repository's README, bf16, 128×128 tiles, kept 51.2 % of tiles unsorted (25.3 %
sorted). Replace it with the fraction measured on the paper stage's real data when available. Each row records the
kept fraction of its inputs (unsorted and sorted) and ``α``.

Passes: ``fw`` (loss with inputs requiring grad: what the forward keeps for backward counts), ``bw`` (backward
only; forward run untimed before each rep) and ``fw+bw``. Time: median of ``--reps`` CUDA-event timings after
``--warmup`` untimed calls. Memory: ``torch.cuda.max_memory_allocated()`` during the pass minus the memory allocated
before it (inputs excluded, gradients included). A method that is not installed is recorded as ``not installed``; a
case reached after ``--time-budget-s`` is recorded as ``skipped: time budget`` (the default keeps
``python -m kernels.bench`` under 8 minutes on an H100). CPU ``--tiny``: Triton interpreter, tiny shapes,
``time.perf_counter``; memory is ``n/a``; ``torch_compile`` is left out unless asked for.

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
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kernels.bench import common


@dataclass(frozen=True)
class LossShape:
    """One classifier-head setting: ``N`` tokens, hidden size ``D``, vocabulary ``V``, optional logit soft-cap."""

    name: str
    n: int
    d: int
    v: int
    softcap: float | None = None


SHAPES = {
    "gemma3-270m-8k": LossShape("gemma3-270m-8k", 8192, 640, 262144),
    "gemma3-270m-16k": LossShape("gemma3-270m-16k", 16384, 640, 262144),
    "gemma2-2b": LossShape("gemma2-2b", 8192, 2304, 256000),   # the paper's headline setting (Table 1)
    "gemma2-2b-softcap": LossShape("gemma2-2b-softcap", 8192, 2304, 256000, softcap=30.0),
    "smollm2-135m": LossShape("smollm2-135m", 8192, 576, 49152),
    "llama3-8b": LossShape("llama3-8b", 8192, 4096, 128256),
}
DEFAULT_SHAPES = ("gemma3-270m-8k", "gemma3-270m-16k", "gemma2-2b", "gemma2-2b-softcap")
TINY_SHAPES = {"tiny": LossShape("tiny", 32, 32, 250), "tiny-softcap": LossShape("tiny-softcap", 32, 32, 250, 20.0)}
METHODS = ("cce_ours", "cce_official", "cce_ours_unsorted", "cce_ours_exact", "cce_official_exact", "liger", "torch",
           "torch_compile", "torch_chunked")
PASSES = ("fw", "bw", "fw+bw")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INPUTS = ("peaked", "random")
#: Default ``--kept-fraction``: Gemma 3 270M on 1023 README tokens, bf16, 128×128 tiles, unsorted (see docstring).
DEFAULT_KEPT_FRACTION = 0.51
#: The paper's A100 numbers for the Gemma-2 setting (Table 1; PyTorch 2.4.1): (ms, MB) per pass, for context.
PAPER_GEMMA2_A100 = {
    "cce": {"fw": (46.4, 1.1), "fw+bw": (134.8, 1164.0)},
    "torch": {"fw": (81.9, 24000.0), "fw+bw": (208.8, 28000.0)},
    "torch_compile": {"fw": (49.9, 4000.0), "fw+bw": (144.0, 16000.0)},
}


class NotInstalled(Exception):
    """An optional peer implementation is not importable."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common.BenchParser(__doc__.split("\n\n")[0], out="reports/cut_cross_entropy_kernels", reps=(10, 1),
                           warmup=(2, 0))
    p.add_argument("--shapes", nargs="+", default=None,
                   help=f"subset of {tuple(SHAPES)} (default {DEFAULT_SHAPES}; tiny: {tuple(TINY_SHAPES)})")
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {METHODS}")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--inputs", nargs="+", choices=INPUTS, default=["peaked"],
                   help="input distributions (default: peaked)")
    p.add_argument("--kept-fraction", type=float, default=DEFAULT_KEPT_FRACTION,
                   help=f"peaked inputs: target fraction of filter-kept tiles (default {DEFAULT_KEPT_FRACTION})")
    p.add_argument("--time-budget-s", type=float, default=330.0,
                   help="stop starting new cases after this many seconds (default 330)")
    args = p.parse_bench_args(argv)
    table = TINY_SHAPES if args.tiny else SHAPES
    names = args.shapes or list(TINY_SHAPES if args.tiny else DEFAULT_SHAPES)
    for n in names:
        if n not in table:
            raise ValueError(f"--shapes must be among {tuple(table)}, got {n!r}")
    args.shape_list = [table[n] for n in names]
    args.methods = args.methods or [m for m in METHODS if not (args.tiny and m == "torch_compile")]
    for m in args.methods:
        if m not in METHODS:
            raise ValueError(f"--methods must be among {METHODS}, got {m!r}")
    if not 0.0 < args.kept_fraction < 1.0:
        raise ValueError(f"--kept-fraction must be in (0, 1), got {args.kept_fraction}")
    common.check_device(args)
    if args.device == "cpu" and not args.tiny:
        raise ValueError("--device cpu runs only with --tiny (the Triton interpreter is 100-1000x slower)")
    return args


# ------------------------------------------------------------------------------------------------------ methods
def _baseline(e: torch.Tensor, c: torch.Tensor, t: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    z = (e @ c.T).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)                         # z' = s · tanh(z / s)
    return F.cross_entropy(z, t)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _make_method(name: str, softcap: float | None) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                                torch.Tensor]:
    """The loss function of method ``name``; raises :class:`NotInstalled` for a missing optional package."""
    from kernels.linear_cross_entropy import linear_cross_entropy

    if name in ("cce_ours", "cce_ours_unsorted", "cce_ours_exact"):
        sort = name == "cce_ours"
        eps = None if name == "cce_ours_exact" else "auto"
        return lambda e, c, t: linear_cross_entropy(e, c, t, impl="triton", vocab_sort=sort, filter_eps=eps,
                                                    softcap=softcap)
    if name == "torch_chunked":
        return lambda e, c, t: linear_cross_entropy(e, c, t, impl="torch_chunked", softcap=softcap)
    if name == "torch":
        return lambda e, c, t: _baseline(e, c, t, softcap)
    if name == "torch_compile":
        compiled = torch.compile(_baseline, dynamic=False)
        return lambda e, c, t: compiled(e, c, t, softcap)
    if name in ("cce_official", "cce_official_exact"):
        try:
            from cut_cross_entropy import linear_cross_entropy as official
        except ImportError as err:
            raise NotInstalled(repr(err)) from err
        if name == "cce_official":  # its defaults: filter_eps="high" (eps / 32) + vocabulary sorting
            return lambda e, c, t: official(e, c, t, softcap=softcap, impl="cce")
        return lambda e, c, t: official(e, c, t, softcap=softcap, filter_eps=None, impl="cce")
    if name == "liger":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as err:
            raise NotInstalled(repr(err)) from err
        lig = LigerFusedLinearCrossEntropyLoss(softcap=softcap) if softcap is not None \
            else LigerFusedLinearCrossEntropyLoss()
        return lambda e, c, t: lig(c, e, t)
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")


# ------------------------------------------------------------------------------------------------------- inputs
def _kept_fraction(e: torch.Tensor, c: torch.Tensor, t: torch.Tensor, softcap: float | None,
                   vocab_sort: bool = False, tokens: int = 1024) -> float:
    """Fraction of ``S − Y`` tiles the filter keeps (``eps/32``, the GPU backward tile), on the first ``tokens``."""
    from kernels.linear_cross_entropy import gradient_filter_stats

    block = None if e.device.type == "cuda" else (16, 32)  # the interpreter's backward tile on the CPU
    st = gradient_filter_stats(e[:tokens].detach(), c.detach(), t[:tokens], softcap=softcap, filter_block=block,
                               vocab_sort=vocab_sort, chunk_size=256)
    return st["fraction_kept"]


def make_inputs(shape: LossShape, kind: str, dtype: torch.dtype, device: str, seed: int,
                kept_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(e, c, t, info)`` — ``random``: ``e ~ N(0, 1)``, ``c ~ N(0, 1/D)``; ``peaked``: ``e_i = α c_{y_i} + N(0, 1)``
    with ``α`` bisected (on a log scale, 14 steps) until the kept-tile fraction is ``kept_fraction``.
    ``info``: ``alpha``, ``kept_fraction`` (unsorted) and ``kept_fraction_sorted`` of the inputs made."""
    g = torch.Generator(device=device).manual_seed(seed)
    c = torch.randn(shape.v, shape.d, device=device, dtype=dtype, generator=g) / shape.d ** 0.5
    t = torch.randint(0, shape.v, (shape.n,), device=device, generator=g)
    noise = torch.randn(shape.n, shape.d, device=device, dtype=dtype, generator=g)
    alpha = 0.0
    if kind == "peaked":
        lo, hi = math.log(0.5), math.log(500.0)
        for _ in range(14):  # the kept fraction falls as α grows (the softmax concentrates on y_i)
            mid = 0.5 * (lo + hi)
            m = min(shape.n, 1024)
            frac = _kept_fraction(math.exp(mid) * c[t[:m]] + noise[:m], c, t[:m], shape.softcap)
            lo, hi = (mid, hi) if frac > kept_fraction else (lo, mid)
        alpha = math.exp(0.5 * (lo + hi))
        e = alpha * c[t] + noise
    else:
        e = noise
    info = {"alpha": round(alpha, 4), "kept_fraction": round(_kept_fraction(e, c, t, shape.softcap), 4),
            "kept_fraction_sorted": round(_kept_fraction(e, c, t, shape.softcap, vocab_sort=True), 4)}
    return e.contiguous(), c, t, info


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
    """Measure every (shape, inputs, method, pass); returns the JSON document."""
    device, dtype = args.device, DTYPES[args.dtype]
    rows: list[dict[str, Any]] = []
    inputs_info: list[dict[str, Any]] = []
    t0 = time.monotonic()
    cases = [(s, k) for s in args.shape_list for k in args.inputs]
    for shape, kind in common.progress(cases, "linear-CE bench"):
        over = time.monotonic() - t0 > args.time_budget_s
        info: dict[str, Any] = {}
        if not over:
            e, c, t, info = make_inputs(shape, kind, dtype, device, args.seed, args.kept_fraction)
            e.requires_grad_()
            c.requires_grad_()
        inputs_info.append({"shape": shape.name, "inputs": kind, **info})
        for method in args.methods:
            fn: Any = None
            over = over or time.monotonic() - t0 > args.time_budget_s
            if not over:
                try:
                    fn = _make_method(method, shape.softcap)
                except Exception as err:  # noqa: BLE001 - a missing peer is a result, not a crash
                    fn = err
            for pass_ in PASSES:
                row: dict[str, Any] = {"shape": shape.name, "N": shape.n, "D": shape.d, "V": shape.v,
                                       "softcap": shape.softcap, "inputs": kind, "method": method, "pass": pass_,
                                       "median_ms": None, "peak_MiB": None, "loss": None, "status": "ok",
                                       "kept_fraction": info.get("kept_fraction")}
                if over:
                    row["status"] = "skipped: time budget"
                elif isinstance(fn, BaseException):
                    row["status"] = _status(fn)
                else:
                    try:
                        ms, mib, loss = _measure(fn, e, c, t, pass_, device, args.reps, args.warmup)
                        row.update(median_ms=round(ms, 3), peak_MiB=None if mib is None else round(mib, 1),
                                   loss=round(loss, 5))
                    except Exception as err:  # noqa: BLE001 - OOM / unsupported shape is recorded, the run goes on
                        row["status"] = _status(err)
                rows.append(row)
                if not over:
                    e.grad = c.grad = None
                common.free(device)
        if info:  # inputs were made for this case
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
        "inputs": inputs_info,
        "target_kept_fraction": args.kept_fraction,
        "wall_s": round(time.monotonic() - t0, 1),
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
    kept = {(i["shape"], i["inputs"]): i for i in meta.get("inputs", [])}
    shapes: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        shapes.setdefault((r["shape"], r.get("inputs", "random")), []).append(r)
    for (name, kind), rs in shapes.items():
        n, d, v, cap = rs[0]["N"], rs[0]["D"], rs[0]["V"], rs[0].get("softcap")
        info = kept.get((name, kind), {})
        extra = "" if not info else (f"; filter keeps {_fmt(info.get('kept_fraction'), 3)} of tiles unsorted, "
                                     f"{_fmt(info.get('kept_fraction_sorted'), 3)} sorted; α = {info.get('alpha')}")
        lines += [f"## {name}, {kind} inputs (N={n}, D={d}, V={v}, softcap={cap}{extra})", "",
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
