"""Low-rank factorizations of a K or V projection, ``W ≈ A·B`` (CSKV §3.1; also the ASVD/SVD baselines).

Shapes (``W`` is the math-convention weight, ``y = x·W``, i.e. ``nn.Linear.weight.T``):

    W  [d_model, C]          C = n_kv · head_dim
    A  [g, d_model, r/g]     latent of a token: z = x·A   (g = 1: joint across heads, the paper; g = n_kv: per head)
    B  [g, r/g, C/g]         reconstruction:     ŷ = z·B   (group i rebuilds channels i·C/g … (i+1)·C/g − 1)

Initialisations:
    svd       SVD of W;                                   A = U_r √Σ_r,            B = √Σ_r V_rᵀ
    asvd      S = diag(m^α) (α = 0.5); SVD of S·W;         A = S⁻¹ U_r √Σ_r,        B = √Σ_r V_rᵀ
              m = mean|x| per input channel (asvd_stat="mean", ours), or the official CSKV statistic
              m = Σ_{i=1..N} mean_t|x_i,t| + 1e-6 over N calibration samples (asvd_stat="official_sum"; official
              asvd_init_calib.py hook + init_asvd; = N·mean|x| + 1e-6 for equal-length samples). A·B does not depend
              on a global scale c of m, but the split does: m → c·m gives A → c^{−α/2}·A, B → c^{α/2}·B (Adam is
              not scale-invariant, so training from the two inits differs).
    whitened  C = XᵀX/n = L Lᵀ; SVD of Lᵀ·W;               A = L⁻ᵀ U_r √Σ_r,        B = √Σ_r V_rᵀ
              (the closed-form minimiser of ‖X W − X A B‖²_F — not in the paper; the optimum of its layer loss)
    random    A, B ~ N(0, 1/fan_in)
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

INITS = ("random", "svd", "asvd", "whitened")
ASVD_STATS = ("mean", "official_sum")
KINDS = ("k", "v")


def projection_weights(model, kind: str) -> torch.Tensor:
    """W of every layer's ``{kind}_proj`` in math convention ``y = x·W``: [L, d_model, n_kv·head_dim] (fp32)."""
    from shared.cache.base import attention_modules

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return torch.stack([getattr(a, f"{kind}_proj").weight.detach().T.float() for a in attention_modules(model)])


@contextmanager
def dense_factors(model, factors: list[tuple["Factors", "Factors"]]) -> Iterator[None]:
    """Always-compressed low-rank K/V: inside the block every layer's k_proj/v_proj weight is its rank-r
    approximation ``(A·B)ᵀ`` (so prefill and decode both see reconstructed K/V; the exact-window mode is the
    cache in shared.cache.lowrank). Restores the original weights on exit. ``factors[l] = (K, V)``."""
    from shared.cache.base import attention_modules

    mods = attention_modules(model)
    if len(factors) != len(mods):
        raise ValueError(f"got factors for {len(factors)} layers, the model has {len(mods)}")
    saved = [(a.k_proj.weight.data, a.v_proj.weight.data) for a in mods]
    try:
        for a, (fk, fv) in zip(mods, factors):
            a.k_proj.weight.data = fk.dense().T.to(a.k_proj.weight.dtype).contiguous()
            a.v_proj.weight.data = fv.dense().T.to(a.v_proj.weight.dtype).contiguous()
        yield
    finally:
        for a, (wk, wv) in zip(mods, saved):
            a.k_proj.weight.data, a.v_proj.weight.data = wk, wv


