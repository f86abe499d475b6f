"""MatryoshkaKV pipeline stages (papers/matryoshka_kv/dvc.yaml runs ``python -m papers.matryoshka_kv.stages <stage>``;
the runner in ``shared.stages`` owns params validation, MLflow, seeds and result files).

    calibrate   mean/covariance of post-RoPE K and V per (layer, KV head) on the train split → PCA projection
    train       Matryoshka training of the projections (Lightning; 0.25·KL + 0.75·CE, random per-head ranks)
    search      the paper's greedy KL rank search (Algorithm 1) from 100% down to the smallest budget
    evaluate    perplexity / KL-to-full / top-1 on the test split, and the next-line multiple-choice task
    retrieval   passkey retrieval decoded token by token through each method's real cache (measured bytes)

Rows are registered KV methods (``shared.cache.registry``) named in params.yaml's ``methods``; a ``matryoshka`` row
names its projection (``pca`` | ``trained``) and ranks (``uniform`` | ``searched``), which this paper computes. The
KV budget is the paper's word for the fraction of cached K/V channels kept: budget = 1 − compression_ratio.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from safetensors.torch import load_file, save_file

from papers.matryoshka_kv.module import (greedy_rank_search, kv_statistics, split_summary, train_projection)
from shared.cache.base import full_cache, record_prefill
from shared.cache.orthogonal import KVProjection, check_budget, check_ranks
from shared.cache.registry import METHODS, build
from shared.kv_eval import evaluate_task
from shared.metrics import kl_divergence, token_nll, top1_agreement
from shared.reports import claim, result_table
from shared.stages import Paper, Params, StageContext
from shared.tasks import TASKS, corpus_ids, next_line_choice, score_choice, token_windows

Budget = float


# ---- params schema -----------------------------------------------------------------------------------------
class _Budgets(Params):
    @field_validator("*", mode="after")
    @classmethod
    def _budgets(cls, v, info):
        if "budgets" in info.field_name:
            for b in v:
                check_budget(b)
        return v


class Calibration(Params):
    split: Literal["train", "validation", "test"]
    n_sequences: int = Field(ge=1)
    seq_len: int = Field(ge=2)
    batch_size: int = Field(ge=1)


class Train(_Budgets):
    n_sequences: int = Field(ge=1)
    seq_len: int = Field(ge=2)
    accumulate: int = Field(ge=1)
    lr: float = Field(gt=0, lt=1)
    warmup_steps: int = Field(ge=0)
    clip: float = Field(gt=0)
    val_sequences: int = Field(ge=1)
    val_every: int = Field(ge=1)
    val_budgets: list[Budget] = Field(min_length=1)


class Search(_Budgets):
    criterion: Literal["kl", "hidden_l2"]
    delta: int = Field(ge=1)
    per_round: int = Field(ge=1)
    n_sequences: int = Field(ge=1)
    seq_len: int = Field(ge=2)
    budgets: list[Budget] = Field(min_length=1)


class LM(Params):
    split: Literal["train", "validation", "test"]
    n_sequences: int = Field(ge=1)
    seq_len: int = Field(ge=2)
    batch_size: int = Field(ge=1)


class Choice(_Budgets):
    split: Literal["train", "validation", "test"]
    n_items: int = Field(ge=1)
    budgets: list[Budget]


class Retrieval(_Budgets):
    task: str
    lengths: list[int] = Field(min_length=1)
    n_cases: int = Field(ge=1)
    budgets: list[Budget] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)

    @field_validator("task")
    @classmethod
    def _task(cls, v):
        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}; registered: {sorted(TASKS)}")
        return v


class Eval(_Budgets):
    budgets: list[Budget] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    lm: LM
    choice: Choice
    retrieval: Retrieval


class MethodSpec(Params):
    """A row: a registered KV method + its params; ``matryoshka`` rows name their projection and ranks, ``lowrank``
    rows their factors (``svd``: plain SVD of the weights, CSKV's init)."""

    model_config = Params.model_config | {"extra": "allow"}
    method: str
    projection: Literal["pca", "trained"] | None = None
    ranks: Literal["uniform", "searched"] | None = None

    @model_validator(mode="after")
    def _known(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown KV method {self.method!r}; registered: {sorted(METHODS)}")
        if (self.method == "matryoshka") != (self.projection is not None and self.ranks is not None):
            raise ValueError("`projection` and `ranks` are required for method matryoshka and only for it")
        build(self.method, 0.0, **dict(self.model_extra or {}))   # unknown / invalid params fail before any model
        return self


class MKVParams(Params):
    seed: int
    model: str
    calibration: Calibration
    train: Train
    search: Search
    eval: Eval
    methods: dict[str, MethodSpec]

    @model_validator(mode="after")
    def _consistent(self):
        e = self.eval
        missing = [m for m in e.methods + e.retrieval.methods if m not in self.methods]
        if missing:
            raise ValueError(f"eval methods {missing} are not defined under `methods` ({sorted(self.methods)})")
        searched = set(self.search.budgets)
        for b in e.budgets + e.choice.budgets + e.retrieval.budgets:
            if b < 1.0 and b not in searched:
                raise ValueError(f"eval budget {b} has no searched ranks; add it to search.budgets {sorted(searched)}")
        return self


paper = Paper("matryoshka_kv", MKVParams, __file__)
main = paper.main
STATS, PCA, TRAINED, RANKS = "kv_stats.safetensors", "pca.safetensors", "mkv.safetensors", "ranks.safetensors"


def save_projection(path, proj: KVProjection, meta: dict) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in proj.state_dict().items()}, str(tmp),
              metadata={k: str(v) for k, v in meta.items()})
    tmp.replace(path)


def load_projection(path) -> KVProjection:
    if not path.is_file():
        raise FileNotFoundError(f"no projection at {path}; run `dvc repro papers/matryoshka_kv` (calibrate/train)")
    t = load_file(str(path))
    L, H, d, _ = t["x_k"].shape
    proj = KVProjection(L, H, d)
    proj.load_state_dict(t)
    return proj.requires_grad_(False)


# ---- stages ------------------------------------------------------------------------------------------------
@paper.stage("calibrate")
def calibrate(ctx: StageContext) -> None:
    p, c = ctx.params, ctx.params.calibration
    model, tok, _ = ctx.model()
    seqs = token_windows(corpus_ids(tok, c.split), c.n_sequences, c.seq_len, ctx.seed)
    stats = kv_statistics(model, list(seqs.split(c.batch_size)))
    path = ctx.artifact(STATS)
    save_file({k: v.contiguous() for k, v in stats.items()}, str(path), metadata={"model": p.model})
    save_projection(ctx.artifact(PCA), KVProjection.from_statistics(stats), {"init": "pca", "model": p.model})
    ctx.log_metrics({"calibration_tokens": int(stats["tokens"])})


@paper.stage("train")
def train(ctx: StageContext) -> dict:
    import time

    p, t = ctx.params, ctx.params.train
    model, tok, _ = ctx.model()
    proj = load_projection(ctx.artifact(PCA)).requires_grad_(True)
    seqs = token_windows(corpus_ids(tok, "train"), t.n_sequences, t.seq_len, ctx.seed + 1)
    val = list(token_windows(corpus_ids(tok, "validation"), t.val_sequences, t.seq_len, ctx.seed + 2).split(1))
    t0 = time.perf_counter()
    module = train_projection(model, proj, seqs, accumulate=t.accumulate, lr=t.lr, warmup_steps=t.warmup_steps,
                              seed=ctx.seed, val_batches=val, val_every=t.val_every, val_budgets=tuple(t.val_budgets),
                              clip=t.clip, logger=ctx.lightning_logger("train/lightning"), progress=True)
    seconds = time.perf_counter() - t0
    save_projection(ctx.artifact(TRAINED), proj, {"init": "pca", "trained_sequences": t.n_sequences})
    ctx.log_metrics({"seconds": seconds, "tokens": seqs.numel()})
    rows = [{"step": r["step"], "budget": b, "kl": r[f"kl@{b:g}"]} for r in module.curve for b in t.val_budgets]
    b0 = min(t.val_budgets)
    k0, k1 = module.curve[0][f"kl@{b0:g}"], module.curve[-1][f"kl@{b0:g}"]
    return {"train.json": result_table(
        "Matryoshka training: KL to the base model on held-out text at uniform budgets (our eval-loss figure)",
        [["step", "step"], ["budget", "budget"], ["kl", "KL(full ‖ MKV)"]], rows,
        setting=f"{p.model}; {t.n_sequences}×{t.seq_len} train tokens (Shakespeare), batch 1 × accumulation "
                f"{t.accumulate} = {seqs.shape[0] // t.accumulate} AdamW steps, lr {t.lr}, warmup {t.warmup_steps}, "
                f"cosine, clip {t.clip}; KL on {t.val_sequences}×{t.seq_len} validation tokens; {seconds:.0f} s",
        plot={"x": "step", "y": "kl", "series": "budget", "xlabel": "optimizer step", "ylabel": "KL to full"},
        claims=[claim("training_lowers_kl", f"KL@{b0:.1%}: {k0:.3f} → {k1:.3f} in {seqs.numel() / 1e3:.0f}K tokens",
                      strong=k1 <= 0.8 * k0, note="PCA init (step 0) → after one pass; paper ≈16M tokens, ours "
                      f"{seqs.numel() / 1e6:.2f}M")],
        notes=["Step 0 is the PCA initialisation; KL at budget 1 stays at fp32 round-off (exact by construction)."])}


