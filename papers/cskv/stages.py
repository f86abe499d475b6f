"""CSKV pipeline stages (papers/cskv/dvc.yaml runs ``python -m papers.cskv.stages <stage>``; the runner in
``shared.stages`` owns params validation, MLflow, seeds and result files — this file keeps stage bodies and the
paper's verdict rules).

    calibrate   inputs X of every K/V projection on the corpus train split (+ a held-out set) and their stats
    train       all factor sets the tables need: SVD/ASVD/whitened/random inits and CSKV-trained (Lightning)
    table1..5   evaluations → results/<table>.json (rendered into reports/cskv.md by the root stage)

Table rows are registered KV methods (``shared.cache.registry``) named in params.yaml's ``methods``; low-rank rows
name their factor set (an init, or ``trained``), which this paper trains and loads.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from safetensors.torch import load_file

from kernels.quant import head_group_size
from papers.cskv.module import (activation_stats, collect_inputs, init_factors, latent_quant_error, load_factors,
                                projection_weights, reconstruction_error, save_factors, train_factors)
from shared.cache.decompose import INITS
from shared.cache.orthogonal import KVProjection, on_rank_grid
from shared.cache.registry import METHODS, build
from shared.io import save_safetensors
from shared.kv_eval import average_over, breakpoint, evaluate_task, summary_rows
from shared.paths import REPO_ROOT
from shared.reports import result_table
from shared.corpus import Corpus
from shared.stages import Paper, Params, StageContext
from shared.tasks import TASKS, corpus_ids


# ---- params schema -----------------------------------------------------------------------------------------
class Calibration(Params):
    split: Literal["train", "validation", "test"]
    n_samples: int = Field(ge=1)
    seq_len: int = Field(ge=2)


class Train(Params):
    init: Literal[INITS]
    steps: int = Field(ge=1)
    seq_len: int = Field(ge=2)
    lr: float = Field(gt=0, lt=1)
    asvd_alpha: float = Field(gt=0, le=1)
    asvd_stat: Literal["mean", "official_sum"] = "official_sum"   # see shared.cache.decompose.asvd_scale
    seeds: list[int] = Field(min_length=1)      # every trained factor set is trained once per seed
    grad_clip: float | None = Field(default=None, gt=0)   # official code: HF Trainer max_grad_norm = 1.0

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"train.seeds must be distinct, got {v}")
        return v


class Eval(Params):
    protocol: Literal["decode", "paper"]
    impl: Literal["torch", "triton"] = "torch"
    n_cases: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lengths: list[int] = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    full_cache_min_accuracy: dict[str, float] = {}

    @field_validator("tasks")
    @classmethod
    def _registered(cls, v):
        bad = [t for t in v if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; registered: {sorted(TASKS)}")
        return v

    @field_validator("lengths")
    @classmethod
    def _long_enough(cls, v):
        if any(n < 128 for n in v):
            raise ValueError(f"context lengths must be >= 128 tokens, got {v}")
        return v


class MethodSpec(Params):
    """A table row: a registered KV method + its params; ``factors`` (lowrank only) names the factor set;
    ``projection`` (matryoshka only) is the folder, relative to the repository root, of trained MatryoshkaKV
    projections, one ``s<seed>.safetensors`` per seed (the MatryoshkaKV pipeline writes them); ``seeds`` (matryoshka
    only) picks which of them (default: every ``train.seeds`` entry)."""

    model_config = Params.model_config | {"extra": "allow"}
    method: str
    factors: Literal["trained", "random", "svd", "asvd", "whitened"] | None = None
    per_head: bool = False
    projection: str | None = None
    seeds: list[int] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _known(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown KV method {self.method!r}; registered: {sorted(METHODS)}")
        if (self.method == "lowrank") != (self.factors is not None):
            raise ValueError("`factors` is required for method lowrank and only for it")
        if (self.projection is not None or self.seeds is not None) and self.method != "matryoshka":
            raise ValueError("`projection` and `seeds` are only for method matryoshka")
        if self.seeds is not None and self.projection is None:
            raise ValueError("`seeds` picks trained projections: give `projection` too")
        extra = dict(self.model_extra or {})
        build(self.method, 0.0, **extra)   # unknown / invalid method params fail here, before any model loads
        return self


class Table1(Params):
    compression_ratios: list[float] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    paper_protocol_length: int | None = None


class Quant(Params):
    """4-bit latents (Table 5): each scheme is run side by side (PTQ and QAT)."""

    schemes: list[Literal["official", "reprise"]] = Field(min_length=1)


class Sweep(Params):
    """Ratio sweep: every method at every ratio on the same cases; breakpoints and paired area comparisons."""

    tasks: list[str] = Field(min_length=1)
    length: int = Field(ge=128)
    n_cases: int = Field(ge=2)
    compression_ratios: list[float] = Field(min_length=2)
    methods: list[str] = Field(min_length=1)
    breakpoint_frac: float = Field(default=0.9, gt=0, le=1)


class Ablation(Params):
    task: str
    length: int = Field(ge=128)
    compression_ratio: float = Field(gt=0, lt=1)
    n_cases: int = Field(ge=1)
    windows: list[int] = Field(min_length=1)
    kv_densities: list[tuple[float, float]] = Field(min_length=1)


class CSKVParams(Params):
    seed: int
    model: str
    corpus: Corpus = Corpus()                   # the text calibration reads (default: the embedded Shakespeare)
    window: int = Field(ge=0)
    calibration: Calibration
    train: Train
    eval: Eval
    methods: dict[str, MethodSpec]
    table1: Table1
    sweep: Sweep
    ablation: Ablation
    quant: Quant

    @model_validator(mode="after")
    def _consistent(self):
        for r in self.table1.compression_ratios:
            if not 0.0 < r < 1.0:
                raise ValueError(f"table1.compression_ratios must be in (0, 1), got {r}")
        for r in self.sweep.compression_ratios:
            if not 0.0 < r < 1.0:
                raise ValueError(f"sweep.compression_ratios must be in (0, 1), got {r}")
        for where, names in (("table1", self.table1.methods), ("sweep", self.sweep.methods)):
            missing = [m for m in names if m not in self.methods]
            if missing:
                raise ValueError(f"{where}.methods {missing} are not defined under `methods` ({sorted(self.methods)})")
        for where, t in (("table1", self.table1), ("sweep", self.sweep)):
            mkv = [m for m in t.methods if self.methods[m].method == "matryoshka"]
            off = [r for r in t.compression_ratios if not on_rank_grid(1.0 - r)]
            if mkv and off:
                raise ValueError(f"{where}: matryoshka rows {mkv} need compression ratios on the rank grid (multiples "
                                 f"of 1/8: uniform ranks d/8, 2d/8, ..., d), got {off}")
        bad = [t for t in self.sweep.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"sweep.tasks {bad} are not registered tasks ({sorted(TASKS)})")
        if self.ablation.task not in TASKS:
            raise ValueError(f"ablation.task {self.ablation.task!r} is not a registered task ({sorted(TASKS)})")
        return self


paper = Paper("cskv", CSKVParams, __file__)
main = paper.main
TABLES = ("table1", "sweep", "table2", "table3", "table4", "table5")


def density(compression_ratio: float) -> float:
    """The decomposition's density (channels kept) at a compression ratio (the paper's accounting)."""
    return round(1.0 - compression_ratio, 6)


# ---- factor sets -------------------------------------------------------------------------------------------
#: 4-bit quantizer semantics (kernels.quant): fake-quant options for QAT, cache options for PTQ/QAT rows.
#: official = the official CSKV code: integer zero point clamped to [0, 15], STE zeroed at the clip bounds, value
#: groups per KV head; reprise = ours (float zero = min, identity STE, value groups over the whole latent row).
QUANT_SCHEMES = {"official": {"scheme": "official", "ste": "clipped", "value_groups": "head"},
                 "reprise": {"scheme": "reprise", "ste": "identity", "value_groups": "row"}}


def factor_name(kind: str, init: str, d: float, per_head: bool, trained: bool, qat: str | None = None,
                seed: int | None = None) -> str:
    """``qat``: the QAT quantizer scheme (None: no QAT); ``"reprise"`` keeps the historical ``-qat`` suffix."""
    if qat not in (None, False) and qat not in QUANT_SCHEMES:
        raise ValueError(f"qat must be None or a quantizer scheme {sorted(QUANT_SCHEMES)}, got {qat!r}")
    name = f"{kind}-{init}-d{d:g}-{'head' if per_head else 'joint'}-{'trained' if trained else 'init'}"
    if qat:
        name += "-qat" if qat == "reprise" else f"-qat-{qat}"
    return name + (f"-s{seed}" if trained and seed is not None else "")


def factor_set(p: CSKVParams, spec: MethodSpec) -> tuple[str, bool]:
    """(init, trained) of a lowrank row's ``factors``."""
    return (p.train.init, True) if spec.factors == "trained" else (spec.factors, False)


