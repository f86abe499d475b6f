"""Pre-training runs for the optimizer family's stages: one params schema for the training block and the optimizer
runs, one ``pretrain_run`` (same init, batch order and schedule per seed for every optimizer; only the optimizer
differs), per-validation-window cases for the claim engine, and reuse of runs another stage (or paper) already made.

    train:  {shape, batch_size, seq_len, steps, warmup_steps, min_lr_ratio, val_every, val_windows, weight_decay}
    runs:   {name: {optimizer: <registered name>, lr: ..., <the optimizer's options>}}
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from shared.pretrain.optim.registry import OPTIMIZERS
from shared.stages import Params, StageContext

OPTIMIZER_NAMES = tuple(OPTIMIZERS)       # the registry's names (shared/pretrain/optim/registry.py)


class Train(Params):
    shape: Literal["tiny", "60m", "130m", "350m", "1b"]
    batch_size: int = Field(ge=1)
    seq_len: int = Field(ge=2)
    steps: int = Field(ge=1)
    warmup_steps: int = Field(ge=0)
    min_lr_ratio: float = Field(ge=0, le=1)
    val_every: int = Field(ge=1)
    val_windows: int = Field(ge=1)
    weight_decay: float = Field(ge=0)


class Run(Params):
    """One optimizer configuration: a registered optimizer (shared/pretrain/optim/registry.py) + its params."""

    model_config = Params.model_config | {"extra": "allow"}
    optimizer: Literal[OPTIMIZER_NAMES]
    lr: float = Field(gt=0, lt=1)
    label: str | None = None


def optimizer_params(run: Run, **override) -> dict:
    return {**dict(run.model_extra or {}), **override}


def load_data(train: Train):
    """(vocab size, train windows, validation windows) for ``train`` of the pre-training corpus (root params.yaml
    ``pretrain.corpus``; default: the embedded Shakespeare corpus) in the BPE fitted on it."""
    from shared.pretrain.data import encode_split, validation_windows, windows
    from shared.pretrain.tokenizer import load_tokenizer, pretrain_corpus, tokenizer_path

    corpus = pretrain_corpus()
    tok = load_tokenizer(tokenizer_path(corpus=corpus.name))
    train_windows = windows(encode_split(tok, "train", corpus), train.seq_len)
    val = validation_windows(tok, train.val_windows, train.seq_len, corpus)
    return tok.get_vocab_size(), train_windows, val


def pretrain_run(ctx: StageContext, train: Train, run: Run, name: str, seed: int, data,
                 label: str | None = None, **extra) -> dict:
    """One pre-training run of ``train.shape`` with the optimizer ``run`` (``extra``: more optimizer options);
    returns its curve, final validation perplexity, per-window losses, measured + analytic state bytes; the
    seconds per step go to MLflow and the timings file only (machine-dependent, not hashed)."""
    from shared.pretrain.data import batch_order, order_hash
    from shared.pretrain.groups import param_groups
    from shared.pretrain.model import build_llama
    from shared.pretrain.module import pretrain
    from shared.pretrain.optim import analytic_state_bytes, build_optimizer, state_bytes

    vocab, train_windows, val = data
    t = train
    params = optimizer_params(run, **extra)
    model = build_llama(t.shape, vocab, seed)
    order = batch_order(len(train_windows), t.batch_size, t.steps, seed)
    holder: dict[str, Any] = {}

    def factory(m):
        holder["opt"] = build_optimizer(run.optimizer, m, lr=run.lr, weight_decay=t.weight_decay, **params)
        return holder["opt"]

    t0 = time.perf_counter()
    module = pretrain(model, factory, train_windows, order, val, warmup_steps=t.warmup_steps, total_steps=t.steps,
                      val_every=t.val_every, seed=seed, min_ratio=t.min_lr_ratio,
                      logger=ctx.lightning_logger(f"{label or name}/seed{seed}"), progress=False)
    seconds = time.perf_counter() - t0
    ctx.timing(f"sec_per_step/{label or name}/seed{seed}", seconds / t.steps)
    groups = param_groups(model)
    measured = state_bytes(holder["opt"], groups)
    analytic = analytic_state_bytes(run.optimizer, model, **params)
    out = {"run": label or name, "optimizer": run.optimizer, "seed": seed, "curve": module.curve,
           "final_val_ppl": module.curve[-1]["val_ppl"], "final_val_loss": module.curve[-1]["val_loss"],
           "state_mb": measured["total"] / 1e6, "state_linear_mb": measured["linear"] / 1e6,
           "analytic_state_mb": analytic["total"] / 1e6, "peak_state_mb": measured.get("peak", measured["total"]) / 1e6,
           "val_window_loss": module.final_window_losses, "batch_order_sha256": order_hash(order)}
    ctx.cell(f"{label or name}/seed{seed}", {k: v for k, v in out.items() if isinstance(v, float)},
             {"run": label or name, "seed": seed, **{k: str(v) for k, v in params.items()}})
    print(f"{label or name} seed {seed}: val ppl {out['final_val_ppl']:.2f}, state {out['state_mb']:.1f} MB, "
          f"{seconds / t.steps:.2f} s/step", flush=True)
    return out


def load_runs(path: Path) -> dict[str, list[dict]]:
    """The per-seed runs a stage saved (``runs`` of its result file); {} when the file does not exist yet."""
    from shared.io import read_json

    return read_json(path).get("runs", {}) if Path(path).is_file() else {}


def reuse(done: dict[str, list[dict]], name: str, seed: int) -> dict | None:
    return next((r for r in done.get(name, []) if r["seed"] == seed), None)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def window_cases(results: dict[str, list[dict]]) -> list[dict]:
    """One row per (run, seed, validation window): the window's mean next-token loss after training — the cases
    of the paired claims (unit: validation window, seed-mean per window; every seed must agree)."""
    return [{"label": name, "seed": r["seed"], "task": "val", "length": None, "protocol": None, "case": i,
             "val_loss": loss} for name, rs in results.items() for r in rs for i, loss in enumerate(r["val_window_loss"])]


RUN_COLUMNS = [["run", "optimizer run"], ["n_seeds", "seeds"], ["val_ppl", "final val ppl (mean)"],
               ["val_ppl_sd", "± sd"], ["state_mb", "state MB (measured)"], ["analytic_state_mb", "state MB (formula)"],
               ["state_linear_mb", "Linear-only state MB"]]


def summaries(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, rs in results.items():
        m, sd = mean_sd([r["final_val_ppl"] for r in rs])
        rows.append({"run": name, "n_seeds": len(rs), "val_ppl": m, "val_ppl_sd": sd, "state_mb": rs[0]["state_mb"],
                     "analytic_state_mb": rs[0]["analytic_state_mb"], "state_linear_mb": rs[0]["state_linear_mb"],
                     "batch_orders": sorted({r["batch_order_sha256"][:12] for r in rs})})
    return rows


def curve_rows(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, rs in results.items():
        steps = [p["step"] for p in rs[0]["curve"]]
        for i, step in enumerate(steps):
            rows.append({"run": name, "step": step, "val_ppl": statistics.fmean(r["curve"][i]["val_ppl"] for r in rs)})
    return rows


def setting(model: str, t: Train, seeds: list[int]) -> str:
    return (f"`{t.shape}` Llama (shared/pretrain/model.py) with the {model} BPE tokenizer; Shakespeare train split "
            f"in contiguous {t.seq_len}-token windows, batch {t.batch_size}, {t.steps} steps (≈"
            f"{t.steps * t.batch_size * t.seq_len / 1e6:.2f}M tokens), warmup {t.warmup_steps} then cosine to "
            f"{t.min_lr_ratio:g}× lr; validation perplexity on {t.val_windows}×{t.seq_len} validation tokens every "
            f"{t.val_every} steps; seeds {seeds} (same init and batch order per seed for every optimizer); fp32 CPU.")
