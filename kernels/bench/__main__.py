"""Run every kernel benchmark: ``python -m kernels.bench [--device cuda|cpu] [--tiny] [--out DIR]``.

Runs :mod:`kernels.bench.linear_cross_entropy_bench` (writes ``<DIR>/cut_cross_entropy_kernels.{json,md}``) and
:mod:`kernels.bench.latent_attention_bench` (``<DIR>/cskv_kernels.{json,md}``) with their default settings, which
are sized to take at most 8 minutes together on an H100-class GPU (the linear-CE benchmark stops starting new cases
after ``--cce-time-budget-s``, default 330 s). ``DIR`` defaults to ``reports`` (the benchmarks' own ``--out``
defaults). Needs only torch and triton: the official ``cut-cross-entropy`` and ``liger-kernel`` are optional
(recorded as ``not installed``), nothing imports mlflow, dvc, gguf, transformers or yaml. A benchmark that fails is
reported on stderr and the other still runs; the exit status is 1 if any failed. ``--device cpu --tiny`` runs both in
the Triton interpreter at tiny shapes (a smoke test).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Run both benchmarks; returns ``{name: JSON document}`` for those that finished."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, few reps (CPU smoke run)")
    p.add_argument("--out", default="reports", help="output folder (default: reports)")
    p.add_argument("--cce-time-budget-s", type=float, default=330.0,
                   help="linear-CE benchmark: stop starting new cases after this many seconds")
    args = p.parse_args(argv)

    from kernels.bench import common

    common.use_interpreter_on_cpu(args.device)  # before any kernel module is imported
    from kernels.bench import latent_attention_bench, linear_cross_entropy_bench

    out = Path(args.out)
    base = ["--device", args.device] + (["--tiny"] if args.tiny else [])
    runs = {
        "cut_cross_entropy_kernels": (linear_cross_entropy_bench.main,
                                      ["--time-budget-s", str(args.cce_time_budget_s)]),
        "cskv_kernels": (latent_attention_bench.main, []),
    }
    docs: dict[str, dict] = {}
    failed = []
    for name, (fn, extra) in runs.items():
        t0 = time.monotonic()
        try:
            docs[name] = fn(base + extra + ["--out", str(out / name)])
            print(f"{name}: wrote {out / name}.json and .md in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        except Exception:  # noqa: BLE001 - one benchmark's failure must not lose the other's results
            failed.append(name)
            traceback.print_exc()
            print(f"{name}: FAILED after {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if failed:
        raise SystemExit(1)
    return docs


if __name__ == "__main__":
    main()
