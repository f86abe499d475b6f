"""pytorch-optimizer 4.1.0's port of Fira (``pytorch_optimizer.Fira``, Apache-2.0) on the harness, for a
side-by-side row: the same algorithm, except that its step counter starts at 1, so the projector is refreshed one
step earlier (steps T, 2T, … instead of the official T + 1, 2T + 1, …), and its Adam uses ``lerp_``.

Its projector lives in a Python object (``state["projector"]``), invisible to tensor accounting; after every step
the object's matrix is referenced from ``state["ortho"]`` (no copy), so the measured bytes count it. The state is
then exactly our Fira's: GaLore's projector (a compact clone, r×n or m×r) + two low-rank moments + the limiter's scalar
per matrix, and 2·N·e for the regular parameters (the step counter is a group integer).
"""
from __future__ import annotations

from typing import ClassVar

from shared.pretrain.optim.base import HarnessOptimizer
from shared.pretrain.optim.galore import check_galore_group, galore_matrix_bytes

try:
    from pytorch_optimizer import Fira as _Fira
except ImportError as err:                     # a test/reference dependency, installed by `make setup`
    raise ImportError("pytorch-optimizer is needed for this row: pip install --no-deps pytorch-optimizer==4.1.0") \
        from err


class PytorchOptimizerFira(HarnessOptimizer, _Fira):
    group_options: ClassVar[dict] = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "projection_type": "std"}
    ctor_options: ClassVar[dict] = {"betas": (0.9, 0.999), "eps": 1e-6}
    invalid_examples: ClassVar[dict] = {"rank": -7, "update_proj_gap": -3}

    @classmethod
    def check_options(cls, group: dict, linear) -> None:
        check_galore_group({**group, "proj_type": group["projection_type"]})

    @classmethod
    def linear_state_bytes(cls, params, options, refresh=0) -> int:
        return sum(galore_matrix_bytes(p.shape, p.element_size(), options["rank"], options["projection_type"])
                   + p.element_size() for p in params)

    def step(self, closure=None):
        loss = super().step(closure)
        for st in self.state.values():
            if "projector" in st:
                st["ortho"] = st["projector"].ortho_matrix       # a reference: the measured bytes see it
        return loss
