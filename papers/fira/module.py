"""What Fira adds beyond its optimizer (papers/fira/optimizer.py): the scaling-factor similarity check of the
official README ("scaling factors of low-rank training are highly similar to full-rank training"; Spearman/Kendall
between the two, matrix level and column level).

Along one training trajectory of the `tiny` model (AdamW or GaLore moving the weights), every Linear gradient G
also feeds two shadow Adam states in GaLore's convention (they do not move the weights):
    full rank   N_f = M_f / (√V_f + ε)  on G
    low rank    N_l = M_l / (√V_l + ε)  on R = proj(G), P refreshed from the SVD of G every T steps (GaLore)
and every ``every`` steps the scaling factors are compared:
    matrix level   φ = ‖N‖_F / ‖G‖_F (full) vs ‖N_l‖_F / ‖R‖_F (low), one per matrix: rank correlation over matrices
    column level   φ_j over the indices j of the unprojected side (Fira's φ, FA:127-133), all matrices pooled
"""
from __future__ import annotations

import torch
from torch import Tensor

from shared.pretrain.optim.galore import GaLoreAdamW, galore_side, svd_factors

EPS = 1e-6          # GaLore's / Fira's Adam ε


def ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank), 1-based, float64."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x)
    r[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    uniq, inv = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    return (sums / counts)[inv]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's ρ: the Pearson correlation of the average ranks."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def kendall(a: Tensor, b: Tensor, chunk: int = 2048) -> float:
    """Kendall's τ-b (ties corrected), O(n²) pairs in chunks."""
    a, b = a.double().flatten(), b.double().flatten()
    n = len(a)
    concord = ties_a = ties_b = 0.0
    for i in range(0, n, chunk):
        da = (a[i:i + chunk, None] > a[None, :]).to(torch.int8) - (a[i:i + chunk, None] < a[None, :]).to(torch.int8)
        db = (b[i:i + chunk, None] > b[None, :]).to(torch.int8) - (b[i:i + chunk, None] < b[None, :]).to(torch.int8)
        concord += int((da * db).sum(dtype=torch.int64))
        ties_a += int((da == 0).sum())
        ties_b += int((db == 0).sum())
    pairs = n * n - n
    return concord / ((pairs - (ties_a - n)) * (pairs - (ties_b - n))) ** 0.5


class ShadowScaling:
    """The two shadow Adam states of one Linear matrix (module docstring)."""

    def __init__(self, rank: int, gap: int, betas=(0.9, 0.999)):
        self.rank, self.gap, self.betas, self.t = rank, gap, betas, 0
        self.full: dict = {}
        self.low: dict = {}

    @staticmethod
    def _adam(state: dict, g: Tensor, betas) -> Tensor:
        if "m" not in state:
            state["m"], state["v"] = torch.zeros_like(g), torch.zeros_like(g)
        state["m"].mul_(betas[0]).add_(g, alpha=1 - betas[0])
        state["v"].mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        return state["m"] / (state["v"].sqrt() + EPS)

    def update(self, g: Tensor) -> dict[str, Tensor]:
        """Feed one gradient; returns φ (matrix and per-index, full and low rank) for this step."""
        if self.t % self.gap == 0:
            side = galore_side(g.shape, "std")
            self.low["ortho"], _ = svd_factors(g, self.rank, side)
            self.low["right"] = side == "right"
        self.t += 1
        n_full = self._adam(self.full, g, self.betas)
        r = GaLoreAdamW._down(self.low, g)
        n_low = self._adam(self.low, r, self.betas)
        dim = 1 if self.low["right"] else 0            # the unprojected side's indices: rows if right-projected
        return {"matrix_full": n_full.norm() / g.norm().clamp_min(1e-30),
                "matrix_low": n_low.norm() / r.norm().clamp_min(1e-30),
                "index_full": n_full.norm(dim=dim) / (g.norm(dim=dim) + 1e-8),
                "index_low": n_low.norm(dim=dim) / (r.norm(dim=dim) + 1e-8)}