@dataclass
class Factors:
    """``A`` [g, d_model, r/g] and ``B`` [g, r/g, C/g] for one projection of one layer."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def groups(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[0] * self.A.shape[2]

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """z = x·A: [..., T, d_model] → [..., g, T, r/g]."""
        return torch.einsum("...td,gdr->...gtr", x, self.A)

    def reconstruct(self, z: torch.Tensor, num_heads: int) -> torch.Tensor:
        """ŷ = z·B per group: [B, g, T, r/g] → [B, n_kv, T, head_dim] (head-major like HF's K/V)."""
        y = torch.einsum("bgtr,grc->bgtc", z, self.B)  # [B, g, T, C/g]
        b, g, t, cg = y.shape
        heads_per_group = num_heads // g
        return y.view(b, g, t, heads_per_group, cg // heads_per_group).permute(0, 1, 3, 2, 4).reshape(
            b, num_heads, t, cg // heads_per_group)

    def dense(self) -> torch.Tensor:
        """The rank-r approximation of W as one [d_model, C] matrix (block-diagonal over groups in C)."""
        return torch.cat([self.A[i] @ self.B[i] for i in range(self.groups)], dim=1)


def rank_for_density(density: float, head_dim: int, num_kv_heads: int) -> int:
    """CSKV's rank: ``r = int(density · head_dim) · n_kv``; density ∈ (0, 1]."""
    if not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    per_head = int(density * head_dim)
    if per_head < 1:
        raise ValueError(f"density {density} leaves 0 channels per head (head_dim={head_dim})")
    return per_head * num_kv_heads


def asvd_scale(act_abs_mean: torch.Tensor, alpha: float = 0.5, asvd_stat: str = "mean",
               asvd_samples: int | None = None) -> torch.Tensor:
    """ASVD's diagonal ``s = m^α`` (fp64) from mean |x| per input channel (module doc).

    ``asvd_stat="mean"``: m = max(mean|x|, 1e-6). ``"official_sum"``: m = N·mean|x| + 1e-6 with N =
    ``asvd_samples`` (the official ``calib_data += 1e-6`` on the sum over N samples of per-sample mean |x|)."""
    if asvd_stat not in ASVD_STATS:
        raise ValueError(f"asvd_stat must be one of {ASVD_STATS}, got {asvd_stat!r}")
    m = act_abs_mean.double()
    if asvd_stat == "official_sum":
        if isinstance(asvd_samples, bool) or not isinstance(asvd_samples, int) or asvd_samples < 1:
            raise ValueError(f"asvd_stat='official_sum' needs asvd_samples = the number of calibration samples "
                             f"(a positive int), got {asvd_samples!r}")
        return (asvd_samples * m + 1e-6) ** alpha
    return m.clamp_min(1e-6) ** alpha


def factorize(W: torch.Tensor, rank: int, groups: int = 1, init: str = "svd", act_abs_mean: torch.Tensor | None = None,
              gram: torch.Tensor | None = None, alpha: float = 0.5, generator: torch.Generator | None = None,
              asvd_stat: str = "mean", asvd_samples: int | None = None) -> Factors:
    """Factor ``W`` [d_model, C] into ``A·B`` of total rank ``rank`` split over ``groups`` channel groups.

    Args:
        act_abs_mean: mean |x| per input channel (needed by ``asvd``).
        gram: XᵀX/n [d_model, d_model] of calibration inputs (needed by ``whitened``).
        asvd_stat: ``"mean"`` (ours) or ``"official_sum"`` (the official CSKV statistic N·mean|x| + 1e-6; needs
            ``asvd_samples`` = N); see :func:`asvd_scale`. Changes only the A/B scale balance, not A·B.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    d_model, C = W.shape
    if groups < 1 or C % groups:
        raise ValueError(f"groups must divide the {C} output channels, got {groups}")
    if rank < groups or rank % groups:
        raise ValueError(f"rank must be a positive multiple of groups={groups}, got {rank}")
    rg, cg = rank // groups, C // groups
    if rg > min(cg, d_model):
        raise ValueError(f"rank {rank} exceeds the {C} channels (max {min(cg, d_model) * groups} for groups={groups})")
    W64 = W.detach().double()
    As, Bs = [], []
    if init == "random":
        g = generator or torch.Generator().manual_seed(0)
        A = torch.randn(groups, d_model, rg, generator=g, dtype=torch.float64) / math.sqrt(d_model)
        B = torch.randn(groups, rg, cg, generator=g, dtype=torch.float64) / math.sqrt(rg)
        return Factors(A.to(W.dtype), B.to(W.dtype))
    if init == "asvd":
        if act_abs_mean is None:
            raise ValueError("init='asvd' needs act_abs_mean (mean |x| per input channel)")
        s = asvd_scale(act_abs_mean, alpha, asvd_stat, asvd_samples)
        left, left_inv = torch.diag(s), torch.diag(1.0 / s)
    elif init == "whitened":
        if gram is None:
            raise ValueError("init='whitened' needs gram = XᵀX/n")
        G = gram.double()
        G = G + 1e-6 * G.diagonal().mean() * torch.eye(d_model, dtype=torch.float64)
        L = torch.linalg.cholesky(G)
        left, left_inv = L.T, torch.linalg.inv(L.T)
    else:
        left = left_inv = None
    for i in range(groups):
        Wg = W64[:, i * cg:(i + 1) * cg]
        M = left @ Wg if left is not None else Wg
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        root = S[:rg].sqrt()
        A = U[:, :rg] * root
        As.append(left_inv @ A if left_inv is not None else A)
        Bs.append(root[:, None] * Vh[:rg])
    return Factors(torch.stack(As).to(W.dtype), torch.stack(Bs).to(W.dtype))
