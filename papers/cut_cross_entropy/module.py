"""Cut Cross-Entropy (Wijmans et al., arXiv 2411.09009) — only what is new for this paper: fine-tuning a causal LM
through one :class:`CausalLMFineTune` whose loss is pluggable, so the baseline and Cut Cross-Entropy are compared
with everything else (model, data order, seed, optimizer) identical (the paper's convergence claim, §5).

Loss implementations (``impl``):

* ``"torch"`` — the baseline: the Hugging Face model's own loss, ``model(..., labels=...).loss``, which materialises
  the ``[B, T, V]`` logits and runs ``F.cross_entropy`` on them in fp32.
* ``"torch_chunked"`` / ``"triton"`` — :func:`kernels.linear_cross_entropy.linear_cross_entropy` on the final hidden
  states and the output-embedding weight (Eq. 1: ``ℓ_i = LSE_v(e_i·c_v) − e_i·c_{y_i}``, shifted as HF does).
  ``"triton"`` is the CCE kernel (blockwise LSE in SRAM, gradient filtering, optional vocabulary sorting; GPU, or
  the Triton interpreter on tiny shapes); ``"torch_chunked"`` is its exact PyTorch counterpart that keeps only the
  per-token LSE from the forward and recomputes logits block by block in the backward — chunked over *tokens*,
  with the whole vocabulary per block; exact by default, and with a numeric ``filter_eps`` it applies the Triton
  kernel's gradient filter (tiles of ``filter_block`` whose ``|S − Y|`` all fall below ``filter_eps`` are skipped),
  so the approximation runs on a CPU at the real vocabulary. Gemma's ``final_logit_softcapping`` is passed on.

The CPU convergence run trains only the last blocks. Because the frozen prefix gives the same features whatever the
loss, :func:`frozen_prefix_hidden` computes them once and :func:`trainable_suffix` is the same model with only the
last blocks, fed those features as ``inputs_embeds``: training it is exactly training the full model with the
prefix frozen (tested), at a fraction of the cost.
"""
from __future__ import annotations

import copy
from typing import Iterable

import lightning as L
import torch
from torch import Tensor, nn

from shared.models import decoder_layers

LOSS_IMPLS = ("torch", "torch_chunked", "triton")


