"""Benchmark: one decode step of one layer's attention over a CSKV latent cache vs the full fp16 cache.

Methods (per model shape, batch, context ``L`` and density):

* ``full_sdpa`` — ``F.scaled_dot_product_attention`` over the full fp16 K/V cache of ``L`` tokens (the target).
* ``naive_joint`` — the paper's joint decomposition, naive path (``shared/tools/gpu_decode_anchor.py``): rebuild
  ``K = RoPE(latent_k B_K)``, ``V = latent_v B_V`` for all ``L`` tokens every step, then SDPA
  (``r = int(density·D)·Hkv`` joint channels).
* ``fused_fp16`` / ``fused_int4`` — our per-head fused kernel (:func:`kernels.latent_attention.latent_decode_attention`)
  on ``L - W`` latent tokens (``r = int(density·D)`` per head; int4: keys per channel over groups of
  ``--key-group`` tokens, values per token, rank rounded up to even) plus ``W`` exact window tokens.

Timing: median of ``--reps`` CUDA-event timings after ``--warmup`` calls (CPU ``--tiny``: ``time.perf_counter``,
Triton interpreter). Achieved bandwidth = bytes the method must read / time, against ``--peak-gbps``.
A second section measures the peak GPU memory of one decode step through every layer of a SmolLM2-135M-sized and
a 7B-sized cache (``torch.cuda.max_memory_allocated``) next to the measured cache bytes.

Usage::

    python -m kernels.bench.latent_attention_bench --device cuda --out reports/cskv_kernels
    python -m kernels.bench.latent_attention_bench --device cpu --tiny --out /tmp/cskv_kernels_tiny
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kernels.bench import common


@dataclass(frozen=True)
class ModelShape:
    """Attention shape of one model layer (and the layer count, for the whole-cache memory section)."""

    name: str
    n_q: int
    n_kv: int
    head_dim: int
    layers: int


LLAMA2_7B = ModelShape("llama2-7b", 32, 32, 128, 32)
MISTRAL_7B = ModelShape("mistral-7b", 32, 8, 128, 32)
SMOLLM2_135M = ModelShape("smollm2-135m", 9, 3, 64, 30)
TINY = ModelShape("tiny-gqa", 4, 2, 16, 2)

METHODS = ("full_sdpa", "naive_joint", "fused_fp16", "fused_int4")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common.BenchParser(__doc__.split("\n\n")[0], out="reports/cskv_kernels", reps=(30, 2), warmup=(5, 1))
    p.add_argument("--peak-gbps", type=float, default=3350.0, help="memory bandwidth peak (H100 SXM: 3350)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 (tiny: 1 2)")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="default 4096 16384 65536 131072 (tiny: 64)")
    p.add_argument("--densities", type=float, nargs="+", default=None, help="default 0.5 0.2 (tiny: 0.5)")
    p.add_argument("--window", type=int, default=None, help="exact recent window W (default 32; tiny: 8)")
    p.add_argument("--key-group", type=int, default=None, help="int4 key group in tokens (default 32; tiny: 8)")
    p.add_argument("--no-memory", action="store_true", help="skip the whole-cache memory section")
    args = p.parse_bench_args(argv)
    tiny = args.tiny
    args.batches = args.batches or ([1, 2] if tiny else [1, 8])
    args.contexts = args.contexts or ([64] if tiny else [4096, 16384, 65536, 131072])
    args.densities = args.densities or ([0.5] if tiny else [0.5, 0.2])
    args.window = args.window if args.window is not None else (8 if tiny else 32)
    args.key_group = args.key_group if args.key_group is not None else (8 if tiny else 32)
    args.models = [TINY] if tiny else [LLAMA2_7B, MISTRAL_7B]
    args.memory_models = ([(TINY, 1, 64)] if tiny else
                          [(SMOLLM2_135M, 1, 8192), (SMOLLM2_135M, 8, 8192), (LLAMA2_7B, 1, 16384),
                           (MISTRAL_7B, 1, 32768)])
    if args.peak_gbps <= 0:
        raise ValueError(f"--peak-gbps must be > 0, got {args.peak_gbps}")
    for d in args.densities:
        if not 0 < d <= 1:
            raise ValueError(f"densities must be in (0, 1], got {d}")
    for L in args.contexts:
        if L <= args.window or (L - args.window) % args.key_group != 0:
            raise ValueError(f"each context must exceed the window ({args.window}) and context - window must be a "
                             f"multiple of --key-group ({args.key_group}), got {L}")
    common.check_device(args)
    return args


# ----------------------------------------------------------------------------------------------------------- timing
def _time_us(fn: Callable[[], Any], device: str, reps: int, warmup: int) -> float:
    """Median wall time of ``fn`` in microseconds (CUDA events on GPU, perf_counter on CPU)."""
    return common.median_ms(fn, device, reps, warmup) * 1e3


def _time_graph_us(fn: Callable[[], Any], reps: int, warmup: int) -> float | None:
    """Median time of one CUDA-graph replay of ``fn`` (no Python/launch overhead, as in a graph-captured decode
    loop); ``None`` if capture fails (the eager time is still reported)."""
    graph = None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return _time_us(graph.replay, "cuda", reps, warmup)
    except Exception:  # noqa: BLE001 - capture is best effort (OOM in the graph pool, uncapturable op)
        return None
    finally:
        del graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _nbytes(*ts: Any) -> int:
    total = 0
    for t in ts:
        if t is None:
            continue
        total += t.nbytes() if hasattr(t, "packed") else t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------------------- case builders
def _rank(density: float, head_dim: int, even: bool) -> int:
    r = max(1, int(density * head_dim))
    return r + (r % 2) if even else r


def _fused_inputs(m: ModelShape, batch: int, ctx: int, density: float, window: int, key_group: int, int4: bool,
                  device: str, dtype: torch.dtype) -> dict[str, Any]:
    from kernels.latent_attention import rope_cos_sin
    from kernels.quant import quantize_int4

    t = ctx - window
    r = _rank(density, m.head_dim, even=int4)
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    lk, lv = rnd(batch, m.n_kv, t, r), rnd(batch, m.n_kv, t, r)
    if int4:  # the Triton quantizer on GPU: the torch one needs several fp32 copies of a 128k-token cache
        impl = "triton" if device == "cuda" else "torch"
        lk = quantize_int4(lk, key_group, axis=-2, impl=impl)
        lv = quantize_int4(lv, r, axis=-1, impl=impl)
    cos, sin = rope_cos_sin(torch.arange(t, device=device), m.head_dim, dtype=dtype)
    return dict(q=rnd(batch, m.n_q, m.head_dim), lk=lk, lv=lv,
                bk=rnd(m.n_kv, r, m.head_dim) / math.sqrt(r), bv=rnd(m.n_kv, r, m.head_dim) / math.sqrt(r),
                cos=cos, sin=sin, wk=rnd(batch, m.n_kv, window, m.head_dim), wv=rnd(batch, m.n_kv, window, m.head_dim))


def _fused_bytes(a: dict[str, Any]) -> int:
    out = a["q"].numel() * a["q"].element_size()
    return _nbytes(a["q"], a["lk"], a["lv"], a["bk"], a["bv"], a["cos"], a["sin"], a["wk"], a["wv"]) + out


def _run_case(method: str, m: ModelShape, batch: int, ctx: int, density: float,
              args: argparse.Namespace) -> tuple[float | None, float | None, int, str]:
    """Time one method; returns ``(eager median us, CUDA-graph median us, bytes_read, status)``."""
    from kernels.latent_attention import latent_decode_attention
    from kernels.latent_attention.latent_attention_ref import joint_rebuild_attention

    dev, dt = args.device, (torch.float16 if args.device == "cuda" else torch.float32)
    state: dict[str, Any] = {}
    try:
        g = torch.Generator(device=dev).manual_seed(args.seed)
        rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)  # noqa: E731
        if method == "full_sdpa":
            q, k, v = rnd(batch, m.n_q, 1, m.head_dim), rnd(batch, m.n_kv, ctx, m.head_dim), rnd(batch, m.n_kv, ctx,
                                                                                                   m.head_dim)
            state.update(q=q, k=k, v=v)
            fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=m.n_q != m.n_kv)  # noqa: E731
            nbytes = _nbytes(q, k, v) + _nbytes(q)
        elif method == "naive_joint":
            from kernels.latent_attention import rope_cos_sin

            r = _rank(density, m.head_dim, even=False) * m.n_kv
            q = rnd(batch, m.n_q, m.head_dim)
            lk, lv = rnd(batch, ctx, r), rnd(batch, ctx, r)
            bk, bv = rnd(r, m.n_kv * m.head_dim) / math.sqrt(r), rnd(r, m.n_kv * m.head_dim) / math.sqrt(r)
            cos, sin = rope_cos_sin(torch.arange(ctx, device=dev), m.head_dim, dtype=dt)
            state.update(q=q, lk=lk, lv=lv, bk=bk, bv=bv, cos=cos, sin=sin)
            fn = lambda: joint_rebuild_attention(q, lk, lv, bk, bv, cos, sin)  # noqa: E731
            nbytes = _nbytes(q, lk, lv, bk, bv, cos, sin) + _nbytes(q)
        else:
            a = _fused_inputs(m, batch, ctx, density, args.window, args.key_group, method == "fused_int4", dev, dt)
            state.update(a)
            fn = lambda: latent_decode_attention(**a, impl="triton")  # noqa: E731
            nbytes = _fused_bytes(a)
        us = _time_us(fn, dev, args.reps, args.warmup)
        graph_us = _time_graph_us(fn, args.reps, args.warmup) if dev == "cuda" else None
        return us, graph_us, nbytes, "ok"
    except Exception as err:  # noqa: BLE001 - a case that does not fit (or fails) is recorded, not fatal
        if common.is_oom(err):
            return None, None, 0, "oom"
        return None, None, 0, common.error_status(err)
    finally:
        state.clear()
        common.free(dev)


# ---------------------------------------------------------------------------------------------------- memory section
def _decode_memory(m: ModelShape, batch: int, ctx: int, method: str, args: argparse.Namespace,
                   density: float = 0.5) -> dict[str, Any]:
    """Allocate a whole-model cache for ``method`` and run one decode step through every layer's attention."""
    from kernels.latent_attention import latent_decode_attention, naive_rebuild_attention

    dev, dt = args.device, (torch.float16 if args.device == "cuda" else torch.float32)
    row: dict[str, Any] = dict(model=m.name, layers=m.layers, n_q=m.n_q, n_kv=m.n_kv, head_dim=m.head_dim,
                               batch=batch, ctx=ctx, method=method, density=None if method == "full_sdpa" else density)
    layers: list[Any] = []
    try:
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        g = torch.Generator(device=dev).manual_seed(args.seed)
        for _ in range(m.layers):
            if method == "full_sdpa":
                k = torch.randn(batch, m.n_kv, ctx, m.head_dim, device=dev, dtype=dt, generator=g)
                layers.append((k, torch.randn_like(k)))
            else:
                layers.append(_fused_inputs(m, batch, ctx, density, args.window, args.key_group,
                                            method == "fused_int4", dev, dt))
        if method == "full_sdpa":
            cache = sum(_nbytes(k, v) for k, v in layers)
        else:
            cache = sum(_nbytes(a["lk"], a["lv"], a["wk"], a["wv"]) for a in layers)
        q = torch.randn(batch, m.n_q, m.head_dim, device=dev, dtype=dt, generator=g)
        for layer in layers:  # one decode step, layer by layer (outputs dropped, like a residual stream would)
            if method == "full_sdpa":
                k, v = layer
                F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=m.n_q != m.n_kv)
            elif method == "naive_perhead":
                naive_rebuild_attention(**layer)
            else:
                latent_decode_attention(**layer, impl="triton")
        row["cache_bytes"] = cache
        if dev == "cuda":
            torch.cuda.synchronize()
            row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        else:
            row["peak_bytes"] = None
        row["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - recorded, not fatal
        status = "oom" if common.is_oom(err) else common.error_status(err)
        row.update(cache_bytes=None, peak_bytes=None, status=status)
    finally:
        layers.clear()
        common.free(dev)
    return row


def _add_compression(rows: list[dict[str, Any]]) -> None:
    """Paper's ratio (``1 - density``; int4: ``1 - density/4``; ignores window, scales and A/B) next to the
    measured one (``1 - cache bytes / full fp16 cache bytes``, window and scales/zeros included)."""
    full = {(r["model"], r["batch"], r["ctx"]): r["cache_bytes"] for r in rows if r["method"] == "full_sdpa"}
    for r in rows:
        d = r["density"]
        r["paper_compression"] = 0.0 if d is None else round(1 - d / 4 if r["method"] == "fused_int4" else 1 - d, 4)
        ref = full.get((r["model"], r["batch"], r["ctx"]))
        r["measured_compression"] = (round(1 - r["cache_bytes"] / ref, 4)
                                     if ref and r["cache_bytes"] is not None else None)


# ---------------------------------------------------------------------------------------------------------- reports
def _fmt(x: float | None, status: str = "oom", nd: int = 1) -> str:
    if x is None:
        return "oom" if status == "oom" else "err"
    return f"{x:.{nd}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    peak = meta["peak_gbps"]
    lines = [
        "# CSKV decode-attention kernels",
        "",
        f"Device: {meta['device_name']} · torch {meta['torch']} · triton {meta['triton']} · "
        f"median of {meta['reps']} reps after {meta['warmup']} warm-up · window W={meta['window']} exact tokens · "
        f"bandwidth peak {peak:g} GB/s"
        f"{' · TINY CPU smoke run (interpreter timings are meaningless)' if meta['tiny'] else ''}.",
        "",
        f"Per-layer decode step, {meta['dtype']}. `full` = SDPA over the full K/V cache; `naive joint` = rebuild "
        "K/V from the paper's joint latents every step, then SDPA; `fused` = our per-head fused kernel (latents + "
        "window). Times are CUDA-graph replays where capture worked (`time_us`; eager times are in the JSON), "
        "else eager. GB/s = bytes the method must read / time (% of peak); `oom` = did not fit, `err` = failed "
        "(message in the JSON).",
        "",
        "| model | batch | ctx | density | rank/head | full µs | naive joint µs | fused fp16 µs | fused int4 µs | "
        "full GB/s | fused fp16 GB/s | fused int4 GB/s | fp16 speedup vs full | int4 speedup vs full | "
        "naive / full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in result["latency"]:
        rows.setdefault((r["model"], r["batch"], r["ctx"], r["density"]), {})[r["method"]] = r

    def gb(r: dict[str, Any] | None) -> str:
        if r is None or r["gbps"] is None:
            return _fmt(None, r["status"]) if r is not None else "-"
        return f"{r['gbps']:.0f} ({100 * r['gbps'] / peak:.0f}%)"

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
        if a is None or b is None or a["time_us"] is None or b["time_us"] is None:
            return "-"
        return f"{a['time_us'] / b['time_us']:.2f}×"

    for (model, batch, ctx, density), by in rows.items():
        us = lambda k: _fmt(by[k]["time_us"], by[k]["status"]) if k in by else "-"  # noqa: E731
        rank = by["fused_fp16"]["rank"] if "fused_fp16" in by else "-"
        lines.append(f"| {model} | {batch} | {ctx} | {density} | {rank}"
                     f" | {us('full_sdpa')} | {us('naive_joint')} | {us('fused_fp16')} | {us('fused_int4')} | "
                     f"{gb(by.get('full_sdpa'))} | {gb(by.get('fused_fp16'))} | {gb(by.get('fused_int4'))} | "
                     f"{ratio(by.get('full_sdpa'), by.get('fused_fp16'))} | "
                     f"{ratio(by.get('full_sdpa'), by.get('fused_int4'))} | "
                     f"{ratio(by.get('naive_joint'), by.get('full_sdpa'))} |")
    if result["memory"]:
        lines += ["", "## Whole-model decode step: cache bytes and peak memory", "",
                  "Cache bytes are summed tensor storage (`numel × element_size`; int4: packed codes + scales + "
                  "zeros). "
                  "Peak = `torch.cuda.max_memory_allocated` during allocation + one decode step through all layers.",
                  "", "| model | layers | batch | ctx | method | density | cache MiB | compression (paper's ratio) | "
                  "compression (measured bytes) | peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["memory"]:
            mib = lambda b: (_fmt(None, r["status"]) if r["status"] != "ok"  # noqa: E731
                             else ("n/a" if b is None else f"{b / 2**20:.3f}"))
            lines.append(f"| {r['model']} | {r['layers']} | {r['batch']} | {r['ctx']} | {r['method']} | "
                         f"{r['density'] if r['density'] is not None else '-'} | {mib(r['cache_bytes'])} | "
                         f"{_pct(r.get('paper_compression'))} | {_pct(r.get('measured_compression'))} | "
                         f"{mib(r['peak_bytes'])} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``<out>.json`` and ``<out>.md``; returns the result dict."""
    args = _parse_args(argv)
    common.use_interpreter_on_cpu(args.device)
    import triton

    torch.manual_seed(args.seed)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    result: dict[str, Any] = {
        "meta": dict(device=args.device, device_name=device_name, torch=torch.__version__, triton=triton.__version__,
                     python=sys.version.split()[0], peak_gbps=args.peak_gbps, reps=args.reps, warmup=args.warmup,
                     window=args.window, key_group=args.key_group, tiny=args.tiny, seed=args.seed,
                     dtype="float16" if args.device == "cuda" else "float32",
                     timer="cuda events" if args.device == "cuda" else "time.perf_counter (Triton interpreter)"),
        "latency": [],
        "memory": [],
    }
    cases = [(m, b, L, d) for m in args.models for b in args.batches for L in args.contexts for d in args.densities]
    full_cache: dict[tuple, tuple[float | None, float | None, int, str]] = {}
    for m, b, L, d in common.progress(cases, "latent attention bench"):
        for method in METHODS:
            if method == "full_sdpa":  # independent of density: measure once per (model, batch, ctx)
                key = (m.name, b, L)
                if key not in full_cache:
                    full_cache[key] = _run_case(method, m, b, L, d, args)
                eager_us, graph_us, nbytes, status = full_cache[key]
            else:
                eager_us, graph_us, nbytes, status = _run_case(method, m, b, L, d, args)
            us = graph_us if graph_us is not None else eager_us
            gbps = None if us is None else nbytes / (us * 1e-6) / 1e9
            rank = _rank(d, m.head_dim, even=method == "fused_int4")
            result["latency"].append(dict(
                model=m.name, n_q=m.n_q, n_kv=m.n_kv, head_dim=m.head_dim, batch=b, ctx=L, density=d,
                method=method, rank=rank * (m.n_kv if method == "naive_joint" else 1),
                latent_tokens=L - args.window if method.startswith("fused") else None,
                time_us=None if us is None else round(us, 2),
                eager_us=None if eager_us is None else round(eager_us, 2),
                graph_us=None if graph_us is None else round(graph_us, 2),
                timed="cuda_graph" if graph_us is not None else "eager",
                status=status, bytes_read=nbytes or None,
                gbps=None if gbps is None else round(gbps, 1),
                pct_peak=None if gbps is None else round(100 * gbps / args.peak_gbps, 1),
                ideal_us_at_peak=round(nbytes / (args.peak_gbps * 1e9) * 1e6, 2) if nbytes else None))
    if not args.no_memory:
        mem_cases = [(m, b, L, meth) for m, b, L in args.memory_models
                     for meth in ("full_sdpa", "fused_fp16", "fused_int4", "naive_perhead")]
        for m, b, L, meth in common.progress(mem_cases, "whole-cache memory"):
            result["memory"].append(_decode_memory(m, b, L, meth, args))
        _add_compression(result["memory"])
    common.write_reports(args.out, result, _markdown(result))
    return result


if __name__ == "__main__":
    main()
