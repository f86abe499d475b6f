"""Byte accounting from real tensors (storage sizes, not formulas) and GPU peak memory."""
from __future__ import annotations

import torch


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes of the storage behind ``t`` (0 for None/empty). A view is charged its whole storage, so caches must
    keep owned (cloned/contiguous) tensors for the count to be honest."""
    if t is None or t.numel() == 0:
        return 0
    return t.untyped_storage().nbytes()


def kv_bytes_full(num_tokens: int, num_layers: int, kv_channels: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Analytic bytes of an uncompressed cache: ``2 (K,V) · L · T · n_kv·head_dim · sizeof(dtype) · B``."""
    return 2 * num_layers * num_tokens * kv_channels * torch.finfo(dtype).bits // 8 * batch


def gpu_peak_bytes(device: torch.device | str | None = None) -> int | None:
    """Peak allocated bytes on a CUDA device since the last reset; None on CPU."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device)
