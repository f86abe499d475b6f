"""Evaluate KV-cache methods on :class:`~shared.tasks.PromptCase` lists — the engine every KV paper's tables use.

Per batch of cases (equal context length): the exact context prefill runs **once** (:func:`record_prefill`) and is
shared by all methods; each method compresses it into its own cache; then the forced tokens go through that cache.
Two modes, equal up to float reassociation (tests/cache/test_teacher_forced.py asserts it for every registered
method): ``"step"`` decodes them one at a time (true incremental decoding, the reference); ``"forward"`` (the
default of :func:`evaluate_methods`) runs ONE teacher-forced forward over all of them (:func:`forced_forward`),
each query seeing the cache exactly as at its own step (CSKV's moving window through a per-query mixed mask, see
shared/cache/lowrank.py). A cache whose layers do not declare ``supports_forced_forward`` is decoded step by step.

Protocols (see shared/tasks/base.py):
    decode  prefill = context; decoded through the cache = question + answer prefix + answer (multi-turn use)
    paper   prefill = context + question + answer prefix; decoded = answer (the paper's setup)

Metrics per case, all against the gold answer and against the full cache on the same tokens:
    correct      every answer token is the greedy (argmax) choice — identical to greedy decoding reproducing the
                 gold answer as its first tokens
    answer_nll   mean negative log-likelihood of the answer tokens (continuation perplexity = exp of it)
    kl           mean KL(full ‖ method) of next-token distributions over all decoded positions
    top1         fraction of decoded positions whose argmax equals the full cache's argmax
    bytes        real storage of the compressed context cache; full_bytes the same for the full cache
"""
from __future__ import annotations

import math
from collections import defaultdict
from statistics import fmean
from typing import Callable

import torch
from tqdm.auto import tqdm

from shared.cache.base import CompressedCache, PrefillRecord, attach, forced_decoding, full_cache, record_prefill
from shared.metrics import kl_divergence, token_nll, top1_agreement, wilson_interval
from shared.tasks.base import PromptCase

PROTOCOLS = ("decode", "paper")
MethodBuilder = Callable[[PrefillRecord], CompressedCache]


def split_case(case: PromptCase, protocol: str) -> tuple[list[int], list[int], int]:
    """(prefilled ids, decoded ids, index in decoded ids where the answer starts)."""
    if protocol == "decode":
        return case.prefix_ids, case.query_ids + case.answer_ids, len(case.query_ids)
    if protocol == "paper":
        return case.prefix_ids + case.query_ids, case.answer_ids, 0
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _positions(start_pos: int | torch.Tensor, batch: int, device) -> torch.Tensor:
    if isinstance(start_pos, torch.Tensor):
        if start_pos.shape != (batch,):
            raise ValueError(f"start_pos must be an int or a [{batch}] tensor, got shape {tuple(start_pos.shape)}")
        return start_pos.to(device=device, dtype=torch.long)[:, None]
    return torch.full((batch, 1), int(start_pos), dtype=torch.long, device=device)


def _step_mask(cache: CompressedCache, batch: int, n_new: int, device, explicit: bool = False
               ) -> torch.Tensor | None:
    """[B, S + n_new] attention mask over the cache's context slots (``cache.kv_mask``) and the decoded tokens.
    ``explicit``: all ones rather than None without padding (a multi-token forward over a cache must not leave the
    causal alignment to SDPA's ``is_causal``, which is top-left)."""
    if explicit:  # over every slot the cache holds (context + tokens decoded before) and the n_new tokens
        n_ctx = 0 if cache.kv_mask is None else cache.kv_mask.shape[1]
        ones = torch.ones(batch, cache.get_seq_length() + n_new - n_ctx, dtype=torch.long, device=device)
        return ones if cache.kv_mask is None else torch.cat([cache.kv_mask.to(device).long(), ones], 1)
    if cache.kv_mask is None:
        return None
    return torch.cat([cache.kv_mask.to(device).long(), torch.ones(batch, n_new, dtype=torch.long, device=device)], 1)


DECODE_MODES = ("step", "forward")


