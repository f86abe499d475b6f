"""FRUGAL pipeline stages (papers/frugal/dvc.yaml runs ``python -m papers.frugal.stages <stage>``; the runner in
``shared.stages`` owns params validation, MLflow, seeds and result files).

    memory        table (b): optimizer-state bytes measured after one step at the paper's 60M/130M/350M shapes
    figures       table (c): Appendix C toy (momentum re-projection) and Figure 2 (principal cosines)
    main          table (a): AdamW / GaLore / FRUGAL ρ=0.25 / FRUGAL ρ=0 pre-training of the `tiny` model, ≥ 3 seeds
    sensitivity   claim (c): FRUGAL ρ=0 with one more regular group (embeddings | norms | logits) on signSGD
    frontier      table (d): validation perplexity vs measured state bytes, sweeping ρ (FRUGAL) and rank (GaLore)

Every pre-training run of every stage uses the same init (seed), the same batch order (seed; its hash is logged) and
the same schedule; only the optimizer differs.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, model_validator

from shared.pretrain.groups import REGULAR_KINDS
from shared.pretrain.runs import (RUN_COLUMNS, Run, Train, curve_rows, load_data, load_runs, mean_sd,
                                  optimizer_params, pretrain_run as _pretrain_run, reuse, setting, summaries,
                                  window_cases)
from shared.reports import result_table
from shared.stages import Paper, Params, StageContext

REGULAR_GROUPS = tuple(REGULAR_KINDS)     # regular groups FRUGAL can move to the state-free rule


# ---- params schema (Train, Run: shared/pretrain/runs.py) ----------------------------------------------------
class Sensitivity(Params):
    base: str                                   # a run name (FRUGAL ρ = 0)
    groups: list[Literal[REGULAR_GROUPS]] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)


class Frontier(Params):
    runs: list[str] = Field(min_length=1)       # run names swept (plus the `main` runs at seed `seeds[0]`)


class Memory(Params):
    shapes: list[Literal["60m", "130m", "350m", "1b"]] = Field(min_length=1)
    vocab_size: int = Field(ge=2)
    galore_rank: dict[str, int]
    runs: list[str] = Field(min_length=1)


class Figures(Params):
    toy_seed: int = 1
    toy_ranks: list[int] = [3, 6]
    toy_repeats: int = Field(5, ge=1)
    toy_iterations: int = Field(200, ge=1)
    cos_rank: int = Field(64, ge=1)
    cos_layer: str = "model.layers.1.mlp.down_proj.weight"
    cos_steps: list[int] = Field(min_length=2)
    random_pairs: int = Field(200, ge=19)        # null draws of the subspace claim (p ≥ 1/(1 + draws))


class FrugalParams(Params):
    seed: int
    model: str                                  # the tokenizer / vocabulary the model is built for
    threads: int = Field(1, ge=1)               # torch CPU threads (1 is fastest for the tiny model, README)
    seeds: list[int] = Field(min_length=1)
    train: Train
    runs: dict[str, Run]
    main: list[str] = Field(min_length=2)
    sensitivity: Sensitivity
    frontier: Frontier
    memory: Memory
    figures: Figures

    @model_validator(mode="after")
    def _known_runs(self):
        names = self.main + [self.sensitivity.base] + self.frontier.runs + self.memory.runs
        missing = sorted({n for n in names if n not in self.runs})
        if missing:
            raise ValueError(f"run(s) {missing} are not defined under `runs` ({sorted(self.runs)})")
        return self


def _threads(stage: str, params: "FrugalParams") -> None:
    import torch

    torch.set_num_threads(params.threads)


paper = Paper("frugal", FrugalParams, __file__, before_stage=_threads)
main = paper.main


# ---- shared pieces (the run harness: shared/pretrain/runs.py) -------------------------------------------------
def _data(ctx: StageContext):
    return load_data(ctx.params.train)


def pretrain_run(ctx: StageContext, name: str, seed: int, data, regular_signsgd: tuple[str, ...] = (),
                 label: str | None = None) -> dict:
    extra = {"regular_signsgd": tuple(regular_signsgd)} if regular_signsgd else {}
    return _pretrain_run(ctx, ctx.params.train, ctx.params.runs[name], name, seed, data, label=label, **extra)


def _main_runs(ctx: StageContext) -> dict[str, list[dict]]:
    """The `main` stage's per-seed runs (results/main.json), reused by later stages instead of re-training."""
    return load_runs(ctx.results_dir / "main.json")


def _setting(p: FrugalParams, seeds: list[int]) -> str:
    return setting(p.model, p.train, seeds)


@paper.stage("main")
def main_table(ctx: StageContext) -> dict:
    p = ctx.params
    data = _data(ctx)
    results = {name: [pretrain_run(ctx, name, s, data) for s in p.seeds] for name in p.main}
    rows = summaries(results)
    return {
        "main.json": result_table(
            "Table (a) — CPU pre-training: AdamW / GaLore / FRUGAL ρ = 0.25 / FRUGAL ρ = 0", RUN_COLUMNS, rows,
            setting=_setting(p, p.seeds), cases=window_cases(results), table_ref="FRUGAL pre-training table (GaLore Table 2 protocol)",
            runs={n: [{k: v for k, v in r.items() if k != "curve"} | {"curve": r["curve"]} for r in rs]
                  for n, rs in results.items()},
            notes=["`state MB`: bytes of the optimizer's state tensors after training (moments, projectors, indices; "
                   "deduplicated storage), MB = 10^6 bytes; `formula` = the analytic count.",
                   "Every seed's runs share one batch order (hashes in `runs`); the runs differ only in the optimizer."]),
        "curves.json": result_table(
            "Validation perplexity during pre-training (mean over seeds)", [["run", "run"], ["step", "step"],
                                                                            ["val_ppl", "val ppl"]],
            curve_rows(results), setting=_setting(p, p.seeds),
            plot={"x": "step", "y": "val_ppl", "series": "run", "xlabel": "step", "ylabel": "validation perplexity"})}


@paper.stage("sensitivity")
def sensitivity(ctx: StageContext) -> dict:
    p, s = ctx.params, ctx.params.sensitivity
    data = _data(ctx)
    done = _main_runs(ctx)
    results = {s.base: [reuse(done, s.base, seed) or pretrain_run(ctx, s.base, seed, data) for seed in s.seeds]}
    for g in s.groups:
        label = f"{s.base} + {g} on signSGD"
        results[label] = [pretrain_run(ctx, s.base, seed, data, regular_signsgd=(g,), label=label) for seed in s.seeds]
    rows = summaries(results)
    base = next(r for r in rows if r["run"] == s.base)
    for r in rows:
        r["delta_ppl"] = r["val_ppl"] - base["val_ppl"]
    return {"sensitivity.json": result_table(
        "Claim (c) — which regular parameters need Adam (FRUGAL ρ = 0 + one group on signSGD)",
        RUN_COLUMNS + [["delta_ppl", "Δ val ppl vs base"]], rows, setting=_setting(p, s.seeds),
        cases=window_cases(results),
        runs={n: [{k: v for k, v in r.items() if k != "curve"} for r in rs] for n, rs in results.items()})}


@paper.stage("frontier")
def frontier(ctx: StageContext) -> dict:
    p = ctx.params
    data = _data(ctx)
    seed = p.seeds[0]
    names = list(dict.fromkeys(p.main + p.frontier.runs))
    done = _main_runs(ctx)
    results = {name: [reuse(done, name, seed) or pretrain_run(ctx, name, seed, data)] for name in names}
    rows = summaries(results)
    for r in rows:
        run = p.runs[r["run"]]
        r["optimizer"] = run.optimizer
        r["knob"] = (run.model_extra or {}).get("density", (run.model_extra or {}).get("rank"))
    return {"frontier.json": result_table(
        "Table (d) — iso-memory frontier: validation perplexity vs measured optimizer-state bytes",
        [["run", "run"], ["optimizer", "optimizer"], ["knob", "ρ / rank"], ["state_mb", "state MB (measured)"],
         ["val_ppl", "final val ppl"]], rows, setting=_setting(p, [seed]), cases=window_cases(results),
        plot={"x": "state_mb", "y": "val_ppl", "series": "optimizer", "xlabel": "optimizer state (MB, measured)",
              "ylabel": "final validation perplexity"},
        notes=["No paper in the family reports this on identical data, init and seeds; one seed per point."])}


@paper.stage("memory")
def memory(ctx: StageContext) -> dict:
    import torch

    from shared.pretrain.groups import param_groups
    from shared.pretrain.model import build_llama
    from shared.pretrain.optim import analytic_state_bytes, build_optimizer, state_bytes

    p, m = ctx.params, ctx.params.memory
    rows = []
    for shape in m.shapes:
        model = build_llama(shape, m.vocab_size, ctx.seed)
        groups = param_groups(model)
        weights = sum(t.numel() * t.element_size() for t in model.parameters())
        g = torch.Generator().manual_seed(ctx.seed)
        for name in m.runs:
            run = p.runs[name]
            params = optimizer_params(run)
            if run.optimizer == "galore":
                params["rank"] = m.galore_rank[shape]
            opt = build_optimizer(run.optimizer, model, lr=run.lr, **params)
            for prm in model.parameters():
                prm.grad = torch.randn(prm.shape, generator=g) * 1e-3
            t0 = time.perf_counter()
            opt.step()
            ctx.timing(f"first_step_seconds/{shape}/{name}", time.perf_counter() - t0)
            measured, analytic = state_bytes(opt, groups), analytic_state_bytes(run.optimizer, model, **params)
            row = {"shape": shape, "run": name, "params_m": sum(t.numel() for t in model.parameters()) / 1e6,
                   "weights_mb": weights / 1e6, "state_mb": measured["total"] / 1e6,
                   "analytic_state_mb": analytic["total"] / 1e6, "state_linear_mb": measured["linear"] / 1e6,
                   "rank": params.get("rank")}
            rows.append(row)
            ctx.cell(f"{shape}/{name}", {k: v for k, v in row.items() if isinstance(v, float)}, {"shape": shape})
            print(f"{shape} {name}: state {row['state_mb']:.1f} MB (formula {row['analytic_state_mb']:.1f})",
                  flush=True)
            del opt
            for prm in model.parameters():
                prm.grad = None
        del model
    return {"memory.json": result_table(
        "Table (b) — optimizer-state bytes at the paper's shapes (one step, synthetic gradients, fp32)",
        [["shape", "shape"], ["run", "optimizer run"], ["rank", "GaLore rank"], ["params_m", "params (M)"],
         ["weights_mb", "fp32 weights MB"], ["state_mb", "state MB (measured)"], ["analytic_state_mb", "formula MB"],
         ["state_linear_mb", "Linear-only state MB"]], rows,
        setting=f"GaLore's 60M/130M/350M configs (vocab {m.vocab_size}, untied head) built on CPU, one step of each "
                "optimizer on N(0, 1e-6) gradients (GaLore's SVD included); MB = 10^6 bytes")}


