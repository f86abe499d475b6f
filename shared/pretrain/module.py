"""The one LightningModule of the pre-training harness: causal-LM pre-training of a model with any optimizer of the
family, GaLore/FRUGAL's warmup + cosine-to-10% schedule, held-out perplexity curve, measured step time.

The optimizer is injected as ``optimizer_factory(model) -> torch.optim.Optimizer`` (e.g.
``lambda m: build_optimizer("frugal", m, lr=1e-3, ...)`` from ``shared.pretrain.optim``), so this module knows no
optimizer. Data is a fixed batch order (``shared.pretrain.data.batch_order``): step ``i`` trains on
``train_windows[order[i]]``; under DDP each of the ``W`` ranks takes every ``W``-th row of that batch, so the global
batch — and the gradient, the mean over it — is the same as on one device.
"""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

OptimizerFactory = Callable[[nn.Module], Optimizer]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup ``step / warmup_steps`` from 0, then a half
    cosine from 1 down to ``min_ratio`` at ``total_steps`` (GaLore training_utils
    ``_get_cyclical_cosine_schedule_with_min_lr_lambda`` with one cycle = ``total_steps``; FRUGAL uses the same)."""
    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
    if not 0 < min_ratio <= 1:
        raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PretrainModule(L.LightningModule):
    """Trains ``model`` (an HF causal LM) on token windows with the loss of HF ``labels=input_ids``.

    Records, on every rank: ``train_losses`` (per step, mean over the global batch), ``lrs`` (first param group),
    ``step_seconds`` (forward + backward + optimizer step, synchronised on GPU), and ``curve`` — a list of
    ``{"step", "val_loss", "val_ppl"}`` at step 0, every ``val_every`` steps and at the end. Logs ``train_loss`` and
    ``lr`` per step, ``val_loss``/``val_ppl`` at each evaluation and ``seconds_per_step`` at the end."""

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerFactory, warmup_steps: int, total_steps: int,
                 val_windows: torch.Tensor | None = None, val_every: int = 0, min_ratio: float = 0.1,
                 val_batch_size: int = 8):
        super().__init__()
        warmup_cosine(0, warmup_steps, total_steps, min_ratio)  # validates the schedule
        if val_every < 0:
            raise ValueError(f"val_every must be >= 0 (0: only at start and end), got {val_every}")
        if val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {val_batch_size}")
        if val_windows is not None and (val_windows.dim() != 2 or val_windows.shape[1] < 2):
            raise ValueError(f"val_windows must be [n, seq_len >= 2], got shape {tuple(val_windows.shape)}")
        self.model = model
        self.optimizer_factory = optimizer_factory
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.val_windows, self.val_every, self.val_batch_size = val_windows, val_every, val_batch_size
        self.train_losses: list[float] = []
        self.lrs: list[float] = []
        self.step_seconds: list[float] = []
        self.curve: list[dict] = []
        self.final_window_losses: list[float] = []     # per validation window, at the last evaluation
        self._t0 = 0.0

    # ---- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.model)
        if not isinstance(opt, Optimizer):
            raise ValueError(f"optimizer_factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
        lam = partial(warmup_cosine, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                      min_ratio=self.min_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        mean = loss.detach()
        if self.trainer.world_size > 1:
            mean = self.all_gather(mean).mean()
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.train_losses.append(float(mean))
        self.lrs.append(float(lr))
        self.log("train_loss", mean, on_step=True, on_epoch=False, prog_bar=True, rank_zero_only=True)
        self.log("lr", float(lr), on_step=True, on_epoch=False, rank_zero_only=True)
        return loss

    # ---- timing -------------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._sync()
        self.step_seconds.append(time.perf_counter() - self._t0)
        if self.val_every and self.global_step % self.val_every == 0:
            self._record_validation()

    @property
    def seconds_per_step(self) -> float:
        """Mean wall time of a training step, the first (allocator/lazy-init warm-up) excluded when possible."""
        if not self.step_seconds:
            return float("nan")
        times = self.step_seconds[1:] or self.step_seconds
        return sum(times) / len(times)

    # ---- validation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """``{"val_loss", "val_ppl", "per_window"}``: mean next-token cross-entropy over every predicted token of the
        held-out windows (all of them, on every rank), its exp, and each window's own mean loss (the cases of the
        paired claims)."""
        if self.val_windows is None:
            raise ValueError("no val_windows were given")
        was_training = self.model.training
        self.model.eval()
        ctx = self._trainer.precision_plugin.forward_context() if self._trainer is not None else _nullcontext()
        total, count, per_window = 0.0, 0, []
        with ctx:
            for chunk in self.val_windows.split(self.val_batch_size):
                chunk = chunk.to(self.device)
                logits = self.model(input_ids=chunk).logits[:, :-1]
                targets = chunk[:, 1:]
                nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
                nll = nll.view(targets.shape)
                total += nll.sum().item()
                count += targets.numel()
                per_window += nll.mean(1).tolist()
        self.model.train(was_training)
        val_loss = total / count
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "per_window": per_window}

    def _record_validation(self) -> None:
        if self.val_windows is None or (self.curve and self.curve[-1]["step"] == self.global_step):
            return
        point = {"step": int(self.global_step), **self.evaluate()}
        self.final_window_losses = point.pop("per_window")
        self.curve.append(point)
        if self.logger is not None:
            self.logger.log_metrics({"val_loss": point["val_loss"], "val_ppl": point["val_ppl"]}, step=point["step"])

    def on_train_start(self) -> None:
        self._record_validation()

    def on_train_end(self) -> None:
        self._record_validation()
        if self.logger is not None and self.step_seconds:
            self.logger.log_metrics({"seconds_per_step": self.seconds_per_step}, step=int(self.global_step))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _OrderedBatches(Dataset):
    """Item ``i`` = this rank's share of batch ``i``: ``windows[order[i, rank::world]]``."""

    def __init__(self, train_windows: torch.Tensor, order: torch.Tensor, rank: int, world: int):
        self.windows, self.order, self.rank, self.world = train_windows, order, rank, world

    def __len__(self) -> int:
        return self.order.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.windows[self.order[i, self.rank::self.world]]


