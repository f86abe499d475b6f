"""Fira's one claim that needs code (``fn:`` in paper.yaml): a rank-correlation permutation test, judged here."""
from __future__ import annotations

import torch

from papers.fira.module import spearman
from shared.metrics import holm

ALPHA = 0.05
PERMUTATIONS = 9999


def scaling_factors_similar(results: dict, claim) -> dict:
    """README: low-rank scaling factors rank the matrices like full-rank ones (Spearman 0.9972 at 60M, p < 0.05).
    For each trajectory, at its last checkpoint: Spearman's ρ between the 28 matrix-level factors, one-sided
    Monte-Carlo permutation p = (1 + #{ρ_perm ≥ ρ}) / (1 + 9999) (seeded), Holm over trajectories. Reproduced iff
    every trajectory's ρ is significantly positive; not reproduced iff none is."""
    factors = results["similarity.json"]["factors"]
    trajectories = list(dict.fromkeys(f["trajectory"] for f in factors))
    if not trajectories:
        raise ValueError("similarity.json has no factors")
    rhos, ps = [], []
    gen = torch.Generator().manual_seed(0)
    for t in trajectories:
        last = max((f for f in factors if f["trajectory"] == t), key=lambda f: f["step"])
        full, low = torch.tensor(last["full"]), torch.tensor(last["low"])
        rho = spearman(full, low)
        null = [spearman(full, low[torch.randperm(len(low), generator=gen)]) for _ in range(PERMUTATIONS)]
        rhos.append((t, last["step"], rho))
        ps.append((1 + sum(x >= rho for x in null)) / (1 + PERMUTATIONS))
    adj = holm(ps)
    hits = [p < ALPHA for p in adj]
    verdict = "reproduced" if all(hits) else "not reproduced" if not any(hits) else "inconclusive"
    text = "; ".join(f"{t} trajectory, step {s}: Spearman ρ = {r:.3f} over {len(full)} matrices (Holm p = {p:.3g})"
                     for (t, s, r), p in zip(rhos, adj))
    return {"verdict": verdict, "text": text + " — paper (60M, README): 0.9972"}
