"""Memory accounting of linear cross-entropy implementations: an analytic count and a measured one.

Why not the allocator: on CPU PyTorch keeps no allocator statistics, and ``torch.profiler``'s ``[memory]`` events
came back as 0 bytes in this torch build, so neither gives a peak. Instead:

* :func:`measure_loss_memory` runs the loss (and its backward) under a ``TorchDispatchMode`` that sees every tensor
  an ATen op creates. A new storage (one not aliasing an op input: views and in-place results are skipped) is added
  to a live-bytes counter and a ``weakref.finalize`` on the storage subtracts it when it is freed — so the counter
  is the exact sum of live tensor storages created since entry (allocator caching/fragmentation excluded; inputs
  excluded, gradients included). Its maximum is the *measured peak*; the largest single storage is recorded too.
  Separately, ``torch.autograd.graph.saved_tensors_hooks`` sums the storages the forward saves for backward (the
  memory that stays alive between forward and backward), excluding ``e`` and ``c`` themselves.
* :func:`analytic_loss_memory` counts the same quantities from the algorithm of each implementation (Eq. 1 and
  Eqs. 3–4 of the paper; the baseline follows ``F.cross_entropy((e @ cᵀ).float(), y)``), so it can be evaluated at
  the paper's Gemma-2 (2B) shape where nothing can be run on a 2-core CPU.
* :func:`measure_memory` is the same counter around any ``(e, c, y) -> loss`` callable on given inputs: the stage
  runs it on real Gemma 3 hidden states and classifier for our kernels (:func:`kernel_loss_fn`) and for the
  official ``cut-cross-entropy`` package (:func:`official_loss_fn`).

Conventions (both functions): bytes, inputs ``e [N, D]`` and ``c [V, D]`` not counted, gradients ``∇E``, ``∇C``
counted in ``fw+bw``; ``fw`` is the peak while computing the loss with inputs requiring grad.
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: Implementations the accounting knows: the kernel's ``impl`` names.
MEMORY_IMPLS = ("torch", "torch_chunked", "triton")
#: fp32 scratch the Triton kernel uses for ∇C of fp16/bf16 classifiers (kernel default ``scratch_bytes``).
TRITON_DC_SCRATCH_BYTES = 64 * 2**20


@dataclass(frozen=True)
class LossMemory:
    """Bytes held by one linear-cross-entropy call (inputs excluded)."""

    fw_peak: int          # peak while computing the loss (forward, inputs requiring grad)
    fw_saved: int         # kept alive from forward to backward (saved tensors, excluding e and c)
    fwbw_peak: int        # peak over forward + backward, gradients included
    largest_tensor: int   # largest single storage created (measured) / largest buffer (analytic)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_shape(n: int, d: int, v: int) -> None:
    for name, x in (("n", n), ("d", d), ("v", v)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be an int >= 1, got {x!r}")


def analytic_loss_memory(impl: str, n: int, d: int, v: int, dtype_bytes: int = 2,
                         chunk_size: int | None = None) -> LossMemory:
    """Bytes each implementation must hold for ``N = n`` tokens, hidden ``D = d``, vocabulary ``V = v``.

    ``dtype_bytes`` is the size of ``e``/``c`` (2: bf16, the paper's setting; 4: fp32); softmax statistics are fp32.

    * ``torch`` (the paper's baseline): logits ``N·V`` in the input dtype, an fp32 copy when the dtype is not fp32,
      and the fp32 log-softmax saved for backward; backward holds the saved log-softmax, its incoming gradient and
      the gradient it returns (``3·N·V·4``), then the logit gradient in the input dtype with ``∇E``/``∇C``.
    * ``torch_chunked`` (``k = chunk_size`` tokens at a time, TorchTune-style): forward the compacted copy of ``e``,
      one ``k·V`` logit block in fp32 (+ the 16-bit matmul output first) with two fp32 temporaries of its row
      log-sum-exp, and the per-token max / log-sum / NLL; backward ``z``, ``z − lse`` and ``S`` for one block
      (``3·k·V·4``) plus an fp32 ``∇C`` accumulator and ``∇E``.
    * ``triton`` (CCE): forward only the per-token LSE and the target logit (``2·N·4``, the logits live in SRAM);
      backward the gradients, plus a bounded fp32 ``∇C`` scratch (≤ 64 MiB) for 16-bit classifiers.
    """
    if impl not in MEMORY_IMPLS:
        raise ValueError(f"impl must be one of {MEMORY_IMPLS}, got {impl!r}")
    _check_shape(n, d, v)
    if dtype_bytes not in (2, 4):
        raise ValueError(f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {dtype_bytes!r}")
    s, f32 = dtype_bytes, 4
    upcast = f32 if s != f32 else 0                     # .float() is a no-op for fp32 logits
    grads = n * d * s + v * d * s                       # ∇E, ∇C in the input dtype
    if impl == "torch":
        nv = n * v
        fw_peak = nv * (s + upcast + f32)               # logits, fp32 copy, log-softmax
        fw_saved = nv * f32                             # log-softmax kept for backward
        bw_peak = max(3 * nv * f32, nv * s + grads)       # ∇logits (input dtype) alive while ∇E, ∇C are formed
        return LossMemory(fw_peak, fw_saved, max(fw_peak, bw_peak), nv * f32)
    if impl == "torch_chunked":
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        k = min(n, chunk_size or n)
        kv = k * v
        # the compacted copy of e (valid rows), one logit block (+ its fp32 copy) and two fp32 block temporaries of
        # the row log-sum-exp (z − max, exp), the per-token max / log-sum / NLL
        fw_peak = n * d * s + (kv * s if s != f32 else 0) + 3 * kv * f32 + 3 * n * f32
        fw_saved = n * d * s + 3 * n * f32              # e copy, max, log-sum, NLL (targets are tiny, not counted)
        dc_acc = v * d * f32                            # fp32 ∇C accumulator
        bw_peak = max(3 * kv * f32, 2 * kv * f32 + v * d * f32) + dc_acc + n * d * s
        return LossMemory(fw_peak, fw_saved, max(fw_peak, bw_peak + (v * d * s if s != f32 else 0)),
                          max(kv * f32, v * d * f32))
    # triton (CCE): logits never leave SRAM
    fw = 2 * n * f32
    scratch = min(v * d * f32, TRITON_DC_SCRATCH_BYTES) if s != f32 else 0
    return LossMemory(fw, n * f32, fw + grads + scratch, max(v * d * s, scratch))


class _LiveStorageCounter(TorchDispatchMode):
    """Counts bytes of live tensor storages created by ATen ops inside the mode (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.largest = 0

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._live:
                continue                                # empty, a view / in-place result, or already counted
            self._live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            self.largest = max(self.largest, nbytes)
            weakref.finalize(storage, self._release, key)
        return out


def measure_memory(loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], e: torch.Tensor,
                   c: torch.Tensor, y: torch.Tensor) -> tuple[LossMemory, float]:
    """Measured bytes of one forward + backward of ``loss_fn(e, c, y)`` (a scalar loss) on the given inputs, and the
    wall time in seconds. ``e`` and ``c`` enter as fresh leaves requiring grad that share the callers' storage, so
    the inputs are excluded and both gradients (``∇E``, ``∇C``) are counted (see the module docstring)."""
    for name, t in (("e", e), ("c", c)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got "
                             f"{type(t).__name__ if not isinstance(t, torch.Tensor) else tuple(t.shape)}")
    if e.shape[1] != c.shape[1] or not isinstance(y, torch.Tensor) or tuple(y.shape) != (e.shape[0],):
        raise ValueError(f"shapes must be e [N, D], c [V, D], y [N]; got {tuple(e.shape)}, {tuple(c.shape)}, "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else y!r}")
    e = e.detach().requires_grad_()
    c = c.detach().requires_grad_()
    inputs = {e.untyped_storage().data_ptr(), c.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in inputs:
            saved[st.data_ptr()] = st.nbytes()
        return t

    counter = _LiveStorageCounter()
    t0 = time.perf_counter()
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(e, c, y)
        fw_peak = counter.peak
        loss.backward()
    seconds = time.perf_counter() - t0
    del loss
    return LossMemory(fw_peak, sum(saved.values()), counter.peak, counter.largest), seconds


def kernel_loss_fn(impl: str, chunk_size: int | None = None, **kwargs) -> Callable:
    """``(e, c, y) -> loss`` of :func:`kernels.linear_cross_entropy.linear_cross_entropy` with ``impl`` (``kwargs``:
    e.g. ``filter_eps``, ``filter_block`` for the filtered ``torch_chunked`` path)."""
    from kernels.linear_cross_entropy import linear_cross_entropy

    if impl not in MEMORY_IMPLS:
        raise ValueError(f"impl must be one of {MEMORY_IMPLS}, got {impl!r}")
    if impl == "torch_chunked":
        kwargs = {"chunk_size": chunk_size, **kwargs}
    return lambda e, c, y: linear_cross_entropy(e, c, y, impl=impl, **kwargs)


def official_loss_fn(impl: str = "torch_compile") -> Callable | None:
    """``(e, c, y) -> loss`` of the official package (``pip install cut-cross-entropy``), or None when it is not
    installed. On CPU only its ``torch_compile`` impl runs (its ``cce`` impl is a CUDA Triton kernel); run it with
    ``TORCHDYNAMO_DISABLE=1`` to measure the eager graph (``e @ cᵀ`` then ``F.cross_entropy(logits.float(), y)``);
    the call also runs under ``torch.compiler.set_stance("force_eager")`` so it is eager however it was imported."""
    try:
        from cut_cross_entropy import linear_cross_entropy as official
    except ImportError:
        return None

    def loss(e: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # TORCHDYNAMO_DISABLE only takes effect if set before the package is imported (its @torch.compile is
        # resolved at import); force_eager runs the compiled function's Python body whenever it was imported.
        with torch.compiler.set_stance("force_eager"):
            return official(e, c, y, impl=impl)

    return loss


def measure_loss_memory(impl: str, n: int, d: int, v: int, dtype: torch.dtype = torch.float32,
                        chunk_size: int | None = None, seed: int = 0, **kwargs) -> tuple[LossMemory, float]:
    """Measured bytes of one forward + backward of ``linear_cross_entropy(e, c, y, impl=impl)`` on random inputs
    (``e ~ N(0, 1)``, ``c ~ N(0, 1/D)``), and the wall time in seconds. ``impl="triton"`` on CPU needs
    ``TRITON_INTERPRET=1`` set before the kernel module is first imported (tiny shapes only: it is slow)."""
    if impl not in MEMORY_IMPLS:
        raise ValueError(f"impl must be one of {MEMORY_IMPLS}, got {impl!r}")
    _check_shape(n, d, v)
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g).to(dtype)
    c = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    return measure_memory(kernel_loss_fn(impl, chunk_size, **kwargs), e, c, y)


__all__ = ["MEMORY_IMPLS", "LossMemory", "analytic_loss_memory", "kernel_loss_fn", "measure_loss_memory",
           "measure_memory", "official_loss_fn"]