def needed_factor_sets(p: CSKVParams) -> list[dict]:
    """Every (kind, init, density, per_head, trained, qat, seed) the tables use, without duplicates; trained sets
    once per ``train.seeds``."""
    sets, seen = [], set()

    def add(init, dk, dv, per_head=False, trained=True, qat=None):
        for seed in (p.train.seeds if trained else [None]):
            for kind, d in (("k", dk), ("v", dv)):
                key = factor_name(kind, init, d, per_head, trained, qat, seed)
                if key not in seen:
                    seen.add(key)
                    sets.append(dict(name=key, kind=kind, init=init, density=d, per_head=per_head,
                                     trained=trained, qat=qat, seed=seed))

    for ratios, names in ((p.table1.compression_ratios, p.table1.methods),
                          (p.sweep.compression_ratios, p.sweep.methods)):
        for r in ratios:
            d = density(r)
            for name in names:
                spec = p.methods[name]
                if spec.method == "lowrank":
                    init, trained = factor_set(p, spec)
                    add(init, d, d, per_head=spec.per_head, trained=trained)
    d = density(p.ablation.compression_ratio)
    for i in ("random", "svd", "asvd"):
        add(i, d, d, trained=False)
        add(i, d, d)
    for dk, dv in p.ablation.kv_densities:
        add(p.train.init, dk, dv)
    for scheme in p.quant.schemes:
        add(p.train.init, d, d, qat=scheme)
    return sets


