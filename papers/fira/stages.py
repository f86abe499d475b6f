"""Fira pipeline stages (papers/fira/dvc.yaml runs ``python -m papers.fira.stages <stage>``; the runner in
``shared.stages`` owns params validation, MLflow, seeds and result files; the run harness is shared/pretrain/runs.py).

    main         Fira vs GaLore (same rank 64, α 0.25) vs AdamW, and the limiter / scaling ablations, ≥ 3 seeds;
                 AdamW and GaLore are reused from papers/frugal/results/main.json when FRUGAL trains them identically
    ranks        one seed: Fira and GaLore at ranks 32 / 128, Fira at rank 16 and with one scaling factor per matrix
    similarity   the README's scaling-factor similarity: Spearman / Kendall between low- and full-rank factors
"""
from __future__ import annotations

import statistics

from pydantic import Field, model_validator

from shared.pretrain.family import set_threads
from shared.pretrain.runs import (RUN_COLUMNS, Run, Train, load_data, pretrain_run, reuse, setting, summaries,
                                  window_cases)
from shared.reports import result_table
from shared.stages import Paper, Params, StageContext


class Similarity(Params):
    trajectories: dict[str, str] = Field(min_length=1)    # label -> run name whose optimizer moves the weights
    rank: int = Field(ge=1)
    update_proj_gap: int = Field(ge=1)
    every: int = Field(ge=1)


class FiraParams(Params):
    seed: int
    model: str
    threads: int = Field(1, ge=1)
    seeds: list[int] = Field(min_length=1)
    train: Train
    runs: dict[str, Run]
    main: list[str] = Field(min_length=2)
    ranks: list[str] = Field(min_length=1)
    reuse_from: dict[str, list[str]] = {}                  # "<paper>/<result file>" -> run names it may supply
    similarity: Similarity

    @model_validator(mode="after")
    def _known_runs(self):
        names = self.main + self.ranks + list(self.similarity.trajectories.values()) + \
            [n for ns in self.reuse_from.values() for n in ns]
        missing = sorted({n for n in names if n not in self.runs})
        if missing:
            raise ValueError(f"run(s) {missing} are not defined under `runs` ({sorted(self.runs)})")
        return self


paper = Paper("fira", FiraParams, __file__, before_stage=set_threads)
main = paper.main


def _train_all(ctx: StageContext, names: list[str], seeds: list[int]) -> tuple[dict, list[str]]:
    """Every (run, seed): reused from another paper's results when identical there (shared/pretrain/family.py),
    trained here otherwise. Returns the runs and notes saying what was reused from where."""
    from shared.pretrain.family import reusable_runs

    p = ctx.params
    done, notes = {}, []
    for src, offered in p.reuse_from.items():
        paper_id, result = src.split("/", 1)
        got, why = reusable_runs(paper_id, result, [n for n in offered if n in names], p.train, p.runs)
        for n, rs in got.items():
            done.setdefault(n, rs)
            notes.append(f"`{n}` reused from papers/{src} (same train block and run configuration: bit-identical)")
        notes += [f"`{n}` trained here: {w}" for n, w in why.items()]
    data = None
    results = {}
    for name in names:
        results[name] = []
        for s in seeds:
            run = reuse(done, name, s)
            if run is None:
                data = data or load_data(p.train)
                run = pretrain_run(ctx, p.train, p.runs[name], name, s, data)
            results[name].append(run)
    return results, notes


def _rows(results: dict, p: FiraParams) -> list[dict]:
    rows = summaries(results)
    for r in rows:
        extra = p.runs[r["run"]].model_extra or {}
        r.update(optimizer=p.runs[r["run"]].optimizer, rank=extra.get("rank"))
    return rows


@paper.stage("main")
def main_table(ctx: StageContext) -> dict:
    p = ctx.params
    results, notes = _train_all(ctx, p.main, p.seeds)
    return {"main.json": result_table(
        "Fira vs GaLore (rank 64, α 0.25) vs AdamW, and Fira without its limiter / scaling", RUN_COLUMNS,
        _rows(results, p), setting=setting(p.model, p.train, p.seeds), cases=window_cases(results),
        table_ref="Fira C4 pre-training table (protocol of GaLore Table 2)", notes=notes,
        runs={n: [{k: v for k, v in r.items()} for r in rs] for n, rs in results.items()})}


