"""LM-Infinite pipeline stages (papers/lm_infinite/dvc.yaml runs ``python -m papers.lm_infinite.stages <stage>``;
the runner in ``shared.stages`` owns params validation, MLflow, seeds and result files; claims are rules in
paper.yaml judged by ``shared.verdicts``). Spec: papers/long_context.md §4.1.

    segments   contiguous, disjoint Shakespeare segments chosen by seed (C1: 16k tokens, C2/C3: 8k tokens)
    c1         out-of-distribution length: per-token NLL of one forward pass (official models/model_base.py:49-72,
               never a sliding window) for vanilla (SDPA) and Λ(n_g, n_l = L = the release window), in buckets
    c2         L = the stable-phase window (2048): vanilla, Λ, window only (n_g = 0), Λ without ceiling
    c3         Λ prefill of all but the last tokens into the Λ cache, then teacher-forced decoding: the NLL equals
               the single pass (c2) and the cache stays n_g + n_l long
"""
from __future__ import annotations

import time

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from shared.cache.lm_infinite import LMInfinite
from shared.io import save_safetensors
from shared.kv_eval import decode_through
from shared.lambda_attention import check_lambda_params
from shared.reports import result_table
from shared.corpus import Corpus
from shared.stages import Paper, Params, StageContext
from shared.tasks import corpus_ids, token_windows

SEGMENTS = "segments.safetensors"


# ---- params schema -----------------------------------------------------------------------------------------------
class Lambda(Params):
    n_global: int = Field(ge=0)          # n_g
    n_local: int = Field(ge=1)           # n_l = L (official: limit = local)
    block: int = Field(default=1024, ge=1)

    @model_validator(mode="after")
    def _check(self):
        check_lambda_params(self.n_global, self.n_local)
        return self


class C1(Params):
    n_segments: int = Field(ge=1)
    seq_len: int = Field(ge=2)
    lam: Lambda
    buckets: list[int] = Field(min_length=2)    # bucket edges in tokens, e.g. [0, 2048, 4096, 8192, 12288, 16384]
    spans: list[tuple[int, int]] = Field(default_factory=list)   # extra [a, b) spans the claims compare


class C2(C1):
    pass


class C3(Params):
    decode_tokens: int = Field(ge=1)     # the last tokens of each C2 segment are decoded through the Λ cache


class LMIParams(Params):
    seed: int = 0
    model: str
    split: str = "train"
    corpus: Corpus = Corpus()              # the text `segments` reads (default: the embedded Shakespeare)
    c1: C1
    c2: C2
    c3: C3

    @model_validator(mode="after")
    def _consistent(self):
        for name, c in (("c1", self.c1), ("c2", self.c2)):
            if c.buckets[0] != 0 or c.buckets[-1] != c.seq_len or c.buckets != sorted(set(c.buckets)):
                raise ValueError(f"{name}.buckets must rise from 0 to {name}.seq_len = {c.seq_len}, got {c.buckets}")
        if self.c3.decode_tokens >= self.c2.seq_len:
            raise ValueError(f"c3.decode_tokens = {self.c3.decode_tokens} must be < c2.seq_len = {self.c2.seq_len}")
        return self


paper = Paper("lm_infinite", LMIParams, __file__)
main = paper.main