def freeze_all_but_last(model: nn.Module, n_blocks: int) -> list[str]:
    """Freeze every parameter except those of the last ``n_blocks`` decoder blocks and the final norm.

    The (tied) embedding / LM head stays frozen. Returns the names of the trainable parameters."""
    layers = decoder_layers(model)
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or not 1 <= n_blocks <= len(layers):
        raise ValueError(f"n_blocks must be an int in [1, {len(layers)}], got {n_blocks!r}")
    model.requires_grad_(False)
    for layer in layers[len(layers) - n_blocks:]:
        layer.requires_grad_(True)
    model.base_model.norm.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def frozen_prefix_hidden(model: nn.Module, input_ids: Tensor, n_frozen: int) -> Tensor:
    """Hidden states entering block ``n_frozen`` (the output of the first ``n_frozen`` blocks) for ``input_ids``."""
    layers = decoder_layers(model)
    if isinstance(n_frozen, bool) or not isinstance(n_frozen, int) or not 1 <= n_frozen < len(layers):
        raise ValueError(f"n_frozen must be an int in [1, {len(layers) - 1}], got {n_frozen!r}")
    captured: list[Tensor] = []

    def hook(_module, _args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    config = model.base_model.config
    full = config.num_hidden_layers
    handle = layers[n_frozen - 1].register_forward_hook(hook)
    try:
        config.num_hidden_layers = n_frozen             # LlamaModel runs layers[:num_hidden_layers] only
        model.base_model(input_ids=input_ids, use_cache=False)
    finally:
        config.num_hidden_layers = full
        handle.remove()
    return captured[0]


def trainable_suffix(model: nn.Module, n_frozen: int) -> nn.Module:
    """A copy of ``model`` holding only blocks ``n_frozen:`` (plus the embedding, final norm and head), to be fed
    :func:`frozen_prefix_hidden` features as ``inputs_embeds``. Position ids default to ``0..T-1`` as in the full
    model, so RoPE is unchanged."""
    layers = decoder_layers(model)
    if isinstance(n_frozen, bool) or not isinstance(n_frozen, int) or not 1 <= n_frozen < len(layers):
        raise ValueError(f"n_frozen must be an int in [1, {len(layers) - 1}], got {n_frozen!r}")
    kept = list(layers[n_frozen:])
    model.base_model.layers = nn.ModuleList()           # do not deep-copy the prefix blocks
    try:
        suffix = copy.deepcopy(model)
    finally:
        model.base_model.layers = layers
    suffix.base_model.layers = nn.ModuleList(copy.deepcopy(kept))
    for i, layer in enumerate(suffix.base_model.layers):  # re-index for a KV cache sized to the suffix
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i
    suffix.config.num_hidden_layers = len(kept)
    if getattr(suffix.config, "layer_types", None):
        suffix.config.layer_types = list(suffix.config.layer_types)[n_frozen:]
    return suffix                                       # deepcopy keeps a tied head tied to the copied embedding


class CausalLMFineTune(L.LightningModule):
    """Fine-tunes the trainable parameters of a causal LM with AdamW (linear decay); only the loss ``impl`` varies.

    A batch is a dict with ``labels`` ``[B, T]`` and either ``input_ids`` or ``inputs_embeds`` ``[B, T, D]``.
    The training loss of every step is logged (``train/loss``) and kept in :attr:`step_losses`.
    """

    def __init__(self, model: nn.Module, impl: str = "torch", lr: float = 1e-4, weight_decay: float = 0.0,
                 total_steps: int = 100, chunk_size: int | None = None, filter_eps: str | float | None = "auto",
                 vocab_sort: bool = False, filter_block: tuple[int, int] | None = None):
        super().__init__()
        if impl not in LOSS_IMPLS:
            raise ValueError(f"impl must be one of {LOSS_IMPLS}, got {impl!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no trainable parameters; call freeze_all_but_last (or unfreeze) first")
        self.model = model
        self.impl, self.lr, self.weight_decay, self.total_steps = impl, float(lr), float(weight_decay), total_steps
        self.chunk_size, self.filter_eps, self.vocab_sort = chunk_size, filter_eps, vocab_sort
        self.filter_block = None if filter_block is None else tuple(filter_block)
        self.step_losses: list[float] = []

    @staticmethod
    def _inputs(batch: dict) -> dict:
        keys = [k for k in ("input_ids", "inputs_embeds") if batch.get(k) is not None]
        if len(keys) != 1 or "labels" not in batch:
            raise ValueError(f"batch needs 'labels' and exactly one of 'input_ids'/'inputs_embeds', got {sorted(batch)}")
        return {keys[0]: batch[keys[0]]}

    def loss(self, batch: dict) -> Tensor:
        """Mean next-token cross-entropy of the batch (HF's shift, ``ignore_index=-100``) under ``self.impl``."""
        inputs, labels = self._inputs(batch), batch["labels"]
        if self.impl == "torch":                        # baseline: HF materialises [B, T, V] logits
            return self.model(**inputs, labels=labels, use_cache=False).loss
        from kernels.linear_cross_entropy import linear_cross_entropy

        hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        kwargs = {"chunk_size": self.chunk_size} if self.impl == "torch_chunked" else {}
        return linear_cross_entropy(hidden.to(head.weight.dtype), head.weight, labels, getattr(head, "bias", None),
                                    ignore_index=-100, reduction="mean", shift=True, filter_eps=self.filter_eps,
                                    vocab_sort=self.vocab_sort, impl=self.impl, filter_block=self.filter_block,
                                    softcap=getattr(self.model.config, "final_logit_softcapping", None), **kwargs)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.step_losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["labels"].shape[0])
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    @torch.no_grad()
    def evaluate_windows(self, batches: Iterable[dict]) -> list[float]:
        """Each held-out sequence's own mean loss (one value per row of every batch): the cases of the paired
        convergence claim."""
        out = []
        for b in batches:
            for i in range(b["labels"].shape[0]):
                out.append(self.evaluate([{k: v[i:i + 1] for k, v in b.items()}]))
        return out

    def evaluate(self, batches: Iterable[dict]) -> float:
        """Token-weighted mean loss over ``batches`` (each batch's mean weighted by its scored tokens)."""
        was_training = self.model.training
        self.model.eval()
        total = count = 0.0
        for b in batches:
            n = float((b["labels"][:, 1:] != -100).sum())
            total += float(self.loss(b)) * n
            count += n
        self.model.train(was_training)
        if count == 0:
            raise ValueError("no scored tokens in the evaluation batches")
        return total / count


def fine_tune(model: nn.Module, batches: list[dict], impl: str, steps: int, lr: float, seed: int = 0,
              weight_decay: float = 0.0, chunk_size: int | None = None, logger=None,
              progress: bool = True, filter_eps: str | float | None = "auto",
              filter_block: tuple[int, int] | None = None) -> CausalLMFineTune:
    """Run ``steps`` AdamW steps over ``batches`` in their given order (cycled), seeded; returns the module.
    ``filter_eps`` / ``filter_block``: gradient filtering of the loss (see :class:`CausalLMFineTune`)."""
    if not batches:
        raise ValueError("batches must not be empty")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    L.seed_everything(seed, workers=True, verbose=False)
    module = CausalLMFineTune(model, impl=impl, lr=lr, weight_decay=weight_decay, total_steps=steps,
                              chunk_size=chunk_size, filter_eps=filter_eps, filter_block=filter_block)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=1,
                        logger=logger or False, enable_checkpointing=False, enable_progress_bar=progress,
                        enable_model_summary=False, deterministic=True, log_every_n_steps=1,
                        num_sanity_val_steps=0, max_epochs=-1)
    data = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    model.train()                                       # load_model returns eval mode (no dropout in Llama anyway)
    trainer.fit(module, data)
    return module


__all__ = ["LOSS_IMPLS", "CausalLMFineTune", "fine_tune", "freeze_all_but_last", "frozen_prefix_hidden",
           "trainable_suffix"]
