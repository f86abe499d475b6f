"""SinkGD / SWAN pipeline stages (papers/sinkgd/dvc.yaml runs ``python -m papers.sinkgd.stages <stage>``; the run
harness is shared/pretrain/runs.py, the optimizers papers/sinkgd/optimizer.py).

    lr_grid    one seed: SinkGD's stateless step size over ``lr_grid.free_lr_scales`` (× the AdamW lr of the regular
               group); the lowest final validation loss is chosen and recorded, and reused for SWAN (both give RMS-1
               updates)
    main       SinkGD (L = 5), SinkGD (L = 1) and SWAN at the full budget and at half the steps, ≥ 3 seeds; AdamW is
               reused from papers/frugal/results/main.json when FRUGAL trains it identically
    frontier   the optimizer family's iso-memory frontier: final validation perplexity against measured optimizer-state
               bytes for every run of FRUGAL (AdamW, GaLore ranks, FRUGAL ρ), Fira and this paper — read from their
               results, nothing re-trained
"""
from __future__ import annotations

import math
import statistics

from pydantic import Field, model_validator

from shared.pretrain.family import reusable_runs, set_threads
from shared.pretrain.runs import (RUN_COLUMNS, Run, Train, load_data, pretrain_run, reuse, setting, summaries,
                                  window_cases)
from shared.reports import result_table
from shared.stages import Paper, Params, StageContext


class LrGrid(Params):
    run: str
    free_lr_scales: list[float] = Field(min_length=1)


class Frontier(Params):
    sources: dict[str, list[str]] = Field(min_length=1)    # "<paper>/<result file>" -> run names (its rows)
    optimizers: dict[str, str] = {}                        # optimizer of a row whose file keeps no per-seed runs


class SinkParams(Params):
    seed: int
    model: str
    threads: int = Field(1, ge=1)
    seeds: list[int] = Field(min_length=1)
    train: Train
    half_steps: int = Field(ge=1)                          # the "half the tokens" budget
    runs: dict[str, Run]
    baseline: str                                          # AdamW, reused from reuse_from when identical
    stateless: list[str] = Field(min_length=1)             # runs that take the grid's step-size choice
    lr_grid: LrGrid
    reuse_from: dict[str, list[str]] = {}
    frontier: Frontier

    @model_validator(mode="after")
    def _known_runs(self):
        names = [self.baseline, self.lr_grid.run, *self.stateless]
        missing = sorted({n for n in names if n not in self.runs})
        if missing:
            raise ValueError(f"run(s) {missing} are not defined under `runs` ({sorted(self.runs)})")
        if self.half_steps >= self.train.steps:
            raise ValueError(f"half_steps must be below train.steps ({self.train.steps}), got {self.half_steps}")
        return self


paper = Paper("sinkgd", SinkParams, __file__, before_stage=set_threads)
main = paper.main


@paper.stage("lr_grid")
def lr_grid(ctx: StageContext) -> dict:
    p, g = ctx.params, ctx.params.lr_grid
    data = load_data(p.train)
    results = {f"{g.run} × {s:g}": [pretrain_run(ctx, p.train, p.runs[g.run], g.run, ctx.seed, data,
                                                 label=f"{g.run} × {s:g}", free_lr_scale=s)] for s in g.free_lr_scales}
    rows = summaries(results)
    for r, s in zip(rows, g.free_lr_scales):
        r.update(free_lr_scale=s, final_val_loss=results[r["run"]][0]["final_val_loss"])
    best = min(rows, key=lambda r: r["final_val_loss"])
    return {"lr_grid.json": result_table(
        f"Step-size grid for the stateless Linear step ({g.run}, one seed): chosen × {best['free_lr_scale']:g}",
        [["run", "run"], ["free_lr_scale", "× lr"], ["val_ppl", "final val ppl"]], rows,
        setting=setting(p.model, p.train, [ctx.seed]), chosen=best["free_lr_scale"],
        notes=[f"Chosen by the lowest final validation loss: × {best['free_lr_scale']:g} of the AdamW lr "
               f"({p.runs[g.run].lr:g}), reused for every stateless run of `main`."])}


def steps_to_target(curve: list[dict], target: float) -> float | None:
    """The first step at which the validation perplexity reaches ``target``, linear in log-perplexity between the
    evaluation points; None when it never does."""
    prev = None
    for pt in curve:
        if pt["val_ppl"] <= target:
            if prev is None:
                return float(pt["step"])
            a, b = math.log(prev["val_ppl"]), math.log(pt["val_ppl"])
            return prev["step"] + (pt["step"] - prev["step"]) * (a - math.log(target)) / (a - b)
        prev = pt
    return None


