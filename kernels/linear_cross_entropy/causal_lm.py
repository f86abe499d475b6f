"""Drop-in Cut Cross-Entropy loss for a Hugging Face causal LM (no ``[B, T, V]`` logits are ever built).

``causal_lm_loss(model, input_ids, labels)`` equals ``model(input_ids, labels=labels).loss``: it runs the base
model (``model.base_model``, e.g. ``LlamaModel``) for the final hidden states and calls
:func:`kernels.linear_cross_entropy.linear_cross_entropy` with the output-embedding weight (the tied input embedding
when ``tie_word_embeddings``), ``shift=True`` and ``ignore_index=-100``, as ``transformers``' ``ForCausalLMLoss``.
A model with ``config.final_logit_softcapping`` (Gemma 2/3: ``logits = s · tanh(logits / s)``) gets ``softcap=s``.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

#: config attributes that change the logits beyond ``softcap(h @ Wᵀ + b)`` and their no-op values; a model with any
#: other value is refused rather than mis-scored (Cohere ``logit_scale``, Granite scaling). Gemma's
#: ``final_logit_softcapping`` is supported (passed as ``softcap``).
_LOGIT_TRANSFORM_NOOPS = {"logit_scale": (None, 1.0), "logits_scaling": (None, 1.0)}


def causal_lm_loss(model: nn.Module, input_ids: Tensor, labels: Tensor, *, attention_mask: Tensor | None = None,
                   impl: str = "triton", ignore_index: int = -100, reduction: str = "mean",
                   filter_eps: str | float | None = "auto", vocab_sort: bool = False,
                   num_items_in_batch: int | Tensor | None = None, **model_kwargs: Any) -> Tensor:
    """Causal-LM loss of ``model`` on ``input_ids`` / ``labels`` through linear cross-entropy (Eq. (L), shifted).

    Args:
        model: a ``transformers`` ``*ForCausalLM`` whose logits are ``lm_head(hidden)``, optionally soft-capped by
            ``config.final_logit_softcapping`` (no other scaling).
        input_ids: ``[B, T]`` token ids.
        labels: ``[B, T]`` int64; position ``t`` is scored against ``labels[:, t + 1]``; ``ignore_index`` masks.
        attention_mask: optional ``[B, T]`` mask passed to the base model.
        impl, filter_eps, vocab_sort: see :func:`kernels.linear_cross_entropy.linear_cross_entropy`.
        reduction: ``"mean"`` / ``"sum"`` / ``"none"`` (``[B, T - 1]``).
        num_items_in_batch: if given (gradient accumulation, as in ``transformers``), the loss is the sum divided by
            it, and ``reduction`` must be ``"mean"``.
        **model_kwargs: passed to the base model (e.g. ``position_ids``).
    """
    from kernels.linear_cross_entropy import linear_cross_entropy

    if not isinstance(model, nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"model must be a transformers causal LM (nn.Module with get_output_embeddings), got "
                         f"{type(model).__name__}")
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"model.get_output_embeddings() must return a layer with a [V, D] weight, got {head!r}")
    config = getattr(model, "config", None)
    for attr, noops in _LOGIT_TRANSFORM_NOOPS.items():
        val = getattr(config, attr, None)
        if val not in noops:
            raise ValueError(f"model config has {attr}={val!r}; causal_lm_loss supports only logits = h @ Wᵀ + b "
                             f"({attr} must be one of {noops})")
    softcap = getattr(config, "final_logit_softcapping", None)
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch needs reduction='mean', got reduction={reduction!r}")

    base = model.base_model
    model_kwargs.setdefault("use_cache", False)
    out = base(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    weight = head.weight
    bias = getattr(head, "bias", None)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    red = "sum" if num_items_in_batch is not None else reduction
    loss = linear_cross_entropy(hidden, weight, labels.to(hidden.device), bias, ignore_index=ignore_index,
                                reduction=red, shift=True, filter_eps=filter_eps, vocab_sort=vocab_sort, impl=impl,
                                softcap=softcap)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


__all__ = ["causal_lm_loss"]
