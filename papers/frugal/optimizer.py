"""FRUGAL (Zmushko et al., ICML 2025) with AdamW as the state-full part, reimplemented from reading the authors' first
commit c7ebe4c (fork ``hungquangbui02022003/FRUGAL``). References: ``PT`` frugal/proj_optimizer_templates.py,
``AD`` frugal/adamw.py, ``GP`` frugal/galore_projector.py, ``CP`` frugal/coordinate_projector.py.

One optimizer class covers the official GaloreAdamW / CoordAdamW / BlockAdamW (AD:146-298). A param group with
``projectable=True`` (official ``is_proj_params``, PT:35) is split, for each matrix W with gradient G, into

    every T steps (group clock, PT:90-98): choose the state-full subspace with density ρ   (``_refresh``)
    G_full = proj(G);  U_full = Adam(G_full) at lr η·s_proj                             (PT:206-210)
    G_free = G − lift(G_full)                                                           (PT:213)
    U_free = −η·s_proj·s_free·sign(G_free) | −η·s_proj·s_free·G_free | 0               (PT:214-219)
    W ← W·(1 − η·λ) + lift(U_full) + U_free        (weight decay first, every parameter, PT:135-145)

Projections (``proj``):
    "blockwise"                 round(ρ·#tensors) whole matrices are state-full (PT:327), the others get only the
                                state-free rule and hold no state (PT:337-342); order random / ascending /
                                descending / mirror (PT:349-377)
    "columns" / "rows" / "randk" int(ρ·n) random columns, int(ρ·m) rows or int(ρ·m·n) entries (CP:10-21, 48-49);
                                indices kept as one int64 tensor (``randk``: flat indices)
    "svd" / "random" / "randperm"  P from the top singular vectors of G, a random semi-orthogonal matrix
                                (``nn.init.orthogonal_``) or rows of a random permutation; side chosen as GaLore
                                ("std": m ≥ n -> right, P ∈ R^{r×n}, r = round(ρ·n); else left, P ∈ R^{m×r},
                                r = round(ρ·m); GP:7-19)

Adam inside FRUGAL (AD:86-106) — the torch.optim.AdamW convention, *not* GaLore's:
    M ← β1·M + (1−β1)·g ;  V ← β2·V + (1−β2)·g² ;  U = −η/(1−β1^t) · M / (√V/√(1−β2^t) + ε)
Regular (non-projectable) groups get exactly this AdamW (AD:121-141), weight decay first.

``reset_statistics`` (PT:197-202): at a refresh the moments are zeroed and the step counter restarts; otherwise
they are kept (not re-projected) like GaLore. Blockwise: the official BlockOptimizer ignores the flag and always
re-initialises every active tensor (PT:345-348); here ``reset_statistics=True`` (default) does the same, and
``False`` lets a tensor that stays active across a refresh keep its moments (newly activated ones start at zero).

Deliberate differences from the official code (documented, none changes the default pre-training recipe):
  * randomness (block order "random", coordinates, random/randperm projectors) comes from a per-optimizer
    ``torch.Generator`` seeded with ``seed`` (saved in ``state_dict``) instead of the global RNG;
  * a full-rank projector (r equal to the projected side: P square and orthogonal, e.g. ρ = 1) has G_free ≡ 0
    mathematically; the residual is skipped instead of applying sign() to rounding noise (the official code would
    move almost every entry by ±η·s_proj·s_free there);
  * projectors/indices are stored as compact tensors in ``state`` (official: a Python object holding a *view* of the
    full thin-SVD factor — min(m,n)·n or m·min(m,n) elements — or, for "randperm", of the whole n×n / m×m
    permutation matrix in fp32), so measured bytes equal the formula; "randk" keeps one flat int64 index tensor
    (official: a (row, col) pair, twice the bytes).
With the same random draws, every variant matches the official classes bit for bit (checked ad hoc against
BlockAdamW descending/ascending/mirror, GaloreAdamW svd with/without reset, CoordAdamW columns/rows/randk).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from shared.pretrain.groups import ParamGroups, split_regular
from shared.pretrain.optim.base import HarnessOptimizer, adam_moment_bytes
from shared.pretrain.optim.galore import adam_defaults, compact

PROJECTIONS = ("blockwise", "columns", "rows", "randk", "svd", "random", "randperm")
COORDINATE_PROJECTIONS = ("columns", "rows", "randk")
SUBSPACE_PROJECTIONS = ("svd", "random", "randperm")
STATE_FREE_RULES = ("signsgd", "sgd", "none")
_RULE_ALIASES = {"signsgd": "signsgd", "sign_sgd": "signsgd", "sgd": "sgd", "none": "none", "no": "none"}
BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")
PROJ_SIDES = ("std", "reverse_std", "left", "right")

FRUGAL_GROUP_DEFAULTS = {   # spec §2 pre-training "FRUGAL" (AU:10-11 + scripts/benchmark_c4/llama_60m.sh)
    "proj": "blockwise", "density": 0.25, "update_gap": 200, "reset_statistics": True, "state_free": "signsgd",
    "proj_lr_scale": 1.0, "free_lr_scale": 1.0, "block_order": "descending", "proj_side": "std",
}


# --------------------------------------------------------------------------------------------------- validation
def normalize_rule(rule: str) -> str:
    """State-free rule: "signsgd" | "sgd" | "none" (official spellings "sign_sgd", "no" accepted)."""
    if not isinstance(rule, str) or rule not in _RULE_ALIASES:
        raise ValueError(f"unknown state-free rule {rule!r}; expected one of {STATE_FREE_RULES} "
                         f"(or the official 'sign_sgd' / 'sgd' / 'no')")
    return _RULE_ALIASES[rule]


def check_frugal_group(group: dict) -> None:
    """Validate (and normalise the rule of) one projectable group in place; ValueError names the value."""
    if group["proj"] not in PROJECTIONS:
        raise ValueError(f"unknown FRUGAL projection {group['proj']!r}; expected one of {PROJECTIONS}")
    rho = group["density"]
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"FRUGAL density (rho) must be in [0, 1], got {rho!r}")
    gap = group["update_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"FRUGAL update_gap (T) must be an integer >= 1, got {gap!r}")
    group["state_free"] = normalize_rule(group["state_free"])
    if group["block_order"] not in BLOCK_ORDERS:
        raise ValueError(f"unknown FRUGAL block_order {group['block_order']!r}; expected one of {BLOCK_ORDERS}")
    if group["proj_side"] not in PROJ_SIDES:
        raise ValueError(f"unknown FRUGAL proj_side {group['proj_side']!r}; expected one of {PROJ_SIDES}")
    for key in ("proj_lr_scale", "free_lr_scale"):
        if not group[key] >= 0:
            raise ValueError(f"FRUGAL {key} must be >= 0, got {group[key]!r}")
    if not isinstance(group["reset_statistics"], bool):
        raise ValueError(f"FRUGAL reset_statistics must be a bool, got {group['reset_statistics']!r}")
    if group["proj"] == "blockwise" and group["block_order"] == "mirror" and num_active_blocks(
            len(group["params"]), rho) % 2:
        raise ValueError(f"FRUGAL block_order 'mirror' needs an even number of active blocks, got "
                         f"{num_active_blocks(len(group['params']), rho)} (density {rho!r}, "
                         f"{len(group['params'])} tensors)")   # PT:328


# ------------------------------------------------------------------------------------------ the state-full subspace
def num_active_blocks(num_tensors: int, density: float) -> int:
    """round(ρ·#tensors) (PT:327; Python rounding, half to even)."""
    return round(num_tensors * density)


def block_schedule(order: str, num_tensors: int, k: int, cursor: int | None,
                   generator: torch.Generator | None = None) -> tuple[list[int], int | None]:
    """Active tensor indices of one refresh and the next cursor (PT:349-377). ``cursor`` None = first refresh.

    descending starts at the last tensor (the top layer's down_proj) and walks down k at a time, wrapping."""
    n = num_tensors
    if order == "random":
        return sorted(torch.randperm(n, generator=generator)[:k].tolist()), None
    if order == "ascending":
        start = 0 if cursor is None else cursor
        idx = [i % n for i in range(start, start + k)]
        start += k
        if start >= n:
            start -= n
        return sorted(set(idx)), start
    if order == "descending":
        start = n - 1 if cursor is None else cursor
        idx = [i % n for i in range(start, start - k, -1)]
        start -= k
        if start < 0:
            start += n
        return sorted(set(idx)), start
    if order == "mirror":
        half = n // 2
        start = 0 if cursor is None else cursor
        idx = []
        for i in range(start, start + k // 2):
            idx += [i % half, n - 1 - i % half]
        start += k // 2
        if start >= half:
            start -= half
        return sorted(set(idx)), start
    raise ValueError(f"unknown FRUGAL block_order {order!r}; expected one of {BLOCK_ORDERS}")


def projection_side(shape, proj_side: str) -> str:
    """GP:7-16: "right" (P ∈ R^{r×n}) or "left" (P ∈ R^{m×r})."""
    m, n = shape
    if proj_side == "right" or (proj_side == "std" and m >= n) or (proj_side == "reverse_std" and m < n):
        return "right"
    if proj_side in ("left", "std", "reverse_std"):
        return "left"
    raise ValueError(f"unknown FRUGAL proj_side {proj_side!r}; expected one of {PROJ_SIDES}")


def subspace_rank(shape, density: float, side: str) -> int:
    """r = round(ρ·side) on the projected side (GP:11, 16): n for "right", m for "left"."""
    m, n = shape
    return round((n if side == "right" else m) * density)


def coordinate_count(shape, density: float, kind: str) -> int:
    """int(ρ·n) columns, int(ρ·m) rows or int(ρ·m·n) entries (CP:12-17, 48-49)."""
    m, n = shape
    total = {"columns": n, "rows": m, "randk": m * n}[kind]
    return int(total * density)


def subspace_shapes(shape, density: float, kind: str, proj_side: str) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """(projector shape, projected-gradient shape, full_rank) for svd/random/randperm."""
    m, n = shape
    side = projection_side(shape, proj_side)
    r = subspace_rank(shape, density, side)
    if kind == "svd":
        r = min(r, m, n)          # a thin SVD has min(m, n) singular vectors
    if side == "right":
        return (r, n), (m, r), r == n
    return (m, r), (r, n), r == m


def build_subspace(kind: str, grad: Tensor, density: float, proj_side: str,
                   generator: torch.Generator | None) -> dict:
    """State entries of a new projector: {"right": bool, "ortho": P} (GP:22-30, 54-152). The side is a bool, not a
    str: ``Optimizer.load_state_dict`` turns strings in the state into generators."""
    m, n = grad.shape
    side = projection_side(grad.shape, proj_side)
    pshape, _, _ = subspace_shapes(grad.shape, density, kind, proj_side)
    r = pshape[0] if side == "right" else pshape[1]
    if kind == "svd":                                   # GP:55-86: fp32 thin SVD of the current gradient
        if r == 0:
            P = grad.new_zeros(pshape)
        else:
            matrix = grad if grad.dtype == torch.float32 else grad.float()
            U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
            P = compact(Vh[:r, :] if side == "right" else U[:, :r])
    elif kind == "random":                              # GP:89-117: random semi-orthogonal (orthonormal rows/cols)
        P = torch.empty(pshape)
        if r > 0:
            torch.nn.init.orthogonal_(P, generator=generator)
    elif kind == "randperm":                            # GP:120-152: r rows (cols) of a random permutation matrix
        size = n if side == "right" else m
        perm = torch.randperm(size, generator=generator)[:r].clone()
        P = torch.zeros(pshape)
        if side == "right":
            P[torch.arange(r), perm] = 1.0
        else:
            P[perm, torch.arange(r)] = 1.0
    else:
        raise ValueError(f"unknown FRUGAL subspace projection {kind!r}; expected one of {SUBSPACE_PROJECTIONS}")
    return {"right": side == "right", "ortho": P.to(device=grad.device, dtype=grad.dtype)}


def build_coordinates(kind: str, grad: Tensor, density: float, generator: torch.Generator | None) -> dict:
    """State entries of a new coordinate projector: {"indices": int64} (CP:10-21, 48-49)."""
    m, n = grad.shape
    total = {"columns": n, "rows": m, "randk": m * n}[kind]
    # clone: a slice of randperm pins the whole permutation (the official CP:49 keeps that view for columns/rows;
    # for randk it stores two derived k-long int64 tensors, 16·k bytes, where we keep one flat 8·k tensor)
    idx = torch.randperm(total, generator=generator)[:coordinate_count(grad.shape, density, kind)].clone()
    return {"indices": idx.to(grad.device)}


def project_down(kind: str, state: dict, g: Tensor) -> Tensor:
    """proj(G) (GP:32-41, CP:23-32)."""
    if kind in SUBSPACE_PROJECTIONS:
        P = state["ortho"]
        return g @ P.t() if state["right"] else P.t() @ g
    idx = state["indices"]
    if kind == "columns":
        return g[:, idx]
    if kind == "rows":
        return g[idx]
    return g.reshape(-1)[idx]                            # randk: flat index i ↔ (i // n, i % n), CP:17-21


def project_up(kind: str, state: dict, low: Tensor, shape) -> Tensor:
    """lift(·) (GP:43-52, CP:34-46): zeros outside the chosen coordinates."""
    if kind in SUBSPACE_PROJECTIONS:
        P = state["ortho"]
        return low @ P if state["right"] else P @ low
    out = low.new_zeros(shape)
    idx = state["indices"]
    if kind == "columns":
        out[:, idx] = low
    elif kind == "rows":
        out[idx] = low
    else:
        out.view(-1)[idx] = low
    return out


def residual(kind: str, state: dict, g: Tensor, low: Tensor | None = None) -> Tensor:
    """G_free = G − lift(proj(G)) (PT:213). Coordinates: G with the chosen entries zeroed (the same value, exactly)."""
    if kind in SUBSPACE_PROJECTIONS:
        low = project_down(kind, state, g) if low is None else low
        return g - project_up(kind, state, low, g.shape)
    out = g.clone(memory_format=torch.contiguous_format)
    idx = state["indices"]
    if kind == "columns":
        out[:, idx] = 0
    elif kind == "rows":
        out[idx] = 0
    else:
        out.view(-1)[idx] = 0
    return out


def is_full_rank(kind: str, state: dict, shape) -> bool:
    if kind not in SUBSPACE_PROJECTIONS:
        return False
    P = state["ortho"]
    return P.shape[0] == P.shape[1] == (shape[1] if state["right"] else shape[0])


# -------------------------------------------------------------------------------------------------- the optimizer
def adam_update(grad: Tensor, state: dict, lr: float, betas, eps: float, correct_bias: bool) -> Tensor:
    """FRUGAL's Adam direction (AD:86-106); ``state["step"]`` already incremented."""
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)                   # AD:90
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)      # AD:91
    denom = exp_avg_sq.sqrt()                                           # AD:92
    step_size = lr
    if correct_bias:                                                    # AD:95-102
        bc1 = 1.0 - beta1 ** state["step"]
        bc2 = 1.0 - beta2 ** state["step"]
        step_size = lr / bc1
        denom.div_(bc2 ** 0.5)
    denom.add_(eps)                                                     # AD:104  ε after the correction
    return exp_avg / denom * (-step_size)                               # AD:106


