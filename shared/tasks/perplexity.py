"""Perplexity of a causal LM over a corpus split with a sliding window (HF's standard recipe): windows of
``window`` tokens advance by ``stride``; only the last ``stride`` tokens of each window are scored (the first
window scores all), so every token is scored once with ≥ ``window - stride`` tokens of context."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from shared.corpus import Corpus, text as _text, token_ids as _token_ids
from shared.paths import CORPORA_DIR


def corpus_text(split: str, corpus: Corpus | dict | str | None = None, root: Path = CORPORA_DIR) -> str:
    """Concatenated text of one split (:func:`shared.corpus.text`; default: the embedded Shakespeare corpus, works
    in sorted order, separated by blank lines)."""
    return _text(split, corpus, root)


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, window: int = 1024, stride: int = 512,
               max_tokens: int | None = None, progress: bool = True) -> dict:
    """Sliding-window perplexity of ``token_ids`` (1-D LongTensor). Returns ``{"ppl", "nll", "tokens"}``."""
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens")
    device = next(model.parameters()).device
    nll_sum, count, prev_end = 0.0, 0, 0
    starts = list(range(0, max(1, ids.numel() - 1), stride))
    for begin in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        end = min(begin + window, ids.numel())
        chunk = ids[begin:end].to(device)[None]
        logits = model(chunk).logits[0, :-1].float()
        targets = chunk[0, 1:]
        n_new = end - max(prev_end, begin + 1)  # tokens not yet scored (positions prev_end..end-1)
        lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
        nll_sum -= lp[-n_new:].sum().item() if n_new > 0 else 0.0
        count += max(n_new, 0)
        prev_end = end
        if end == ids.numel():
            break
    return {"ppl": math.exp(nll_sum / count), "nll": nll_sum / count, "tokens": count}


def corpus_ids(tokenizer, split: str, max_chars: int | None = 2_000_000,
               corpus: Corpus | dict | str | None = None) -> torch.Tensor:
    """Token ids (1-D) of the first ``max_chars`` characters of a corpus split (:func:`shared.corpus.token_ids`)."""
    return _token_ids(tokenizer, split, corpus, max_chars)


def token_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at seeded random, non-overlapping offsets of ``ids`` → [n, seq_len]."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if n < 1 or seq_len < 2:
        raise ValueError(f"need n >= 1 and seq_len >= 2, got n={n}, seq_len={seq_len}")
    slots = ids.numel() // seq_len
    if slots < n:
        raise ValueError(f"{ids.numel()} tokens hold only {slots} windows of {seq_len}, asked for {n}")
    pick = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([ids[int(i) * seq_len:(int(i) + 1) * seq_len] for i in pick])