@paper.stage("search")
def search(ctx: StageContext) -> dict:
    import time

    s = ctx.params.search
    model, tok, spec = ctx.model()
    proj = load_projection(ctx.artifact(TRAINED))
    ids = token_windows(corpus_ids(tok, "train"), s.n_sequences, s.seq_len, ctx.seed + 3)
    t0 = time.perf_counter()
    res = greedy_rank_search(model, proj, ids, s.budgets, delta=s.delta, per_round=s.per_round, criterion=s.criterion)
    seconds = time.perf_counter() - t0
    path = ctx.artifact(RANKS)
    save_file({f"{b:g}": r.contiguous() for b, r in res.snapshots.items()}, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)
    ctx.log_metrics({"seconds": seconds, "rounds": len(res.history)})
    rows = []
    for b, r in sorted(res.snapshots.items(), reverse=True):
        sm = split_summary(r, spec.head_dim)
        rows.append({"budget": b, "key_fraction": sm["key_fraction"], "value_fraction": sm["value_fraction"]})
    b_ref = 0.375 if 0.375 in res.snapshots else min(res.snapshots)
    sm = split_summary(res.snapshots[b_ref], spec.head_dim)
    layer_rows = [{"layer": l, "kind": "keys" if kind == "k" else "values", "kept": f}
                  for kind in ("k", "v") for l, f in enumerate(sm[f"per_layer_{kind}"])]
    return {
        "search.json": result_table(
            "Greedy rank search (Algorithm 1): share of key vs value channels kept per budget",
            [["budget", "budget"], ["key_fraction", "key channels kept"], ["value_fraction", "value channels kept"]],
            rows, setting=f"criterion {s.criterion} on {s.n_sequences}×{s.seq_len} train tokens, Δr = {s.delta}, "
                          f"{s.per_round} decrements per round (paper: 1), {len(res.history)} rounds, {seconds:.0f} s",
            claims=[claim("kv_split", f"{sm['key_fraction']:.2%} K vs {sm['value_fraction']:.2%} V at {b_ref:.1%}",
                          strong=sm["value_fraction"] > sm["key_fraction"],
                          note="SmolLM2-135M (3 KV heads × 30 layers), KL search on Shakespeare")],
            notes=[f"Round history: {[round(h['budget'], 4) for h in res.history]}"]),
        "search_layers.json": result_table(
            f"Searched ranks per layer at a {b_ref:.1%} budget (mean kept fraction over the 3 KV heads)",
            [["layer", "layer"], ["kind", "K/V"], ["kept", "kept fraction"]], layer_rows,
            plot={"x": "layer", "y": "kept", "series": "kind", "xlabel": "layer", "ylabel": "fraction kept"})}


