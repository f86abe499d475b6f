"""Fira (Chen et al., arXiv 2410.01623) as the official code computes it: GaLore-AdamW plus a norm-based scaled
residual and a norm-growth limiter. Read from ``xichen-fy/Fira`` HEAD 5c28b13 = PyPI ``fira`` 1.0.2; line references
``FA`` = fira/fira_adamw.py, ``FP`` = fira/gradient_projection.py of the 1.0.2 sdist.

For a projected matrix W ∈ R^{m×n} with gradient G, GaLore's projector P (SVD of G every T steps, FP:15-65),
R = proj(G) and GaLore's Adam on R (ε before bias correction, FA:110-118) giving N = M/(√V+ε):

    φ_j = ‖N_j‖ / (‖R_j‖ + 1e-8)       per index j of the *unprojected* side: rows of W if right-projected (R is m×r),
                                        columns if left-projected (R is r×n)                          (FA:127-133)
    S   = φ ⊙ (G − α·lift(R))           the code's residual: project_back multiplies by α (FP:90)   (FA:126,134)
    limiter (FA:137-147): ℓ = max(‖S‖ / (s_{t−1} + 1e-8), γ) / γ;  S ← S/ℓ;  s_t = ‖S‖/ℓ   (first step: s = ‖S‖)
    W ← W − η·√(1−β2^t)/(1−β1^t) · (α·lift(N) + S);   W ← W − η·λ·W                           (FA:149-164)

γ = 1.01 is hard-coded in the code (``limiter_gamma`` here; ∞ disables the limiter and stores no norm).

**Paper vs code.** The paper's residual is G − P Pᵀ G; the code subtracts α·P Pᵀ G, so at α = 0.25 the in-subspace
gradient also moves by 0.75·φ. ``residual="code"`` (default, what we run) or ``"paper"``. Ablations of the paper:
``scaling="none"`` (φ ≡ 1), ``scaling="matrix"`` (one φ = ‖N‖_F/(‖R‖_F + 1e-8) per matrix), ``limiter_gamma=inf``.

State: GaLore's (projector + two low-rank moments) + the limiter's scalar norm per matrix (one element of the
gradient dtype): 4 B per fp32 matrix.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from shared.pretrain.optim.galore import GaLoreAdamW, check_galore_group, galore_matrix_bytes

SCALINGS = ("column", "matrix", "none")
RESIDUALS = ("code", "paper")


def scaling_factor(low_update: Tensor, low_grad: Tensor, scaling: str) -> Tensor | float:
    """φ of FA:127-133 from the low-rank Adam direction N and the projected gradient R: per unprojected index
    (``column``: the norm runs over the projected axis, i.e. dim 0 when R is r×n, dim 1 when R is m×r), one per
    matrix (``matrix``) or 1 (``none``)."""
    if scaling == "none":
        return 1.0
    if scaling == "matrix":
        return torch.norm(low_update) / (torch.norm(low_grad) + 1e-8)
    dim = 0 if low_update.shape[0] < low_update.shape[1] else 1               # FA:128
    phi = torch.norm(low_update, dim=dim) / (torch.norm(low_grad, dim=dim) + 1e-8)   # FA:129-132
    return phi.unsqueeze(1) if dim == 1 else phi                               # FA:133


class FiraAdamW(GaLoreAdamW):
    """Fira on GaLoreAdamW (see module docstring). Extra options of a projected group: ``limiter_gamma`` (1.01),
    ``scaling`` ("column" | "matrix" | "none"), ``residual`` ("code" | "paper")."""

    group_options: ClassVar[dict] = {**GaLoreAdamW.group_options, "limiter_gamma": 1.01, "scaling": "column",
                                     "residual": "code"}
    invalid_examples: ClassVar[dict] = {**GaLoreAdamW.invalid_examples, "limiter_gamma": 0.5, "scaling": "rows",
                                        "residual": "both"}

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, rank: int | None = None, update_proj_gap: int = 200, scale: float = 1.0,
                 proj_type: str = "std", limiter_gamma: float = 1.01, scaling: str = "column",
                 residual: str = "code"):
        self._fira_defaults = {"limiter_gamma": limiter_gamma, "scaling": scaling, "residual": residual}
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, rank, update_proj_gap, scale, proj_type)

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("rank", getattr(self, "_default_rank", None)) is not None:
            for k, v in self._fira_defaults.items():
                param_group.setdefault(k, v)
            check_fira_group(param_group)
        super().add_param_group(param_group)

    @classmethod
    def check_options(cls, group: dict, linear) -> None:
        check_galore_group(group)
        check_fira_group(group)

    @classmethod
    def linear_state_bytes(cls, params, options, refresh=0) -> int:
        limiter = 0 if math.isinf(options["limiter_gamma"]) else 1
        return sum(galore_matrix_bytes(p.shape, p.element_size(), options["rank"], options["proj_type"])
                   + limiter * p.element_size() for p in params)

    def _direction(self, p: Tensor, state: dict, group: dict, low_grad: Tensor, low_update: Tensor) -> Tensor:
        alpha = group["scale"] if group["residual"] == "code" else 1.0
        sub = self._up(state, low_grad, alpha)                                 # FA:126  α·lift(R) (FP:90)
        phi = scaling_factor(low_update, low_grad, group["scaling"])           # FA:127-133
        residual = limit_growth((p.grad - sub) * phi, state, group["limiter_gamma"])   # FA:134-147  S
        return self._up(state, low_update, group["scale"]) + residual         # FA:149  α·lift(N) + S


def limit_growth(residual: Tensor, state: dict, gamma: float) -> Tensor:
    """The norm-growth limiter (FA:137-147): ℓ = max(‖S‖/(s_{t−1} + 1e-8), γ)/γ, S ← S/ℓ, s_t = ‖S‖/ℓ; the first
    call only records s = ‖S‖. ``gamma`` = inf: no limiter, nothing stored."""
    if math.isinf(gamma):
        return residual
    if "scaling_grad" not in state:
        state["scaling_grad"] = torch.norm(residual)
        return residual
    norm = torch.norm(residual)
    limiter = max(norm / (state["scaling_grad"] + 1e-8), gamma) / gamma
    state["scaling_grad"] = norm / limiter
    return residual / limiter


def check_fira_group(group: dict) -> None:
    """ValueError naming the bad value: γ ≥ 1 (or inf), a known scaling and residual."""
    gamma = group["limiter_gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 1.0:
        raise ValueError(f"Fira limiter_gamma must be a number >= 1 (inf disables the limiter), got {gamma!r}")
    if group["scaling"] not in SCALINGS:
        raise ValueError(f"unknown Fira scaling {group['scaling']!r}; expected one of {SCALINGS}")
    if group["residual"] not in RESIDUALS:
        raise ValueError(f"unknown Fira residual {group['residual']!r}; expected one of {RESIDUALS}")
