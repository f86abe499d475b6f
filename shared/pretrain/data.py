"""Token streams, windows and batch orders of the pre-training harness (FRUGAL report §4).

Each corpus split is encoded once as one token stream and cut into contiguous, non-overlapping windows of
``seq_len`` tokens (no padding: Shakespeare is one running text, unlike C4's documents). A run's data is then a
*batch order*: ``steps × batch_size`` window indices drawn from one seed, shared by every optimizer so that two runs
differ only in the optimizer; :func:`order_hash` is logged to prove it.
"""
from __future__ import annotations

import hashlib

import torch
from tokenizers import Tokenizer

from shared.corpus import Corpus, as_corpus, token_ids
from shared.paths import CORPORA_DIR

_ENCODED: dict[tuple[str, str, str, str], torch.Tensor] = {}


def encode_split(tokenizer: Tokenizer, split: str, corpus: Corpus | dict | str | None = None) -> torch.Tensor:
    """All token ids of one corpus split (:func:`shared.corpus.token_ids`; default: the embedded Shakespeare corpus)
    → 1-D LongTensor, cached in memory per (tokenizer, corpus, split). The cached tensor is shared: do not modify it
    in place."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be train/validation/test, got {split!r}")
    c = as_corpus(corpus)
    key = (hashlib.sha256(tokenizer.to_str().encode()).hexdigest(), str(CORPORA_DIR), c.model_dump_json(), split)
    if key not in _ENCODED:
        _ENCODED[key] = token_ids(tokenizer, split, c)
    return _ENCODED[key]


def windows(ids: torch.Tensor, seq_len: int = 256) -> torch.Tensor:
    """Contiguous non-overlapping windows ``[N, seq_len]`` of a 1-D token stream (the tail shorter than
    ``seq_len`` is dropped; no padding). A view of ``ids``."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n = ids.numel() // seq_len
    if n < 1:
        raise ValueError(f"{ids.numel()} tokens hold no window of seq_len={seq_len}")
    return ids[:n * seq_len].view(n, seq_len)


def batch_order(n_windows: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """Window indices ``LongTensor[steps, batch_size]``: epochs of seeded random permutations of
    ``range(n_windows)`` laid end to end (each epoch reshuffled from the same generator) and cut into batches.
    Same arguments → same order on every machine; every optimizer of a comparison uses the same order."""
    if n_windows < 1 or batch_size < 1 or steps < 1:
        raise ValueError(f"need n_windows, batch_size, steps >= 1, got {n_windows}, {batch_size}, {steps}")
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    epochs = [torch.randperm(n_windows, generator=g) for _ in range(-(-need // n_windows))]
    return torch.cat(epochs)[:need].view(steps, batch_size).clone()


def order_hash(order: torch.Tensor) -> str:
    """sha256 (hex) of a batch order: its shape and its ids as little-endian int64 — equal hashes ⇔ the runs saw
    the same windows in the same batches."""
    if order.dim() != 2:
        raise ValueError(f"order must be [steps, batch_size], got shape {tuple(order.shape)}")
    h = hashlib.sha256(f"{tuple(order.shape)}".encode())
    h.update(order.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return h.hexdigest()


def validation_windows(tokenizer: Tokenizer, n: int, seq_len: int = 256,
                       corpus: Corpus | dict | str | None = None) -> torch.Tensor:
    """The first ``n`` windows of ``seq_len`` tokens of the validation split → ``[n, seq_len]``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    w = windows(encode_split(tokenizer, "validation", corpus), seq_len)
    if w.shape[0] < n:
        raise ValueError(f"the validation split holds only {w.shape[0]} windows of {seq_len} tokens, asked for {n}")
    return w[:n].clone()
