"""torch.optim.AdamW on the harness (the family's full-state baseline): every parameter keeps two moments in its
dtype plus torch's scalar ``step`` tensor — 2·N·e + 4 bytes per parameter (fp32 default dtype)."""
from __future__ import annotations

from typing import ClassVar

import torch

from .base import HarnessOptimizer, adam_moment_bytes


class AdamW(HarnessOptimizer, torch.optim.AdamW):
    """``torch.optim.AdamW`` unchanged (same class, same math), with the harness's declarations."""

    ctor_options: ClassVar[dict] = {"betas": (0.9, 0.999), "eps": 1e-8}
    invalid_examples: ClassVar[dict] = {"eps": -0.125}
    regular_step_tensor: ClassVar[bool] = True

    @classmethod
    def linear_state_bytes(cls, params, options, refresh=0) -> int:
        return adam_moment_bytes(params, step_tensor=True)
