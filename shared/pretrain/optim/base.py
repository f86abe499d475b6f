"""What every optimizer of the harness declares beside its ``torch.optim.Optimizer``: its options, how it is built
on the shared param-group split, and its own analytic state bytes. The harness (``shared.pretrain.optim``) holds no
optimizer-specific branch: ``build_optimizer`` / ``analytic_state_bytes`` call these class methods.

    class MyOpt(HarnessOptimizer, torch.optim.Optimizer):
        group_options = {"rank": 128}                 # options of the projectable Linear group (defaults)
        ctor_options = {"betas": (0.9, 0.999)}        # constructor options (defaults)
        invalid_examples = {"rank": -7}               # option -> a bad value (the generic test: ValueError names it)
        @classmethod
        def check_options(cls, group, linear): ...    # raise ValueError naming the bad value
        @classmethod
        def linear_state_bytes(cls, params, options, refresh=0): ...   # the formula for the Linear group

Groups (``build_optimizer``): ``regular`` (embeddings, norms, LM head: Adam in the optimizer's own convention)
first, then ``linear`` (the projectable Linear weights), each tagged with ``role``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..groups import ParamGroups


def adam_moment_bytes(params, step_tensor: bool = False) -> int:
    """2·N·e per parameter (two moments in the parameter dtype), + torch's scalar ``step`` tensor when the optimizer
    keeps one (torch.optim.AdamW: 4 B in the fp32 default dtype, 8 B when the default is fp64)."""
    step = (8 if torch.get_default_dtype() == torch.float64 else 4) if step_tensor else 0
    return sum(2 * p.numel() * p.element_size() + step for p in params)


class HarnessOptimizer:
    """Mixin of every registered optimizer (see module docstring)."""

    group_options: ClassVar[dict[str, Any]] = {}
    ctor_options: ClassVar[dict[str, Any]] = {}
    linear_tags: ClassVar[dict[str, Any]] = {}
    invalid_examples: ClassVar[dict[str, Any]] = {}
    #: regular parameters use torch's tensor ``step`` (torch.optim.AdamW convention) in their state
    regular_step_tensor: ClassVar[bool] = False

    # ---- options -----------------------------------------------------------------------------------------------
    @classmethod
    def normalize(cls, params: dict) -> dict:
        """Aliases -> canonical option names (default: none)."""
        return params

    @classmethod
    def check_options(cls, group: dict, linear: list[Tensor]) -> None:
        """Validate the Linear group's options in place (may normalise spellings); ValueError names the value."""

    @classmethod
    def resolve(cls, params: dict, linear: list[Tensor]) -> tuple[dict, dict]:
        """(Linear-group options, constructor options) from the user's ``params``; ValueError on an unknown one."""
        params = cls.normalize(dict(params))
        known = set(cls.group_options) | set(cls.ctor_options)
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for optimizer {cls.__name__}; known: {sorted(known)}")
        group = {k: params.get(k, v) for k, v in cls.group_options.items()}
        ctor = {k: params.get(k, v) for k, v in cls.ctor_options.items()}
        cls.check_options(group, linear)
        cls.check_ctor(ctor)
        return group, ctor

    @classmethod
    def check_ctor(cls, ctor: dict) -> None:
        """Adam hyper-parameters, checked before any optimizer exists (so the analytic count rejects them too)."""
        for b in ctor.get("betas", ()):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"invalid beta {b!r}; must be in [0, 1)")
        if "eps" in ctor and not ctor["eps"] >= 0.0:
            raise ValueError(f"invalid eps {ctor['eps']!r}; must be >= 0")

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, groups: ParamGroups, lr: float, weight_decay: float = 0.0, **params):
        """The optimizer over ``groups``: [regular (if any), linear with the method's options]."""
        lin = [p for _, p in groups.linear]
        reg = [p for _, p in groups.regular]
        group, ctor = cls.resolve(params, lin)
        regular = [{"params": reg, "role": "regular"}] if reg else []
        return cls(regular + [{"params": lin, "role": "linear", **cls.linear_tags, **group}], lr=lr,
                   weight_decay=weight_decay, **ctor)

    # ---- analytic state bytes ----------------------------------------------------------------------------------
    @classmethod
    def regular_state_bytes(cls, params: list[Tensor], options: dict) -> int:
        return adam_moment_bytes(params, cls.regular_step_tensor)

    @classmethod
    def linear_state_bytes(cls, params: list[Tensor], options: dict, refresh: int = 0) -> int:
        raise NotImplementedError(f"{cls.__name__} must give the analytic state bytes of its Linear group")

    @classmethod
    def analytic_bytes(cls, groups: ParamGroups, refresh: int = 0, **params) -> dict[str, int]:
        """The formula's {"total", "linear", "regular"} bytes after the first step (``refresh`` = k: between the
        k-th refresh after step 0 and the next, for optimizers whose state changes size at a refresh)."""
        lin = [p for _, p in groups.linear]
        group, ctor = cls.resolve(params, lin)
        options = {**ctor, **group}
        linear = cls.linear_state_bytes(lin, options, refresh=refresh)
        regular = cls.regular_state_bytes([p for _, p in groups.regular], options)
        return {"total": linear + regular, "linear": linear, "regular": regular}
