"""MatryoshkaKV pipeline stages (run by papers/matryoshka_kv/dvc.yaml): ``python -m papers.matryoshka_kv.stages <stage>``.

    calibrate   mean/covariance of post-RoPE K and V per (layer, KV head) on the train split → PCA projection
    train       Matryoshka training of the projections (Lightning; 0.25·KL + 0.75·CE, random per-head ranks)
    search      the paper's greedy KL rank search (Algorithm 1) from 100% down to the smallest budget
    evaluate    perplexity / KL-to-full / top-1 on the test split, and the next-line multiple-choice task
    retrieval   passkey retrieval decoded token by token through each method's real cache (measured bytes)

Methods, all at equal KV budget (fraction of cached K/V channels, measured in bytes):
    pca_uniform     PCA bases from calibration, no training, r = budget·d everywhere (the paper's PCA row)
    mkv_uniform     trained projections, uniform ranks
    mkv_searched    trained projections, ranks from the greedy search
    cskv_svd        CSKV-style joint SVD of W_K/W_V (shared.cache.decompose), always compressed (prefill too)
    cskv_window     the same factors in CSKV's native bi-branch cache (exact recent window; retrieval only)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from papers.matryoshka_kv.module import greedy_rank_search, kl_to, split_summary, train_projection
from shared.cache.base import PrefillRecord, full_cache, record_prefill
from shared.cache.decompose import dense_factors, factorize, projection_weights, rank_for_density
from shared.cache.lowrank import lowrank_cache
from shared.cache.orthogonal import (KVProjection, check_budget, check_ranks, kv_statistics, latent_attention_impl,
                                     matryoshka_cache, project_kv, uniform_ranks)
from shared.io import read_yaml, write_json
from shared.kv_eval import evaluate_methods, summarize
from shared.models import load_model
from shared.tasks import GENERATORS, corpus_ids, next_line_choice, score_choice, token_windows
from shared.tracking import lightning_logger, stage_run

PAPER = "matryoshka_kv"
HERE = Path(__file__).resolve().parent
ARTIFACTS, RESULTS = HERE / "artifacts", HERE / "results"
STATS, PCA, TRAINED, RANKS = (ARTIFACTS / f for f in ("kv_stats.safetensors", "pca.safetensors",
                                                        "mkv.safetensors", "ranks.safetensors"))
METHODS = ("pca_uniform", "mkv_uniform", "mkv_searched", "cskv_svd")
RETRIEVAL_METHODS = ("pca_uniform", "mkv_uniform", "mkv_searched", "cskv_window")


def load_params(path: Path = HERE / "params.yaml") -> dict:
    p = read_yaml(path)
    for b in p["eval"]["budgets"] + p["search"]["budgets"] + p["eval"]["choice"]["budgets"] + \
            p["eval"]["retrieval"]["budgets"] + p["train"]["val_budgets"]:
        check_budget(b)
    for m in p["eval"]["methods"]:
        if m not in METHODS:
            raise ValueError(f"unknown eval method {m!r}; expected one of {METHODS}")
    for m in p["eval"]["retrieval"]["methods"]:
        if m not in RETRIEVAL_METHODS:
            raise ValueError(f"unknown retrieval method {m!r}; expected one of {RETRIEVAL_METHODS}")
    if p["eval"]["retrieval"]["task"] not in GENERATORS:
        raise ValueError(f"unknown retrieval task {p['eval']['retrieval']['task']!r}; expected {sorted(GENERATORS)}")
    searched = set(p["search"]["budgets"])
    for b in p["eval"]["budgets"] + p["eval"]["choice"]["budgets"] + p["eval"]["retrieval"]["budgets"]:
        if b < 1.0 and b not in searched:
            raise ValueError(f"eval budget {b} has no searched ranks; add it to search.budgets {sorted(searched)}")
    return p


def save_projection(path: Path, proj: KVProjection, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in proj.state_dict().items()}, str(tmp),
              metadata={k: str(v) for k, v in meta.items()})
    tmp.replace(path)


def load_projection(path: Path) -> KVProjection:
    if not path.is_file():
        raise FileNotFoundError(f"no projection at {path}; run `dvc repro papers/{PAPER}` (calibrate/train stages)")
    t = load_file(str(path))
    L, H, d, _ = t["x_k"].shape
    proj = KVProjection(L, H, d)
    proj.load_state_dict(t)
    return proj.requires_grad_(False)


def load_ranks(path: Path = RANKS) -> dict[float, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no searched ranks at {path}; run the `search` stage")
    return {float(k): v for k, v in load_file(str(path)).items()}


# ---- stages ------------------------------------------------------------------------------------------------
def stage_calibrate(p: dict) -> None:
    c = p["calibration"]
    model, tok, spec = load_model(p["model"])
    with stage_run(PAPER, "calibrate", p, p["seed"]) as run:
        t0 = time.perf_counter()
        seqs = token_windows(corpus_ids(tok, c["split"]), c["n_sequences"], c["seq_len"], p["seed"])
        stats = kv_statistics(model, list(seqs.split(c["batch_size"])))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in stats.items()}, str(STATS), metadata={"model": p["model"]})
        save_projection(PCA, KVProjection.from_statistics(stats), {"init": "pca", "model": p["model"]})
        run.log_metrics({"calibration_tokens": int(stats["tokens"]), "seconds": time.perf_counter() - t0})


def stage_train(p: dict) -> None:
    t = p["train"]
    model, tok, spec = load_model(p["model"])
    proj = load_projection(PCA).requires_grad_(True)
    ids = corpus_ids(tok, "train")
    seqs = token_windows(ids, t["n_sequences"], t["seq_len"], p["seed"] + 1)
    val = list(token_windows(corpus_ids(tok, "validation"), t["val_sequences"], t["seq_len"],
                             p["seed"] + 2).split(1))
    with stage_run(PAPER, "train", p, p["seed"]) as run:
        t0 = time.perf_counter()
        module = train_projection(model, proj, seqs, accumulate=t["accumulate"], lr=t["lr"],
                                  warmup_steps=t["warmup_steps"], seed=p["seed"], val_batches=val,
                                  val_every=t["val_every"], val_budgets=tuple(t["val_budgets"]), clip=t["clip"],
                                  logger=lightning_logger(PAPER, "train/lightning"), progress=True)
        seconds = time.perf_counter() - t0
        save_projection(TRAINED, proj, {"init": "pca", "trained_sequences": t["n_sequences"]})
        run.log_metrics({"seconds": seconds, "tokens": seqs.numel()})
    rows = [{"step": r["step"], "budget": b, "kl": r[f"kl@{b:g}"]} for r in module.curve for b in t["val_budgets"]]
    first, last = module.curve[0], module.curve[-1]
    b0 = min(t["val_budgets"])
    k0, k1 = first[f"kl@{b0:g}"], last[f"kl@{b0:g}"]
    verdict = "reproduced" if k1 <= 0.8 * k0 else "not reproduced"
    write_json(RESULTS / "train.json", {
        "title": "Matryoshka training: KL to the base model on held-out text at uniform budgets (our eval-loss figure)",
        "setting": f"{p['model']}; {t['n_sequences']}×{t['seq_len']} train tokens (Shakespeare), batch 1 × "
                   f"accumulation {t['accumulate']} = {seqs.shape[0] // t['accumulate']} AdamW steps, lr {t['lr']}, "
                   f"warmup {t['warmup_steps']}, cosine, clip {t['clip']}; KL on {t['val_sequences']}×{t['seq_len']} "
                   f"validation tokens; {seconds:.0f} s",
        "columns": [["step", "step"], ["budget", "budget"], ["kl", "KL(full ‖ MKV)"]],
        "rows": rows,
        "plot": {"x": "step", "y": "kl", "series": "budget", "xlabel": "optimizer step", "ylabel": "KL to full"},
        "claims": [{"id": "training_lowers_kl", "ours": f"KL@{b0:.1%}: {k0:.3f} → {k1:.3f} in "
                    f"{seqs.numel() / 1e3:.0f}K tokens", "verdict": verdict,
                    "note": "PCA init (step 0) → after one pass; paper ≈16M tokens, ours "
                            f"{seqs.numel() / 1e6:.2f}M"}],
        "notes": ["Step 0 is the PCA initialisation; KL at budget 1 stays at fp32 round-off (exact by construction)."]})


def stage_search(p: dict) -> None:
    s = p["search"]
    model, tok, spec = load_model(p["model"])
    proj = load_projection(TRAINED)
    ids = token_windows(corpus_ids(tok, "train"), s["n_sequences"], s["seq_len"], p["seed"] + 3)
    with stage_run(PAPER, "search", p, p["seed"]) as run:
        t0 = time.perf_counter()
        res = greedy_rank_search(model, proj, ids, s["budgets"], delta=s["delta"], per_round=s["per_round"],
                                 criterion=s["criterion"])
        seconds = time.perf_counter() - t0
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        save_file({f"{b:g}": r.contiguous() for b, r in res.snapshots.items()}, str(RANKS.with_suffix(".tmp")))
        RANKS.with_suffix(".tmp").replace(RANKS)
        run.log_metrics({"seconds": seconds, "rounds": len(res.history)})
    rows, layer_rows = [], []
    for b, r in sorted(res.snapshots.items(), reverse=True):
        sm = split_summary(r, spec.head_dim)
        rows.append({"budget": b, "key_fraction": sm["key_fraction"], "value_fraction": sm["value_fraction"]})
    b_ref = 0.375 if 0.375 in res.snapshots else min(res.snapshots)
    sm = split_summary(res.snapshots[b_ref], spec.head_dim)
    for kind in ("k", "v"):
        for l, f in enumerate(sm[f"per_layer_{kind}"]):
            layer_rows.append({"layer": l, "kind": "keys" if kind == "k" else "values", "kept": f})
    verdict = "reproduced" if sm["value_fraction"] > sm["key_fraction"] else "not reproduced"
    write_json(RESULTS / "search.json", {
        "title": "Greedy rank search (Algorithm 1): share of key vs value channels kept per budget",
        "setting": f"criterion {s['criterion']} on {s['n_sequences']}×{s['seq_len']} train tokens, Δr = {s['delta']}, "
                   f"{s['per_round']} decrements per round (paper: 1), {len(res.history)} rounds, {seconds:.0f} s",
        "columns": [["budget", "budget"], ["key_fraction", "key channels kept"],
                    ["value_fraction", "value channels kept"]],
        "rows": rows,
        "claims": [{"id": "kv_split", "ours": f"{sm['key_fraction']:.2%} K vs {sm['value_fraction']:.2%} V "
                    f"at {b_ref:.1%}", "verdict": verdict,
                    "note": "SmolLM2-135M (3 KV heads × 30 layers), KL search on Shakespeare"}],
        "notes": [f"Round history: {[round(h['budget'], 4) for h in res.history]}"]})
    write_json(RESULTS / "search_layers.json", {
        "title": f"Searched ranks per layer at a {b_ref:.1%} budget (mean kept fraction over the 3 KV heads)",
        "columns": [["layer", "layer"], ["kind", "K/V"], ["kept", "kept fraction"]],
        "rows": layer_rows,
        "plot": {"x": "layer", "y": "kept", "series": "kind", "xlabel": "layer", "ylabel": "fraction kept"}})


class Methods:
    """Context managers that put the model into each (method, budget) configuration for full-sequence forwards,
    and cache builders for decoding."""

    def __init__(self, p: dict, model, spec):
        self.p, self.model, self.spec = p, model, spec
        self.pca, self.mkv = load_projection(PCA), load_projection(TRAINED)
        self.searched = load_ranks()
        self._svd: dict[float, list] = {}
        self.W = {k: projection_weights(model, k) for k in ("k", "v")}

    def ranks(self, method: str, budget: float) -> torch.Tensor:
        s = self.spec
        if method == "mkv_searched" and budget < 1.0:
            return check_ranks(self.searched[budget], s.head_dim)
        return uniform_ranks(s.num_layers, s.num_kv_heads, s.head_dim, budget)

    def projection(self, method: str) -> KVProjection:
        return self.pca if method.startswith("pca") else self.mkv

    def svd(self, budget: float) -> list:
        if budget not in self._svd:
            s = self.spec
            r = rank_for_density(budget, s.head_dim, s.num_kv_heads)
            fk = [factorize(w, r, init="svd") for w in self.W["k"]]
            fv = [factorize(w, r, init="svd") for w in self.W["v"]]
            self._svd[budget] = list(zip(fk, fv))
        return self._svd[budget]

    @contextmanager
    def active(self, method: str, budget: float):
        if method == "full":
            yield
        elif method == "cskv_svd":
            with dense_factors(self.model, self.svd(budget)):
                yield
        else:
            proj = self.projection(method)
            with proj.frozen(), project_kv(self.model, proj, self.ranks(method, budget)):
                yield

    def builder(self, method: str, budget: float, window: int = 0):
        if method in ("cskv_svd", "cskv_window"):
            factors = self.svd(budget)
            w = window if method == "cskv_window" else 0
            return lambda rec: lowrank_cache(rec, factors, self.spec.num_kv_heads, window=w, method=method)
        return matryoshka_cache(self.model, self.projection(method), self.ranks(method, budget), method=method)

    @torch.no_grad()
    def bytes_per_token(self, method: str, budget: float, record: PrefillRecord) -> float:
        """Measured storage of this configuration's KV cache for one exact prefill, per token."""
        cache = full_cache(record) if method == "full" else self.builder(method, budget)(record)
        return cache.stored_bytes() / record.input_ids.numel()