def _fresh_moments(state: dict, like: Tensor) -> None:
    state["step"] = 0
    state["exp_avg"] = torch.zeros_like(like, memory_format=torch.contiguous_format)
    state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.contiguous_format)


def frugal_matrix_bytes(shape, e: int, opts: dict) -> int:
    """Analytic state bytes of one projectable m×n matrix (not blockwise): columns 2·m·c·e + 8·c (int64 indices),
    c = int(ρ·n); rows 2·c·n·e + 8·c, c = int(ρ·m); randk 2·c·e + 8·c, c = int(ρ·m·n); svd/random/randperm
    |P|·e + 2·|proj(G)|·e with r = round(ρ·side) (svd: min(r, m, n))."""
    kind, rho = opts["proj"], opts["density"]
    m, n = shape
    if kind in COORDINATE_PROJECTIONS:
        c = coordinate_count(shape, rho, kind)
        low = {"columns": m * c, "rows": c * n, "randk": c}[kind]
        return 2 * low * e + 8 * c
    pshape, lshape, _ = subspace_shapes(shape, rho, kind, opts["proj_side"])
    return (pshape[0] * pshape[1] + 2 * lshape[0] * lshape[1]) * e


class FRUGAL(HarnessOptimizer, Optimizer):
    """FRUGAL with an AdamW state-full part (see module docstring).

    ``params``: tensors or param-group dicts; a group with ``projectable=True`` gets the FRUGAL split with the
    constructor's options as defaults (each overridable per group), every other group plain AdamW (AD convention).
    ``inactive_update_rule`` is accepted as the official alias of ``state_free``.

    Harness (``build_optimizer("frugal", ...)``): defaults of spec §2 (blockwise ρ 0.25, T 200, descending,
    signSGD, scales 1); ``regular_signsgd`` = regular sub-groups (``embeddings`` | ``norms`` | ``logits``) moved to
    the state-free rule too — a projectable group at ρ = 0 (FRUGAL's ablation of which parameters need Adam).
    """

    group_options: ClassVar[dict] = dict(FRUGAL_GROUP_DEFAULTS)
    ctor_options: ClassVar[dict] = {"betas": (0.9, 0.999), "eps": 1e-8, "correct_bias": True, "seed": 0}
    linear_tags: ClassVar[dict] = {"projectable": True}
    invalid_examples: ClassVar[dict] = {"density": 1.5, "update_gap": -3, "proj": "diagonal",
                                        "state_free": "adagrad", "block_order": "sideways"}

    # ---- harness declarations (shared.pretrain.optim.base) ------------------------------------------------
    @classmethod
    def normalize(cls, params: dict) -> dict:
        if "inactive_update_rule" in params:
            if "state_free" in params:
                raise ValueError("give either state_free or its alias inactive_update_rule, not both "
                                 f"({params['state_free']!r} / {params['inactive_update_rule']!r})")
            params["state_free"] = params.pop("inactive_update_rule")
        return params

    @classmethod
    def check_options(cls, group: dict, linear) -> None:
        checked = {**group, "params": linear}
        check_frugal_group(checked)
        group["state_free"] = checked["state_free"]      # normalised spelling

    @classmethod
    def for_model(cls, groups: ParamGroups, lr: float, weight_decay: float = 0.0, **params):
        kept, moved = split_regular(groups, params.pop("regular_signsgd", ()), "regular_signsgd")
        lin = [p for _, p in groups.linear]
        reg = [p for _, p in kept]
        group, ctor = cls.resolve(params, lin)
        regular = [{"params": reg, "role": "regular"}] if reg else []
        if moved:
            regular.append({"params": [p for _, p in moved], "role": "regular", "projectable": True,
                            **{**group, "density": 0.0}})
        # FRUGAL PT:35-36: [regular, proj] groups
        return cls(regular + [{"params": lin, "role": "linear", "projectable": True, **group}], lr=lr,
                   weight_decay=weight_decay, **ctor)

    @classmethod
    def analytic_bytes(cls, groups: ParamGroups, refresh: int = 0, **params) -> dict[str, int]:
        kept, _ = split_regular(groups, params.pop("regular_signsgd", ()), "regular_signsgd")   # moved groups keep no state
        return super().analytic_bytes(ParamGroups(groups.linear, kept), refresh=refresh, **params)

    @classmethod
    def linear_state_bytes(cls, params, options, refresh=0) -> int:
        """Blockwise: 2·N·e for the round(ρ·#tensors) tensors active after refresh ``refresh``, 0 for the rest
        (ρ = 0: nothing); otherwise ``frugal_matrix_bytes`` per matrix."""
        if options["proj"] != "blockwise":
            return sum(frugal_matrix_bytes(p.shape, p.element_size(), options) for p in params)
        k = num_active_blocks(len(params), options["density"])
        gen, cursor = torch.Generator().manual_seed(options["seed"]), None
        for _ in range(refresh + 1):
            active, cursor = block_schedule(options["block_order"], len(params), k, cursor, gen)
        return adam_moment_bytes([params[i] for i in active])

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, correct_bias: bool = True, *,
                 proj: str = "blockwise", density: float = 0.25, update_gap: int = 200,
                 reset_statistics: bool = True, state_free: str = "signsgd", proj_lr_scale: float = 1.0,
                 free_lr_scale: float = 1.0, block_order: str = "descending", proj_side: str = "std",
                 inactive_update_rule: str | None = None, seed: int = 0):
        defaults = adam_defaults(lr, betas, eps, weight_decay, correct_bias)
        if inactive_update_rule is not None:
            state_free = inactive_update_rule
        self._frugal_defaults = {
            "proj": proj, "density": density, "update_gap": update_gap, "reset_statistics": reset_statistics,
            "state_free": state_free, "proj_lr_scale": proj_lr_scale, "free_lr_scale": free_lr_scale,
            "block_order": block_order, "proj_side": proj_side}
        check_frugal_group({**self._frugal_defaults, "params": []})      # bad defaults fail even if unused
        self._generator = torch.Generator().manual_seed(seed)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("projectable", False)
        if param_group["projectable"]:
            if "inactive_update_rule" in param_group:
                param_group["state_free"] = param_group.pop("inactive_update_rule")
            for k, v in self._frugal_defaults.items():
                param_group.setdefault(k, v)
            params = param_group["params"]
            param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
            check_frugal_group(param_group)
            for p in param_group["params"]:   # whole-tensor blocks need no matrix shape (norm weights at ρ = 0)
                if p.dim() != 2 and param_group["proj"] != "blockwise":
                    raise ValueError(f"FRUGAL's {param_group['proj']!r} projection needs 2-D weights, got shape "
                                     f"{tuple(p.shape)}")
            param_group.setdefault("frugal_step", 0)      # group clock: refresh when frugal_step % T == 0
            param_group.setdefault("block_cursor", None)  # next block start (PT:354-377)
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------------------------ checkpointing
    def state_dict(self):
        sd = super().state_dict()
        sd["generator"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        gen = state_dict.pop("generator", None)
        # torch casts every state tensor of a float param to the param dtype: int64 indices would become fp32
        # (inexact beyond 2**24); keep the saved ones (saved ids map to params in group order, as in torch)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(saved_ids, params))
        indices = {id_map[k]: v["indices"] for k, v in state_dict["state"].items() if "indices" in v}
        super().load_state_dict(state_dict)
        for p, idx in indices.items():
            self.state[p]["indices"] = idx.to(device=p.device, copy=True)
        if gen is not None:
            self._generator.set_state(gen)

    # ----------------------------------------------------------------------------------------------- refresh
    @torch.no_grad()
    def _refresh(self, group: dict) -> None:
        """Pick the next state-full subspace of a projectable group (PT:189-202, 259-273, 344-377)."""
        kind = group["proj"]
        if kind == "blockwise":
            params = group["params"]
            k = num_active_blocks(len(params), group["density"])
            active, group["block_cursor"] = block_schedule(group["block_order"], len(params), k,
                                                           group["block_cursor"], self._generator)
            active = set(active)
            for i, p in enumerate(params):
                state = self.state[p]
                if i in active:
                    if not (state.get("active") and not group["reset_statistics"]):
                        state.clear()                          # PT:332-335 (re)initialised Adam state
                        _fresh_moments(state, p)
                        state["active"] = True
                else:                                          # PT:338-342 inactive: state deleted
                    state.clear()
                    state["active"] = False
            return
        for p in group["params"]:
            if p.grad is not None:
                self._refresh_param(p, group)

    def _refresh_param(self, p: Tensor, group: dict) -> None:
        kind, state, grad = group["proj"], self.state[p], p.grad
        for key in ("right", "ortho", "indices"):
            state.pop(key, None)
        if kind in SUBSPACE_PROJECTIONS:
            state.update(build_subspace(kind, grad, group["density"], group["proj_side"], self._generator))
        else:
            state.update(build_coordinates(kind, grad, group["density"], self._generator))
        if "exp_avg" not in state or group["reset_statistics"]:   # PT:197-202 reset iff the flag
            _fresh_moments(state, project_down(kind, state, grad))

    # ------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            projectable = group["projectable"]
            if projectable:
                if group["frugal_step"] % group["update_gap"] == 0:     # PT:90-98
                    self._refresh(group)
                group["frugal_step"] += 1
            lr, betas, eps, cb = group["lr"], group["betas"], group["eps"], group["correct_bias"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("FRUGAL does not support sparse gradients")
                state = self.state[p]
                p.mul_(1 - lr * group["weight_decay"])                  # PT:135  weight decay first
                if not projectable:                                     # AD:130-141
                    if "exp_avg" not in state:
                        _fresh_moments(state, p)
                    state["step"] += 1
                    p.add_(adam_update(grad, state, lr, betas, eps, cb))
                else:
                    p.add_(self._projected_update(p, grad, state, group))
        return loss

    def _free_update(self, g_free: Tensor, group: dict) -> Tensor:
        """PT:214-219 / 386-390: state-free step on the residual."""
        free_lr = group["lr"] * group["proj_lr_scale"] * group["free_lr_scale"]
        if group["state_free"] == "signsgd":
            return -free_lr * g_free.sign()
        return -free_lr * g_free

    def _projected_update(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> Tensor:
        kind = group["proj"]
        active_lr = group["lr"] * group["proj_lr_scale"]                # PT:208
        betas, eps, cb = group["betas"], group["eps"], group["correct_bias"]
        if kind == "blockwise":                                         # PT:380-390
            if state.get("active"):
                state["step"] += 1
                return adam_update(grad, state, active_lr, betas, eps, cb)
            if group["state_free"] == "none":
                return torch.zeros_like(grad)
            return self._free_update(grad, group)
        if "exp_avg" not in state:        # first gradient of a tensor that had none at the last refresh
            self._refresh_param(p, group)
        low = project_down(kind, state, grad)                           # PT:207
        state["step"] += 1
        update = project_up(kind, state, adam_update(low, state, active_lr, betas, eps, cb), grad.shape)  # PT:209-210
        if group["state_free"] == "none" or is_full_rank(kind, state, grad.shape):
            return update
        return update.add_(self._free_update(residual(kind, state, grad, low), group))   # PT:213-219
