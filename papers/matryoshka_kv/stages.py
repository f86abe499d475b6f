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
from safetensors.torch import load_file

from papers.matryoshka_kv.module import (greedy_rank_search, kv_statistics, split_summary, train_projection)
from shared.cache.base import full_cache, record_prefill
from shared.cache.orthogonal import KVProjection, check_budget, check_ranks
from shared.cache.registry import METHODS, build
from shared.io import save_safetensors
from shared.kv_eval import evaluate_task, summary_rows
from shared.metrics import kl_divergence, token_nll, top1_agreement
from shared.reports import result_table
from shared.corpus import Corpus
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
    seeds: list[int] = Field(min_length=1)      # one trained projection (and one rank search) per seed
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
    corpus: Corpus = Corpus()                   # the text all stages but retrieval read (default: embedded Shakespeare)
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
STATS, PCA = "kv_stats.safetensors", "pca.safetensors"


def trained_path(seed: int) -> str:
    return f"mkv/s{seed}.safetensors"


def ranks_path(seed: int) -> str:
    return f"ranks/s{seed}.safetensors"


# ---- stages ------------------------------------------------------------------------------------------------
@paper.stage("calibrate")
def calibrate(ctx: StageContext) -> None:
    p, c = ctx.params, ctx.params.calibration
    model, tok, _ = ctx.model()
    seqs = token_windows(corpus_ids(tok, c.split, corpus=p.corpus), c.n_sequences, c.seq_len, ctx.seed)
    stats = kv_statistics(model, list(seqs.split(c.batch_size)))
    path = ctx.artifact(STATS)
    save_safetensors(path, stats, {"model": p.model})
    KVProjection.from_statistics(stats).save(ctx.artifact(PCA), {"init": "pca", "model": p.model})
    ctx.log_metrics({"calibration_tokens": int(stats["tokens"])})


@paper.stage("train")
def train(ctx: StageContext) -> dict:
    import time

    p, t = ctx.params, ctx.params.train
    model, tok, _ = ctx.model()
    seqs = token_windows(corpus_ids(tok, "train", corpus=p.corpus), t.n_sequences, t.seq_len, ctx.seed + 1)
    val_ids = corpus_ids(tok, "validation", corpus=p.corpus)
    val = list(token_windows(val_ids, t.val_sequences, t.seq_len, ctx.seed + 2).split(1))
    rows = []
    ctx.fresh_artifact_dir("mkv")
    for seed in t.seeds:                      # same data, another initialisation of the rank sampler / order
        proj = KVProjection.load(ctx.artifact(PCA)).requires_grad_(True)
        t0 = time.perf_counter()
        module = train_projection(model, proj, seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(
                                      seed))], accumulate=t.accumulate, lr=t.lr, warmup_steps=t.warmup_steps, seed=seed,
                                  val_batches=val, val_every=t.val_every, val_budgets=tuple(t.val_budgets), clip=t.clip,
                                  logger=ctx.lightning_logger(f"train/s{seed}"), progress=True)
        ctx.timing(f"seconds/s{seed}", time.perf_counter() - t0)
        proj.save(ctx.artifact(trained_path(seed)), {"init": "pca", "trained_sequences": t.n_sequences, "seed": seed})
        rows += [{"seed": seed, "step": r["step"], "budget": b, "kl": r[f"kl_{b:g}"]}
                 for r in module.curve for b in t.val_budgets]
    ctx.log_metrics({"tokens": seqs.numel()})
    return {"train.json": result_table(
        "Matryoshka training: KL to the base model on held-out text at uniform budgets (our eval-loss figure)",
        [["seed", "seed"], ["step", "step"], ["budget", "budget"], ["kl", "KL(full ‖ MKV)"]], rows,
        setting=f"{p.model}; {t.n_sequences}×{t.seq_len} train tokens (Shakespeare), batch 1 × accumulation "
                f"{t.accumulate} = {seqs.shape[0] // t.accumulate} AdamW steps, lr {t.lr}, warmup {t.warmup_steps}, "
                f"cosine, clip {t.clip}; KL on {t.val_sequences}×{t.seq_len} validation tokens; seeds {t.seeds} "
                f"(rank sampling + sequence order)",
        plot={"x": "step", "y": "kl", "series": "budget", "xlabel": "optimizer step", "ylabel": "KL to full"},
        notes=["Step 0 is the PCA initialisation; KL at budget 1 stays at fp32 round-off (exact by construction).",
               "The plot shows every seed's curve (one line per budget and seed)."])}


