"""Optimizer-state bytes: measured from the real tensors in ``optimizer.state`` and the analytic formula.

Convention: **MB = 1e6 bytes** (decimal). It is the one that reproduces the spec's anchors for the 7.36M ``tiny``
model (AdamW 8·7,358,720 B = 58.87e6 -> "58.9 MB"; in MiB it would read 56.1). ``MB`` below is that constant.

Measured (``state_bytes``): every tensor reachable from ``optimizer.state`` (moments, projectors, index tensors,
torch's scalar ``step`` tensors; nested lists/tuples/dicts followed), deduplicated by the data pointer of its
untyped storage and counted with the storage's ``nbytes()`` — so a view keeps the whole storage it pins alive.

Analytic: each optimizer class states its own formula (``HarnessOptimizer.linear_state_bytes``, beside its code);
``shared.pretrain.optim.analytic_state_bytes`` calls it. The generic test checks measured = analytic for every
registered optimizer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..groups import ParamGroups

MB = 1_000_000


def _tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _linear_ids(optimizer: torch.optim.Optimizer, groups: ParamGroups | None) -> set[int]:
    if groups is not None:
        return {id(p) for _, p in groups.linear}
    ids = set()
    for g in optimizer.param_groups:
        if g.get("role") == "linear":
            ids.update(id(p) for p in g["params"])
    return ids


def state_bytes(optimizer: torch.optim.Optimizer, groups: ParamGroups | None = None) -> dict[str, int]:
    """Measured optimizer-state bytes {"total", "linear", "regular"}; ``groups`` (from ``param_groups(model)``)
    says which parameters are the projectable Linear weights — without it the groups tagged ``role="linear"`` (as
    ``build_optimizer`` tags them) are."""
    linear = _linear_ids(optimizer, groups)
    out = {"linear": 0, "regular": 0}
    seen: set[tuple] = set()
    for p, st in optimizer.state.items():
        which = "linear" if id(p) in linear else "regular"
        for t in _tensors(st):
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            key = (t.device, storage.data_ptr())
            if nbytes == 0 or key in seen:
                continue
            seen.add(key)
            out[which] += nbytes
    out["total"] = out["linear"] + out["regular"]
    return {"total": out["total"], "linear": out["linear"], "regular": out["regular"]}