# ---- stages ------------------------------------------------------------------------------------------------
@paper.stage("calibrate")
def calibrate(ctx: StageContext) -> None:
    p, c = ctx.params, ctx.params.calibration
    model, tok, _ = ctx.model()
    X = collect_inputs(model, corpus_ids(tok, c.split, corpus=p.corpus), c.n_samples, c.seq_len, ctx.seed)
    X_val = collect_inputs(model, corpus_ids(tok, "validation", corpus=p.corpus), 2, c.seq_len, ctx.seed + 1)
    stats = activation_stats(X)
    path = ctx.artifact("calibration.safetensors")
    save_safetensors(path, {"X": X, "X_val": X_val, "abs_mean": stats["abs_mean"], "gram": stats["gram"]},
                     {"model": p.model})
    ctx.log_metrics({"calibration_tokens": X.shape[1]})


@paper.stage("train")
def train(ctx: StageContext) -> dict:
    import time

    p, t = ctx.params, ctx.params.train
    model, _, spec = ctx.model()
    cal = load_file(str(ctx.artifact("calibration.safetensors")))
    X, X_val = cal["X"], cal["X_val"]
    stats = {"abs_mean": cal["abs_mean"], "gram": cal["gram"]}
    W = {k: projection_weights(model, k) for k in ("k", "v")}
    rows = []
    ctx.fresh_artifact_dir("factors")
    for fs in needed_factor_sets(p):
        t0 = time.perf_counter()
        Wk = W[fs["kind"]]
        f = init_factors(Wk, stats, fs["density"], spec.head_dim, spec.num_kv_heads, fs["init"], fs["per_head"],
                         seed=ctx.seed, alpha=t.asvd_alpha, asvd_stat=t.asvd_stat,
                         asvd_samples=p.calibration.n_samples)
        if fs["trained"]:
            q = QUANT_SCHEMES[fs["qat"]] if fs["qat"] else {}
            rank = f[0].A.shape[-1] * (spec.num_kv_heads if fs["per_head"] else 1)
            f, _ = train_factors(X, Wk, f, fs["kind"], steps=t.steps, seq_len=t.seq_len, lr=t.lr,
                                 qat=bool(fs["qat"]), seed=fs["seed"], grad_clip=t.grad_clip,
                                 quant={k: q[k] for k in ("scheme", "ste")} if q else None,
                                 value_group=head_group_size(rank, spec.num_kv_heads) if fs["per_head"] is False
                                 and q.get("value_groups") == "head" else None,
                                 logger=ctx.lightning_logger(f"train/{fs['name']}"), progress=False)
        save_factors(ctx.artifact(f"factors/{fs['name']}.safetensors"), f, fs)
        row = {**fs, "recon_err_train": reconstruction_error(X, Wk, f),
               "recon_err_heldout": reconstruction_error(X_val, Wk, f)}
        rows.append(row)
        seconds = time.perf_counter() - t0
        ctx.timing(f"seconds/{fs['name']}", seconds)
        ctx.cell(fs["name"], {k: row[k] for k in ("recon_err_train", "recon_err_heldout")}, fs)
        print(f"{fs['name']}: rel. error train {row['recon_err_train']:.4f} held-out {row['recon_err_heldout']:.4f}"
              f" ({seconds:.1f}s)", flush=True)
    return {"train.json": result_table(
        "Layer-wise reconstruction error (CSKV Eq. 5, relative ‖XW − XAB‖²/‖XW‖², mean over layers)",
        [["name", "factor set"], ["recon_err_train", "rel. error (train)"],
         ["recon_err_heldout", "rel. error (held-out)"]], rows,
        setting=f"{p.model}, calibration {p.calibration.n_samples}×{p.calibration.seq_len} tokens (Shakespeare "
                f"train), held-out = 2×{p.calibration.seq_len} validation tokens; {t.steps} AdamW steps, lr {t.lr}, "
                f"gradient clipping {t.grad_clip}, ASVD statistic `{t.asvd_stat}`; trained sets once per seed {t.seeds} "
                "(`-s<seed>`); `-qat` = QAT with our quantizer, `-qat-official` with the official one",
        notes=["`whitened` is the closed-form minimiser of the same loss (not in the paper): the floor training "
               "can reach on the calibration set."])}


