"""CSKV pipeline stages (run by papers/cskv/dvc.yaml): ``python -m papers.cskv.stages <stage>``.

    calibrate   inputs X of every K/V projection on the corpus train split (+ a held-out set) and their stats
    train       all factor sets the tables need: SVD/ASVD/whitened/random inits and CSKV-trained (Lightning)
    table1..5   evaluations → results/<table>.json (rendered into reports/cskv.md by the root stage)
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from papers.cskv.module import (activation_stats, collect_inputs, init_factors, load_factors, projection_weights,
                                reconstruction_error, save_factors, train_factors)
from shared.cache.eviction import h2o_cache, h2o_scores, streaming_llm_cache
from shared.cache.fused import use_fused_latent_attention
from shared.cache.lowrank import lowrank_cache
from shared.io import read_yaml, write_json
from shared.kv_eval import evaluate_methods, summarize
from shared.models import load_model
from shared.tasks import GENERATORS, corpus_text
from shared.tracking import lightning_logger, stage_run

PAPER = "cskv"
HERE = Path(__file__).resolve().parent
ARTIFACTS, RESULTS = HERE / "artifacts", HERE / "results"
CALIBRATION = ARTIFACTS / "calibration.safetensors"
FACTORS = ARTIFACTS / "factors"
TABLES = ("table1", "table2", "table3", "table4", "table5")


def load_params(path: Path = HERE / "params.yaml") -> dict:
    p = read_yaml(path)
    if not isinstance(p.get("window"), int) or p["window"] < 0:
        raise ValueError(f"window must be an int >= 0, got {p.get('window')!r}")
    for r in p["table1"]["ratios"] + [p["ablation"]["ratio"]]:
        if not 0.0 < r < 1.0:
            raise ValueError(f"compression ratios must be in (0, 1), got {r}")
    if p["eval"].get("impl", "torch") not in ("torch", "triton"):
        raise ValueError(f"eval.impl must be 'torch' or 'triton', got {p['eval']['impl']!r}")
    for task in p["eval"]["tasks"] + [p["ablation"]["task"]]:
        if task not in GENERATORS:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(GENERATORS)}")
    return p


# ---- factor sets -------------------------------------------------------------------------------------------
def factor_name(kind: str, init: str, density: float, per_head: bool, trained: bool, qat: bool = False) -> str:
    return f"{kind}-{init}-d{density:g}-{'head' if per_head else 'joint'}-{'trained' if trained else 'init'}" + \
        ("-qat" if qat else "")


def needed_factor_sets(p: dict) -> list[dict]:
    """Every (kind, init, density, per_head, trained, qat) the tables use, without duplicates."""
    sets, seen = [], set()

    def add(init, dk, dv, per_head=False, trained=True, qat=False):
        for kind, d in (("k", dk), ("v", dv)):
            key = factor_name(kind, init, d, per_head, trained, qat)
            if key not in seen:
                seen.add(key)
                sets.append(dict(name=key, kind=kind, init=init, density=d, per_head=per_head, trained=trained,
                                 qat=qat))

    init = p["train"]["init"]
    for r in p["table1"]["ratios"]:
        d = round(1 - r, 6)
        for i in ("svd", "asvd", "whitened"):
            add(i, d, d, trained=False)
        add(init, d, d)
        add(init, d, d, per_head=True)
    d = round(1 - p["ablation"]["ratio"], 6)
    for i in ("random", "svd", "asvd"):
        add(i, d, d, trained=False)
        add(i, d, d)
    for dk, dv in p["ablation"]["kv_densities"]:
        add(init, dk, dv)
    add(init, d, d, qat=True)
    return sets


# ---- stages ------------------------------------------------------------------------------------------------
def _corpus_ids(tokenizer, split: str, max_chars: int = 2_000_000) -> torch.Tensor:
    return torch.tensor(tokenizer(corpus_text(split)[:max_chars], add_special_tokens=False)["input_ids"])


def stage_calibrate(p: dict) -> None:
    c = p["calibration"]
    model, tok, spec = load_model(p["model"])
    with stage_run(PAPER, "calibrate", p, p["seed"]) as run:
        t0 = time.perf_counter()
        X = collect_inputs(model, _corpus_ids(tok, c["split"]), c["n_samples"], c["seq_len"], p["seed"])
        X_val = collect_inputs(model, _corpus_ids(tok, "validation"), 2, c["seq_len"], p["seed"] + 1)
        stats = activation_stats(X)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        tmp = CALIBRATION.with_suffix(".tmp")
        save_file({"X": X.contiguous(), "X_val": X_val.contiguous(), "abs_mean": stats["abs_mean"].contiguous(),
                   "gram": stats["gram"].contiguous()}, str(tmp), metadata={"model": p["model"]})
        tmp.replace(CALIBRATION)
        run.log_metrics({"calibration_tokens": X.shape[1], "seconds": time.perf_counter() - t0})


def stage_train(p: dict) -> None:
    model, tok, spec = load_model(p["model"])
    cal = load_file(str(CALIBRATION))
    X, X_val = cal["X"], cal["X_val"]
    stats = {"abs_mean": cal["abs_mean"], "gram": cal["gram"]}
    W = {k: projection_weights(model, k) for k in ("k", "v")}
    t = p["train"]
    rows = []
    with stage_run(PAPER, "train", p, p["seed"]) as run:
        for fs in needed_factor_sets(p):
            t0 = time.perf_counter()
            Wk = W[fs["kind"]]
            f = init_factors(Wk, stats, fs["density"], spec.head_dim, spec.num_kv_heads, fs["init"], fs["per_head"],
                             seed=p["seed"])
            if fs["trained"]:
                logger = lightning_logger(PAPER, f"train/{fs['name']}")
                f, _ = train_factors(X, Wk, f, fs["kind"], steps=t["steps"], seq_len=t["seq_len"], lr=t["lr"],
                                     qat=fs["qat"], seed=p["seed"], logger=logger, progress=False)
            save_factors(FACTORS / f"{fs['name']}.safetensors", f, fs)
            row = {**fs, "recon_err_train": reconstruction_error(X, Wk, f),
                   "recon_err_heldout": reconstruction_error(X_val, Wk, f), "seconds": time.perf_counter() - t0}
            rows.append(row)
            run.cell(fs["name"], {k: row[k] for k in ("recon_err_train", "recon_err_heldout", "seconds")}, fs)
            print(f"{fs['name']}: rel. error train {row['recon_err_train']:.4f} held-out {row['recon_err_heldout']:.4f}"
                  f" ({row['seconds']:.1f}s)", flush=True)
    write_json(RESULTS / "train.json", {
        "title": "Layer-wise reconstruction error (CSKV Eq. 5, relative ‖XW − XAB‖²/‖XW‖², mean over layers)",
        "setting": f"{p['model']}, calibration {p['calibration']['n_samples']}×{p['calibration']['seq_len']} tokens "
                   f"(Shakespeare train), held-out = 2×{p['calibration']['seq_len']} validation tokens; "
                   f"{t['steps']} AdamW steps, lr {t['lr']}",
        "columns": [["name", "factor set"], ["recon_err_train", "rel. error (train)"],
                    ["recon_err_heldout", "rel. error (held-out)"]],
        "rows": rows, "claims": [],
        "notes": ["`whitened` is the closed-form minimiser of the same loss (not in the paper): the floor training "
                  "can reach on the calibration set."]})


# ---- evaluation --------------------------------------------------------------------------------------------
class MethodFactory:
    """Builds ``name → (PrefillRecord → cache)`` for the method configurations the tables ask for."""

    def __init__(self, p: dict, model, spec):
        self.p, self.model, self.spec = p, model, spec
        self._factors: dict[str, list] = {}
        self._scored_record = None
        self._scores: list = []

    def factors(self, kind, init, density, per_head=False, trained=True, qat=False):
        name = factor_name(kind, init, density, per_head, trained, qat)
        if name not in self._factors:
            self._factors[name] = load_factors(FACTORS / f"{name}.safetensors")
        return self._factors[name]

    def lowrank(self, init, dk, dv, per_head=False, trained=True, qat=False, window=None, quantize=False):
        fk = self.factors("k", init, dk, per_head, trained, qat)
        fv = self.factors("v", init, dv, per_head, trained, qat)
        w = self.p["window"] if window is None else window
        # impl="triton": per-head factor sets decode through the fused kernel; joint ones stay on torch
        impl = self.p["eval"].get("impl", "torch") if per_head else "torch"
        return lambda rec: lowrank_cache(rec, list(zip(fk, fv)), self.spec.num_kv_heads, window=w,
                                         quantize=quantize, impl=impl)

    def h2o(self, ratio):
        def build(rec):
            # one score pass per prefill, shared by both ratios; keep the record itself (not its id(), which
            # CPython may reuse for the next record once this one is freed)
            if self._scored_record is not rec:
                self._scored_record, self._scores = rec, h2o_scores(self.model, rec, self.p["eval"]["h2o_max_queries"])
            return h2o_cache(rec, ratio, self._scores)
        return build

    def table1_method(self, name, ratio):
        d = round(1 - ratio, 6)
        init = self.p["train"]["init"]
        if name == "streaming_llm":
            return lambda rec: streaming_llm_cache(rec, ratio)
        if name == "h2o":
            return self.h2o(ratio)
        if name in ("svd", "asvd", "whitened"):
            return self.lowrank(name, d, d, trained=False)
        if name == "cskv":
            return self.lowrank(init, d, d)
        if name == "cskv_per_head":
            return self.lowrank(init, d, d, per_head=True)
        raise ValueError(f"unknown method {name!r}; expected streaming_llm, h2o, svd, asvd, whitened, cskv, "
                         "cskv_per_head")


def make_cases(tok, task: str, length: int, n: int, seed: int) -> list:
    if task == "needle":
        hay = corpus_text("test")
        return [GENERATORS["needle"](tok, hay, length, seed * 100_003 + i) for i in range(n)]
    if task == "longeval_lines":
        from shared.tasks import lines_for_tokens
        n_lines = lines_for_tokens(tok, length)
        return [GENERATORS[task](tok, n_lines, seed * 100_003 + i) for i in range(n)]
    return [GENERATORS[task](tok, length, seed * 100_003 + i) for i in range(n)]


def run_cells(model, tok, p, task, length, methods: dict, protocol: str, run, labels: dict) -> list[dict]:
    """Evaluate one (task, length) for all methods; returns summary rows tagged with ``labels[method]``."""
    cases = make_cases(tok, task, length, p["eval"]["n_cases"], p["seed"])
    fused = use_fused_latent_attention(model) if p["eval"].get("impl", "torch") == "triton" else nullcontext()
    with fused:
        rows = evaluate_methods(model, cases, methods, protocol=protocol, batch_size=p["eval"]["batch_size"],
                                pad_token_id=tok.pad_token_id, desc=f"{task}@{length} {protocol}")
    out = []
    for s in summarize(rows):
        s.update({"task": task, "length": length, "protocol": protocol, **labels.get(s["method"], {})})
        run.cell(f"{task}/{length}/{protocol}/{s['method']}",
                 {k: s[k] for k in ("accuracy", "answer_ppl", "kl", "top1", "bytes_ratio")}, s)
        out.append(s)
    full = next(r for r in out if r["method"] == "full")
    gate = p["eval"]["full_cache_min_accuracy"].get(task)
    if gate is not None and full["accuracy"] < gate:
        raise RuntimeError(f"full-cache accuracy on {task}@{length} is {full['accuracy']:.2f} < {gate} (the range "
                           "measured for the uncompressed model): refusing to publish method rows — check the "
                           "prompt format / model before comparing compression methods")
    return out


ROW_COLUMNS = [["label", "method"], ["paper_ratio", "paper ratio"], ["bytes_ratio", "measured bytes / full"],
               ["accuracy", "acc"], ["ci95", "95% CI"], ["n", "n"], ["kl", "KL vs full"], ["top1", "top-1 agree"],
               ["answer_ppl", "answer ppl"]]


def _mean(rows, method_label, key="accuracy", **filters):
    vals = [r[key] for r in rows if r.get("label") == method_label and all(r.get(k) == v for k, v in filters.items())]
    return sum(vals) / len(vals) if vals else float("nan")


def stage_table1(p: dict) -> None:
    model, tok, spec = load_model(p["model"])
    mf = MethodFactory(p, model, spec)
    methods, labels = {}, {"full": {"label": "full", "paper_ratio": 0.0}}
    for ratio in p["table1"]["ratios"]:
        for name in p["table1"]["methods"]:
            key = f"{name}@{ratio:g}"
            methods[key] = mf.table1_method(name, ratio)
            labels[key] = {"label": name, "paper_ratio": ratio}
    rows = []
    with stage_run(PAPER, "table1", p, p["seed"]) as run:
        for task in p["eval"]["tasks"]:
            for length in p["eval"]["lengths"]:
                rows += run_cells(model, tok, p, task, length, methods, p["eval"]["protocol"], run, labels)
            L = p["table1"]["paper_protocol_length"]
            if L and p["eval"]["protocol"] != "paper":
                rows += run_cells(model, tok, p, task, L, methods, "paper", run, labels)
    proto = p["eval"]["protocol"]
    dec = [r for r in rows if r["protocol"] == proto]
    hi = max(p["table1"]["ratios"])
    lo = min(p["table1"]["ratios"])
    acc = lambda m, r: _mean(dec, m, paper_ratio=r)
    kl = lambda m, r: _mean(dec, m, "kl", paper_ratio=r)
    full = _mean(dec, "full")
    claims = [
        _claim("t1_cskv_vs_asvd_80", acc("cskv", hi), acc("asvd", hi), full, kl("cskv", hi), kl("asvd", hi), hi),
        _claim_vs_eviction(acc("cskv", hi), acc("streaming_llm", hi), acc("h2o", hi), kl("cskv", hi),
                           kl("streaming_llm", hi), kl("h2o", hi), hi),
        _claim_near_full(acc("cskv", lo), full, kl("cskv", lo), lo),
    ]
    lengths = ", ".join(map(str, p["eval"]["lengths"]))
    write_json(RESULTS / "table1.json", {
        "title": "Table 1 analogue — retrieval and fidelity at 50% / 80% compression",
        "table_ref": "Table 1",
        "setting": f"{p['model']}; tasks {p['eval']['tasks']} at {lengths} context tokens "
                   f"(↔ paper's 4k/6k/8k/10k, see README); {p['eval']['n_cases']} cases per cell; protocol "
                   f"`{proto}` (+ `paper` at {p['table1']['paper_protocol_length']}); window W={p['window']}.",
        "columns": [["task", "task"], ["length", "ctx"], ["protocol", "protocol"]] + ROW_COLUMNS,
        "rows": rows, "claims": claims,
        "plot": None,
        "notes": ["`acc`: every gold answer token is the greedy choice (teacher-forced; equals greedy decoding "
                  "reproducing the gold answer). KL/top-1 vs the full cache over all decoded positions.",
                  "`paper ratio` = 1 − density as the paper counts it; `measured bytes / full` counts real "
                  "tensor storage (latents + exact window + window latents)."]})


def _verdict(strong: bool, weak: bool) -> str:
    return "reproduced" if strong else ("partially reproduced" if weak else "not reproduced")


def _claim(cid, a_cskv, a_asvd, a_full, kl_cskv, kl_asvd, ratio):
    # Rule fixed before the run: reproduced iff CSKV is within 0.1 of full and ≥ 0.2 above ASVD;
    # partially iff CSKV beats ASVD in accuracy or has ≤ half its KL.
    strong = a_cskv >= a_full - 0.1 and a_cskv - a_asvd >= 0.2
    weak = a_cskv > a_asvd or kl_cskv <= 0.5 * kl_asvd
    return {"id": cid, "ours": f"acc {a_cskv:.2f} vs {a_asvd:.2f} (full {a_full:.2f}); KL {kl_cskv:.3f} vs {kl_asvd:.3f}",
            "verdict": _verdict(strong, weak), "note": f"mean over tasks × lengths at {ratio:.0%}"}


def _claim_vs_eviction(a_cskv, a_st, a_h2o, kl_cskv, kl_st, kl_h2o, ratio):
    strong = a_cskv >= max(a_st, a_h2o) and kl_cskv <= min(kl_st, kl_h2o)
    weak = a_cskv >= max(a_st, a_h2o) or kl_cskv <= min(kl_st, kl_h2o)
    return {"id": "t1_cskv_vs_eviction_80",
            "ours": f"acc CSKV {a_cskv:.2f}, StreamingLLM {a_st:.2f}, H2O {a_h2o:.2f}; KL {kl_cskv:.3f}/{kl_st:.3f}/{kl_h2o:.3f}",
            "verdict": _verdict(strong, weak), "note": f"at {ratio:.0%}; reproduced iff best in both acc and KL"}


def _claim_near_full(a_cskv, a_full, kl_cskv, ratio):
    return {"id": "t1_cskv_50_near_full", "ours": f"acc {a_cskv:.2f} vs full {a_full:.2f}; KL {kl_cskv:.3f}",
            "verdict": _verdict(a_cskv >= a_full - 0.05, a_cskv >= a_full - 0.15),
            "note": f"at {ratio:.0%}; reproduced iff within 0.05 of full"}


def _ablation(p: dict, stage: str, methods: dict, labels: dict) -> list[dict]:
    model, tok, spec = load_model(p["model"])
    a = p["ablation"]
    mf = MethodFactory(p, model, spec)
    built = {k: make(mf) for k, make in methods.items()}  # methods: name -> (MethodFactory -> cache builder)
    with stage_run(PAPER, stage, p, p["seed"]) as run:
        return run_cells(model, tok, p, a["task"], a["length"], built, p["eval"]["protocol"], run, labels)


def _ablation_setting(p: dict) -> str:
    a = p["ablation"]
    return (f"{p['model']}; {a['task']} at {a['length']} tokens, {p['eval']['n_cases']} cases, protocol "
            f"`{p['eval']['protocol']}`, paper ratio {a['ratio']:.0%}, window W={p['window']} unless varied.")


def stage_table2(p: dict) -> None:
    d = round(1 - p["ablation"]["ratio"], 6)
    methods, labels = {}, {"full": {"label": "full"}}
    for init in ("random", "svd", "asvd"):
        for trained in (False, True):
            key = f"{init}/{'trained' if trained else 'init only'}"
            methods[key] = lambda mf, i=init, t=trained: mf.lowrank(i, d, d, trained=t)
            labels[key] = {"label": key, "init": init, "trained": trained, "paper_ratio": p["ablation"]["ratio"]}
    rows = _ablation(p, "table2", methods, labels)
    acc = {r["label"]: r["accuracy"] for r in rows}
    kl = {r["label"]: r["kl"] for r in rows}
    strong = acc["asvd/trained"] >= acc["svd/trained"] > acc["random/trained"]
    weak = kl["asvd/trained"] <= kl["svd/trained"] < kl["random/trained"]
    write_json(RESULTS / "table2.json", {
        "title": "Table 2 analogue — initialisation (random / SVD / ASVD), with and without training",
        "table_ref": "Table 2", "setting": _ablation_setting(p),
        "columns": [["init", "init"], ["trained", "trained"]] + ROW_COLUMNS[3:], "rows": rows,
        "claims": [{"id": "t2_init_matters",
                    "ours": "trained acc random {:.2f} / SVD {:.2f} / ASVD {:.2f}; KL {:.3f} / {:.3f} / {:.3f}".format(
                        acc["random/trained"], acc["svd/trained"], acc["asvd/trained"], kl["random/trained"],
                        kl["svd/trained"], kl["asvd/trained"]),
                    "verdict": _verdict(strong, weak), "note": "reproduced iff ASVD ≥ SVD > random in accuracy"}]})


def stage_table3(p: dict) -> None:
    d = round(1 - p["ablation"]["ratio"], 6)
    init = p["train"]["init"]
    methods, labels = {}, {"full": {"label": "full", "window": None}}
    for w in p["ablation"]["windows"]:
        methods[f"W={w}"] = lambda mf, w=w: mf.lowrank(init, d, d, window=w)
        labels[f"W={w}"] = {"label": f"cskv W={w}", "window": w, "paper_ratio": p["ablation"]["ratio"]}
    rows = _ablation(p, "table3", methods, labels)
    sweep = sorted((r for r in rows if r["window"] is not None), key=lambda r: r["window"])
    accs, kls = [r["accuracy"] for r in sweep], [r["kl"] for r in sweep]
    strong = accs[-1] >= accs[0] and all(b <= a + 1e-9 for a, b in zip(kls, kls[1:]))
    weak = kls[-1] < kls[0]
    write_json(RESULTS / "table3.json", {
        "title": "Table 3 analogue — bi-branch window size", "table_ref": "Table 3", "setting": _ablation_setting(p),
        "columns": [["window", "W"]] + ROW_COLUMNS[2:], "rows": rows,
        "plot": {"x": "window", "y": "kl", "series": "task", "xlabel": "window W (tokens)", "ylabel": "KL vs full"},
        "claims": [{"id": "t3_window_helps",
                    "ours": "acc " + ", ".join(f"{a:.2f}@{r['window']}" for a, r in zip(accs, sweep)) +
                            "; KL " + ", ".join(f"{k:.3f}" for k in kls),
                    "verdict": _verdict(strong, weak),
                    "note": "reproduced iff acc(max W) ≥ acc(min W) and KL falls monotonically with W"}]})


def stage_table4(p: dict) -> None:
    init = p["train"]["init"]
    methods, labels = {}, {"full": {"label": "full"}}
    for dk, dv in p["ablation"]["kv_densities"]:
        key = f"K{dk:g}/V{dv:g}"
        methods[key] = lambda mf, dk=dk, dv=dv: mf.lowrank(init, dk, dv)
        labels[key] = {"label": f"cskv {key}", "density_k": dk, "density_v": dv,
                       "paper_ratio": round(1 - (dk + dv) / 2, 6)}
    rows = _ablation(p, "table4", methods, labels)
    splits = [r for r in rows if r.get("density_k") is not None]
    best = min(splits, key=lambda r: r["kl"])
    more_v = [r for r in splits if r["density_v"] > r["density_k"]]
    more_k = [r for r in splits if r["density_k"] > r["density_v"]]
    kl_v = min(r["kl"] for r in more_v) if more_v else float("nan")
    kl_k = min(r["kl"] for r in more_k) if more_k else float("nan")
    write_json(RESULTS / "table4.json", {
        "title": "Table 4 analogue — uneven key/value density at a fixed total", "table_ref": "Table 4",
        "setting": _ablation_setting(p),
        "columns": [["density_k", "key density"], ["density_v", "value density"]] + ROW_COLUMNS[2:], "rows": rows,
        "claims": [{"id": "t4_uneven_split",
                    "ours": f"best split K{best['density_k']:g}/V{best['density_v']:g} (KL {best['kl']:.3f}); "
                            f"best more-V KL {kl_v:.3f} vs best more-K KL {kl_k:.3f}",
                    "verdict": "not comparable",
                    "note": "the paper's direction is ambiguous (spec); we report both directions — keys are "
                            "low-rank on this model (95% energy in ~24/192 channels), values are not"}]})


def stage_table5(p: dict) -> None:
    d = round(1 - p["ablation"]["ratio"], 6)
    init = p["train"]["init"]
    r = p["ablation"]["ratio"]
    methods = {"none (fp32 latents)": lambda mf: mf.lowrank(init, d, d),
               "PTQ int4": lambda mf: mf.lowrank(init, d, d, quantize=True),
               "QAT int4": lambda mf: mf.lowrank(init, d, d, qat=True, quantize=True)}
    labels = {"full": {"label": "full", "paper_ratio": 0.0},
              "none (fp32 latents)": {"label": "none", "paper_ratio": r},
              "PTQ int4": {"label": "PTQ", "paper_ratio": round(1 - d / 4, 6)},
              "QAT int4": {"label": "QAT", "paper_ratio": round(1 - d / 4, 6)}}
    rows = _ablation(p, "table5", methods, labels)
    g = {row["label"]: row for row in rows}
    strong = g["QAT"]["accuracy"] >= g["PTQ"]["accuracy"] and g["QAT"]["kl"] < g["PTQ"]["kl"]
    weak = g["QAT"]["kl"] < g["PTQ"]["kl"]
    write_json(RESULTS / "table5.json", {
        "title": "Table 5 analogue — 4-bit latents: none / PTQ / QAT", "table_ref": "Table 5",
        "setting": _ablation_setting(p) + " int4 = packed 4-bit codes with per-group scale/zero in the cache dtype "
                   "(fp32 on CPU). `paper ratio` is the paper's 1 − density/4 (vs fp16); measured bytes are vs our "
                   "fp32 full cache.",
        "columns": ROW_COLUMNS, "rows": rows,
        "claims": [{"id": "t5_qat_rescues_4bit",
                    "ours": "acc none {:.2f} / PTQ {:.2f} / QAT {:.2f}; KL {:.3f} / {:.3f} / {:.3f}".format(
                        g["none"]["accuracy"], g["PTQ"]["accuracy"], g["QAT"]["accuracy"], g["none"]["kl"],
                        g["PTQ"]["kl"], g["QAT"]["kl"]),
                    "verdict": _verdict(strong, weak), "note": "reproduced iff QAT ≥ PTQ in acc and lower KL"}]})


STAGES = {"calibrate": stage_calibrate, "train": stage_train, "table1": stage_table1, "table2": stage_table2,
          "table3": stage_table3, "table4": stage_table4, "table5": stage_table5}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="CSKV pipeline stages")
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("--params", default=str(HERE / "params.yaml"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    STAGES[args.stage](load_params(Path(args.params)))
    print(f"stage {args.stage} done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