@paper.stage("figures")
def figures(ctx: StageContext) -> dict:
    import torch

    from papers.frugal.module import (COSINE_THRESHOLD, appendix_c_toy, left_subspace, principal_cosines,
                                      random_semiorthogonal)
    from shared.pretrain.data import batch_order
    from shared.pretrain.model import build_llama

    p, f = ctx.params, ctx.params.figures
    toy = appendix_c_toy(seed=f.toy_seed, ranks=tuple(f.toy_ranks), repeats=f.toy_repeats, n_iter=f.toy_iterations)
    toy_rows = []
    for r in f.toy_ranks:
        rs = [x for x in toy if x["rank"] == r]
        stale, proper = mean_sd([x["stale"] for x in rs]), mean_sd([x["reprojected"] for x in rs])
        toy_rows.append({"rank": r, "stale": stale[0], "stale_sd": stale[1], "reprojected": proper[0],
                         "reprojected_sd": proper[1], "reprojected_lower": sum(x["reprojected"] < x["stale"] for x in rs),
                         "repeats": len(rs)})
    toy_cases = [{"label": kind, "rank": x["rank"], "task": f"toy r={x['rank']}", "length": None, "protocol": None,
                  "case": x["repeat"], "final_loss": x[kind]} for x in toy for kind in ("stale", "reprojected")]
    # Figure 2: subspaces of one Linear gradient along an AdamW run of the tiny model
    vocab, train_windows, _ = _data(ctx)
    t = p.train
    model = build_llama(t.shape, vocab, ctx.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = batch_order(len(train_windows), t.batch_size, max(f.cos_steps), ctx.seed)
    weight = dict(model.named_parameters())[f.cos_layer]
    grads = {}
    for step in range(1, max(f.cos_steps) + 1):
        batch = train_windows[order[step - 1]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if step in f.cos_steps:
            grads[step] = weight.grad.detach().clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ref = f.cos_steps[0]
    Q0 = left_subspace(grads[ref], f.cos_rank)
    cos_rows = []
    for step in f.cos_steps[1:]:
        c = principal_cosines(Q0, left_subspace(grads[step], f.cos_rank))
        cos_rows.append({"pair": f"steps {ref} & {step}", "above": int((c > COSINE_THRESHOLD).sum()),
                         "mean_cosine": float(c.mean()), "rank": f.cos_rank})
    n = grads[ref].shape[0]
    # the null: mean principal cosine of independent random rank-r subspaces (2 × random_pairs draws)
    null = [float(principal_cosines(random_semiorthogonal(n, f.cos_rank, 2 * i),
                                    random_semiorthogonal(n, f.cos_rank, 2 * i + 1)).mean())
            for i in range(f.random_pairs)]
    c = principal_cosines(random_semiorthogonal(n, f.cos_rank, 0), random_semiorthogonal(n, f.cos_rank, 1))
    cos_rows.append({"pair": "random semi-orthogonal", "above": int((c > COSINE_THRESHOLD).sum()),
                     "mean_cosine": float(c.mean()), "rank": f.cos_rank})
    return {"figures.json": result_table(
        "Table (c) — figure checks: Appendix C toy (final loss) and Figure 2 (principal cosines > 0.87)",
        [["rank", "toy rank"], ["stale", "stale momentum"], ["reprojected", "re-projected"],
         ["reprojected_lower", "re-projected lower (repeats)"]], toy_rows,
        setting=f"toy: seed {f.toy_seed}, {f.toy_repeats} repeats; cosines: {f.cos_layer}, steps {f.cos_steps}",
        notes=[f"Figure 2 analogue, {r['pair']}: {r['above']}/{r['rank']} principal cosines > {COSINE_THRESHOLD} "
               f"(mean cosine {r['mean_cosine']:.2f})" for r in cos_rows],
        cosines=cos_rows, toy_cases=toy_cases, random_mean_cosines=null)}


if __name__ == "__main__":
    raise SystemExit(main())
