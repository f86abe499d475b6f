"""Orthogonal per-KV-head projections of post-RoPE keys and values, with attention computed in the latent space
(MatryoshkaKV, arXiv 2410.14731 §3; any method that rotates K/V per head and keeps the leading channels).

Per layer l and KV head h: orthogonal U_K, U_V ∈ R^{d×d} and means μ_K, μ_V ∈ R^d (d = head_dim). With ranks r_K, r_V
and U_r = U[:, :r]:

    K' = (K − μ_K)·U_K,r        Q' = Q·U_K,r              (keys after RoPE; U_K cannot fold into W_K through RoPE)
    logits = (Q'·K'ᵀ + Q·μ_Kᵀ)/√d                         (Q·μ_K is constant along a softmax row → dropped, exact)
    V' = (V − μ_V)·U_V,r        out = softmax(logits)·V'·U_V,rᵀ + μ_V     (rows of softmax sum to 1)

The cache stores K', V' (r_K + r_V channels per KV head and token); at r = d the layer is exactly the original
attention. A query head uses the U_K/U_V of its KV head (GQA-correct: one projection per *KV* head).

Orthogonality by the Cayley map of an unconstrained X (trainable): A = X − Xᵀ, U = (I − A/2)⁻¹(I + A/2). Cayley only
reaches det +1, so PCA bases get their first column's sign flipped when det < 0.

Two ways to run a model with projections (both through the project's one attention router, shared.cache.base):

* :func:`project_kv` — a context in which every attention call projects its own K/V/Q (training, perplexity, the
  rank search): no cache needed; ranks can change between calls (``handle.ranks = ...``).
* :func:`matryoshka_cache` — a :class:`~shared.cache.base.CompressedCache` builder whose layers project new tokens
  on ``update`` and store per-head latents of width r_h (zero-padded on read); prefill runs through the projection.
  Registered as the KV method ``"matryoshka"`` (:class:`Matryoshka`).

Ranks are an int tensor [L, H, 2] (last axis: K, V) on the grid {step, 2·step, …, d}; the KV budget is
Σ(r_K + r_V)/(2·L·H·d), i.e. the fraction of cached channels (= bytes at equal dtype).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from shared.cache.base import (CompressedCache, CompressedLayer, PrefillRecord, attach, attention_modules,
                               positions_from_mask, routed_attention)
from shared.cache.registry import KVMethod
from shared.io import save_safetensors

KV = ("k", "v")


# ---- the Cayley map and PCA bases --------------------------------------------------------------------------
def cayley(X: torch.Tensor) -> torch.Tensor:
    """U = (I − A/2)⁻¹(I + A/2) with A = X − Xᵀ (batched over leading dims); orthogonal with det +1. fp32 or wider."""
    if X.shape[-1] != X.shape[-2]:
        raise ValueError(f"X must be square in its last two dims, got {tuple(X.shape)}")
    X = X.float() if X.dtype not in (torch.float32, torch.float64) else X
    A = X - X.mT
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    return torch.linalg.solve(eye - A / 2, eye + A / 2)


def inverse_cayley(U: torch.Tensor, max_cond: float = 1e6) -> torch.Tensor:
    """An X with ``cayley(X) = U`` for orthogonal U with det +1: A = 2(U − I)(U + I)⁻¹, X = A/2.

    Warns when cond(I + U) > ``max_cond`` (U has an eigenvalue near −1, which the Cayley map reaches only at
    infinity; the init is then inaccurate)."""
    U64 = U.double()
    eye = torch.eye(U.shape[-1], dtype=torch.float64, device=U.device)
    # cond(I + U) ≤ 2/σ_min(I + U) (‖I + U‖ ≤ 2); σ_min → 0 means an eigenvalue of U near −1 and a huge X.
    sigma_min = torch.linalg.svdvals(eye + U64)[..., -1]
    cond = 2.0 / sigma_min.clamp_min(1e-300)
    if bool((~(cond <= max_cond)).any()):
        warnings.warn(f"cond(I + U) up to {float(cond.max()):.3g} > {max_cond:g}: U is close to an eigenvalue −1 "
                      "and its inverse Cayley is ill-conditioned", RuntimeWarning, stacklevel=2)
    # (U − I) and (U + I)⁻¹ commute, so A = (U + I)⁻¹·2(U − I).
    A = torch.linalg.solve(eye + U64, 2 * (U64 - eye))
    A = (A - A.mT) / 2  # remove round-off asymmetry; exact A is skew
    return (A / 2).to(U.dtype)


def pca_basis(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of ``cov`` [..., d, d] as columns, sorted by descending eigenvalue, each column's sign chosen so
    its diagonal entry is ≥ 0 (keeps U away from eigenvalue −1, so the inverse Cayley is well conditioned), and the
    first column flipped when det < 0 (the Cayley map cannot reach det −1)."""
    evals, evecs = torch.linalg.eigh(cov.double())
    U = evecs.flip(-1)                                             # descending eigenvalues
    sign = torch.where(torch.diagonal(U, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(U.dtype)
    U = U * sign[..., None, :]
    det = torch.linalg.det(U)
    fix = torch.ones_like(U[..., 0, :])
    fix[..., 0] = torch.where(det < 0, -1.0, 1.0)
    return (U * fix[..., None, :]).to(cov.dtype)


# ---- ranks and budgets -------------------------------------------------------------------------------------
#: the paper's rank grid {d/8, 2d/8, …, d}: in budget terms, the multiples of 1/RANK_GRID whatever d is
RANK_GRID = 8


def default_step(head_dim: int) -> int:
    """The paper's rank grid {d/8, 2d/8, …, d}."""
    if head_dim % RANK_GRID:
        raise ValueError(f"head_dim must be a multiple of {RANK_GRID} for the d/{RANK_GRID} rank grid, got {head_dim}")
    return head_dim // RANK_GRID


def on_rank_grid(budget: float) -> bool:
    """Whether uniform ranks at the default grid hit ``budget`` exactly (a multiple of 1/RANK_GRID)."""
    return abs(RANK_GRID * budget - round(RANK_GRID * budget)) < 1e-9


def check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    return float(budget)


def check_ranks(ranks: torch.Tensor, head_dim: int, step: int | None = None) -> torch.Tensor:
    """Validate an int rank tensor [L, H, 2]: every entry in [step, d] and a multiple of ``step``."""
    step = default_step(head_dim) if step is None else step
    ranks = torch.as_tensor(ranks)
    if ranks.dim() != 3 or ranks.shape[-1] != 2:
        raise ValueError(f"ranks must have shape [layers, kv_heads, 2], got {tuple(ranks.shape)}")
    if ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
        raise ValueError(f"ranks must be integers, got dtype {ranks.dtype}")
    bad = (ranks < step) | (ranks > head_dim) | (ranks % step != 0)
    if bool(bad.any()):
        v = int(ranks[bad][0])
        raise ValueError(f"rank {v} is invalid: ranks must be multiples of {step} in [{step}, {head_dim}]")
    return ranks.long()


def uniform_ranks(n_layers: int, n_kv_heads: int, head_dim: int, budget: float, step: int | None = None
                  ) -> torch.Tensor:
    """Every (layer, head, K/V) at r = budget·d, which must lie on the rank grid."""
    step = default_step(head_dim) if step is None else step
    r = check_budget(budget) * head_dim
    if abs(r - round(r)) > 1e-9 or round(r) % step:
        raise ValueError(f"budget {budget} gives r = {r:g}, not a multiple of {step} (head_dim {head_dim})")
    return torch.full((n_layers, n_kv_heads, 2), int(round(r)), dtype=torch.long)


def budget_of(ranks: torch.Tensor, head_dim: int) -> float:
    """Fraction of KV channels kept: Σ(r_K + r_V) / (2·L·H·d)."""
    return float(torch.as_tensor(ranks).sum()) / (torch.as_tensor(ranks).numel() * head_dim)


# ---- the projection parameters -----------------------------------------------------------------------------
@dataclass
class LayerBases:
    """U_K, U_V [H, d, d] and μ_K, μ_V [H, d] of one layer."""

    u_k: torch.Tensor
    u_v: torch.Tensor
    mu_k: torch.Tensor
    mu_v: torch.Tensor


class KVProjection(nn.Module):
    """Trainable per-(layer, KV head) orthogonal projections: X_K, X_V [L, H, d, d] (U = Cayley(X)) and μ_K, μ_V
    [L, H, d]. All parameters are fp32. Use :meth:`from_statistics` for the PCA init."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        shape = (n_layers, n_kv_heads, head_dim, head_dim)
        self.x_k = nn.Parameter(torch.zeros(shape))
        self.x_v = nn.Parameter(torch.zeros(shape))
        self.mu_k = nn.Parameter(torch.zeros(shape[:3]))
        self.mu_v = nn.Parameter(torch.zeros(shape[:3]))
        self._frozen: list[LayerBases] | None = None

    @classmethod
    def from_statistics(cls, stats: dict[str, torch.Tensor]) -> "KVProjection":
        """PCA init from :func:`kv_statistics`: U = sorted eigenbasis of the covariance (det fixed), μ = mean."""
        L, H, d = stats["mean_k"].shape
        proj = cls(L, H, d)
        with torch.no_grad():
            for kind in KV:
                U = pca_basis(stats[f"cov_{kind}"].double())
                getattr(proj, f"x_{kind}").copy_(inverse_cayley(U).float())
                getattr(proj, f"mu_{kind}").copy_(stats[f"mean_{kind}"].float())
        return proj

    def save(self, path, meta: dict | None = None) -> None:
        """Write the parameters to a safetensors file (atomically: a temporary file, then a rename); ``meta``
        values are stored as strings in its metadata."""
        save_safetensors(path, self.state_dict(), meta)

    @classmethod
    def load(cls, path) -> "KVProjection":
        """A projection written by :meth:`save` (shapes from the file), frozen (``requires_grad`` False)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no projection at {path}; the MatryoshkaKV pipeline writes it "
                                    "(`dvc repro papers/matryoshka_kv`: calibrate → PCA, train → trained)")
        t = load_file(str(path))
        missing = {"x_k", "x_v", "mu_k", "mu_v"} - set(t)
        if missing:
            raise ValueError(f"{path} is not a KVProjection file: missing {sorted(missing)}")
        L, H, d, _ = t["x_k"].shape
        proj = cls(L, H, d)
        proj.load_state_dict(t)
        return proj.requires_grad_(False)

    def layer(self, idx: int) -> LayerBases:
        if self._frozen is not None:
            return self._frozen[idx]
        return LayerBases(cayley(self.x_k[idx]), cayley(self.x_v[idx]), self.mu_k[idx], self.mu_v[idx])

    @contextmanager
    def frozen(self) -> Iterator["KVProjection"]:
        """Evaluate the Cayley maps once (no grad) and reuse them inside the block (evaluation speed)."""
        with torch.no_grad():
            self._frozen = [LayerBases(cayley(self.x_k[i]), cayley(self.x_v[i]), self.mu_k[i].detach(),
                                       self.mu_v[i].detach()) for i in range(self.n_layers)]
        try:
            yield self
        finally:
            self._frozen = None

    def check_model(self, model) -> None:
        spec = model.config
        n_layers = len(attention_modules(model))
        hd = getattr(spec, "head_dim", None) or spec.hidden_size // spec.num_attention_heads
        if (n_layers, spec.num_key_value_heads, hd) != (self.n_layers, self.n_kv_heads, self.head_dim):
            raise ValueError(f"projection is for (layers, kv_heads, head_dim) = "
                             f"{(self.n_layers, self.n_kv_heads, self.head_dim)}, the model has "
                             f"{(n_layers, spec.num_key_value_heads, hd)}")


# ---- the latent attention ----------------------------------------------------------------------------------
def _truncate(U: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """U [H, d, d] → [H, d, r_max] with columns ≥ r_h zeroed (per-head widths, zero-padded — exact)."""
    r_max = int(ranks.max())
    cols = torch.arange(r_max, device=U.device)
    return U[..., :r_max] * (cols[None, :] < ranks.to(U.device)[:, None]).to(U.dtype)[:, None, :]


def project(x: torch.Tensor, U_r: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
    """(x − μ)·U_r per head in fp32: x [B, H, T, d], U_r [H, d, r], μ [H, d] → [B, H, T, r] (input dtype)."""
    xf = x.float() if mu is None else x.float() - mu.float()[None, :, None, :]
    return torch.einsum("bhtd,hdr->bhtr", xf, U_r.float()).to(x.dtype)


def latent_attention(module, query: torch.Tensor, k_lat: torch.Tensor, v_lat: torch.Tensor, Uk_r: torch.Tensor,
                     Uv_r: torch.Tensor, mu_k: torch.Tensor, mu_v: torch.Tensor, attention_mask, scaling,
                     keep_query_mean: bool = False, **kwargs) -> torch.Tensor:
    """softmax((Q·U_K,r)·K'ᵀ [+ Q·μ_K]) · V' · U_V,rᵀ + μ_V. query [B, Hq, T, d]; k_lat/v_lat [B, H, S, r_K|r_V].

    Returns HF's attention-output layout [B, T, Hq, d]."""
    n_rep = query.shape[1] // k_lat.shape[1]
    Uk_q = Uk_r.repeat_interleave(n_rep, 0)                                   # [Hq, d, rK]
    q_lat = project(query, Uk_q, None)                                        # Q' = Q·U_K,r
    if keep_query_mean:  # fidelity path (eager): the row constant Q·μ_K, proven irrelevant by the tests
        out_lat = _eager_with_query_mean(query, q_lat, k_lat, v_lat, mu_k.repeat_interleave(n_rep, 0),
                                         attention_mask, scaling)
    else:
        out_lat, _ = sdpa_attention_forward(module, q_lat, k_lat, v_lat, attention_mask, scaling=scaling, **kwargs)
    Uv_q, mu_v_q = Uv_r.repeat_interleave(n_rep, 0), mu_v.repeat_interleave(n_rep, 0)
    out = torch.einsum("bthr,hdr->bthd", out_lat.float(), Uv_q.float()) + mu_v_q.float()
    return out.to(query.dtype)


def _eager_with_query_mean(query, q_lat, k_lat, v_lat, mu_k_q, attention_mask, scaling):
    n_rep = q_lat.shape[1] // k_lat.shape[1]
    k = k_lat.repeat_interleave(n_rep, 1).float()
    v = v_lat.repeat_interleave(n_rep, 1).float()
    logits = q_lat.float() @ k.mT + (query.float() * mu_k_q.float()[None, :, None, :]).sum(-1, keepdim=True)
    logits = logits * scaling
    T, S = logits.shape[-2:]
    if attention_mask is None:
        causal = torch.ones(T, S, dtype=torch.bool, device=logits.device).tril(S - T)
        logits = logits.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask, float("-inf"))
    else:
        logits = logits + attention_mask
    return (logits.softmax(-1) @ v).transpose(1, 2)                           # [B, T, Hq, rV]


class _Projected:
    """Per-attention-module state inside :func:`project_kv`."""

    def __init__(self, handle: "ProjectionHandle", layer_idx: int):
        self.handle, self.layer_idx = handle, layer_idx

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        h = self.handle
        b = h.projection.layer(self.layer_idx)
        ranks = h.ranks[self.layer_idx]
        Uk_r, Uv_r = _truncate(b.u_k, ranks[:, 0]), _truncate(b.u_v, ranks[:, 1])
        k_lat, v_lat = project(key, Uk_r, b.mu_k), project(value, Uv_r, b.mu_v)
        return latent_attention(module, query, k_lat, v_lat, Uk_r, Uv_r, b.mu_k, b.mu_v, attention_mask, scaling,
                                keep_query_mean=h.keep_query_mean, **kwargs)


class ProjectionHandle:
    """Returned by :func:`project_kv`; set ``.ranks`` (validated) to change ranks between forward calls."""

    def __init__(self, projection: KVProjection, ranks: torch.Tensor, keep_query_mean: bool, step: int | None):
        self.projection, self.keep_query_mean, self.step = projection, keep_query_mean, step
        self.ranks = ranks

    @property
    def ranks(self) -> torch.Tensor:
        return self._ranks

    @ranks.setter
    def ranks(self, value) -> None:
        r = check_ranks(value, self.projection.head_dim, self.step)
        if tuple(r.shape[:2]) != (self.projection.n_layers, self.projection.n_kv_heads):
            raise ValueError(f"ranks shape {tuple(r.shape)} does not match the projection's "
                             f"[{self.projection.n_layers}, {self.projection.n_kv_heads}, 2]")
        self._ranks = r


@contextmanager
def project_kv(model, projection: KVProjection, ranks: torch.Tensor | None = None, keep_query_mean: bool = False,
               step: int | None = None) -> Iterator[ProjectionHandle]:
    """Inside the block every attention call of ``model`` projects its K/V/Q with ``projection`` at ``ranks``
    ([L, H, 2]; default: full rank d). Gradients flow into ``projection`` when it is trainable."""
    projection.check_model(model)
    if ranks is None:
        ranks = torch.full((projection.n_layers, projection.n_kv_heads, 2), projection.head_dim)
    handle = ProjectionHandle(projection, ranks, keep_query_mean, step)
    mods = attention_modules(model)
    with routed_attention(model):
        for i, attn in enumerate(mods):
            attn._reprise_attend = _Projected(handle, i).attend
        try:
            yield handle
        finally:
            for attn in mods:
                attn._reprise_attend = None


# ---- the latent KV cache -----------------------------------------------------------------------------------
class MatryoshkaLayer(CompressedLayer):
    """Stores per-head latents K'_h [B, T, r_K,h] and V'_h [B, T, r_V,h]; ``update`` projects new post-RoPE K/V and
    returns all latents zero-padded to the layer's widest head (what :func:`latent_attention` reads).

    Every token is stored by the same fixed projection whatever the step, so n forced tokens projected and attended
    in one forward (causal mask) equal n decode steps: ``supports_forced_forward``."""

    supports_forced_forward = True

    def __init__(self, bases: LayerBases, ranks: torch.Tensor):
        super().__init__()
        self.bases = bases
        self.ranks = ranks.long().cpu()                                       # [H, 2]
        self.Uk_r, self.Uv_r = _truncate(bases.u_k, self.ranks[:, 0]), _truncate(bases.u_v, self.ranks[:, 1])
        self.k_heads: list[torch.Tensor] = []
        self.v_heads: list[torch.Tensor] = []
        self.keys = self.values = None
        self.pending = None
        self._len = 0

    def stored_tensors(self) -> list[torch.Tensor]:
        return self.k_heads + self.v_heads

    def get_seq_length(self) -> int:
        return self._len

    @staticmethod
    def _pad(heads: list[torch.Tensor], width: int) -> torch.Tensor:
        return torch.stack([nn.functional.pad(h, (0, width - h.shape[-1])) for h in heads], dim=1)

    def update(self, key_states, value_states, *args, **kwargs):
        k_lat = project(key_states, self.Uk_r, self.bases.mu_k)
        v_lat = project(value_states, self.Uv_r, self.bases.mu_v)
        new_k = [k_lat[:, h, :, :int(r)] for h, r in enumerate(self.ranks[:, 0])]
        new_v = [v_lat[:, h, :, :int(r)] for h, r in enumerate(self.ranks[:, 1])]
        if self._len:
            new_k = [torch.cat([a, b], dim=-2) for a, b in zip(self.k_heads, new_k)]
            new_v = [torch.cat([a, b], dim=-2) for a, b in zip(self.v_heads, new_v)]
        else:  # own the storage: a slice of the projected tensor may be a view of all heads (honest byte count)
            new_k = [t.clone(memory_format=torch.contiguous_format) for t in new_k]
            new_v = [t.clone(memory_format=torch.contiguous_format) for t in new_v]
        self.k_heads, self.v_heads = new_k, new_v
        self._len += key_states.shape[-2]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.pending = (self._pad(self.k_heads, self.Uk_r.shape[-1]), self._pad(self.v_heads, self.Uv_r.shape[-1]))
        return self.pending

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        """Latent attention over what :meth:`update` just returned (the router's hook); None for anything else."""
        if self.pending is None or key is not self.pending[0]:
            return None
        self.pending = None
        return latent_attention(module, query, key, value, self.Uk_r, self.Uv_r, self.bases.mu_k, self.bases.mu_v,
                                attention_mask, scaling, **kwargs)

    def analytic_bytes(self) -> int:
        B = self.k_heads[0].shape[0] if self.k_heads else 0
        return int(self.ranks.sum()) * self._len * B * torch.empty((), dtype=self.dtype).element_size()


def empty_matryoshka_cache(projection: KVProjection, ranks: torch.Tensor, method: str = "matryoshka"
                           ) -> CompressedCache:
    ranks = check_ranks(ranks, projection.head_dim)
    return CompressedCache([MatryoshkaLayer(projection.layer(i), ranks[i]) for i in range(projection.n_layers)],
                           method=method)


def matryoshka_cache(model, projection: KVProjection, ranks: torch.Tensor, method: str = "matryoshka"):
    """A method builder for :func:`shared.kv_eval.evaluate_methods`: re-runs the context prefill *through* the
    projection (attention in latent space, as MatryoshkaKV does), filling a latent cache; the prefill's own last
    logits go on ``cache.prefill_logits``. Decode the result inside :func:`shared.cache.base.attach` (as every
    cache is decoded): the router hands each step to :meth:`MatryoshkaLayer.attend`."""
    projection.check_model(model)

    @torch.no_grad()
    def build(record: PrefillRecord) -> CompressedCache:
        if record.input_ids is None:
            raise ValueError("this PrefillRecord has no input_ids; record it with shared.cache.base.record_prefill")
        with projection.frozen():
            cache = empty_matryoshka_cache(projection, ranks, method)
        mask = record.attention_mask
        pos = None if mask is None else positions_from_mask(mask)
        with attach(model, cache):
            out = model(input_ids=record.input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True)
        cache.prefill_logits = out.logits[:, -1].float()
        cache.kv_mask = mask
        return cache

    return build


@dataclass
class Matryoshka(KVMethod):
    """Orthogonal per-KV-head projections with a latent cache (MatryoshkaKV-style), as a registered KV method.

    ``compression_ratio`` = 1 − budget (fraction of cached K/V channels removed). ``projection`` None → identity
    bases (U = I, μ = 0: plain channel truncation, a data-free baseline); ``ranks`` None → uniform ranks at the
    budget, which must lie on the rank grid; given ranks must have that budget."""

    projection: KVProjection | None = None
    ranks: torch.Tensor | None = None
    needs: ClassVar[frozenset[str]] = frozenset({"projection", "fused"})
    name: ClassVar[str] = "matryoshka"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection is not None and self.ranks is None:   # an off-grid uniform budget fails here, not later
            p = self.projection
            uniform_ranks(p.n_layers, p.n_kv_heads, p.head_dim, 1.0 - self.compression_ratio)

    def _resolve(self, n_layers: int, n_kv: int, d: int) -> tuple[KVProjection, torch.Tensor]:
        proj = self.projection if self.projection is not None else KVProjection(n_layers, n_kv, d)
        budget = 1.0 - self.compression_ratio
        if self.ranks is None:
            ranks = uniform_ranks(proj.n_layers, proj.n_kv_heads, proj.head_dim, budget)
        else:
            ranks = check_ranks(self.ranks, proj.head_dim)
            if abs(budget_of(ranks, proj.head_dim) - budget) > 1e-6:
                raise ValueError(f"ranks keep {budget_of(ranks, proj.head_dim):.4f} of the channels but "
                                 f"compression_ratio={self.compression_ratio} asks for {budget:.4f}")
        return proj, ranks

    @contextmanager
    def full_sequence(self, model):
        """Every attention call of ``model`` projects its own K/V/Q at the ranks (:func:`project_kv`)."""
        cfg = model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        proj, ranks = self._resolve(len(attention_modules(model)), cfg.num_key_value_heads, hd)
        with proj.frozen(), project_kv(model, proj, ranks) as handle:
            yield handle

    def compress(self, record: PrefillRecord) -> CompressedCache:
        model = record.model
        if model is None:
            raise ValueError("this PrefillRecord has no model; record it with shared.cache.base.record_prefill")
        n_layers, n_kv, _, d = (len(record.layers),) + tuple(record.layers[0].keys.shape[1:])
        proj, ranks = self._resolve(n_layers, n_kv, d)
        return matryoshka_cache(model, proj, ranks, method=self.name)(record)