class Methods:
    """Registered KV methods configured from params.yaml's ``methods``, at a budget (= 1 − compression_ratio)."""

    def __init__(self, ctx: StageContext):
        self.p = ctx.params
        self.projections = {"pca": load_projection(ctx.artifact(PCA)), "trained": load_projection(ctx.artifact(TRAINED))}
        path = ctx.artifact(RANKS)
        if not path.is_file():
            raise FileNotFoundError(f"no searched ranks at {path}; run the `search` stage")
        self.searched = {float(k): v for k, v in load_file(str(path)).items()}
        self._built: dict = {}

    def method(self, name: str, budget: float):
        key = (name, budget)
        if key not in self._built:
            spec = self.p.methods[name]
            params = dict(spec.model_extra or {})
            if spec.method == "matryoshka":
                params["projection"] = self.projections[spec.projection]
                if spec.ranks == "searched" and budget < 1.0:
                    params["ranks"] = check_ranks(self.searched[budget], params["projection"].head_dim)
            self._built[key] = build(spec.method, round(1.0 - budget, 9), **params)
        return self._built[key]


@torch.no_grad()
def lm_metrics(model, seqs: torch.Tensor, refs: list[torch.Tensor], batch: int) -> dict:
    """Perplexity of ``seqs`` and KL/top-1 to the full model's log-probs ``refs`` (one per batch)."""
    nll, kl, top1, n = 0.0, 0.0, 0.0, 0
    for ids, ref in zip(seqs.split(batch), refs):
        logits = model(input_ids=ids).logits.float()
        nll += float(token_nll(logits[:, :-1], ids[:, 1:], reduction="sum"))
        kl += float(kl_divergence(ref, logits, reduction="sum"))
        top1 += float(top1_agreement(ref, logits, reduction="sum"))
        n += ids.numel()
    n_pred = seqs.shape[0] * (seqs.shape[1] - 1)
    return {"ppl": math.exp(nll / n_pred), "kl": kl / n, "top1": top1 / n}


