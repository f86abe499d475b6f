"""GaLore-AdamW (Zhao et al., ICML 2024), reimplemented from reading the official PyPI package ``galore-torch`` 1.0
(``jiaweizzhao/GaLore``); line references are to the 1.0 wheel's files, ``GA`` = galore_torch/adamw.py and ``GP`` =
galore_torch/galore_projector.py (the repo HEAD 2cc66f8 differs only by ``.to(device)`` calls, shifted 1-2 lines).

A param group is *projectable* when it carries ``rank`` (the official group format, GA:92):

    {"params": [...], "rank": r, "update_proj_gap": T, "scale": alpha, "proj_type": "std"}

For such a matrix W ∈ R^{m×n} with gradient G, at the parameter's step 0, T, 2T, ... (GP:16/20: ``iter % T == 0``
with ``iter`` the step counter *before* its increment, GA:96/108) the projector is refreshed from an fp32 thin SVD of
the *current* gradient (GP:71-98):

    proj_type "std":  m >= n -> P = Vᵀ[:r]  (r×n), R = G·Pᵀ (m×r)      "right"
                      m <  n -> P = U[:, :r] (m×r), R = Pᵀ·G (r×n)      "left"
    "reverse_std" swaps the two; "left"/"right" force a side; "full": R = Uᵣᵀ·G·Vᵣᵀ (r×r).

So per projectable m×n matrix (m ≤ n w.l.o.g.) the state is m·r (projector) + 2·n·r (moments) elements.
Adam moments live on R and are **not** reset or re-projected at a refresh (GA:99-103 initialise them once).
GaLore's own Adam convention (GA:112-120), which differs from torch.optim.AdamW and from FRUGAL:

    M ← β1·M + (1−β1)·R ;  V ← β2·V + (1−β2)·R² ;  N = M / (√V + ε)   (ε added *before* bias correction)
    W ← W − η·√(1−β2^t)/(1−β1^t) · α·lift(N)                      (α applied in project_back, GP:67)
    W ← W − η·λ·W                                                 (decoupled decay *after* the step, GA:139-140)

Non-projectable groups get the same Adam update without projection. Default ε = 1e-6 as the official class.

Two storage notes (measured state bytes): the official projector keeps a *view* ``Vh[:r]`` / ``U[:, :r]`` of the full
thin-SVD factor (Vh is n×n when m >= n, U is m×m when m < n), so it really holds min(m,n)² projector elements, not
min(m,n)·r; we store a compact copy (same major order, so the matmuls stay bit-identical) and the real bytes equal the
paper formula. The official projector also lives in a Python object inside the state (invisible to ``state_dict``);
here it is a tensor ``state["ortho"]`` (plus ``state["ortho_right"]`` for "full"), and ``state["right"]`` (bool)
records the side.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from .base import HarnessOptimizer

GALORE_PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


def galore_side(shape: tuple[int, int] | torch.Size, proj_type: str) -> str:
    """The side GaLore projects on (GP:14-43): "right" (P ∈ R^{r×n}), "left" (P ∈ R^{m×r}) or "full"."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("right", "left", "full"):
        return proj_type
    raise ValueError(f"unknown GaLore proj_type {proj_type!r}; expected one of {GALORE_PROJ_TYPES}")