class OrderedBatchData(L.LightningDataModule):
    """Serves a fixed batch order, split across DDP ranks by row (built once the trainer knows its rank)."""

    def __init__(self, train_windows: torch.Tensor, order: torch.Tensor):
        super().__init__()
        self.train_windows, self.order = train_windows, order

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if self.order.shape[1] % world:
            raise ValueError(f"batch size {self.order.shape[1]} is not divisible by the {world} devices")
        return DataLoader(_OrderedBatches(self.train_windows, self.order, rank, world), batch_size=None,
                          shuffle=False, num_workers=0)


def pretrain(model: nn.Module, optimizer_factory: OptimizerFactory, train_windows: torch.Tensor, order: torch.Tensor,
             val_windows: torch.Tensor | None, warmup_steps: int, total_steps: int, val_every: int, seed: int,
             logger=None, strategy: str = "auto", devices: int = 1, progress: bool = True,
             precision: str = "32-true", deterministic: bool | str = True, min_ratio: float = 0.1,
             val_batch_size: int = 8) -> PretrainModule:
    """Pre-train ``model`` for ``len(order)`` steps with a Lightning ``Trainer`` (no checkpointing, deterministic,
    CPU accelerator when no CUDA) and return the trained :class:`PretrainModule` (its ``model`` is trained in place).

    ``train_windows``: ``[N, seq_len]`` token ids; ``order``: ``[steps, batch_size]`` indices into it (from
    :func:`shared.pretrain.data.batch_order`); ``logger``: a Lightning logger (e.g.
    ``shared.tracking.lightning_logger``), which also receives ``order_hash``, ``seed`` and the schedule."""
    from shared.pretrain.data import order_hash

    if train_windows.dim() != 2 or train_windows.dtype != torch.long:
        raise ValueError(f"train_windows must be a 2-D LongTensor, got {train_windows.dtype} "
                         f"{tuple(train_windows.shape)}")
    if order.dim() != 2 or order.numel() == 0:
        raise ValueError(f"order must be a non-empty [steps, batch_size] tensor, got shape {tuple(order.shape)}")
    if int(order.min()) < 0 or int(order.max()) >= train_windows.shape[0]:
        raise ValueError(f"order indexes windows {int(order.min())}..{int(order.max())}, "
                         f"but only {train_windows.shape[0]} train windows exist")
    if val_windows is not None and val_windows.shape[1] > getattr(model.config, "max_position_embeddings", 1 << 30):
        raise ValueError(f"val windows of {val_windows.shape[1]} tokens exceed the model's max positions")
    L.seed_everything(seed, workers=True, verbose=False)
    module = PretrainModule(model, optimizer_factory, warmup_steps, total_steps, val_windows, val_every,
                            min_ratio=min_ratio, val_batch_size=val_batch_size)
    module.order_hash = order_hash(order)
    if logger is not None:
        logger.log_hyperparams({"order_hash": module.order_hash, "seed": seed, "steps": order.shape[0],
                                "batch_size": order.shape[1], "seq_len": train_windows.shape[1],
                                "warmup_steps": warmup_steps, "total_steps": total_steps, "min_ratio": min_ratio,
                                "val_every": val_every})
    trainer = L.Trainer(max_steps=order.shape[0], max_epochs=1,
                        accelerator="cpu" if not torch.cuda.is_available() else "auto", devices=devices,
                        strategy=strategy, precision=precision, logger=logger or False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, deterministic=deterministic,
                        log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=OrderedBatchData(train_windows, order))
    return module
