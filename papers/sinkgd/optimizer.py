"""Stateless multi-normalized gradient descent on the Linear weights: SinkGD (Scetbon, Ma, Gong, Meeds, arXiv
2502.06742) and SWAN (Ma, Gong, Scetbon, Meeds, arXiv 2412.13148), in one file because SinkGD is SWAN with the
spectral step swapped for a column ℓ2 normalization. **No official code exists** (SWAN promised
``microsoft/msr_optim``; no snapshot): the equations are transcribed from the spec (../shared/papers/optimizers.md
§2), which took them from secondary transcriptions — the normalization axis, the Newton–Schulz iteration and the
η split are UNVERIFIED against the PDFs. Embeddings, norms and the LM head: torch.optim.AdamW (UNVERIFIED).

W ∈ R^{m×n} (out × in), gradient G. Both update W ← W(1 − ηλ) − η·s·D with s = ``free_lr_scale`` and no state:

SinkGD (SR-Sinkhorn, L iterations):   X ← G;  repeat L:  X ← √n · diag(‖X_i,:‖)⁻¹ X      (rows to norm √n)
                                                          X ← √m · X diag(‖X_:,j‖)⁻¹      (columns to norm √m)
                                      D = X  (every entry RMS 1 once converged)
    One iteration = sign(X) ⊙ √(one Sinkhorn–Knopp sweep of X⊙X to row sums n, column sums m).

SWAN (GradNorm then GradWhitening):   G̃ = (G − ḡ1ᵀ) ⊘ (s1ᵀ)   ḡ, s = row mean and (population) std over the n inputs
                                      U = (G̃G̃ᵀ)^{-1/2} G̃  (m ≤ n; else G̃ (G̃ᵀG̃)^{-1/2}) = the polar factor of G̃,
                                          by coupled Newton–Schulz on the smaller Gram A, in fp32:
                                          Y₀ = A/‖A‖_F, Z₀ = I;  T = (3I − Z Y)/2;  Y ← Y T;  Z ← T Z  (→ A^{-1/2}·√‖A‖_F)
                                      D = (‖G̃‖_F / ‖U‖_F) · U
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from shared.pretrain.optim.base import HarnessOptimizer

_TINY = 1e-30


def _check_matrix(g: Tensor) -> None:
    if g.dim() != 2:
        raise ValueError(f"multi-normalization needs 2-D weights, got shape {tuple(g.shape)}")


def sr_sinkhorn(g: Tensor, iterations: int) -> Tensor:
    """SinkGD's direction: ``iterations`` alternating row (to √n) and column (to √m) ℓ2 normalizations of G."""
    _check_matrix(g)
    m, n = g.shape
    x = g
    for _ in range(iterations):
        x = x * (math.sqrt(n) / x.norm(dim=1, keepdim=True).clamp_min(_TINY))
        x = x * (math.sqrt(m) / x.norm(dim=0, keepdim=True).clamp_min(_TINY))
    return x


def grad_norm(g: Tensor) -> Tensor:
    """SWAN's GradNorm: each row standardized over the n inputs (mean 0, population std 1)."""
    _check_matrix(g)
    centered = g - g.mean(dim=1, keepdim=True)
    return centered / centered.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(_TINY)


def inverse_sqrt_newton_schulz(a: Tensor, steps: int) -> Tensor:
    """A^{-1/2} of a symmetric PSD matrix by the coupled Newton–Schulz iteration (module docstring), fp32."""
    a = a.float()
    scale = torch.linalg.matrix_norm(a).clamp_min(_TINY)
    y = a / scale
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    z = eye
    for _ in range(steps):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return z / scale.sqrt()


def whiten(g: Tensor, steps: int) -> Tensor:
    """SWAN's GradWhitening: (GGᵀ)^{-1/2}G on the smaller Gram (the polar factor of G), in fp32."""
    _check_matrix(g)
    x = g.float()
    if x.shape[0] <= x.shape[1]:
        return (inverse_sqrt_newton_schulz(x @ x.T, steps) @ x).to(g.dtype)
    return (x @ inverse_sqrt_newton_schulz(x.T @ x, steps)).to(g.dtype)


def swan_direction(g: Tensor, steps: int) -> Tensor:
    gn = grad_norm(g)
    u = whiten(gn, steps)
    return u * (gn.norm() / u.norm().clamp_min(_TINY))


class MultiNormGD(HarnessOptimizer, torch.optim.AdamW):
    """torch.optim.AdamW on every group except the ``stateless`` one (the Linear weights), which gets the method's
    stateless normalized step at lr·``free_lr_scale`` and keeps no state at all. Subclasses give ``direction``."""

    group_options: ClassVar[dict] = {"free_lr_scale": 1.0}
    ctor_options: ClassVar[dict] = {"betas": (0.9, 0.999), "eps": 1e-8}
    linear_tags: ClassVar[dict] = {"stateless": True}
    regular_step_tensor: ClassVar[bool] = True
    invalid_examples: ClassVar[dict] = {"free_lr_scale": -2.5}

    @classmethod
    def check_options(cls, group: dict, linear) -> None:
        s = group["free_lr_scale"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise ValueError(f"free_lr_scale must be a number > 0, got {s!r}")
        for p in linear:
            _check_matrix(p)

    @classmethod
    def linear_state_bytes(cls, params, options, refresh=0) -> int:
        return 0                                   # stateless: nothing is kept between steps

    def direction(self, grad: Tensor, group: dict) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stateless = [(p, g) for g in self.param_groups if g.get("stateless") for p in g["params"]
                     if p.grad is not None]
        grads = [p.grad for p, _ in stateless]
        for p, _ in stateless:                     # torch.optim.AdamW skips parameters without a gradient
            p.grad = None
        try:
            super().step()
        finally:
            for (p, _), grad in zip(stateless, grads):
                p.grad = grad
        for p, group in stateless:
            if group["weight_decay"] > 0.0:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(self.direction(p.grad, group), alpha=-group["lr"] * group["free_lr_scale"])
        return loss


class SinkGD(MultiNormGD):
    """SinkGD: ``iterations`` (L, default 5) SR-Sinkhorn steps on each Linear gradient."""

    group_options: ClassVar[dict] = {**MultiNormGD.group_options, "iterations": 5}
    invalid_examples: ClassVar[dict] = {**MultiNormGD.invalid_examples, "iterations": -4}

    @classmethod
    def check_options(cls, group: dict, linear) -> None:
        _check_count("iterations", group["iterations"])
        super().check_options(group, linear)

    def direction(self, grad: Tensor, group: dict) -> Tensor:
        return sr_sinkhorn(grad, group["iterations"])


class SWAN(MultiNormGD):
    """SWAN: GradNorm then GradWhitening with ``ns_steps`` (default 10) Newton–Schulz iterations."""

    group_options: ClassVar[dict] = {**MultiNormGD.group_options, "ns_steps": 10}
    invalid_examples: ClassVar[dict] = {**MultiNormGD.invalid_examples, "ns_steps": -4}

    @classmethod
    def check_options(cls, group: dict, linear) -> None:
        _check_count("ns_steps", group["ns_steps"])
        super().check_options(group, linear)

    def direction(self, grad: Tensor, group: dict) -> Tensor:
        return swan_direction(grad, group["ns_steps"])


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