@paper.stage("ranks")
def ranks_table(ctx: StageContext) -> dict:
    p = ctx.params
    seed = p.seeds[0]
    results, notes = _train_all(ctx, p.ranks, [seed])
    rows = _rows(results, p)
    return {"ranks.json": result_table(
        "Fira across ranks (and one scaling factor per matrix), one seed", RUN_COLUMNS + [["rank", "rank"]], rows,
        setting=setting(p.model, p.train, [seed]), cases=window_cases(results), notes=notes,
        runs={n: [{k: v for k, v in r.items() if k != "curve"} for r in rs] for n, rs in results.items()})}


@paper.stage("similarity")
def similarity(ctx: StageContext) -> dict:
    import torch
    from tqdm import tqdm

    from papers.fira.module import ShadowScaling, kendall, spearman
    from shared.pretrain.data import batch_order
    from shared.pretrain.groups import param_groups
    from shared.pretrain.model import build_llama
    from shared.pretrain.optim import build_optimizer

    p, s = ctx.params, ctx.params.similarity
    vocab, train_windows, _ = load_data(p.train)
    rows, factors = [], []
    for label, name in s.trajectories.items():
        run = p.runs[name]
        model = build_llama(p.train.shape, vocab, ctx.seed)
        opt = build_optimizer(run.optimizer, model, lr=run.lr, **(run.model_extra or {}))
        linear = param_groups(model).linear
        shadows = [ShadowScaling(s.rank, s.update_proj_gap) for _ in linear]
        order = batch_order(len(train_windows), p.train.batch_size, p.train.steps, ctx.seed)
        for step in tqdm(range(1, p.train.steps + 1), desc=f"similarity/{label}", mininterval=10):
            batch = train_windows[order[step - 1]]
            model(input_ids=batch, labels=batch).loss.backward()
            phis = [sh.update(w.grad.detach()) for sh, (_, w) in zip(shadows, linear)]
            opt.step()                      # constant lr: the factors, not the run, are measured here
            opt.zero_grad(set_to_none=True)
            if step % s.every:
                continue
            mf = torch.stack([f["matrix_full"] for f in phis])
            ml = torch.stack([f["matrix_low"] for f in phis])
            cf = torch.cat([f["index_full"] for f in phis])
            cl = torch.cat([f["index_low"] for f in phis])
            rows.append({"trajectory": label, "step": step, "spearman_matrix": spearman(mf, ml),
                         "kendall_matrix": kendall(mf, ml), "spearman_column": spearman(cf, cl),
                         "kendall_column": kendall(cf, cl), "n_matrices": len(mf), "n_columns": len(cf)})
            factors.append({"trajectory": label, "step": step, "full": mf.tolist(), "low": ml.tolist()})
    summary = [{"trajectory": t, **{k: statistics.fmean(r[k] for r in rows if r["trajectory"] == t)
                                    for k in ("spearman_matrix", "kendall_matrix", "spearman_column",
                                              "kendall_column")}} for t in s.trajectories]
    return {"similarity.json": result_table(
        "Scaling-factor similarity: low-rank (rank {}) vs full-rank Adam factors, mean over checkpoints".format(s.rank),
        [["trajectory", "weights moved by"], ["spearman_matrix", "Spearman (matrix)"],
         ["kendall_matrix", "Kendall (matrix)"], ["spearman_column", "Spearman (column)"],
         ["kendall_column", "Kendall (column)"]], summary,
        setting=f"{setting(p.model, p.train, [ctx.seed])} Shadow Adam states (GaLore convention, T "
                f"{s.update_proj_gap}) fed the same gradients every step; factors compared every {s.every} steps; "
                "constant lr along the trajectory.",
        checkpoints=rows, factors=factors)}


if __name__ == "__main__":
    raise SystemExit(main())