# ---- evaluation --------------------------------------------------------------------------------------------
class Methods:
    """Registered KV methods configured from params; low-rank rows get this paper's factor files, one cache builder
    per training seed for trained factors (``seed`` None for untrained rows)."""

    def __init__(self, ctx: StageContext):
        self.ctx, self.p = ctx, ctx.params
        self._factors: dict[str, list] = {}
        self._projections: dict = {}

    def factors(self, kind, init, d, per_head=False, trained=True, qat=None, seed=None):
        name = factor_name(kind, init, d, per_head, trained, qat, seed)
        if name not in self._factors:
            path = self.ctx.artifacts_dir / "factors" / f"{name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"no factor set {path}; run the train stage (`dvc repro papers/cskv`)")
            self._factors[name] = load_factors(path)
        return self._factors[name]

    def lowrank(self, init, dk, dv, per_head=False, trained=True, qat=None, **params) -> list[tuple]:
        """``[(seed, builder), ...]`` of a lowrank cache with these factor sets (``params``: lowrank method params)."""
        impl = self.p.eval.impl if per_head else "torch"   # the fused kernel serves the per-head decomposition
        params = {"window": self.p.window, "current_exact": True, **params}   # official W = 0 rule (no-op for W > 0)
        out = []
        for seed in (self.p.train.seeds if trained else [None]):
            fk = self.factors("k", init, dk, per_head, trained, qat, seed)
            fv = self.factors("v", init, dv, per_head, trained, qat, seed)
            out.append((seed, build("lowrank", round(1 - (dk + dv) / 2, 6), factors=list(zip(fk, fv)), impl=impl,
                                    **params)))
        return out

    def matryoshka(self, folder: str, compression_ratio: float, seeds: list[int] | None = None,
                   **params) -> list[tuple]:
        """``[(seed, builder), ...]`` of MatryoshkaKV at uniform ranks, budget = 1 − ratio (equal cached bytes to a
        low-rank row at the same ratio), one builder per trained projection ``<folder>/s<seed>.safetensors`` for
        ``seeds`` (default ``train.seeds``)."""
        out = []
        for seed in seeds or self.p.train.seeds:
            path = REPO_ROOT / folder / f"s{seed}.safetensors"
            if path not in self._projections:
                self._projections[path] = KVProjection.load(path)
            out.append((seed, build("matryoshka", compression_ratio, projection=self._projections[path], **params)))
        return out

    def row(self, name: str, compression_ratio: float) -> list[tuple]:
        """The table row ``name`` (params.yaml ``methods``) at ``compression_ratio``: ``[(seed, builder), ...]``."""
        spec = self.p.methods[name]
        params = dict(spec.model_extra or {})
        if spec.method == "lowrank":
            init, trained = factor_set(self.p, spec)
            d = density(compression_ratio)
            return self.lowrank(init, d, d, per_head=spec.per_head, trained=trained, **params)
        if spec.projection is not None:
            return self.matryoshka(spec.projection, compression_ratio, spec.seeds, **params)
        return [(None, build(spec.method, compression_ratio, **params))]


def add_rows(methods: dict, labels: dict, rows: list[tuple], label: str, **fields) -> None:
    """Register one table row (all its seeds) under ``label`` with extra label ``fields``."""
    for seed, builder in rows:
        key = label + "".join(f"|{k}={v}" for k, v in fields.items()) + ("" if seed is None else f"|s{seed}")
        methods[key] = builder
        labels[key] = {"label": label, "seed": seed, **fields}


ROW_COLUMNS = [["label", "method"], ["compression_ratio", "compression ratio"],
               ["bytes_ratio", "measured bytes / full"], ["accuracy", "acc"], ["ci95", "95% CI"], ["n", "n"],
               ["kl", "KL vs full"], ["kl_seed_range", "KL seed range"], ["top1", "top-1 agree"],
               ["answer_ppl", "answer ppl"]]
ROW_NOTE = ("`n` counts cases; a trained row's accuracy is the mean over `train.seeds` of each case's outcome (Wilson "
            "interval on that count), the seed range shows the seed-to-seed spread; the claims pair cases of the "
            "seed-mean per case (rules in paper.yaml).")


def _cells(ctx: StageContext, task: str, length: int, methods: dict, protocol: str, labels: dict,
           n_cases: int | None = None) -> list[dict]:
    """Per-case rows of every method (and the full cache) on ``n_cases`` seeded cases of ``task`` at ``length``."""
    e = ctx.params.eval
    model, tok, _ = ctx.model()
    _, cases = evaluate_task(model, tok, task, length, n_cases or e.n_cases, ctx.seed, methods, protocol=protocol,
                             batch_size=e.batch_size, labels=labels, cell=ctx.cell, return_cases=True,
                             full_cache_min_accuracy=e.full_cache_min_accuracy.get(task))
    return cases


@paper.stage("table1")
def table1(ctx: StageContext) -> dict:
    p, e = ctx.params, ctx.params.eval
    mf = Methods(ctx)
    methods, labels = {}, {"full": {"label": "full"}}
    for ratio in p.table1.compression_ratios:
        for name in p.table1.methods:
            add_rows(methods, labels, mf.row(name, ratio), name, compression_ratio=ratio)
    cases = []
    for task in e.tasks:
        for length in e.lengths:
            cases += _cells(ctx, task, length, methods, e.protocol, labels)
        L = p.table1.paper_protocol_length
        if L and e.protocol != "paper":
            cases += _cells(ctx, task, L, methods, "paper", labels)
    return {"table1.json": result_table(
        f"Table 1 analogue — retrieval and fidelity at {', '.join(f'{r:.0%}' for r in p.table1.compression_ratios)}"
        " compression",
        [["task", "task"], ["length", "ctx"], ["protocol", "protocol"]] + ROW_COLUMNS, summary_rows(cases),
        table_ref="Table 1", cases=cases,
        setting=f"{p.model}; tasks {e.tasks} at {', '.join(map(str, e.lengths))} context tokens (↔ paper's "
                f"4k/6k/8k/10k, see README); {e.n_cases} cases per cell; protocol `{e.protocol}` (+ `paper` at "
                f"{p.table1.paper_protocol_length}); window W={p.window}; trained rows × seeds {p.train.seeds}.",
        notes=["`acc`: every gold answer token is the greedy choice (teacher-forced; equals greedy decoding "
               "reproducing the gold answer). KL/top-1 vs the full cache over all decoded positions.",
               "`compression ratio` = 1 − density as the paper counts it; `measured bytes / full` counts real "
               "tensor storage (latents + exact window + window latents; evicted caches: kept tokens).", ROW_NOTE])}


# ---- ratio sweep -------------------------------------------------------------------------------------------
@paper.stage("sweep")
def sweep(ctx: StageContext) -> dict:
    p, sw = ctx.params, ctx.params.sweep
    mf = Methods(ctx)
    methods, labels = {}, {"full": {"label": "full"}}
    for ratio in sw.compression_ratios:
        for name in sw.methods:
            add_rows(methods, labels, mf.row(name, ratio), name, compression_ratio=ratio)
    cases = []
    for task in sw.tasks:
        cases += _cells(ctx, task, sw.length, methods, p.eval.protocol, labels, n_cases=sw.n_cases)
    rows = summary_rows(cases)
    full_acc = {t: next(r["accuracy"] for r in rows if r["label"] == "full" and r["task"] == t) for t in sw.tasks}
    bps = []
    for name in sw.methods:
        per_task = {t: breakpoint([r for r in rows if r["task"] == t], name, full_acc[t], sw.breakpoint_frac)
                    for t in sw.tasks}
        bps.append({"label": name, **{f"breakpoint_{t}": v for t, v in per_task.items()},
                    "breakpoint": min((v if v is not None else 0.0) for v in per_task.values())})
    by = {b["label"]: {**b, "text": breakpoint_text(b["breakpoint"], min(sw.compression_ratios))} for b in bps}
    mkv = [m for m in sw.methods if p.methods[m].method == "matryoshka"]
    return {"sweep.json": result_table(
        "Ratio sweep — accuracy and KL vs compression ratio, and each method's breakpoint",
        [["task", "task"], ["label", "method"], ["compression_ratio", "compression ratio"], ["accuracy", "acc"],
         ["ci95", "95% CI"], ["n", "n"], ["kl", "KL vs full"], ["kl_seed_range", "KL seed range"],
         ["bytes_ratio", "measured bytes / full"]], rows, table_ref="Table 1 (breakpoints)",
        cases=cases, breakpoints=bps, area=average_over(cases, "compression_ratio"),
        plots=[{"x": "compression_ratio", "y": "accuracy", "series": "label", "xlabel": "compression ratio",
                "ylabel": "accuracy"},
               {"x": "compression_ratio", "y": "kl", "series": "label", "xlabel": "compression ratio",
                "ylabel": "KL vs full"}],
        setting=f"{p.model}; {sw.tasks} at {sw.length} tokens, {sw.n_cases} cases per cell, protocol "
                f"`{p.eval.protocol}`, ratios {sw.compression_ratios}; trained rows × seeds {p.train.seeds}.",
        notes=["Breakpoints (largest swept ratio up to which accuracy stays ≥ "
               f"{sw.breakpoint_frac:.0%} of the full cache's; min over tasks; `< r` = already below at the smallest "
               "swept ratio r): " + ", ".join(f"{b} {by[b]['text']}" for b in by) + ".",
               "`area`: each case's accuracy (and KL) averaged over the swept ratios — the area under its curve, "
               "per case and training seed; the sweep claims compare these areas case by case.",
               *[f"`{m}`: MatryoshkaKV's trained projections (`{p.methods[m].projection}`, training seeds "
                 f"{p.methods[m].seeds or p.train.seeds}) at uniform ranks, budget = 1 − compression ratio: the same "
                 "cached channels as a low-rank row at that ratio, without CSKV's exact window; its prefill also "
                 "runs in the latent space (as in its paper), the low-rank rows prefill exactly." for m in mkv],
               ROW_NOTE])}


def breakpoint_text(value: float, smallest: float) -> str:
    """A breakpoint for reading: ``< smallest`` when the method fails already at the smallest swept ratio (stored
    as 0)."""
    return f"< {smallest:g}" if value == 0 else f"{value:g}"


# ---- ablations (Tables 2-5) ----------------------------------------------------------------------------------
def _ablation(ctx: StageContext, methods: dict, labels: dict) -> list[dict]:
    a = ctx.params.ablation
    return _cells(ctx, a.task, a.length, methods, ctx.params.eval.protocol, labels, n_cases=a.n_cases)


def _ablation_setting(p: CSKVParams) -> str:
    a = p.ablation
    return (f"{p.model}; {a.task} at {a.length} tokens, {a.n_cases} cases, protocol `{p.eval.protocol}`, "
            f"compression ratio {a.compression_ratio:.0%}, window W={p.window} unless varied; trained rows × seeds "
            f"{p.train.seeds}.")


@paper.stage("table2")
def table2(ctx: StageContext) -> dict:
    p = ctx.params
    mf, d, r = Methods(ctx), density(p.ablation.compression_ratio), p.ablation.compression_ratio
    methods, labels = {}, {"full": {"label": "full"}}
    for init in ("random", "svd", "asvd"):
        for trained in (False, True):
            add_rows(methods, labels, mf.lowrank(init, d, d, trained=trained),
                     f"{init}/{'trained' if trained else 'init only'}", init=init, trained=trained,
                     compression_ratio=r)
    cases = _ablation(ctx, methods, labels)
    return {"table2.json": result_table(
        "Table 2 analogue — initialisation (random / SVD / ASVD), with and without training",
        [["init", "init"], ["trained", "trained"]] + ROW_COLUMNS[3:], summary_rows(cases), table_ref="Table 2",
        setting=_ablation_setting(p), cases=cases, notes=[ROW_NOTE])}


@paper.stage("table3")
def table3(ctx: StageContext) -> dict:
    p = ctx.params
    mf, d, r = Methods(ctx), density(p.ablation.compression_ratio), p.ablation.compression_ratio
    methods, labels = {}, {"full": {"label": "full"}}
    for w in p.ablation.windows:
        add_rows(methods, labels, mf.lowrank(p.train.init, d, d, window=w), f"cskv W={w}", window=w,
                 compression_ratio=r)
    cases = _ablation(ctx, methods, labels)
    rows = summary_rows(cases)
    return {"table3.json": result_table(
        "Table 3 analogue — bi-branch window size", [["window", "W"]] + ROW_COLUMNS[2:], rows, table_ref="Table 3",
        setting=_ablation_setting(p), cases=cases, notes=[ROW_NOTE],
        plot={"x": "window", "y": "kl", "series": "task", "xlabel": "window W (tokens)", "ylabel": "KL vs full"})}


@paper.stage("table4")
def table4(ctx: StageContext) -> dict:
    p = ctx.params
    mf = Methods(ctx)
    methods, labels = {}, {"full": {"label": "full"}}
    for dk, dv in p.ablation.kv_densities:
        add_rows(methods, labels, mf.lowrank(p.train.init, dk, dv), f"cskv K{dk:g}/V{dv:g}", density_k=dk,
                 density_v=dv, compression_ratio=round(1 - (dk + dv) / 2, 6))
    cases = _ablation(ctx, methods, labels)
    rows = summary_rows(cases)
    return {"table4.json": result_table(
        "Table 4 analogue — uneven key/value density at a fixed total",
        [["density_k", "key density"], ["density_v", "value density"]] + ROW_COLUMNS[2:], rows, table_ref="Table 4",
        setting=_ablation_setting(p), cases=cases, notes=[ROW_NOTE])}


@paper.stage("table5")
def table5(ctx: StageContext) -> dict:
    p = ctx.params
    mf, r = Methods(ctx), p.ablation.compression_ratio
    d, init = density(r), p.train.init
    r4 = round(1 - d / 4, 6)
    methods, labels = {}, {"full": {"label": "full"}}
    add_rows(methods, labels, mf.lowrank(init, d, d), "none", compression_ratio=r, quantizer="—")
    for scheme in p.quant.schemes:
        cache_q = {"quantize": True, "quant_scheme": QUANT_SCHEMES[scheme]["scheme"],
                   "value_groups": QUANT_SCHEMES[scheme]["value_groups"]}
        add_rows(methods, labels, mf.lowrank(init, d, d, **cache_q), f"PTQ {scheme}", compression_ratio=r4,
                 quantizer=scheme)
        add_rows(methods, labels, mf.lowrank(init, d, d, qat=scheme, **cache_q), f"QAT {scheme}",
                 compression_ratio=r4, quantizer=scheme)
    cases = _ablation(ctx, methods, labels)
    # each quantizer's reconstruction error on the real latents of the PTQ factors (held-out calibration tokens)
    _, _, spec = ctx.model()
    X_val = load_file(str(ctx.artifact("calibration.safetensors")))["X_val"]
    errors = []
    for scheme in p.quant.schemes:
        q = QUANT_SCHEMES[scheme]
        for kind in ("k", "v"):
            errs = [latent_quant_error(X_val, mf.factors(kind, init, d, seed=seed), kind, q["scheme"],
                                       q["value_groups"], spec.num_kv_heads) for seed in p.train.seeds]
            errors.append({"quantizer": scheme, "kind": "keys" if kind == "k" else "values",
                           "rel_sq_error": sum(errs) / len(errs), "seed_range": [min(errs), max(errs)]})
    err = {(e["quantizer"], e["kind"]): e["rel_sq_error"] for e in errors}
    return {"table5.json": result_table(
        "Table 5 analogue — 4-bit latents: none / PTQ / QAT, official quantizer and ours side by side",
        [["quantizer", "quantizer"]] + ROW_COLUMNS, summary_rows(cases), table_ref="Table 5", cases=cases,
        quant_errors=errors,
        setting=_ablation_setting(p) + " int4 = packed 4-bit codes with per-group scale/zero in the cache dtype "
                "(fp32 on CPU). The compression ratio of int4 rows is the paper's 1 − density/4 (vs fp16); measured "
                "bytes are vs our fp32 full cache.",
        notes=[ROW_NOTE,
               "Quantizers: `official` = the official code (integer zero point clamped to [0, 15], STE zeroed at "
               "the clip bounds, value groups per KV head); `reprise` = ours (float zero = min, identity STE, value "
               "groups over the whole latent row). Keys are quantized per channel over 32-token groups in both.",
               "Measured 4-bit relative squared reconstruction error ‖z − ẑ‖²/‖z‖² of the real latents (PTQ factors, "
               "held-out calibration tokens, all layers, mean of the seeds): " + "; ".join(
                   f"{q} {k} {err[(q, k)]:.4f}" for q in p.quant.schemes for k in ("keys", "values")) + "."])}


if __name__ == "__main__":
    raise SystemExit(main())