@paper.stage("evaluate")
def evaluate(ctx: StageContext) -> dict:
    import time

    p, e = ctx.params, ctx.params.eval
    model, tok, _ = ctx.model()
    M = Methods(ctx)
    seqs = token_windows(corpus_ids(tok, e.lm.split), e.lm.n_sequences, e.lm.seq_len, ctx.seed + 4)
    items = next_line_choice(tok, e.choice.n_items, ctx.seed, split=e.choice.split)
    bsz = e.lm.batch_size
    refs = [torch.log_softmax(model(input_ids=x).logits.float(), -1) for x in seqs.split(bsz)]
    record = record_prefill(model, seqs[:1])  # one exact prefill; every configuration's cache bytes come from it
    full_bpt = full_cache(record).stored_bytes() / record.input_ids.numel()
    t0 = time.perf_counter()
    full = lm_metrics(model, seqs, refs, bsz)
    mc_full = score_choice(model, items, progress=False)
    lm_rows = [{"method": "full", "budget": 1.0, **full, "bytes_per_token": full_bpt, "bytes_ratio": 1.0}]
    mc_rows = [{"method": "full", "budget": 1.0, "accuracy": mc_full["accuracy"], "acc_norm": mc_full["acc_norm"],
                "n": mc_full["n"]}]
    for name in e.methods:
        for b in e.budgets:
            m = M.method(name, b)
            bpt = m(record).stored_bytes() / record.input_ids.numel()
            with m.full_sequence(model):
                row = {"method": name, "budget": b, **lm_metrics(model, seqs, refs, bsz), "bytes_per_token": bpt,
                       "bytes_ratio": bpt / full_bpt}
                lm_rows.append(row)
                ctx.cell(f"lm/{name}@{b:g}", {k: v for k, v in row.items() if k != "method"},
                         {"method": name, "budget": b})
                if b in e.choice.budgets:
                    mc = score_choice(model, items, progress=False)
                    mc_rows.append({"method": name, "budget": b, "accuracy": mc["accuracy"],
                                    "acc_norm": mc["acc_norm"], "n": mc["n"]})
                    ctx.cell(f"choice/{name}@{b:g}", {"accuracy": mc["accuracy"], "acc_norm": mc["acc_norm"]},
                             {"method": name, "budget": b})
            print(f"{name}@{b:g}: ppl {row['ppl']:.2f} KL {row['kl']:.4f} bytes {row['bytes_ratio']:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return {
        "lm.json": result_table(
            "Perplexity and KL to the full model on the test split, per method × KV budget",
            [["method", "method"], ["budget", "budget"], ["ppl", "perplexity"], ["kl", "KL to full"],
             ["top1", "top-1 agreement"], ["bytes_ratio", "bytes / full"]], lm_rows, lm_claims(lm_rows),
            setting=f"{p.model}; {seqs.shape[0]}×{seqs.shape[1]} = {seqs.numel()} test tokens (Hamlet/Macbeth/"
                    "Tempest), full-sequence forward with every attention call projected (prefill = decode, tested); "
                    "bytes measured from each method's real cache on one sequence (fp32)",
            plot={"x": "budget", "y": "kl", "series": "method", "xlabel": "KV budget (fraction of channels)",
                  "ylabel": "KL to full (nats/token)"},
            notes=["cskv_svd is the weight-SVD peer (CSKV init, untrained) applied in every attention call; its "
                   "native exact-window cache is in the retrieval table.",
                   "Token eviction (SnapKV) has no full-sequence form (it compresses a prefilled cache): it is "
                   "compared in the retrieval table.",
                   "At budget 1 every projection is orthogonal and exact: KL is fp32 round-off."]),
        "choice.json": result_table(
            "Table 1 analogue: next-line multiple choice (log-likelihood scoring, 4 options)",
            [["method", "method"], ["budget", "budget"], ["accuracy", "acc"], ["acc_norm", "acc_norm"],
             ["n", "items"]], mc_rows, choice_claims(mc_rows),
            setting=f"{len(items)} seeded items from the test split; 3 context lines, true next line vs 3 random "
                    "lines of similar length; acc = summed log-likelihood, acc_norm = per-token (OpenCompass "
                    "ppl-style); chance 0.25",
            notes=["Budget 1 of every projection method equals full exactly (see the KL table), so it is not "
                   "re-run."])}


def _row(rows, method, budget):
    return next((r for r in rows if r["method"] == method and abs(r["budget"] - budget) < 1e-9), None)


# Verdict rules, fixed before the run.
def lm_claims(rows: list[dict]) -> list[dict]:
    full = _row(rows, "full", 1.0)
    out = []
    exact = [r for r in rows if r["budget"] == 1.0 and r["method"] in ("pca_uniform", "mkv_uniform", "mkv_searched")]
    if exact:
        worst = max(r["kl"] for r in exact)
        dppl = max(abs(r["ppl"] - full["ppl"]) for r in exact)
        out.append(claim("exact_full_rank", f"max KL {worst:.1e}, |Δppl| ≤ {dppl:.1e} at 100%", strong=worst < 1e-5,
                         note="ours is exact at r = d (fp32 U); the paper's bf16 runs lose up to 2 points"))
    pca50, mkv50 = _row(rows, "pca_uniform", 0.5), _row(rows, "mkv_uniform", 0.5)
    if pca50 and full:
        ratio = pca50["ppl"] / full["ppl"]
        out.append(claim("pca_collapse", f"PCA ppl ×{ratio:.2f} of full at 50% (KL {pca50['kl']:.3f})",
                         strong=ratio >= 2.0, note="rule: collapse = perplexity at least doubles at a 50% budget"))
    budgets = sorted({r["budget"] for r in rows if r["method"] == "pca_uniform"}, reverse=True)
    clear = [b for b in budgets if _row(rows, "mkv_uniform", b) and _row(rows, "pca_uniform", b)
             and _row(rows, "mkv_uniform", b)["kl"] <= 0.7 * _row(rows, "pca_uniform", b)["kl"]]
    if pca50 and mkv50:
        where = ", ".join(f"{b:.3g}" for b in clear) if clear else "no budget"
        out.append(claim("mkv_beats_pca", f"KL {mkv50['kl']:.3f} vs {pca50['kl']:.3f} at 50%; MKV ≥ 30% lower KL at "
                         f"budgets {where} (of {', '.join(f'{b:.3g}' for b in budgets if b < 1)})",
                         strong=0.5 in clear, note="uniform ranks for both; 'clear' = KL at least 30% lower"))
    s, u = _row(rows, "mkv_searched", 0.375), _row(rows, "mkv_uniform", 0.375)
    if s and u:
        out.append(claim("search_gain", f"KL {s['kl']:.3f} searched vs {u['kl']:.3f} uniform at 37.5% (ppl "
                         f"{s['ppl']:.2f} vs {u['ppl']:.2f})", strong=s["kl"] < u["kl"],
                         note="paper: +1.92 avg accuracy points; ours in KL/perplexity (accuracy in the choice "
                              "table)"))
    return out