def compact(view: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A fresh, gap-free copy of a 2-D view in the *same* major order (LAPACK returns U / Vh column-major; keeping
    that order keeps the projection matmuls bit-identical to the official code, which multiplies by the view)."""
    out = torch.empty_strided(view.shape, (1, max(view.shape[0], 1)) if view.stride(0) < view.stride(1)
                              else (max(view.shape[1], 1), 1), dtype=dtype or view.dtype, device=view.device)
    return out.copy_(view)


def svd_factors(grad: Tensor, rank: int, side: str) -> tuple[Tensor, Tensor | None]:
    """fp32 thin SVD of the current gradient (GP:71-107): top-``rank`` right singular vectors as rows (side "right"),
    left ones as columns (side "left") or both ("full"), cast back to the gradient dtype, stored compact."""
    matrix = grad if grad.dtype == torch.float32 else grad.float()
    U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
    if side == "right":
        return compact(Vh[:rank, :], grad.dtype), None
    if side == "left":
        return compact(U[:, :rank], grad.dtype), None
    return compact(U[:, :rank], grad.dtype), compact(Vh[:rank, :], grad.dtype)


def adam_defaults(lr: float, betas, eps: float, weight_decay: float, correct_bias: bool) -> dict:
    """The validated Adam hyper-parameters every optimizer of the family starts its param-group defaults from."""
    if not lr >= 0.0:
        raise ValueError(f"invalid learning rate {lr!r}")
    for b in betas:
        if not 0.0 <= b < 1.0:
            raise ValueError(f"invalid beta {b!r}; must be in [0, 1)")
    if not eps >= 0.0:
        raise ValueError(f"invalid eps {eps!r}")
    return {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}


def check_galore_group(group: dict) -> None:
    """Validate one projectable GaLore group in place; ValueError names the bad value."""
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"GaLore rank must be an integer >= 1, got {rank!r}")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"GaLore update_proj_gap (T) must be an integer >= 1, got {gap!r}")
    if not group["scale"] >= 0:
        raise ValueError(f"GaLore scale (alpha) must be >= 0, got {group['scale']!r}")
    if group["proj_type"] not in GALORE_PROJ_TYPES:
        raise ValueError(f"unknown GaLore proj_type {group['proj_type']!r}; expected one of {GALORE_PROJ_TYPES}")


def galore_matrix_bytes(shape, e: int, rank: int, proj_type: str) -> int:
    """Analytic state bytes of one projected m×n matrix, r' = min(r, m, n): right side r'·n (P) + 2·m·r' (moments),
    left side m·r' + 2·r'·n, "full" m·r' + r'·n + 2·r'² — the paper's m·r + 2·n·r (m ≤ n), times the element size."""
    m, n = shape
    r = min(rank, m, n)
    side = galore_side(shape, proj_type)
    if side == "right":
        return (r * n + 2 * m * r) * e
    if side == "left":
        return (m * r + 2 * r * n) * e
    return (m * r + r * n + 2 * r * r) * e


class GaLoreAdamW(HarnessOptimizer, Optimizer):
    """GaLore-AdamW; parameter-for-parameter equal to ``galore_torch.adamw.AdamW`` 1.0 (see module docstring).

    Groups with a non-None ``rank`` are projected; missing ``update_proj_gap`` / ``scale`` / ``proj_type`` in such a
    group are filled from the constructor's values. Harness defaults: GaLore App. C.1 (r 128 at 60M, T 200, α 0.25).

    Subclasses change the full-rank update direction through ``_direction`` (Fira adds its scaled residual there).
    """

    group_options: ClassVar[dict] = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    ctor_options: ClassVar[dict] = {"betas": (0.9, 0.999), "eps": 1e-6, "correct_bias": True}
    invalid_examples: ClassVar[dict] = {"rank": -7, "update_proj_gap": -3, "scale": -0.5, "proj_type": "sideways"}

    @classmethod
    def check_options(cls, group: dict, linear) -> None:
        check_galore_group(group)

    @classmethod
    def linear_state_bytes(cls, params, options, refresh=0) -> int:
        return sum(galore_matrix_bytes(p.shape, p.element_size(), options["rank"], options["proj_type"])
                   for p in params)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True,
                 rank: int | None = None, update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std"):
        self._galore_defaults = {"update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type}
        self._default_rank = rank
        super().__init__(params, adam_defaults(lr, betas, eps, weight_decay, correct_bias))

    def add_param_group(self, param_group: dict) -> None:
        if "rank" not in param_group and getattr(self, "_default_rank", None) is not None:
            param_group["rank"] = self._default_rank
        if param_group.get("rank") is not None:
            for k, v in self._galore_defaults.items():
                param_group.setdefault(k, v)
            check_galore_group(param_group)
        super().add_param_group(param_group)

    # --- projector (GP:12-67) -------------------------------------------------------------------------------
    @staticmethod
    def _refresh(state: dict, grad: Tensor, group: dict) -> None:
        side = galore_side(grad.shape, group["proj_type"])
        left_or_right, right = svd_factors(grad, group["rank"], side)
        state["right"] = side == "right"      # a bool, not a str: Optimizer.load_state_dict mangles strings
        state["ortho"] = left_or_right
        state.pop("ortho_right", None)
        if right is not None:                  # side "full"
            state["ortho_right"] = right

    @staticmethod
    def _down(state: dict, g: Tensor) -> Tensor:
        P = state["ortho"]
        if "ortho_right" in state:                             # GP:43  "full"
            return torch.matmul(P.t(), g) @ state["ortho_right"].t()
        if state["right"]:                                     # GP:18  R = G·Pᵀ
            return torch.matmul(g, P.t())
        return torch.matmul(P.t(), g)                          # GP:22  R = Pᵀ·G

    @staticmethod
    def _up(state: dict, low: Tensor, scale: float) -> Tensor:
        P = state["ortho"]
        if "ortho_right" in state:                             # GP:64  "full"
            full = torch.matmul(P, low) @ state["ortho_right"]
        elif state["right"]:                                   # GP:51  R·P
            full = torch.matmul(low, P)
        else:                                                  # GP:53  P·R
            full = torch.matmul(P, low)
        return full * scale                                    # GP:67  α

    def _direction(self, p: Tensor, state: dict, group: dict, low_grad: Tensor, low_update: Tensor) -> Tensor:
        """The full-size update direction of a projected matrix from its low-rank Adam direction N (``low_update``);
        ``low_grad`` is R = proj(G). GaLore: α·lift(N) (GA:127)."""
        return self._up(state, low_update, group["scale"])

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            projected = group.get("rank") is not None
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                if projected:
                    if grad.dim() != 2:
                        raise ValueError(f"GaLore projects 2-D weights only, got shape {tuple(grad.shape)}")
                    # GP:16/20: refresh at step 0 and whenever step % T == 0 (step = count before this update)
                    if "ortho" not in state or state["step"] % group["update_proj_gap"] == 0:
                        self._refresh(state, grad, group)
                    grad = self._down(state, grad)
                if "exp_avg" not in state:                     # GA:99-103 (once; never reset at refresh)
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)                 # GA:112
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)    # GA:113
                denom = exp_avg_sq.sqrt().add_(group["eps"])                      # GA:114  ε before correction
                step_size = group["lr"]
                if group["correct_bias"]:                                          # GA:117-120
                    bc1 = 1.0 - beta1 ** state["step"]
                    bc2 = 1.0 - beta2 ** state["step"]
                    step_size = step_size * math.sqrt(bc2) / bc1
                norm_grad = exp_avg / denom                                        # GA:123
                if projected:
                    norm_grad = self._direction(p, state, group, grad, norm_grad)  # GA:127
                p.add_(norm_grad, alpha=-step_size)                                # GA:129
                if group["weight_decay"] > 0.0:                                    # GA:139-140  decay after
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss
