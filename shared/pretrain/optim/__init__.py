"""Optimizer registry of the pre-training harness: AdamW, GaLore-AdamW and FRUGAL, all plain
``torch.optim.Optimizer``s, built on the shared param-group split (``shared.pretrain.groups.param_groups``) and
reporting their state bytes (measured and analytic, MB = 1e6 bytes; see ``accounting``).

    build_optimizer(name, model, lr, weight_decay=0.0, **params) -> torch.optim.Optimizer
    state_bytes(optimizer, groups=None) -> {"total", "linear", "regular"}        (measured)
    analytic_state_bytes(name, model, *, refresh=0, **params) -> {"total", "linear", "regular"} (formula)

``params`` per name (defaults in brackets; anything else raises ValueError naming it):
    adamw   betas [(0.9, 0.999)], eps [1e-8]                                          torch.optim.AdamW
    galore  rank [128], update_proj_gap [200], scale [0.25], proj_type ["std"],
            betas, eps [1e-6 = galore_torch default], correct_bias [True]              GaLoreAdamW
    frugal  proj ["blockwise"], density [0.25], update_gap [200], reset_statistics [True], state_free ["signsgd"]
            (alias inactive_update_rule), proj_lr_scale [1.0], free_lr_scale [1.0], block_order ["descending"],
            proj_side ["std"], seed [0], betas, eps [1e-8], correct_bias [True]          FRUGAL
Defaults follow the papers' pre-training recipes (GaLore App. C.1: r 128 at 60M, T 200, α 0.25; FRUGAL spec §2:
blockwise ρ 0.25, T 200, descending, signSGD, scales 1). Groups: ``regular`` (embeddings, norms, LM head; plain AdamW
in the method's own Adam convention) first, then ``linear`` (the projectable Linear weights); each group is tagged
with ``role`` = "regular" / "linear".
"""
from __future__ import annotations

import torch
from torch import nn

from ..groups import ParamGroups, param_groups
from .accounting import MB, analytic_bytes, state_bytes
from .frugal import FRUGAL, FRUGAL_GROUP_DEFAULTS, check_frugal_group
from .galore import GaLoreAdamW, check_galore_group

__all__ = ["OPTIMIZERS", "REGULAR_KINDS", "MB", "FRUGAL", "GaLoreAdamW", "build_optimizer", "state_bytes", "analytic_state_bytes",
           "ParamGroups", "param_groups"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "galore": GaLoreAdamW,
    "frugal": FRUGAL,
}

# per-name: options of the projectable group, options of the whole optimizer
_GROUP_DEFAULTS = {
    "adamw": {},
    "galore": {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    "frugal": dict(FRUGAL_GROUP_DEFAULTS),
}
_CTOR_DEFAULTS = {
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8},
    "galore": {"betas": (0.9, 0.999), "eps": 1e-6, "correct_bias": True},
    "frugal": {"betas": (0.9, 0.999), "eps": 1e-8, "correct_bias": True, "seed": 0},
}


def _resolve(name: str, linear_params: list, params: dict) -> tuple[str, dict, dict]:
    """Validate ``name`` and ``params``; returns (name, projectable-group options, constructor options)."""
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    name = name.lower()
    params = dict(params)
    if name == "frugal" and "inactive_update_rule" in params:
        if "state_free" in params:
            raise ValueError("give either state_free or its alias inactive_update_rule, not both "
                             f"({params['state_free']!r} / {params['inactive_update_rule']!r})")
        params["state_free"] = params.pop("inactive_update_rule")
    unknown = sorted(set(params) - set(_GROUP_DEFAULTS[name]) - set(_CTOR_DEFAULTS[name]))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for optimizer {name!r}; "
                         f"known: {sorted(set(_GROUP_DEFAULTS[name]) | set(_CTOR_DEFAULTS[name]))}")
    group = {k: params.get(k, v) for k, v in _GROUP_DEFAULTS[name].items()}
    ctor = {k: params.get(k, v) for k, v in _CTOR_DEFAULTS[name].items()}
    if name == "galore":
        check_galore_group(group)
    elif name == "frugal":
        checked = {**group, "params": linear_params}
        check_frugal_group(checked)
        group["state_free"] = checked["state_free"]      # normalised spelling
    return name, group, ctor