def choice_claims(rows: list[dict]) -> list[dict]:
    full = _row(rows, "full", 1.0)
    s = _row(rows, "mkv_searched", 0.375) or _row(rows, "mkv_uniform", 0.375)
    if not (full and s):
        return []
    rel = s["acc_norm"] / full["acc_norm"] if full["acc_norm"] else float("nan")
    return [claim("mkv_holds_375", f"{s['method']} acc_norm {s['acc_norm']:.2f} vs full {full['acc_norm']:.2f} = "
                  f"{rel:.0%} at 37.5% (n = {s['n']})", strong=rel >= 0.9,
                  note="next-line choice on a 135M model stands in for the 6 zero-shot tasks; small n → wide CI")]


@paper.stage("retrieval")
def retrieval(ctx: StageContext) -> dict:
    r = ctx.params.eval.retrieval
    model, tok, _ = ctx.model()
    M = Methods(ctx)
    rows = []
    for length in r.lengths:
        methods = {f"{m}@{b:g}": M.method(m, b) for m in r.methods for b in r.budgets}
        labels = {"full": {"label": "full", "budget": 1.0},
                  **{f"{m}@{b:g}": {"label": m, "budget": b} for m in r.methods for b in r.budgets}}
        for row in evaluate_task(model, tok, r.task, length, r.n_cases, ctx.seed, methods, protocol="decode",
                                 batch_size=r.n_cases, labels=labels):
            out = {"method": row["label"], "budget": row["budget"], "length": length,
                   **{k: row[k] for k in ("n", "accuracy", "ci95", "kl", "answer_ppl", "bytes_ratio")}}
            rows.append(out)
            ctx.cell(f"{r.task}/{length}/{row['method']}", {k: v for k, v in out.items() if isinstance(v, float)},
                     {"method": out["method"], "budget": out["budget"], "length": length})
    window = next((dict(ctx.params.methods[m].model_extra or {}).get("window") for m in r.methods
                   if ctx.params.methods[m].method == "lowrank"), None)
    return {"retrieval.json": result_table(
        f"Retrieval through the real cache: {r.task} (decode protocol)",
        [["method", "method"], ["budget", "budget"], ["length", "context"], ["accuracy", "acc"], ["ci95", "95% CI"],
         ["kl", "KL to full"], ["bytes_ratio", "bytes / full"]], rows,
        setting=f"{r.n_cases} seeded cases per length; the context is prefilled through each method, then question "
                "+ answer are decoded token by token through its cache; bytes measured from the cache; "
                f"cskv_window keeps the last ≤ {window} tokens exact (CSKV's bi-branch cache); snapkv evicts tokens "
                "at compression ratio 1 − budget (observation window kept)")}


if __name__ == "__main__":
    raise SystemExit(main())
