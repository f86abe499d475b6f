"""RefreshKV / Recycled Attention pipeline stages (papers/refreshkv/dvc.yaml runs
``python -m papers.refreshkv.stages <stage>``; the runner in ``shared.stages`` owns params validation, MLflow, seeds
and result files; claims are rules in paper.yaml judged by ``shared.verdicts``). Spec: papers/long_context.md §4.2.

    segments   contiguous, disjoint Shakespeare segments of P + T tokens chosen by seed
    evaluate   per segment: the exact prefill of P tokens is recorded ONCE (shared.cache.base.record_prefill); every
               method compresses it into its own cache and the next T tokens are teacher-forced through it
               (shared.kv_eval.decode_through, mode="forward": equal to step-by-step decoding, tested): NLL, drift per 64-step bin against vanilla, keys attended
               per step, wall time (MLflow only)

Methods are registered KV methods (shared.cache.registry) named in params.yaml: vanilla = the full cache, StreamingLLM
= ``lm_infinite`` with 4 sinks + K − 4 recent at their original positions over the exact prefill, SnapKV (window 1,
kernel 7, max; = RefreshKV without refresh), RefreshKV with stride S.
"""
from __future__ import annotations

import time
from statistics import fmean
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from shared.cache.base import record_prefill
from shared.cache.registry import build
from shared.io import save_safetensors
from shared.kv_eval import decode_through
from shared.reports import result_table
from shared.corpus import Corpus
from shared.stages import Paper, Params, StageContext
from shared.tasks import corpus_ids, token_windows

SEGMENTS = "segments.safetensors"


class Eval(Params):
    n_segments: int = Field(ge=1)
    prefill: int = Field(ge=2)             # P
    decode: int = Field(ge=1)              # T
    budget: int = Field(ge=1)              # K
    bins: int = Field(ge=1)                # drift bins over the T decoded tokens (spec: 4 × 64)
    gap_target: float = Field(gt=0, le=1)  # G threshold of the claim (spec: 0.3)

    @model_validator(mode="after")
    def _check(self):
        if self.budget >= self.prefill:     # K ≥ context: the partial cache is the full one, nothing is tested
            raise ValueError(f"eval.budget = {self.budget} must be < eval.prefill = {self.prefill} (K < context)")
        if self.decode % self.bins:
            raise ValueError(f"eval.decode = {self.decode} must be a multiple of eval.bins = {self.bins}")
        return self


class SecondModel(Params):
    model: str                             # e.g. gemma3-270m (15 of 18 layers slide over 512 tokens)
    eval: Eval


class RKVParams(Params):
    seed: int = 0
    model: str
    split: str = "test"
    corpus: Corpus = Corpus()              # the text `segments` reads (default: the embedded Shakespeare)
    methods: dict[str, dict[str, Any]]     # label → {method: <registered name>, **params}; `full` = vanilla
    eval: Eval
    second_model: SecondModel | None = None  # the same table on a model whose local layers bound attention already

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        for label, spec in v.items():
            spec = dict(spec)
            name = spec.pop("method", None)
            if name is None:
                raise ValueError(f"methods.{label}: give `method: <registered KV method>`")
            build(name, 0.0, **{k: x for k, x in spec.items() if k != "budget_from_eval"})  # names/values checked
        if not any(spec.get("method") == "full" for spec in v.values()):
            raise ValueError("methods must include the vanilla row (method: full)")
        return v


paper = Paper("refreshkv", RKVParams, __file__)
main = paper.main


def method_for(spec: dict, budget: int):
    """The registered method of a params row; ``budget_from_eval: <param>`` sets that param from eval.budget
    (RefreshKV's K; StreamingLLM's n_local = K − n_global)."""
    spec = dict(spec)
    name, field = spec.pop("method"), spec.pop("budget_from_eval", None)
    if field == "budget":
        spec["budget"] = budget
    elif field == "n_local":
        spec["n_local"] = budget - spec.get("n_global", 0)
    return build(name, 0.0, **spec)


@paper.stage("segments")
def segments(ctx: StageContext) -> None:
    p, e = ctx.params, ctx.params.eval
    _, tok, _ = ctx.model()
    ids = corpus_ids(tok, p.split, max_chars=None, corpus=p.corpus)
    segs = token_windows(ids, e.n_segments, e.prefill + e.decode, ctx.seed)
    save_safetensors(ctx.artifact(SEGMENTS), {"segments": segs.contiguous()},
                     {"model": p.model, "split": p.split, "seed": str(ctx.seed)})


@paper.stage("evaluate")
def evaluate(ctx: StageContext) -> dict:
    from safetensors.torch import load_file

    segs = load_file(str(ctx.artifact(SEGMENTS)))["segments"]
    return {"ra.json": evaluate_segments(ctx, "evaluate", ctx.params.model, ctx.params.eval, segs)}


@paper.stage("second_model")
def second_model(ctx: StageContext) -> dict:
    """The same table on ``second_model`` (its own tokenizer: its own segments, same seed, split and corpus)."""
    p, s = ctx.params, ctx.params.second_model
    if s is None:
        raise ValueError("second_model is not set in params.yaml")
    _, tok, _ = ctx.model(s.model)
    ids = corpus_ids(tok, p.split, max_chars=None, corpus=p.corpus)
    segs = token_windows(ids, s.eval.n_segments, s.eval.prefill + s.eval.decode, ctx.seed)
    return {"ra_second_model.json": evaluate_segments(ctx, "second_model", s.model, s.eval, segs)}


