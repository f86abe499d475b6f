"""FRUGAL (arXiv 2411.07837) — what is new in this paper beyond the shared optimizer harness (``shared.pretrain``):
the two seconds-long figure checks.

Appendix C (momentum re-projection, official notebook galore_re-projection.ipynb). Toy objective on W ∈ R^{m×n}
with data D = I_n and a batch B of b columns drawn without replacement each step:

    f(W) = ‖W D‖²_F / n,      f_B(W) = ‖W D_B‖²_F / b,      G = ∇f_B(W)

GaLore-style SGDM with a rank-r projector U (top-r left singular vectors of G, refreshed when t mod T = 1):

    stale       M ← βM + (1−β)UᵀG;  W ← W − η/(1−β^t) · U M            (M keeps the coordinates of the old basis)
    re-project  at a refresh M ← U_newᵀ (U_old M) and the bias-correction mass c ← c·‖M_new‖/‖M_old‖; then
                M ← βM + (1−β)UᵀG,  c ← βc + (1−β),  W ← W − η/c · U M

The claim: re-projected momentum ends lower. Both variants here see the same batch sequence (paired), unlike the
notebook's single shared random stream.

Figure 2 (principal angles, official notebook principal_angles.ipynb): the cosines of the principal angles between
two subspaces with orthonormal bases Q₁, Q₂ are the singular values of Q₁ᵀQ₂; GaLore's subspaces of one Linear
gradient at different steps keep many cosines > 0.87 (the paper: rank 128 of 512), a random semi-orthogonal pair
almost none.
"""
from __future__ import annotations

import torch

COSINE_THRESHOLD = 0.87


def _check(rank: int, size: int, T: int, n_iter: int, batch: int) -> None:
    if not 1 <= rank <= size:
        raise ValueError(f"rank must be in [1, {size}], got {rank}")
    if T < 1 or n_iter < 1 or not 1 <= batch <= size:
        raise ValueError(f"need T >= 1, n_iter >= 1 and 1 <= batch <= {size}; got T={T}, n_iter={n_iter}, "
                         f"batch={batch}")


def galore_sgdm_toy(W0: torch.Tensor, batches: torch.Tensor, rank: int, lr: float = 0.1, beta: float = 0.9,
                    T: int = 10, reproject: bool = False) -> list[float]:
    """Full losses f(W_t), t = 0..len(batches), of GaLore-style SGDM on the Appendix C toy (see module docstring).
    ``batches`` [n_iter, b]: column indices of D = I used at each step."""
    m, n = W0.shape
    _check(rank, min(m, n), T, len(batches), batches.shape[1])
    W = W0.clone().double()
    U = None
    M = torch.zeros(rank, n, dtype=torch.float64)
    mass = 0.0
    losses = [float((W ** 2).sum() / n)]                       # f(W) = ‖W I‖² / n
    for t, cols in enumerate(batches.tolist(), start=1):
        G = torch.zeros_like(W)
        G[:, cols] = 2.0 * W[:, cols] / len(cols)               # ∇ ‖W D_B‖² / b
        if t % T == 1 or T == 1:
            U_new = torch.linalg.svd(G, full_matrices=False)[0][:, :rank]
            if reproject and U is not None:
                M_old = M
                M = U_new.T @ (U @ M_old)                          # lift with the old basis, project on the new
                norm_old = float(M_old.norm())
                mass = mass * float(M.norm()) / norm_old if norm_old > 0 else mass
            U = U_new
        M = beta * M + (1 - beta) * (U.T @ G)
        if reproject:
            mass = beta * mass + (1 - beta)
            W = W - lr / mass * (U @ M)
        else:
            W = W - lr / (1 - beta ** t) * (U @ M)
        losses.append(float((W ** 2).sum() / n))
    return losses


def appendix_c_toy(seed: int = 1, ranks=(3, 6), repeats: int = 5, n_iter: int = 200, T: int = 10, lr: float = 0.1,
                   beta: float = 0.9, batch: int = 2, size: int = 10) -> list[dict]:
    """Rows ``{rank, repeat, stale, reprojected}`` of final losses; W₀ ~ N(0, 1) from ``seed`` (as the notebook),
    the batch sequence of each repeat from ``seed + 1000·repeat``."""
    W0 = torch.randn(size, size, generator=torch.Generator().manual_seed(seed))
    rows = []
    for r in ranks:
        for k in range(repeats):
            g = torch.Generator().manual_seed(seed + 1000 * (k + 1))
            batches = torch.stack([torch.randperm(size, generator=g)[:batch] for _ in range(n_iter)])
            stale = galore_sgdm_toy(W0, batches, r, lr, beta, T, reproject=False)
            proper = galore_sgdm_toy(W0, batches, r, lr, beta, T, reproject=True)
            rows.append({"rank": r, "repeat": k, "stale": stale[-1], "reprojected": proper[-1],
                         "stale_curve": stale, "reprojected_curve": proper})
    return rows


def principal_cosines(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(Q₁) and span(Q₂) (orthonormal columns): σ(Q₁ᵀQ₂), descending."""
    if Q1.shape != Q2.shape:
        raise ValueError(f"bases must have the same shape, got {tuple(Q1.shape)} and {tuple(Q2.shape)}")
    return torch.linalg.svdvals(Q1.double().T @ Q2.double()).clamp(0.0, 1.0)


def left_subspace(G: torch.Tensor, rank: int) -> torch.Tensor:
    """GaLore's subspace of a gradient: its top-``rank`` left singular vectors (fp32 SVD, as GaLore)."""
    if not 1 <= rank <= min(G.shape):
        raise ValueError(f"rank must be in [1, {min(G.shape)}], got {rank}")
    return torch.linalg.svd(G.float(), full_matrices=False)[0][:, :rank]


def random_semiorthogonal(n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0].float()