#: regular sub-groups FRUGAL's ablation can move from Adam to the state-free rule (which need Adam: claim (c))
REGULAR_KINDS = {"embeddings": ("embed_tokens",), "norms": ("norm",), "logits": ("lm_head",)}


def _split_regular(groups: ParamGroups, kinds) -> tuple[list, list]:
    """(kept on Adam, moved to the state-free rule) regular parameters, by ``REGULAR_KINDS`` name fragments."""
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in REGULAR_KINDS]
    if bad:
        raise ValueError(f"regular_signsgd must name groups in {sorted(REGULAR_KINDS)}, got {bad}")
    frags = [f for k in kinds for f in REGULAR_KINDS[k]]
    moved = [(n, p) for n, p in groups.regular if any(f in n for f in frags)]
    kept = [(n, p) for n, p in groups.regular if not any(f in n for f in frags)]
    if kinds and not moved:
        raise ValueError(f"regular_signsgd={list(kinds)} matches no parameter of the model")
    return kept, moved


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
                    **params) -> torch.optim.Optimizer:
    """Build a registry optimizer over ``param_groups(model)``: the projectable Linear weights get the method's
    options, the regular group plain AdamW (in the method's Adam convention). ValueError for an unknown name or
    parameter, ρ outside [0, 1], T ≤ 0, or an unknown rule / projector / order / side.

    ``regular_signsgd`` (FRUGAL only; FRUGAL's ablation of which regular parameters need Adam): regular groups
    (``embeddings`` | ``norms`` | ``logits``) updated by the state-free rule too — a projectable group at ρ = 0."""
    groups = param_groups(model)
    kinds = params.pop("regular_signsgd", ())
    if kinds and str(name).lower() != "frugal":
        raise ValueError(f"regular_signsgd is a FRUGAL option, got optimizer {name!r}")
    kept, moved = _split_regular(groups, kinds)
    lin = [p for _, p in groups.linear]
    reg = [p for _, p in kept]
    name, gopts, ctor = _resolve(name, lin, params)
    regular_group = [{"params": reg, "role": "regular"}] if reg else []
    if moved:
        regular_group.append({"params": [p for _, p in moved], "role": "regular", "projectable": True,
                              **{**gopts, "density": 0.0}})
    if name == "adamw":
        return torch.optim.AdamW(regular_group + [{"params": lin, "role": "linear"}], lr=lr,
                                 weight_decay=weight_decay, **ctor)
    if name == "galore":   # GaLore torchrun_main.py:280-281, 296: [regular, galore] groups
        return GaLoreAdamW(regular_group + [{"params": lin, "role": "linear", **gopts}], lr=lr,
                           weight_decay=weight_decay, **ctor)
    # FRUGAL PT:35-36: [regular, proj] groups
    return FRUGAL(regular_group + [{"params": lin, "role": "linear", "projectable": True, **gopts}], lr=lr,
                  weight_decay=weight_decay, **ctor)


def analytic_state_bytes(name: str, model: nn.Module, *, refresh: int = 0, **params) -> dict[str, int]:
    """The analytic optimizer-state bytes of ``build_optimizer(name, model, ..., **params)`` after its first step
    (formula in ``accounting``); ``refresh`` = k gives the state between the k-th refresh after step 0 and the next
    (it only matters for blockwise FRUGAL, whose active tensors change size). ``lr`` / ``weight_decay`` may be
    passed and are ignored."""
    params.pop("lr", None)
    params.pop("weight_decay", None)
    groups = param_groups(model)
    kept, _ = _split_regular(groups, params.pop("regular_signsgd", ()))   # moved groups keep no state
    groups = ParamGroups(groups.linear, kept)
    name, gopts, ctor = _resolve(name, [p for _, p in groups.linear], params)
    return analytic_bytes(name, groups, gopts, seed=ctor.get("seed", 0), refresh=refresh)