@torch.no_grad()
def forced_forward(model, cache: CompressedCache, tokens: torch.Tensor, start_pos: int | torch.Tensor
                   ) -> torch.Tensor:
    """Teacher forcing in ONE forward: logits [B, n, V] (fp32) of ``tokens`` [B, n] fed through ``cache`` at once,
    equal to :func:`decode_through` step by step up to float reassociation (every query attends the cache as its own
    decode step would). Raises ``ValueError`` if the cache does not declare ``supports_forced_forward``.

    Afterwards the cache holds the n tokens as the n steps would leave it (same storage and bytes; the values of the
    new tokens' K/V may differ from the steps' in the last float bits), so decoding can continue from it."""
    B, n = tokens.shape
    start = _positions(start_pos, B, tokens.device)
    with forced_decoding(cache), attach(model, cache):
        logits = model(input_ids=tokens, position_ids=start + torch.arange(n, device=tokens.device),
                       past_key_values=cache, attention_mask=_step_mask(cache, B, n, tokens.device, explicit=True),
                       use_cache=True).logits
    return logits.float()


@torch.no_grad()
def decode_through(model, cache: CompressedCache, tokens: torch.Tensor, start_pos: int | torch.Tensor,
                   mode: str = "step") -> torch.Tensor:
    """Feed ``tokens`` [B, n] through ``cache``; returns logits [B, n, V] (fp32). ``start_pos``: RoPE position of the
    first token (an int, or one per row: ``record.next_positions``); a cache with a ``kv_mask`` (left-padded rows) is
    decoded with the matching attention mask. ``mode="step"`` (default, the reference): one position at a time;
    ``"forward"``: :func:`forced_forward` when the cache supports it, else step by step (same numbers)."""
    if mode not in DECODE_MODES:
        raise ValueError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
    if mode == "forward" and cache.supports_forced_forward:
        return forced_forward(model, cache, tokens, start_pos)
    B = tokens.shape[0]
    out = []
    start = _positions(start_pos, B, tokens.device)
    with attach(model, cache):
        for i in range(tokens.shape[1]):
            logits = model(input_ids=tokens[:, i:i + 1], position_ids=start + i, past_key_values=cache,
                           attention_mask=_step_mask(cache, B, i + 1, tokens.device), use_cache=True).logits
            out.append(logits[:, -1].float())
    return torch.stack(out, dim=1)


@torch.no_grad()
def greedy_generate(model, cache: CompressedCache, first_logits: torch.Tensor, start_pos: int | torch.Tensor,
                    max_new_tokens: int,
                       eos_token_id: int | None = None) -> list[list[int]]:
    """Greedy decoding (the paper's LongEval protocol) from ``first_logits`` [B, V]; returns new token ids."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B = first_logits.shape[0]
    nxt = first_logits.argmax(-1)
    done = torch.zeros(B, dtype=torch.bool, device=nxt.device)
    outs: list[list[int]] = [[] for _ in range(B)]
    with attach(model, cache):
        for i in range(max_new_tokens):
            for b in range(B):
                if not done[b]:
                    outs[b].append(int(nxt[b]))
            if eos_token_id is not None:
                done |= nxt == eos_token_id
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            logits = model(input_ids=nxt[:, None], position_ids=_positions(start_pos, B, nxt.device) + i,
                           past_key_values=cache, attention_mask=_step_mask(cache, B, i + 1, nxt.device),
                           use_cache=True).logits
            nxt = logits[:, -1].argmax(-1)
    return outs


def _pad_right(seqs: list[list[int]], pad: int) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (n - len(s)) for s in seqs], dtype=torch.long)


def _batches(cases: list[PromptCase], protocol: str, batch_size: int):
    groups = defaultdict(list)
    for i, c in enumerate(cases):
        groups[len(split_case(c, protocol)[0])].append(i)
    for _, idx in sorted(groups.items()):
        for s in range(0, len(idx), batch_size):
            yield idx[s:s + batch_size]


@torch.no_grad()
def evaluate_methods(model, cases: list[PromptCase], methods: dict[str, MethodBuilder], protocol: str = "decode",
                     batch_size: int = 4, pad_token_id: int = 0, desc: str = "cases", mode: str = "forward"
                     ) -> list[dict]:
    """Score every method on every case; the full cache is always evaluated (first) as the reference.
    ``mode``: how the forced tokens go through each cache (module doc): ``"forward"`` (default; one teacher-forced
    forward, caches that cannot do it are decoded step by step) or ``"step"`` (token by token, the reference).

    Returns one row per (method, case): ``{"method", "case", "correct", "answer_nll", "kl", "top1", "bytes",
    "full_bytes", "context_tokens"}``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not cases:
        raise ValueError("no cases to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mode not in DECODE_MODES:
        raise ValueError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
    device = next(model.parameters()).device
    rows: list[dict] = []
    all_methods = {"full": full_cache, **{k: v for k, v in methods.items() if k != "full"}}
    bar = tqdm(total=len(cases) * len(all_methods), desc=desc, leave=False)
    for idx in _batches(cases, protocol, batch_size):
        splits = [split_case(cases[i], protocol) for i in idx]
        prefill = torch.tensor([s[0] for s in splits], dtype=torch.long, device=device)
        forced = _pad_right([s[1] for s in splits], pad_token_id).to(device)
        record = record_prefill(model, prefill)
        T = prefill.shape[1]
        full_logp = None
        full_bytes = None
        for name, build in all_methods.items():
            cache = build(record)
            stored = cache.stored_bytes()
            logits = decode_through(model, cache, forced, start_pos=T, mode=mode)
            # logits_all[:, j] predicts forced[:, j]; the first comes from the prefill (the method's own if it has one).
            first = cache.prefill_logits if cache.prefill_logits is not None else record.last_logits
            logits_all = torch.cat([first[:, None], logits[:, :-1]], dim=1)
            logp = torch.log_softmax(logits_all, -1)
            if name == "full":
                full_logp, full_bytes = logp, stored
            for b, i in enumerate(idx):
                _, dec, a0 = splits[b]
                n = len(dec)
                ans = torch.tensor(dec[a0:], device=device)
                lp = logp[b, :n]
                ref = full_logp[b, :n]
                rows.append({
                    "method": name, "case": i, "context_tokens": T,
                    "correct": bool((lp[a0:].argmax(-1) == ans).all()),
                    "answer_nll": float(token_nll(lp[a0:], ans)),
                    "kl": float(kl_divergence(ref, lp)),
                    "top1": float(top1_agreement(ref, lp)),
                    "bytes": stored // len(idx), "full_bytes": full_bytes // len(idx),
                })
            bar.update(len(idx))
            del cache
    bar.close()
    return rows


def summarize(rows: list[dict], keys: tuple[str, ...] = ("method",)) -> list[dict]:
    """Aggregate per-case rows: accuracy with n and 95% Wilson interval, mean NLL/KL/top-1, bytes ratio.

    A key a row lacks groups as ``None`` (e.g. the full cache has no compression ratio). Rows that carry a
    ``seed`` (a trained method evaluated once per training seed) and are grouped without it are pooled per case:
    ``n`` counts **cases** (each case's outcome is its mean over seeds, the Wilson interval uses that fractional
    count), and ``seeds`` / ``accuracy_seed_range`` / ``kl_seed_range`` give the number of seeds and the min–max of
    the per-seed means (the seed-to-seed spread)."""
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in keys)].append(r)
    out = []
    for key, rs in groups.items():
        per_case = defaultdict(list)
        for r in rs:
            per_case[tuple(r.get(k) for k in CASE_KEY)].append(r["correct"])
        n = len(per_case)
        k = sum(fmean(float(x) for x in v) for v in per_case.values())
        k = round(k) if abs(k - round(k)) < 1e-9 else k
        lo, hi = wilson_interval(k, n)
        m = len(rs)
        row = {**dict(zip(keys, key)), "n": n, "accuracy": k / n, "ci95": [lo, hi],
               "answer_ppl": math.exp(sum(r["answer_nll"] for r in rs) / m),
               "kl": sum(r["kl"] for r in rs) / m, "top1": sum(r["top1"] for r in rs) / m,
               "bytes_ratio": sum(r["bytes"] for r in rs) / max(1, sum(r["full_bytes"] for r in rs))}
        by_seed = defaultdict(list)
        for r in rs:
            if r.get("seed") is not None and "seed" not in keys:
                by_seed[r["seed"]].append(r)
        if len(by_seed) > 1:
            accs = [sum(r["correct"] for r in v) / len(v) for v in by_seed.values()]
            kls = [sum(r["kl"] for r in v) / len(v) for v in by_seed.values()]
            row.update({"seeds": len(by_seed), "accuracy_seed_range": [min(accs), max(accs)],
                        "kl_seed_range": [min(kls), max(kls)]})
        out.append(row)
    return out


def evaluate_task(model, tokenizer, task: str, context_tokens: int, n_cases: int, seed: int,
                  methods: dict[str, MethodBuilder], protocol: str = "decode", batch_size: int = 4,
                  labels: dict[str, dict] | None = None, cell=None, full_cache_min_accuracy: float | None = None,
                  return_cases: bool = False) -> list[dict] | tuple[list[dict], list[dict]]:
    """One table cell group: ``n_cases`` seeded cases of a registered task at ``context_tokens``, every method (and
    the full cache) scored on the same cases. Returns summary rows tagged with task/length/protocol and
    ``labels[method]``; ``cell(name, metrics, params)`` logs each row (MLflow). With ``full_cache_min_accuracy``,
    a full cache below it raises (the prompt format or model is broken: no method rows are published).
    With ``return_cases``: ``(summary rows, per-case rows)``, the per-case rows tagged the same way (paired
    statistics between methods need them: every method is scored on the same cases)."""
    from shared.tasks.registry import make_cases

    cases = make_cases(task, tokenizer, context_tokens, n_cases, seed)
    rows = evaluate_methods(model, cases, methods, protocol=protocol, batch_size=batch_size,
                            pad_token_id=tokenizer.pad_token_id or 0, desc=f"{task}@{context_tokens} {protocol}")
    out = []
    for s in summarize(rows):
        s.update({"task": task, "length": context_tokens, "protocol": protocol, **(labels or {}).get(s["method"], {})})
        if cell is not None:
            cell(f"{task}/{context_tokens}/{protocol}/{s['method']}",
                 {k: s[k] for k in ("accuracy", "answer_ppl", "kl", "top1", "bytes_ratio")}, s)
        out.append(s)
    for r in rows:
        r.update({"task": task, "length": context_tokens, "protocol": protocol, **(labels or {}).get(r["method"], {})})
    full = next(r for r in out if r["method"] == "full")
    if full_cache_min_accuracy is not None and full["accuracy"] < full_cache_min_accuracy:
        raise RuntimeError(f"full-cache accuracy on {task}@{context_tokens} is {full['accuracy']:.2f} < "
                           f"{full_cache_min_accuracy} (the range measured for the uncompressed model): refusing to "
                           "publish method rows — check the prompt format / model before comparing methods")
    return (out, rows) if return_cases else out


# ---- table rows from per-case rows (summaries, ratio-averaged rows, breakpoints) ------------------------------
CASE_KEY = ("task", "length", "protocol", "case")
CASE_METRICS = ("correct", "kl", "answer_nll", "top1")
CASE_FIELDS = ("method", "case", "context_tokens", "correct", "answer_nll", "kl", "top1", "bytes", "full_bytes",
               "seed")


def summary_rows(cases: list[dict], keys: tuple[str, ...] = ("task", "length", "protocol", "label",
                                                              "compression_ratio")) -> list[dict]:
    """One table row per ``keys`` group of per-case rows (training seeds pooled, see
    :func:`shared.kv_eval.summarize`), carrying the group's other label fields (e.g. ``window``)."""
    out = []
    for s in summarize(cases, keys):
        first = next(c for c in cases if all(c.get(k) == s[k] for k in keys))
        out.append({**{k: v for k, v in first.items() if k not in s and k not in CASE_FIELDS}, **s})
    return out


def average_over(cases: list[dict], key: str) -> list[dict]:
    """Per-case rows averaged over ``key`` (e.g. the swept compression ratio) per (label, seed, case): the area
    under a method's curve, case by case, so that two methods' areas can be compared paired. Rows lacking ``key``
    (the full cache) are left out."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in cases:
        if r.get(key) is not None:
            groups[(r.get("label"), r.get("seed"), *(r.get(k) for k in CASE_KEY))].append(r)
    out = []
    for (label, seed, *case), rs in groups.items():
        row = {"label": label, "seed": seed, **dict(zip(CASE_KEY, case)), "points": len(rs)}
        for field in CASE_METRICS:
            row[field] = fmean(float(r[field]) for r in rs)
        out.append(row)
    return out


def breakpoint(rows: list[dict], label: str, full_accuracy: float, frac: float = 0.9,
               key: str = "compression_ratio") -> float | None:
    """The largest swept ratio ``r`` such that ``accuracy(r') ≥ frac · full_accuracy`` for every swept ``r' ≤ r``
    (summary rows of one method, selected by ``label``); ``None`` when the smallest ratio already fails."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    pts = sorted((r[key], r["accuracy"]) for r in rows if r.get("label") == label and r.get(key) is not None)
    if not pts:
        raise ValueError(f"no summary rows with label {label!r} and a {key!r}")
    best = None
    for ratio, acc in pts:
        if acc < frac * full_accuracy:
            break
        best = ratio
    return best
