"""The optimizer harness of the pre-training family: every optimizer is a plain ``torch.optim.Optimizer`` that also
derives from ``HarnessOptimizer`` (``base``), registered by name in ``registry.OPTIMIZERS`` ("module:Class", imported
lazily: adding one = its file + one registry line), built on the shared param-group split
(``shared.pretrain.groups.param_groups``) and reporting its own analytic state bytes beside the measured ones
(MB = 1e6 bytes; see ``accounting``).

    build_optimizer(name, model, lr, weight_decay=0.0, **params) -> torch.optim.Optimizer
    state_bytes(optimizer, groups=None) -> {"total", "linear", "regular"}                  (measured)
    analytic_state_bytes(name, model, *, refresh=0, **params) -> {"total", "linear", "regular"}  (the class's formula)
    optimizer_class(name) -> the registered class (its ``group_options`` / ``ctor_options`` are the defaults)

Registered (defaults in each class): ``adamw`` (torch.optim.AdamW), ``galore`` (GaLore-AdamW, shared: every paper's
baseline), ``frugal`` (papers/frugal), ``fira`` (papers/fira), ``sinkgd`` / ``swan`` (papers/sinkgd). An unknown name
or option raises ValueError naming it; each class validates its own values.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from ..groups import REGULAR_KINDS, ParamGroups, param_groups
from .accounting import MB, state_bytes
from .base import HarnessOptimizer
from .galore import GaLoreAdamW
from .registry import OPTIMIZERS

__all__ = ["OPTIMIZERS", "REGULAR_KINDS", "MB", "GaLoreAdamW", "HarnessOptimizer", "build_optimizer",
           "optimizer_class", "state_bytes", "analytic_state_bytes", "ParamGroups", "param_groups"]


def optimizer_class(name: str) -> type[HarnessOptimizer]:
    """The registered class of ``name`` (case-insensitive); ValueError lists the known names."""
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    module, _, cls_name = OPTIMIZERS[name.lower()].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if not (issubclass(cls, HarnessOptimizer) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"registry entry {name!r} -> {OPTIMIZERS[name.lower()]} is not a HarnessOptimizer "
                        "torch.optim.Optimizer")
    return cls


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
                    **params) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` over ``param_groups(model)``: the projectable Linear weights get the
    method's options, the regular group Adam in the method's own convention. ValueError for an unknown name or
    option or a bad value (the message names it)."""
    return optimizer_class(name).for_model(param_groups(model), lr, weight_decay, **params)


def analytic_state_bytes(name: str, model: nn.Module, *, refresh: int = 0, **params) -> dict[str, int]:
    """The analytic optimizer-state bytes of ``build_optimizer(name, model, ..., **params)`` after its first step,
    from the class's own formula; ``refresh`` = k gives the state between the k-th refresh after step 0 and the
    next. ``lr`` / ``weight_decay`` may be passed and are ignored."""
    params.pop("lr", None)
    params.pop("weight_decay", None)
    return optimizer_class(name).analytic_bytes(param_groups(model), refresh=refresh, **params)
