"""Runs shared across the optimizer family's papers: a paper reuses another paper's runs (AdamW, GaLore, …) from
that paper's committed results instead of re-training them, *only* when the other paper's training block and the
run's configuration are identical to its own — then the run is bit-identical (same init, batches, schedule and
optimizer; the harness is deterministic per seed), so reusing it changes no number. Otherwise it is re-trained.

DVC: a stage that reuses lists the source result file as a dep and the source params it compares
(``../frugal/params.yaml: [train, runs.adamw, ...]``), so a change there re-runs it.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from shared.paths import REPO_ROOT
from shared.pretrain.runs import Run, Train, load_runs


def reusable_runs(source: str, result: str, names: list[str], train: Train, runs: dict[str, Run],
                  root: Path = REPO_ROOT) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """(runs of ``papers/<source>/results/<result>`` usable here, {name: why not} for the others): a run named
    ``name`` is reusable when the source's ``train`` block equals ``train`` and its ``runs[name]`` equals
    ``runs[name]`` (all fields, after validation)."""
    params_path = root / "papers" / source / "params.yaml"
    if not params_path.is_file():
        return {}, {n: f"papers/{source}/params.yaml not found" for n in names}
    src = yaml.safe_load(params_path.read_text()) or {}
    done = load_runs(root / "papers" / source / "results" / result)
    if Train(**src.get("train", {})) != train:
        return {}, {n: f"papers/{source} trains with a different `train` block" for n in names}
    out, why = {}, {}
    for name in names:
        theirs = (src.get("runs") or {}).get(name)
        if theirs is None or Run(**theirs) != runs[name]:
            why[name] = f"papers/{source} runs `{name}` with a different configuration"
        elif name not in done:
            why[name] = f"papers/{source}/results/{result} has no `{name}` runs"
        else:
            out[name] = done[name]
    return out, why


def set_threads(stage: str, params) -> None:
    """``before_stage`` hook of the family's papers: torch CPU threads from ``params.threads`` (1 is fastest for the
    `tiny` model: FRUGAL README)."""
    import torch

    torch.set_num_threads(params.threads)
