"""What the kernel benchmark scripts share: the common command-line flags, timing (CUDA events on a GPU,
``time.perf_counter`` on the CPU; median after warm-up, optional peak-memory delta), error classification, the case
loop's progress bar and writing ``<out>.json`` + ``<out>.md``.

Imports only the standard library and torch (``tqdm`` if installed), so ``python -m kernels.bench`` runs on a bare
GPU machine with only torch + triton."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, TypeVar

import torch

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------- command line
class BenchParser(argparse.ArgumentParser):
    """Parser with the flags every benchmark has: ``--device``, ``--out`` (default ``out``), ``--tiny``, ``--reps``,
    ``--warmup`` and ``--seed``; ``reps`` / ``warmup`` are the (full, ``--tiny``) defaults."""

    def __init__(self, description: str, out: str, reps: tuple[int, int], warmup: tuple[int, int]) -> None:
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.reps_defaults, self.warmup_defaults = reps, warmup
        self.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        self.add_argument("--out", default=out, help="output prefix: writes <out>.json and <out>.md")
        self.add_argument("--tiny", action="store_true",
                          help="tiny shapes and few reps (CPU smoke run, Triton interpreter)")
        self.add_argument("--reps", type=int, default=None,
                          help=f"timed repetitions (default {reps[0]}; tiny: {reps[1]})")
        self.add_argument("--warmup", type=int, default=None,
                          help=f"untimed warm-up calls (default {warmup[0]}; tiny: {warmup[1]})")
        self.add_argument("--seed", type=int, default=0)

    def parse_bench_args(self, argv: list[str] | None) -> argparse.Namespace:
        """Parse ``argv``, fill in the ``--reps`` / ``--warmup`` defaults and validate them."""
        args = self.parse_args(argv)
        args.reps = args.reps if args.reps is not None else self.reps_defaults[args.tiny]
        args.warmup = args.warmup if args.warmup is not None else self.warmup_defaults[args.tiny]
        if args.reps < 1 or args.warmup < 0:
            raise ValueError(f"--reps must be >= 1 and --warmup >= 0, got {args.reps}, {args.warmup}")
        return args


def check_device(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU; use --device cpu --tiny here")


def use_interpreter_on_cpu(device: str) -> None:
    """On the CPU, run Triton kernels in the interpreter: call before the kernel modules are first imported
    (``@triton.jit`` reads ``TRITON_INTERPRET`` at decoration time)."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


class Timed(NamedTuple):
    value: Any  #: what the call returned
    ms: float  #: its time in milliseconds
    peak_bytes: int | None  #: peak allocation above the pre-call one (``memory=True`` on CUDA), else None


def time_call(fn: Callable[[], Any], device: str, memory: bool = False) -> Timed:
    """Time one call of ``fn``: CUDA events on ``"cuda"`` (then synchronised), ``time.perf_counter`` otherwise."""
    if device != "cuda":
        t0 = time.perf_counter()
        value = fn()
        return Timed(value, (time.perf_counter() - t0) * 1e3, None)
    if memory:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    value = fn()
    end.record()
    torch.cuda.synchronize()
    return Timed(value, start.elapsed_time(end), torch.cuda.max_memory_allocated() - base if memory else None)


def median_ms(fn: Callable[[], Any], device: str, reps: int, warmup: int) -> float:
    """Median time of ``fn`` in milliseconds over ``reps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(time_call(fn, device).ms for _ in range(reps))


# ---------------------------------------------------------------------------------------------------------- errors
def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def error_status(err: BaseException) -> str:
    """``"error: <type>: <first line of the message, 200 chars at most>"``."""
    msg = str(err).splitlines()[0][:200] if str(err) else ""
    return f"error: {type(err).__name__}: {msg}"


# --------------------------------------------------------------------------------------------------------- running
def progress(cases: Iterable[T], desc: str) -> Iterable[T]:
    """The case loop, with a progress bar (``tqdm`` when installed, else one line per case on stderr)."""
    try:
        from tqdm import tqdm
    except ImportError:
        items = list(cases)

        def plain() -> Iterable[T]:
            for i, item in enumerate(items):
                print(f"{desc}: case {i + 1}/{len(items)}", file=sys.stderr, flush=True)
                yield item

        return plain()
    return tqdm(cases, desc=desc, unit="case")


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_reports(out: str | os.PathLike, doc: dict[str, Any], markdown: str, sort_keys: bool = True) -> None:
    """Write ``<out>.json`` (2-space indent, trailing newline; non-JSON values as ``str``) and ``<out>.md``
    atomically, creating the folder (standard library only: no ``shared.io``, whose ``yaml`` a bare GPU machine
    lacks)."""
    out = Path(out)
    _write_text_atomic(out.with_name(out.name + ".json"),
                       json.dumps(doc, indent=2, sort_keys=sort_keys, default=str) + "\n")
    _write_text_atomic(out.with_name(out.name + ".md"), markdown)