def keys_per_step(cache, P: int, T: int) -> float:
    """Key slots attended per decode step, per layer and KV head: a layer that counts them (``reads``: eviction,
    RefreshKV, sliding-window layers) gives its count; an exact layer reads P + t + 1 at step t (mean P + (T + 1)/2)."""
    exact = P + (T + 1) / 2
    if not any(getattr(layer, "reads", None) for layer in cache.layers):
        return exact
    H = cache.layers[0].keys.shape[1]
    total = sum(sum(layer.reads) if getattr(layer, "reads", None) else exact * T * H for layer in cache.layers)
    return total / (len(cache.layers) * T * H)


def evaluate_segments(ctx: StageContext, stage: str, model_name: str, e: Eval, segs: torch.Tensor) -> dict:
    """Per segment: the exact prefill of P tokens recorded once, every method's cache, T teacher-forced tokens →
    the result table (NLL, PPL, G, keys/step, drift bins) with per-segment cases."""
    p = ctx.params
    model, _, _ = ctx.model(model_name)
    P, T, nb = e.prefill, e.decode, e.bins
    cases, drift = [], []
    bar = tqdm(total=len(segs) * len(p.methods), desc="refreshkv segments × methods")
    for i, seg in enumerate(segs):
        rec = record_prefill(model, seg[None, :P])                             # once per segment, shared
        per_tok = {}
        for label, mspec in p.methods.items():
            method = method_for(mspec, e.budget)
            t0 = time.perf_counter()
            cache = method(rec)
            # one teacher-forced forward: every registered method's layers give each query what its own decode step
            # would (tests/cache/test_teacher_forced.py; RefreshKV runs the T steps in order inside each layer)
            logits = decode_through(model, cache, seg[None, P:P + T], P, mode="forward")
            ctx.timing(f"{label}/segment{i}", time.perf_counter() - t0)
            first = (cache.prefill_logits if cache.prefill_logits is not None else rec.last_logits)[:, None]
            lp = torch.log_softmax(torch.cat([first, logits[:, :-1]], 1)[0], -1)
            per_tok[label] = -lp.gather(1, seg[P:P + T, None])[:, 0]          # NLL of tokens P .. P+T−1
            cases.append({"segment": i, "method": label, "nll": float(per_tok[label].mean()),
                          "keys_per_step": keys_per_step(cache, P, T)})
            bar.update()
        v = per_tok[next(k for k, s in p.methods.items() if s["method"] == "full")]
        for label, nll in per_tok.items():
            for b, (x, y) in enumerate(zip(nll.chunk(nb), v.chunk(nb)), start=1):
                drift.append({"segment": i, "method": label, "bin": b, "drift": float(x.mean() - y.mean())})
    bar.close()
    by = {(r["segment"], r["method"]): r["nll"] for r in cases}
    van = next(k for k, s in p.methods.items() if s["method"] == "full")
    for r in cases:                            # gap closure G = (SnapKV − RA)/(SnapKV − V), as an excess over target
        snap, v = by[(r["segment"], "snapkv")], by[(r["segment"], van)]
        r["closure_excess"] = (snap - r["nll"]) - e.gap_target * (snap - v)
        r["zero"] = 0.0
    rows = []
    for label in p.methods:
        got = [r for r in cases if r["method"] == label]
        nll, snap, v = (fmean(r["nll"] for r in cases if r["method"] == m) for m in (label, "snapkv", van))
        row = {"method": label, "nll": nll, "ppl": float(torch.tensor(nll).exp()),
               "gap_closure": (snap - nll) / (snap - v) if snap != v else None,
               "keys_per_step": fmean(r["keys_per_step"] for r in got)}
        for b in range(1, nb + 1):
            row[f"drift_{b}"] = fmean(d["drift"] for d in drift if d["method"] == label and d["bin"] == b)
        rows.append(row)
        ctx.cell(f"{stage}/{label}", {k: x for k, x in row.items() if isinstance(x, float)})
    cols = [["method", "method"], ["nll", "NLL"], ["ppl", "PPL"], ["gap_closure", "G"],
            ["keys_per_step", "keys/step/layer/head"]] + [[f"drift_{b}", f"drift bin {b}"] for b in range(1, nb + 1)]
    return result_table(
        f"Table 1 analogue — NLL of {T} teacher-forced tokens after a {P}-token prefill, K = {e.budget}", cols, rows,
        setting=f"{e.n_segments} contiguous Shakespeare segments ({p.split} split) × ({P} + {T}) tokens, {model_name}; "
                f"per method: {', '.join(f'{k} = {v}' for k, v in p.methods.items())}",
        table_ref="ACL Table 1 (16K, K = 2048, last 256 tokens)", cases=cases, drift=drift,
        notes=[f"Unit of replication: segment (n = {e.n_segments}). Drift = NLL − vanilla NLL per {T // nb}-step "
               "bin. G = (SnapKV − RA)/(SnapKV − V) in log-PPL (the paper's gap closure). keys/step = key slots "
               "attended per decode step, per layer and KV head. Wall time is in MLflow only: a 135M model's CPU "
               "decode is overhead-bound, so speed is not a claim here."])


if __name__ == "__main__":
    raise SystemExit(main())
