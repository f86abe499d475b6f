"""The param-group builder every optimizer of the family shares (GaLore torchrun_main.py:264-281; FRUGAL PT:11-36):

    linear   the weight matrices of the attention and MLP Linear layers (module name contains ``self_attn`` or
             ``mlp``) — the *projectable* tensors that get low-rank / block / state-free treatment
    regular  everything else: token embeddings, RMSNorm weights, the LM head — always plain AdamW
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

PROJECTABLE = ("self_attn", "mlp")
#: regular sub-groups an optimizer may move off Adam (FRUGAL's ablation of which regular parameters need Adam)
REGULAR_KINDS = {"embeddings": ("embed_tokens",), "norms": ("norm",), "logits": ("lm_head",)}


@dataclass
class ParamGroups:
    linear: list[tuple[str, nn.Parameter]]
    regular: list[tuple[str, nn.Parameter]]

    def numel(self, which: str) -> int:
        return sum(p.numel() for _, p in getattr(self, which))


def param_groups(model: nn.Module) -> ParamGroups:
    """Split ``model``'s trainable parameters into projectable Linear weights and the rest (names kept, model
    order). Raises ``ValueError`` when the model has no projectable Linear weight."""
    linear_ids = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(k in name.split(".") for k in PROJECTABLE):
            linear_ids.add(id(mod.weight))
    linear, regular = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (linear if id(p) in linear_ids else regular).append((name, p))
    if not linear:
        raise ValueError(f"{type(model).__name__} has no Linear weight under a module named {PROJECTABLE}")
    return ParamGroups(linear, regular)


def split_regular(groups: ParamGroups, kinds, option: str = "regular groups") -> tuple[list, list]:
    """(kept, moved) regular (name, parameter) pairs: ``kinds`` names sub-groups of ``REGULAR_KINDS``
    (matched by name fragment). ValueError for an unknown kind or a kind matching no parameter."""
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in REGULAR_KINDS]
    if bad:
        raise ValueError(f"{option} must name groups in {sorted(REGULAR_KINDS)}, got {bad}")
    frags = [f for k in kinds for f in REGULAR_KINDS[k]]
    moved = [(n, p) for n, p in groups.regular if any(f in n for f in frags)]
    kept = [(n, p) for n, p in groups.regular if not any(f in n for f in frags)]
    if kinds and not moved:
        raise ValueError(f"{option}={list(kinds)} matches no parameter of the model")
    return kept, moved
