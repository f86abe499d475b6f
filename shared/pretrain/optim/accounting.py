"""Optimizer-state bytes: measured from the real tensors in ``optimizer.state`` and the analytic formula.

Convention: **MB = 1e6 bytes** (decimal). It is the one that reproduces the spec's anchors for the 7.36M ``tiny``
model (AdamW 8·7,358,720 B = 58.87e6 -> "58.9 MB"; in MiB it would read 56.1). ``MB`` below is that constant.

Measured (``state_bytes``): every tensor reachable from ``optimizer.state`` (moments, projectors, index tensors,
torch's scalar ``step`` tensors; nested lists/tuples/dicts followed), deduplicated by the data pointer of its
untyped storage and counted with the storage's ``nbytes()`` — so a view keeps the whole storage it pins alive.

Analytic (``analytic_state_bytes``), per parameter with numel N, element size e (the param dtype):
    adamw   2·N·e + s            s = torch's scalar step tensor (4 B in fp32 default dtype) per parameter
    galore  regular 2·N·e; projectable m×n, r' = min(r, m, n):
              right side (m ≥ n for "std"): r'·n (P) + 2·m·r' (moments); left side: m·r' + 2·r'·n
              ("full": m·r' + r'·n + 2·r'²)  — i.e. min(m,n)·r + 2·max(m,n)·r, the paper's m·r + 2·n·r (m ≤ n)
    frugal  regular 2·N·e; projectable:
              blockwise   2·N·e for the round(ρ·#tensors) tensors active (after refresh ``refresh``), 0 for the rest
              columns     2·m·c·e + 8·c (int64 indices), c = int(ρ·n); rows: 2·c·n·e + 8·c, c = int(ρ·m);
              randk       2·c·e + 8·c, c = int(ρ·m·n)
              svd/random/randperm   |P|·e + 2·|proj(G)|·e with r = round(ρ·side) (svd: min(r, m, n))
    FRUGAL ρ = 0 -> regular only (every projectable state tensor is empty).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..groups import ParamGroups
from .frugal import (COORDINATE_PROJECTIONS, block_schedule, coordinate_count, num_active_blocks,
                     subspace_shapes)
from .galore import galore_side

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
        if g.get("role") == "linear" or g.get("projectable") or g.get("rank") is not None:
            ids.update(id(p) for p in g["params"])
    return ids


def state_bytes(optimizer: torch.optim.Optimizer, groups: ParamGroups | None = None) -> dict[str, int]:
    """Measured optimizer-state bytes {"total", "linear", "regular"}; ``groups`` (from ``param_groups(model)``)
    says which parameters are the projectable Linear weights — without it the optimizer's group tags are used
    (``role`` set by ``build_optimizer``, ``projectable`` for FRUGAL, ``rank`` for GaLore)."""
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


def _step_tensor_bytes() -> int:
    """Bytes of torch.optim.AdamW's scalar ``step`` tensor (``_get_scalar_dtype``: fp64 iff the default is fp64)."""
    return 8 if torch.get_default_dtype() == torch.float64 else 4


def _galore_matrix_bytes(shape, e: int, rank: int, proj_type: str) -> int:
    m, n = shape
    r = min(rank, m, n)
    side = galore_side(shape, proj_type)
    if side == "right":
        return (r * n + 2 * m * r) * e
    if side == "left":
        return (m * r + 2 * r * n) * e
    return (m * r + r * n + 2 * r * r) * e


def _frugal_matrix_bytes(shape, e: int, opts: dict) -> int:
    kind, rho = opts["proj"], opts["density"]
    m, n = shape
    if kind in COORDINATE_PROJECTIONS:
        c = coordinate_count(shape, rho, kind)
        low = {"columns": m * c, "rows": c * n, "randk": c}[kind]
        return 2 * low * e + 8 * c
    pshape, lshape, _ = subspace_shapes(shape, rho, kind, opts["proj_side"])
    return (pshape[0] * pshape[1] + 2 * lshape[0] * lshape[1]) * e


def analytic_bytes(name: str, groups: ParamGroups, opts: dict, seed: int = 0, refresh: int = 0) -> dict[str, int]:
    """The formula of the module docstring for already-validated method options ``opts``, for the state between
    refresh number ``refresh`` (0 = the one at step 0) and the next: only blockwise FRUGAL depends on it."""
    lin = [p for _, p in groups.linear]
    reg = [p for _, p in groups.regular]
    step = _step_tensor_bytes() if name == "adamw" else 0
    regular = sum(2 * p.numel() * p.element_size() + step for p in reg)
    if name == "adamw":
        linear = sum(2 * p.numel() * p.element_size() + step for p in lin)
    elif name == "galore":
        linear = sum(_galore_matrix_bytes(p.shape, p.element_size(), opts["rank"], opts["proj_type"]) for p in lin)
    elif name == "frugal":
        if opts["proj"] == "blockwise":
            k = num_active_blocks(len(lin), opts["density"])
            gen, cursor = torch.Generator().manual_seed(seed), None
            for _ in range(refresh + 1):
                active, cursor = block_schedule(opts["block_order"], len(lin), k, cursor, gen)
            linear = sum(2 * lin[i].numel() * lin[i].element_size() for i in active)
        else:
            linear = sum(_frugal_matrix_bytes(p.shape, p.element_size(), opts) for p in lin)
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    return {"total": linear + regular, "linear": linear, "regular": regular}