@paper.stage("main")
def main_table(ctx: StageContext) -> dict:
    from shared.io import read_json

    p = ctx.params
    scale = read_json(ctx.results_dir / "lr_grid.json")["chosen"]
    done, notes = {}, []
    for src, offered in p.reuse_from.items():
        got, why = reusable_runs(src.split("/")[0], src.split("/", 1)[1], offered, p.train, p.runs)
        done.update(got)
        notes += [f"`{n}` reused from papers/{src} (identical train block and run: bit-identical)" for n in got]
        notes += [f"`{n}` trained here: {w}" for n, w in why.items()]
    data = load_data(p.train)
    half = p.train.model_copy(update={"steps": p.half_steps,
                                      "warmup_steps": max(1, p.train.warmup_steps * p.half_steps // p.train.steps)})
    results = {p.baseline: [reuse(done, p.baseline, s) or pretrain_run(ctx, p.train, p.runs[p.baseline],
                                                                         p.baseline, s, data) for s in p.seeds]}
    for name in p.stateless:
        results[name] = [pretrain_run(ctx, p.train, p.runs[name], name, s, data, free_lr_scale=scale)
                         for s in p.seeds]
        results[f"{name} (half)"] = [pretrain_run(ctx, half, p.runs[name], name, s, data, label=f"{name} (half)",
                                                  free_lr_scale=scale) for s in p.seeds]
    rows = summaries(results)
    for r in rows:
        rs = results[r["run"]]
        base = {b["seed"]: b for b in results[p.baseline]}
        hit = [steps_to_target(x["curve"], base[x["seed"]]["final_val_ppl"]) for x in rs]
        r["steps"] = rs[0]["curve"][-1]["step"]
        r["steps_to_adamw"] = statistics.fmean(hit) if all(h is not None for h in hit) else None
        r["token_speedup"] = p.train.steps / r["steps_to_adamw"] if r["steps_to_adamw"] else None
    return {"main.json": result_table(
        f"Stateless Linear updates (SinkGD, SWAN; step × {scale:g}) vs AdamW, full budget and half the steps",
        RUN_COLUMNS + [["steps", "steps"], ["steps_to_adamw", "steps to AdamW's final ppl (mean)"],
                       ["token_speedup", "token speedup"]], rows,
        setting=setting(p.model, p.train, p.seeds) + f" Half budget: {p.half_steps} steps with the same schedule "
                f"shape (warmup {half.warmup_steps}).", cases=window_cases(results), notes=notes + [
            "token speedup = AdamW's steps / the steps at which a run first reaches the same seed's AdamW final "
            "validation perplexity (log-linear between evaluations every 10 steps); empty when never reached."],
        runs={n: [dict(r) for r in rs] for n, rs in results.items()})}


@paper.stage("frontier")
def frontier(ctx: StageContext) -> dict:
    from shared.io import read_json
    from shared.paths import PAPERS_DIR

    rows = []
    for src, names in ctx.params.frontier.sources.items():
        paper_id, result = src.split("/", 1)
        data = read_json(PAPERS_DIR / paper_id / "results" / result)
        table = {r["run"]: r for r in data.get("rows", [])}
        runs = data.get("runs", {})
        for name in names:
            if name not in table:
                raise ValueError(f"frontier source papers/{src} has no row {name!r} (rows: {sorted(table)})")
            row = table[name]
            ppl = [r["final_val_ppl"] for r in runs.get(name, [])]
            rows.append({"run": name, "paper": paper_id, "optimizer": runs[name][0]["optimizer"] if ppl else
                         ctx.params.frontier.optimizers.get(name), "n_seeds": row["n_seeds"],
                         "state_mb": row["state_mb"], "val_ppl": row["val_ppl"],
                         "val_ppl_seed_range": [min(ppl), max(ppl)] if len(ppl) > 1 else None})
    rows.sort(key=lambda r: (r["state_mb"], r["val_ppl"]))
    return {"frontier.json": result_table(
        "The optimizer family's iso-memory frontier: final validation perplexity vs measured optimizer-state bytes",
        [["run", "run"], ["paper", "from"], ["optimizer", "optimizer"], ["state_mb", "state MB (measured)"],
         ["val_ppl", "final val ppl (mean)"], ["n_seeds", "seeds"]], rows,
        setting=setting(ctx.params.model, ctx.params.train, ctx.params.seeds) + " Every row read from its paper's "
                "results (same init, batches and schedule per seed across the family); bars: range over seeds.",
        plot={"x": "state_mb", "y": "val_ppl", "series": "optimizer", "xlabel": "optimizer state (MB, measured)",
              "ylabel": "final validation perplexity"},
        notes=["Rows with one seed (GaLore r32/r128, FRUGAL ρ 0.125/0.5, Fira's rank sweep: seed 0) carry no range."])}


if __name__ == "__main__":
    raise SystemExit(main())