@torch.no_grad()
def _lm_metrics(model, seqs: torch.Tensor, refs: list[torch.Tensor], batch: int) -> dict:
    nll, kl, top1, n = 0.0, 0.0, 0.0, 0
    for ids, ref in zip(seqs.split(batch), refs):
        logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits, -1)
        nll -= float(logp[:, :-1].gather(-1, ids[:, 1:, None]).sum())
        kl += float(kl_to(ref, logits)) * ids.numel()
        top1 += float((logp.argmax(-1) == ref.argmax(-1)).float().sum())
        n += ids.numel()
    n_pred = seqs.shape[0] * (seqs.shape[1] - 1)
    return {"ppl": math.exp(nll / n_pred), "kl": kl / n, "top1": top1 / n}


def stage_evaluate(p: dict) -> None:
    e = p["eval"]
    model, tok, spec = load_model(p["model"])
    M = Methods(p, model, spec)
    seqs = token_windows(corpus_ids(tok, e["lm"]["split"]), e["lm"]["n_sequences"], e["lm"]["seq_len"], p["seed"] + 4)
    items = next_line_choice(tok, e["choice"]["n_items"], p["seed"], split=e["choice"]["split"])
    bsz = e["lm"]["batch_size"]
    refs = [torch.log_softmax(model(input_ids=x).logits.float(), -1) for x in seqs.split(bsz)]
    lm_rows, mc_rows = [], []
    record = record_prefill(model, seqs[:1])  # one exact prefill; every configuration's cache bytes come from it
    full_bpt = M.bytes_per_token("full", 1.0, record)
    with stage_run(PAPER, "evaluate", p, p["seed"]) as run, latent_attention_impl(model):
        t0 = time.perf_counter()
        full = _lm_metrics(model, seqs, refs, bsz)
        mc_full = score_choice(model, items, progress=False)
        lm_rows.append({"method": "full", "budget": 1.0, **full, "bytes_per_token": full_bpt, "bytes_ratio": 1.0})
        mc_rows.append({"method": "full", "budget": 1.0, "accuracy": mc_full["accuracy"],
                        "acc_norm": mc_full["acc_norm"], "n": mc_full["n"]})
        for method in e["methods"]:
            for b in e["budgets"]:
                bpt = M.bytes_per_token(method, b, record)
                with M.active(method, b):
                    row = {"method": method, "budget": b, **_lm_metrics(model, seqs, refs, bsz),
                           "bytes_per_token": bpt, "bytes_ratio": bpt / full_bpt}
                    lm_rows.append(row)
                    run.cell(f"lm/{method}@{b:g}", {k: v for k, v in row.items() if k not in ("method",)},
                             {"method": method, "budget": b})
                    if b in e["choice"]["budgets"]:
                        mc = score_choice(model, items, progress=False)
                        mc_rows.append({"method": method, "budget": b, "accuracy": mc["accuracy"],
                                        "acc_norm": mc["acc_norm"], "n": mc["n"]})
                        run.cell(f"choice/{method}@{b:g}", {"accuracy": mc["accuracy"], "acc_norm": mc["acc_norm"]},
                                 {"method": method, "budget": b})
                print(f"{method}@{b:g}: ppl {row['ppl']:.2f} KL {row['kl']:.4f} bytes {row['bytes_ratio']:.3f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
    claims = lm_claims(lm_rows) + choice_claims(mc_rows)
    n_tok = seqs.numel()
    write_json(RESULTS / "lm.json", {
        "title": "Perplexity and KL to the full model on the test split, per method × KV budget",
        "setting": f"{p['model']}; {seqs.shape[0]}×{seqs.shape[1]} = {n_tok} test tokens (Hamlet/Macbeth/Tempest), "
                   "full-sequence forward with every attention call projected (prefill = decode, tested); bytes "
                   "measured from each method's real cache on one sequence (fp32)",
        "columns": [["method", "method"], ["budget", "budget"], ["ppl", "perplexity"], ["kl", "KL to full"],
                    ["top1", "top-1 agreement"], ["bytes_ratio", "bytes / full"]],
        "rows": lm_rows, "claims": claims,
        "plot": {"x": "budget", "y": "kl", "series": "method", "xlabel": "KV budget (fraction of channels)",
                 "ylabel": "KL to full (nats/token)"},
        "notes": ["cskv_svd is the weight-SVD peer (CSKV init, untrained) applied in every attention call; its "
                  "native exact-window cache is in the retrieval table.",
                  "At budget 1 every projection is orthogonal and exact: KL is fp32 round-off."]})
    write_json(RESULTS / "choice.json", {
        "title": "Table 1 analogue: next-line multiple choice (log-likelihood scoring, 4 options)",
        "setting": f"{len(items)} seeded items from the test split; 3 context lines, true next line vs 3 random lines "
                   "of similar length; acc = summed log-likelihood, acc_norm = per-token (OpenCompass ppl-style); "
                   "chance 0.25",
        "columns": [["method", "method"], ["budget", "budget"], ["accuracy", "acc"], ["acc_norm", "acc_norm"],
                    ["n", "items"]],
        "rows": mc_rows, "claims": [],
        "notes": ["Budget 1 of every projection method equals full exactly (see the KL table), so it is not re-run."]})


def _row(rows, method, budget):
    return next((r for r in rows if r["method"] == method and abs(r["budget"] - budget) < 1e-9), None)


def lm_claims(rows: list[dict]) -> list[dict]:
    full = _row(rows, "full", 1.0)
    out = []
    exact = [r for r in rows if r["budget"] == 1.0 and r["method"] in ("pca_uniform", "mkv_uniform", "mkv_searched")]
    if exact:
        worst = max(r["kl"] for r in exact)
        dppl = max(abs(r["ppl"] - full["ppl"]) for r in exact)
        out.append({"id": "exact_full_rank", "ours": f"max KL {worst:.1e}, |Δppl| ≤ {dppl:.1e} at 100%",
                    "verdict": "reproduced" if worst < 1e-5 else "not reproduced",
                    "note": "ours is exact at r = d (fp32 U); the paper's bf16 runs lose up to 2 points"})
    pca50, mkv50 = _row(rows, "pca_uniform", 0.5), _row(rows, "mkv_uniform", 0.5)
    if pca50 and full:
        ratio = pca50["ppl"] / full["ppl"]
        out.append({"id": "pca_collapse", "ours": f"PCA ppl ×{ratio:.2f} of full at 50% (KL {pca50['kl']:.3f})",
                    "verdict": "reproduced" if ratio >= 2.0 else "not reproduced",
                    "note": "rule: collapse = perplexity at least doubles at a 50% budget"})
    budgets = sorted({r["budget"] for r in rows if r["method"] == "pca_uniform"}, reverse=True)
    clear = [b for b in budgets if _row(rows, "mkv_uniform", b) and _row(rows, "pca_uniform", b)
             and _row(rows, "mkv_uniform", b)["kl"] <= 0.7 * _row(rows, "pca_uniform", b)["kl"]]
    if pca50 and mkv50:
        where = ", ".join(f"{b:.3g}" for b in clear) if clear else "no budget"
        out.append({"id": "mkv_beats_pca", "ours": f"KL {mkv50['kl']:.3f} vs {pca50['kl']:.3f} at 50%; MKV ≥ 30% "
                    f"lower KL at budgets {where} (of {', '.join(f'{b:.3g}' for b in budgets if b < 1)})",
                    "verdict": "reproduced" if 0.5 in clear else "not reproduced",
                    "note": "uniform ranks for both; 'clear' = KL at least 30% lower"})
    s, u = _row(rows, "mkv_searched", 0.375), _row(rows, "mkv_uniform", 0.375)
    if s and u:
        out.append({"id": "search_gain", "ours": f"KL {s['kl']:.3f} searched vs {u['kl']:.3f} uniform at 37.5% "
                    f"(ppl {s['ppl']:.2f} vs {u['ppl']:.2f})",
                    "verdict": "reproduced" if s["kl"] < u["kl"] else "not reproduced",
                    "note": "paper: +1.92 avg accuracy points; ours in KL/perplexity (accuracy in the choice table)"})
    return out


def choice_claims(rows: list[dict]) -> list[dict]:
    full = _row(rows, "full", 1.0)
    s = _row(rows, "mkv_searched", 0.375) or _row(rows, "mkv_uniform", 0.375)
    if not (full and s):
        return []
    rel = s["acc_norm"] / full["acc_norm"] if full["acc_norm"] else float("nan")
    return [{"id": "mkv_holds_375", "ours": f"{s['method']} acc_norm {s['acc_norm']:.2f} vs full "
             f"{full['acc_norm']:.2f} = {rel:.0%} at 37.5% (n = {s['n']})",
             "verdict": "reproduced" if rel >= 0.9 else "not reproduced",
             "note": "next-line choice on a 135M model stands in for the 6 zero-shot tasks; small n → wide CI"}]


def stage_retrieval(p: dict) -> None:
    r = p["eval"]["retrieval"]
    model, tok, spec = load_model(p["model"])
    M = Methods(p, model, spec)
    gen = GENERATORS[r["task"]]
    rows = []
    with stage_run(PAPER, "retrieval", p, p["seed"]) as run, latent_attention_impl(model):
        for length in r["lengths"]:
            cases = [gen(tok, length, p["seed"] * 100_003 + i) for i in range(r["n_cases"])]
            methods = {f"{m}@{b:g}": M.builder(m, b, window=r["window"]) for m in r["methods"] for b in r["budgets"]}
            res = evaluate_methods(model, cases, methods, protocol="decode", batch_size=r["n_cases"],
                                   desc=f"{r['task']}@{length}")
            for row in summarize(res):
                name = row["method"]
                m, b = (name.split("@") + ["1"])[:2] if "@" in name else (name, "1")
                out = {"method": m, "budget": float(b), "length": length, **{k: row[k] for k in
                       ("n", "accuracy", "ci95", "kl", "answer_ppl", "bytes_ratio")}}
                rows.append(out)
                run.cell(f"{r['task']}/{length}/{name}", {k: v for k, v in out.items() if isinstance(v, float)},
                         {"method": m, "budget": b, "length": length})
    write_json(RESULTS / "retrieval.json", {
        "title": f"Retrieval through the real cache: {r['task']} (decode protocol)",
        "setting": f"{r['n_cases']} seeded cases per length; the context is prefilled through each method, then "
                   "question + answer are decoded token by token through its cache; bytes measured from the cache; "
                   f"cskv_window keeps the last ≤ {r['window']} tokens exact (CSKV's bi-branch cache)",
        "columns": [["method", "method"], ["budget", "budget"], ["length", "context"], ["accuracy", "acc"],
                    ["ci95", "95% CI"], ["kl", "KL to full"], ["bytes_ratio", "bytes / full"]],
        "rows": rows, "claims": []})


STAGES = {"calibrate": stage_calibrate, "train": stage_train, "search": stage_search, "evaluate": stage_evaluate,
          "retrieval": stage_retrieval}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="MatryoshkaKV pipeline stages")
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("--params", type=Path, default=HERE / "params.yaml")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    STAGES[args.stage](load_params(args.params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