# ---- helpers -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def token_nlls(model, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-token NLL [T − 1] of one forward pass over ``ids`` [1, T]: token t+1 given tokens ≤ t. The LM head runs
    in chunks so that a 16k-token pass never holds [T, vocab] logits."""
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
    out = []
    for s in range(0, ids.shape[1] - 1, chunk):
        logits = model.lm_head(hidden[s:s + chunk][: ids.shape[1] - 1 - s]).float()
        out.append(torch.nn.functional.cross_entropy(logits, ids[0, s + 1:s + 1 + logits.shape[0]],
                                                     reduction="none"))
    return torch.cat(out)


def _buckets(nll: torch.Tensor, edges: list[int], spans=()) -> dict[str, float]:
    """Mean NLL per position bucket [a, b) (position of the predicted token) and per extra span."""
    pos = torch.arange(1, nll.numel() + 1)
    return {f"{a}-{b}": float(nll[(pos >= a) & (pos < b)].mean())
            for a, b in list(zip(edges, edges[1:])) + [tuple(s) for s in spans]}


def _variants(c, lam_only=False) -> dict[str, LMInfinite | None]:
    lam = c.lam
    out = {"vanilla": None, "lambda": LMInfinite(n_global=lam.n_global, n_local=lam.n_local, block=lam.block)}
    if not lam_only:
        out["window"] = LMInfinite(n_global=0, n_local=lam.n_local, block=lam.block)
        out["lambda_no_ceiling"] = LMInfinite(n_global=lam.n_global, n_local=lam.n_local, ceiling=False,
                                              block=lam.block)
    return out


def _nll_table(ctx: StageContext, c, segs: torch.Tensor, variants: dict, key: str) -> tuple[list, list, dict]:
    model, _, _ = ctx.model()
    cases, tails = [], {}
    bar = tqdm(total=len(segs) * len(variants), desc=f"{key} NLL passes")
    for i, seg in enumerate(segs):
        for name, method in variants.items():
            t0 = time.perf_counter()
            if method is None:
                nll = token_nlls(model, seg[None])
            else:
                with method.full_sequence(model):
                    nll = token_nlls(model, seg[None])
            ctx.timing(f"{key}/{name}/segment{i}", time.perf_counter() - t0)
            for bucket, v in _buckets(nll, c.buckets, c.spans).items():
                cases.append({"segment": i, "variant": name, "bucket": bucket, "nll": v})
            if name == "lambda":
                tails[i] = nll[-ctx.params.c3.decode_tokens:].tolist()
            bar.update()
    bar.close()
    rows = []
    for name in variants:
        row = {"variant": name}
        for a, b in zip(c.buckets, c.buckets[1:]):
            vals = [r["nll"] for r in cases if r["variant"] == name and r["bucket"] == f"{a}-{b}"]
            row[f"{a}-{b}"] = sum(vals) / len(vals)
        rows.append(row)
        ctx.cell(f"{key}/{name}", {k: v for k, v in row.items() if k != "variant"})
    return rows, cases, tails


def _columns(c) -> list:
    return [["variant", "variant"]] + [[f"{a}-{b}", f"NLL [{a}, {b})"] for a, b in zip(c.buckets, c.buckets[1:])]


def _segments(ctx: StageContext, name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(ctx.artifact(SEGMENTS)))[name]


# ---- stages ------------------------------------------------------------------------------------------------------
@paper.stage("segments")
def segments(ctx: StageContext) -> None:
    """C1 segments, then C2 segments cut from further windows of C1's length: all contiguous and disjoint."""
    p = ctx.params
    _, tok, _ = ctx.model()
    ids = corpus_ids(tok, p.split, max_chars=None, corpus=p.corpus)
    per = max(1, p.c1.seq_len // p.c2.seq_len)
    n_extra = -(-p.c2.n_segments // per)
    windows = token_windows(ids, p.c1.n_segments + n_extra, p.c1.seq_len, ctx.seed)
    c2 = windows[p.c1.n_segments:, :per * p.c2.seq_len].reshape(-1, p.c2.seq_len)[:p.c2.n_segments]
    save_safetensors(ctx.artifact(SEGMENTS), {"c1": windows[:p.c1.n_segments].contiguous(), "c2": c2.contiguous()},
                     {"model": p.model, "split": p.split, "seed": str(ctx.seed)})


@paper.stage("c1")
def c1(ctx: StageContext) -> dict:
    c = ctx.params.c1
    rows, cases, _ = _nll_table(ctx, c, _segments(ctx, "c1"), _variants(c, lam_only=True), "c1")
    return {"c1.json": result_table(
        f"C1 — NLL by position past the release window ({c.seq_len} tokens = 2× SmolLM2's 8192)", _columns(c), rows,
        setting=f"{c.n_segments} contiguous Shakespeare segments × {c.seq_len} tokens; one forward pass each; "
                f"Λ: n_g = {c.lam.n_global}, n_l = L = {c.lam.n_local}, query block {c.lam.block}",
        table_ref="§4.1 C1 (paper Fig. 1 / Table 1 analogue)", cases=cases,
        notes=["Unit of replication: segment (n = number of segments); per-token NLL of a single pass, bucketed by "
               "position; never a sliding window (it hides the failure)."])}


@paper.stage("c2")
def c2(ctx: StageContext) -> dict:
    c = ctx.params.c2
    rows, cases, tails = _nll_table(ctx, c, _segments(ctx, "c2"), _variants(c), "c2")
    return {"c2.json": result_table(
        f"C2 — L = {c.lam.n_local} (SmolLM2's stable-phase window) on {c.seq_len}-token segments", _columns(c), rows,
        setting=f"{c.n_segments} segments × {c.seq_len} tokens; Λ(n_g = {c.lam.n_global}, n_l = L = "
                f"{c.lam.n_local}); window = n_g 0; Λ without ceiling = global keys at their true distance",
        table_ref="§4.1 C2 (paper Table 3 ablation analogue)", cases=cases, tails=tails)}


@paper.stage("c3")
def c3(ctx: StageContext) -> dict:
    from shared.io import read_json

    p, c = ctx.params, ctx.params.c2
    model, _, _ = ctx.model()
    tails = read_json(ctx.results_dir / "c2.json")["tails"]
    n = p.c3.decode_tokens
    lam = LMInfinite(n_global=c.lam.n_global, n_local=c.lam.n_local, block=c.lam.block)
    cases = []
    for i, seg in enumerate(tqdm(_segments(ctx, "c2"), desc="c3 Λ prefill + decode")):
        P = seg.numel() - n                         # prefill P tokens; predict the last n (as c2's tails do)
        t0 = time.perf_counter()
        cache = lam.prefill(model, seg[None, :P])
        logits = decode_through(model, cache, seg[None, P:P + n], P)           # step by step
        ctx.timing(f"c3/segment{i}", time.perf_counter() - t0)
        first = cache.prefill_logits[:, None]
        lp = torch.log_softmax(torch.cat([first, logits[:, :-1]], 1)[0], -1)
        nll = -lp.gather(1, seg[P:P + n, None])[:, 0]
        single = torch.tensor(tails[str(i)])
        cases += [{"segment": i, "variant": "decode", "nll": float(nll.mean())},
                  {"segment": i, "variant": "single_pass", "nll": float(single.mean())}]
        cases[-2].update(max_abs_diff=float((nll - single).abs().max()), cache_len=cache.layers[0].n_stored,
                         bound=c.lam.n_global + c.lam.n_local)
    rows = []
    for v in ("single_pass", "decode"):
        got = [r for r in cases if r["variant"] == v]
        rows.append({"variant": v, "nll": sum(r["nll"] for r in got) / len(got),
                     "max_abs_diff": max((r.get("max_abs_diff", 0.0) for r in got), default=0.0),
                     "cache_len": max((r.get("cache_len", 0) for r in got), default=None)})
    return {"c3.json": result_table(
        f"C3 — decoding through the Λ cache equals the single pass ({n} teacher-forced tokens)",
        [["variant", "variant"], ["nll", "NLL"], ["max_abs_diff", "max |per-token Δ|"], ["cache_len", "cache slots"]],
        rows, table_ref="§4.1 C3",
        setting=f"per C2 segment: Λ prefill of {c.seq_len - n} tokens into the Λ cache (first {c.lam.n_global} + "
                f"last {c.lam.n_local}), then {n} tokens decoded one at a time", cases=cases)}


if __name__ == "__main__":
    raise SystemExit(main())