@paper.stage("search")
def search(ctx: StageContext) -> dict:
    import time

    p, s = ctx.params, ctx.params.search
    model, tok, spec = ctx.model()
    ids = token_windows(corpus_ids(tok, "train", corpus=p.corpus), s.n_sequences, s.seq_len, ctx.seed + 3)
    rows, layer_rows, history = [], [], {}
    ctx.fresh_artifact_dir("ranks")
    for seed in p.train.seeds:
        proj = KVProjection.load(ctx.artifact(trained_path(seed)))
        t0 = time.perf_counter()
        res = greedy_rank_search(model, proj, ids, s.budgets, delta=s.delta, per_round=s.per_round,
                                 criterion=s.criterion)
        ctx.timing(f"seconds/s{seed}", time.perf_counter() - t0)
        path = ctx.artifact(ranks_path(seed))
        save_safetensors(path, {f"{b:g}": r for b, r in res.snapshots.items()})
        for b, r in sorted(res.snapshots.items(), reverse=True):
            sm = split_summary(r, spec.head_dim)
            rows.append({"seed": seed, "budget": b, "key_fraction": sm["key_fraction"],
                         "value_fraction": sm["value_fraction"]})
        b_ref = 0.375 if 0.375 in res.snapshots else min(res.snapshots)
        sm = split_summary(res.snapshots[b_ref], spec.head_dim)
        history[seed] = [round(h["budget"], 4) for h in res.history]
        layer_rows += [{"seed": seed, "layer": l, "kind": ("keys" if kind == "k" else "values") + f" s{seed}",
                        "kept": f} for kind in ("k", "v") for l, f in enumerate(sm[f"per_layer_{kind}"])]
    return {
        "search.json": result_table(
            "Greedy rank search (Algorithm 1): share of key vs value channels kept per budget",
            [["seed", "seed"], ["budget", "budget"], ["key_fraction", "key channels kept"],
             ["value_fraction", "value channels kept"]],
            rows, setting=f"criterion {s.criterion} on {s.n_sequences}×{s.seq_len} train tokens, Δr = {s.delta}, "
                          f"{s.per_round} decrements per round (paper: 1), one search per trained seed",
            notes=[f"Round history (budget after each round), seed {sd}: {h}" for sd, h in history.items()]),
        "search_layers.json": result_table(
            f"Searched ranks per layer at a {b_ref:.1%} budget (mean kept fraction over the 3 KV heads)",
            [["seed", "seed"], ["layer", "layer"], ["kind", "K/V"], ["kept", "kept fraction"]], layer_rows,
            plot={"x": "layer", "y": "kept", "series": "kind", "xlabel": "layer", "ylabel": "fraction kept"})}


class Methods:
    """Registered KV methods configured from params.yaml's ``methods``, at a budget (= 1 − compression_ratio); a row
    on the trained projection has one builder per training seed."""

    def __init__(self, ctx: StageContext):
        self.p = ctx.params
        self.pca = KVProjection.load(ctx.artifact(PCA))
        self.trained, self.searched = {}, {}
        for seed in self.p.train.seeds:
            self.trained[seed] = KVProjection.load(ctx.artifact(trained_path(seed)))
            path = ctx.artifact(ranks_path(seed))
            if not path.is_file():
                raise FileNotFoundError(f"no searched ranks at {path}; run the `search` stage")
            self.searched[seed] = {float(k): v for k, v in load_file(str(path)).items()}
        self._built: dict = {}

    def method(self, name: str, budget: float) -> list[tuple]:
        """``[(seed, builder), ...]`` (seed ``None`` for rows that are not trained)."""
        key = (name, budget)
        if key not in self._built:
            spec = self.p.methods[name]
            params = dict(spec.model_extra or {})
            out = []
            for seed in (self.p.train.seeds if spec.projection == "trained" else [None]):
                if spec.method == "matryoshka":
                    params["projection"] = self.pca if seed is None else self.trained[seed]
                    if spec.ranks == "searched" and budget < 1.0:
                        ranks = (self.searched[seed] if seed is not None else self.searched[self.p.train.seeds[0]])
                        params["ranks"] = check_ranks(ranks[budget], params["projection"].head_dim)
                out.append((seed, build(spec.method, round(1.0 - budget, 9), **params)))
            self._built[key] = out
        return self._built[key]


@torch.no_grad()
def lm_metrics(model, seqs: torch.Tensor, refs: list[torch.Tensor], batch: int) -> dict:
    """Perplexity of ``seqs`` and KL/top-1 to the full model's log-probs ``refs`` (one per batch); ``per_sequence``
    holds each sequence's mean NLL / KL / top-1 (the cases of the paired comparisons)."""
    per_seq = []
    for ids, ref in zip(seqs.split(batch), refs):
        logits = model(input_ids=ids).logits.float()
        nll = token_nll(logits[:, :-1], ids[:, 1:], reduction="none").mean(-1)
        kl = kl_divergence(ref, logits, reduction="none").mean(-1)
        top1 = top1_agreement(ref, logits, reduction="none").float().mean(-1)
        per_seq += [{"answer_nll": float(a), "kl": float(b), "top1": float(c)} for a, b, c in zip(nll, kl, top1)]
    n = len(per_seq)
    return {"ppl": math.exp(sum(r["answer_nll"] for r in per_seq) / n), "kl": sum(r["kl"] for r in per_seq) / n,
            "top1": sum(r["top1"] for r in per_seq) / n, "per_sequence": per_seq}


def _choice_cases(mc: dict, items, label: str, budget: float, seed) -> list[dict]:
    """One case row per choice item: ``correct`` = the per-token-normalised choice (acc_norm) is right."""
    out = []
    for i, (sc, item) in enumerate(zip(mc["scores"], items)):
        norm = [v / len(o) for v, o in zip(sc, item.option_ids)]
        out.append({"label": label, "budget": budget, "seed": seed, "task": "choice", "length": None,
                    "protocol": None, "case": i, "correct": max(range(len(norm)), key=norm.__getitem__) == item.label,
                    "kl": 0.0, "answer_nll": 0.0, "top1": 0.0})
    return out


def _pool(rows: list[dict], keys=("method", "budget")) -> list[dict]:
    """Seed-pooled table rows: means over seeds, with the seed range of ``kl`` / ``acc_norm``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key))
        for k, v in rs[0].items():
            if k not in keys and k != "seed" and isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k] = sum(r[k] for r in rs) / len(rs)
        if len(rs) > 1:
            row["seeds"] = len(rs)
            for k in ("kl", "acc_norm"):
                if k in rs[0]:
                    row[f"{k}_seed_range"] = [min(r[k] for r in rs), max(r[k] for r in rs)]
        out.append(row)
    return out


@paper.stage("evaluate")
def evaluate(ctx: StageContext) -> dict:
    import time

    p, e = ctx.params, ctx.params.eval
    model, tok, _ = ctx.model()
    M = Methods(ctx)
    seqs = token_windows(corpus_ids(tok, e.lm.split, corpus=p.corpus), e.lm.n_sequences, e.lm.seq_len, ctx.seed + 4)
    items = next_line_choice(tok, e.choice.n_items, ctx.seed, split=e.choice.split, corpus=p.corpus)
    bsz = e.lm.batch_size
    refs = [torch.log_softmax(model(input_ids=x).logits.float(), -1) for x in seqs.split(bsz)]
    record = record_prefill(model, seqs[:1])  # one exact prefill; every configuration's cache bytes come from it
    full_bpt = full_cache(record).stored_bytes() / record.input_ids.numel()
    t0 = time.perf_counter()
    full = lm_metrics(model, seqs, refs, bsz)
    mc_full = score_choice(model, items, progress=False)
    lm_rows = [{"method": "full", "budget": 1.0, "seed": None, **full, "bytes_per_token": full_bpt, "bytes_ratio": 1.0}]
    mc_rows = [{"method": "full", "budget": 1.0, "seed": None, "accuracy": mc_full["accuracy"],
                "acc_norm": mc_full["acc_norm"], "n": mc_full["n"]}]
    choice_cases = _choice_cases(mc_full, items, "full", 1.0, None)
    for name in e.methods:
        for b in e.budgets:
            for seed, m in M.method(name, b):
                bpt = m(record).stored_bytes() / record.input_ids.numel()
                with m.full_sequence(model):
                    row = {"method": name, "budget": b, "seed": seed, **lm_metrics(model, seqs, refs, bsz),
                           "bytes_per_token": bpt, "bytes_ratio": bpt / full_bpt}
                    lm_rows.append(row)
                    ctx.cell(f"lm/{name}@{b:g}" + ("" if seed is None else f"/s{seed}"),
                             {k: v for k, v in row.items() if isinstance(v, float)},
                             {"method": name, "budget": b, "seed": seed})
                    if b in e.choice.budgets:
                        mc = score_choice(model, items, progress=False)
                        mc_rows.append({"method": name, "budget": b, "seed": seed, "accuracy": mc["accuracy"],
                                        "acc_norm": mc["acc_norm"], "n": mc["n"]})
                        choice_cases += _choice_cases(mc, items, name, b, seed)
                        ctx.cell(f"choice/{name}@{b:g}" + ("" if seed is None else f"/s{seed}"),
                                 {"accuracy": mc["accuracy"], "acc_norm": mc["acc_norm"]},
                                 {"method": name, "budget": b, "seed": seed})
                print(f"{name}@{b:g} s{seed}: ppl {row['ppl']:.2f} KL {row['kl']:.4f} bytes "
                      f"{row['bytes_ratio']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    lm_cases = [{"label": r["method"], "budget": r["budget"], "seed": r["seed"], "task": "lm", "length": e.lm.seq_len,
                 "protocol": None, "case": i, "correct": False, **c}
                for r in lm_rows for i, c in enumerate(r.pop("per_sequence"))]
    seeds = len(p.train.seeds)
    return {
        "lm.json": result_table(
            "Perplexity and KL to the full model on the test split, per method × KV budget",
            [["method", "method"], ["budget", "budget"], ["ppl", "perplexity"], ["kl", "KL to full"],
             ["kl_seed_range", "KL seed range"], ["top1", "top-1 agreement"], ["bytes_ratio", "bytes / full"]],
            _pool(lm_rows), cases=lm_cases, per_seed=lm_rows,
            setting=f"{p.model}; {seqs.shape[0]}×{seqs.shape[1]} = {seqs.numel()} test tokens (Hamlet/Macbeth/"
                    "Tempest), full-sequence forward with every attention call projected (prefill = decode, tested); "
                    f"bytes measured from each method's real cache on one sequence (fp32); trained rows: mean of "
                    f"{seeds} training seeds (range shown)",
            plot={"x": "budget", "y": "kl", "series": "method", "xlabel": "KV budget (fraction of channels)",
                  "ylabel": "KL to full (nats/token)"},
            notes=["cskv_svd is the weight-SVD peer (CSKV init, untrained) applied in every attention call; its "
                   "native exact-window cache is in the retrieval table.",
                   "Token eviction (SnapKV) has no full-sequence form (it compresses a prefilled cache): it is "
                   "compared in the retrieval table.",
                   "At budget 1 every projection is orthogonal and exact: KL is fp32 round-off.",
                   "`cases`: one row per test sequence, method, budget and training seed (the unit of the paired "
                   "claims)."]),
        "choice.json": result_table(
            "Table 1 analogue: next-line multiple choice (log-likelihood scoring, 4 options)",
            [["method", "method"], ["budget", "budget"], ["accuracy", "acc"], ["acc_norm", "acc_norm"],
             ["acc_norm_seed_range", "acc_norm seed range"], ["n", "items"]], _pool(mc_rows),
            cases=choice_cases,
            setting=f"{len(items)} seeded items from the test split; 3 context lines, true next line vs 3 random "
                    "lines of similar length; acc = summed log-likelihood, acc_norm = per-token (OpenCompass "
                    f"ppl-style); chance 0.25; trained rows: mean of {seeds} seeds",
            notes=["Budget 1 of every projection method equals full exactly (see the KL table), so it is not "
                   "re-run."])}


@paper.stage("retrieval")
def retrieval(ctx: StageContext) -> dict:
    r = ctx.params.eval.retrieval
    model, tok, _ = ctx.model()
    M = Methods(ctx)
    cases = []
    for length in r.lengths:
        methods, labels = {}, {"full": {"label": "full", "budget": 1.0}}
        for m in r.methods:
            for b in r.budgets:
                for seed, builder in M.method(m, b):
                    key = f"{m}@{b:g}" + ("" if seed is None else f"/s{seed}")
                    methods[key], labels[key] = builder, {"label": m, "budget": b, "seed": seed}
        _, got = evaluate_task(model, tok, r.task, length, r.n_cases, ctx.seed, methods, protocol="decode",
                               batch_size=r.n_cases, labels=labels, cell=ctx.cell, return_cases=True)
        cases += got
    rows = [{"method": x["label"], **x} for x in summary_rows(cases, ("task", "length", "label", "budget"))]
    window = next((dict(ctx.params.methods[m].model_extra or {}).get("window") for m in r.methods
                   if ctx.params.methods[m].method == "lowrank"), None)
    return {"retrieval.json": result_table(
        f"Retrieval through the real cache: {r.task} (decode protocol)",
        [["method", "method"], ["budget", "budget"], ["length", "context"], ["accuracy", "acc"], ["ci95", "95% CI"],
         ["n", "n"], ["kl", "KL to full"], ["kl_seed_range", "KL seed range"], ["bytes_ratio", "bytes / full"]],
        rows, cases=cases,
        setting=f"{r.n_cases} seeded cases per length; the context is prefilled through each method, then question "
                "+ answer are forced through its cache (one teacher-forced forward, equal to token-by-token "
                "decoding, tested); bytes measured from the cache; "
                f"cskv_window keeps the last ≤ {window} tokens exact (CSKV's bi-branch cache); snapkv evicts tokens "
                "at compression ratio 1 − budget (observation window kept); trained rows pooled over seeds")}


if __name__ == "__main__":
    raise SystemExit(main())
