"""FRUGAL's one claim that needs code (``fn:`` in paper.yaml): an unpaired Monte-Carlo test, judged by the engine."""
from __future__ import annotations

from shared.metrics import holm

ALPHA = 0.05


def revisits_subspace(results: dict, claim) -> dict:
    """Figure 2: GaLore keeps revisiting the same subspace. For each pair of training steps, the mean principal
    cosine between the gradient's top-r left subspaces is compared with ``random_mean_cosines`` (independent random
    rank-r subspaces of the same size): p = (1 + #{null ≥ observed}) / (1 + draws), Holm over the step pairs.
    Reproduced iff every pair is above the null; not reproduced iff none is (all within the random bulk);
    inconclusive otherwise."""
    fig = results["figures.json"]
    null = fig["random_mean_cosines"]
    pairs = [r for r in fig["cosines"] if r["pair"] != "random semi-orthogonal"]
    if not pairs or len(null) < 19:
        raise ValueError("figures.json needs step-pair cosines and ≥ 19 random pairs (p ≥ 1/(1 + draws))")
    ps = [(1 + sum(x >= r["mean_cosine"] for x in null)) / (1 + len(null)) for r in pairs]
    adj = holm(ps)
    hits = [p < ALPHA for p in adj]
    verdict = "reproduced" if all(hits) else "not reproduced" if not any(hits) else "inconclusive"
    text = "; ".join(f"{r['pair']}: mean cosine {r['mean_cosine']:.2f} (Holm p = {p:.3g})" for r, p in zip(pairs, adj))
    text += f" — null: {len(null)} random pairs, mean cosine max {max(null):.2f}"
    return {"verdict": verdict, "text": text}
