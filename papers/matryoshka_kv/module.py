"""MatryoshkaKV (arXiv 2410.14731): Matryoshka training of the orthogonal K/V projections and the greedy rank search.

What is new in this paper lives here (the rank sampler, the K/V calibration statistics, the W_V/W_O fold, the
channel split); the projections, the latent-space attention and cache, the PCA calibration and
the rank/budget helpers are shared (``shared.cache.orthogonal``), as is the partial re-forward
(``shared.partial_forward``).

Training (paper §3.2; official trainer.py:443-471). Every step, for every (layer, KV head) and for K and V
independently, draw r ~ U{d/8, 2d/8, …, d}; then

    loss = 0.25 · KL(p_teacher ‖ p_student) + 0.75 · CE(student, next token)

with KL summed over the vocabulary (T = 1) and averaged over tokens, the teacher = the same frozen model without
projections. Only X_K, X_V (U = Cayley(X)) and μ_K, μ_V are trained; the base weights never change.

Rank search (paper Algorithm 1): start at r = d everywhere; each round tentatively lower every (layer, head, K|V)
entry by Δr, score each candidate by KL(p_base ‖ p_candidate) on calibration text, and lower the least harmful
``per_round`` entries (paper: 1; the released code batches 64·24); stop below the smallest target budget. The
released code's variant (relative L2 of the last hidden state against the *current* configuration) is
``criterion="hidden_l2"``. Candidates at layer l re-run only layers ≥ l from the cached hidden state entering l.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shared.cache.orthogonal import (KV, KVProjection, LayerBases, budget_of, check_budget, default_step, project_kv,
                                     uniform_ranks)
from shared.metrics import kl_divergence
from shared.partial_forward import capture_layer_inputs, forward_from

CRITERIA = ("kl", "hidden_l2")


def sample_ranks(n_layers: int, n_kv_heads: int, head_dim: int, generator: torch.Generator,
                 step: int | None = None) -> torch.Tensor:
    """Matryoshka training's sampler: every (layer, head, K/V) independently uniform on {step, 2·step, …, d}."""
    step = default_step(head_dim) if step is None else step
    return torch.randint(1, head_dim // step + 1, (n_layers, n_kv_heads, 2), generator=generator) * step


@torch.no_grad()
def kv_statistics(model, batches: list[torch.Tensor], progress: bool = True) -> dict[str, torch.Tensor]:
    """Per (layer, KV head) mean and covariance of post-RoPE keys and of values, read from the HF cache of each
    batch of token ids ([B, T], no padding). Returns fp64 ``mean_k/mean_v`` [L, H, d], ``cov_k/cov_v`` [L, H, d, d]
    and ``tokens``."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    if not batches:
        raise ValueError("kv_statistics needs at least one batch of token ids")
    sums: dict[str, torch.Tensor] = {}
    n = 0
    device = next(model.parameters()).device
    for ids in tqdm(batches, desc="K/V statistics", disable=not progress, leave=False):
        cache = DynamicCache()
        model(input_ids=ids.to(device), past_key_values=cache, use_cache=True)
        for kind, attr in (("k", "keys"), ("v", "values")):
            x = torch.stack([getattr(l, attr) for l in cache.layers]).double()      # [L, B, H, T, d]
            x = x.permute(0, 2, 1, 3, 4).flatten(2, 3)                             # [L, H, N, d]
            sums[f"s_{kind}"] = sums.get(f"s_{kind}", 0) + x.sum(2)
            sums[f"ss_{kind}"] = sums.get(f"ss_{kind}", 0) + x.mT @ x
        n += ids.numel()
    out = {"tokens": torch.tensor(n)}
    for kind in KV:
        mean = sums[f"s_{kind}"] / n
        out[f"mean_{kind}"] = mean
        out[f"cov_{kind}"] = sums[f"ss_{kind}"] / n - mean[..., :, None] * mean[..., None, :]
    return out


def fold_values(W_v: torch.Tensor, b_v: torch.Tensor | None, W_o: torch.Tensor, b_o: torch.Tensor | None,
                bases: LayerBases, r_v: torch.Tensor, n_rep: int) -> tuple[torch.Tensor, ...]:
    """Fold U_V,r and μ_V into the value and output projections (math convention ``y = x·W``).

    W_v [d_model, H·d] → [d_model, Σ r_h] (v' = x·W_v' + b_v' is the latent V'); W_o [Hq·d, d_model] →
    [Σ_q r_h(q), d_model] with b_o' = b_o + Σ_q μ_V,h(q)·W_o,q. Returns (W_v', b_v', W_o', b_o')."""
    H, d = bases.u_v.shape[0], bases.u_v.shape[1]
    b_v = torch.zeros(H * d, dtype=W_v.dtype) if b_v is None else b_v
    b_o = torch.zeros(W_o.shape[1], dtype=W_o.dtype) if b_o is None else b_o
    Wv_new, bv_new, Wo_rows = [], [], []
    for h in range(H):
        U = bases.u_v[h, :, :int(r_v[h])].to(W_v.dtype)
        Wv_new.append(W_v[:, h * d:(h + 1) * d] @ U)
        bv_new.append((b_v[h * d:(h + 1) * d] - bases.mu_v[h].to(W_v.dtype)) @ U)
    for q in range(H * n_rep):
        h = q // n_rep
        U = bases.u_v[h, :, :int(r_v[h])].to(W_o.dtype)
        Wo_rows.append(U.T @ W_o[q * d:(q + 1) * d])
        b_o = b_o + bases.mu_v[h].to(W_o.dtype) @ W_o[q * d:(q + 1) * d]
    return torch.cat(Wv_new, 1), torch.cat(bv_new), torch.cat(Wo_rows, 0), b_o


def channel_split(ranks: torch.Tensor, head_dim: int) -> dict[str, float]:
    """Fraction of key and of value channels kept (the paper reports 32.28% / 42.72% at a 37.5% budget)."""
    r = torch.as_tensor(ranks).double()
    per = r[..., 0].numel() * head_dim
    return {"key_fraction": float(r[..., 0].sum()) / per, "value_fraction": float(r[..., 1].sum()) / per}


class MatryoshkaTraining(L.LightningModule):
    """Trains a :class:`KVProjection` on a frozen causal LM. ``batch``: token ids [B, T].

    The base model is held outside the module's parameters (never optimised, never checkpointed)."""

    def __init__(self, model, projection: KVProjection, lr: float = 1e-3, warmup_steps: int = 100,
                 total_steps: int = 1000, kl_weight: float = 0.25, ce_weight: float = 0.75, seed: int = 0,
                 val_budgets: tuple[float, ...] = (0.375, 0.5, 0.625, 1.0), val_every: int = 10,
                 val_batches: list[torch.Tensor] | None = None):
        super().__init__()
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, {warmup_steps}")
        for b in val_budgets:
            check_budget(b)
        projection.check_model(model)
        self.projection = projection
        self._base = [model.requires_grad_(False)]
        self.lr, self.warmup, self.total = lr, warmup_steps, total_steps
        self.kl_weight, self.ce_weight = kl_weight, ce_weight
        self.generator = torch.Generator().manual_seed(seed)
        self.val_budgets, self.val_every, self.val_batches = tuple(val_budgets), val_every, val_batches or []
        self.curve: list[dict] = []

    @property
    def base(self):
        return self._base[0]

    def sample(self) -> torch.Tensor:
        p = self.projection
        return sample_ranks(p.n_layers, p.n_kv_heads, p.head_dim, self.generator)

    def losses(self, ids: torch.Tensor, ranks: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher = torch.log_softmax(self.base(input_ids=ids).logits.float(), -1)
        with project_kv(self.base, self.projection, ranks):
            logits = self.base(input_ids=ids).logits.float()
        kl = kl_divergence(teacher, logits)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return {"kl": kl, "ce": ce, "loss": self.kl_weight * kl + self.ce_weight * ce}

    def training_step(self, batch, batch_idx):
        out = self.losses(batch, self.sample())
        self.log_dict({f"train_{k}": v.detach() for k, v in out.items()}, prog_bar=True, on_step=True)
        return out["loss"]

    @torch.no_grad()
    def validation_curve(self) -> dict:
        """KL to the base model at uniform ranks per budget on the held-out batches (the paper's eval loss is this
        at 50%)."""
        p = self.projection
        row = {"step": int(self.global_step)}
        refs = [torch.log_softmax(self.base(input_ids=ids.to(self.device)).logits.float(), -1)
                for ids in self.val_batches]
        with p.frozen():
            for b in self.val_budgets:
                ranks = uniform_ranks(p.n_layers, p.n_kv_heads, p.head_dim, b)
                with project_kv(self.base, p, ranks):
                    kls = [float(kl_divergence(ref, self.base(input_ids=ids.to(self.device)).logits))
                           for ids, ref in zip(self.val_batches, refs)]
                row[f"kl_{b:g}"] = sum(kls) / len(kls)      # MLflow: val_kl_<budget> (a name it accepts as is)
        self.curve.append(row)
        return row

    def _maybe_validate(self, force: bool = False) -> None:
        if not self.val_batches:
            return
        if force or (self.val_every and self.global_step % self.val_every == 0):
            if self.curve and self.curve[-1]["step"] == self.global_step:
                return
            row = self.validation_curve()
            if self.logger is not None:
                self.logger.log_metrics({f"val_{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def on_train_start(self) -> None:
        self._maybe_validate(force=True)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._maybe_validate()

    def on_train_end(self) -> None:
        self._maybe_validate(force=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.projection.parameters(), lr=self.lr, weight_decay=0.0)

        def schedule(step: int) -> float:  # linear warmup, then cosine to 0 (the paper's HF "cosine")
            if step < self.warmup:
                return (step + 1) / (self.warmup + 1)
            t = (step - self.warmup) / max(1, self.total - self.warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_projection(model, projection: KVProjection, sequences: torch.Tensor, accumulate: int, lr: float,
                     warmup_steps: int, seed: int, val_batches: list[torch.Tensor] | None = None,
                     val_every: int = 10, val_budgets=(0.375, 0.5, 0.625, 1.0), logger=None, clip: float = 1.0,
                     progress: bool = True) -> MatryoshkaTraining:
    """One pass over ``sequences`` [N, T] (batch 1, ``accumulate`` micro-batches per optimizer step)."""
    if sequences.dim() != 2 or sequences.shape[0] < accumulate:
        raise ValueError(f"sequences must be [N >= accumulate={accumulate}, T], got {tuple(sequences.shape)}")
    steps = sequences.shape[0] // accumulate
    L.seed_everything(seed, workers=True, verbose=False)
    module = MatryoshkaTraining(model, projection, lr=lr, warmup_steps=warmup_steps, total_steps=steps, seed=seed,
                                val_budgets=val_budgets, val_every=val_every, val_batches=val_batches)
    data = torch.utils.data.DataLoader(sequences[: steps * accumulate], batch_size=1, shuffle=False)
    trainer = L.Trainer(max_epochs=1, max_steps=steps, accelerator="cpu" if not torch.cuda.is_available() else "auto",
                        devices=1, logger=logger or False, enable_checkpointing=False, enable_progress_bar=progress,
                        enable_model_summary=False, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
                        log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, data)
    return module


# ---- greedy rank search (Algorithm 1) ----------------------------------------------------------------------
@dataclass
class SearchResult:
    snapshots: dict[float, torch.Tensor]              # target budget → ranks [L, H, 2] at exactly that budget
    history: list[dict] = field(default_factory=list)  # per round: budget, best/worst candidate error, seconds


@torch.no_grad()
def greedy_rank_search(model, projection: KVProjection, input_ids: torch.Tensor, budgets: list[float],
                       delta: int, per_round: int = 1, criterion: str = "kl", floor: int | None = None,
                       progress: bool = True) -> SearchResult:
    """Paper Algorithm 1 (``criterion="kl"``: KL to the *base* model) or the released code's variant
    (``"hidden_l2"``: relative L2 of the last hidden state to the *current* configuration). Returns the ranks at
    each target budget, hit exactly (one entry changes per decrement, so the budget passes every grid point)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    d, Lyr, H = projection.head_dim, projection.n_layers, projection.n_kv_heads
    floor = delta if floor is None else floor
    if delta < 1 or d % delta or floor < delta or floor % delta:
        raise ValueError(f"delta must divide head_dim {d} and floor be a multiple of delta >= delta; "
                         f"got delta={delta}, floor={floor}")
    if per_round < 1:
        raise ValueError(f"per_round must be >= 1, got {per_round}")
    targets = sorted({check_budget(b) for b in budgets}, reverse=True)
    total = 2 * Lyr * H * d
    for b in targets:
        if abs((1 - b) * total / delta - round((1 - b) * total / delta)) > 1e-6 or b < floor / d - 1e-12:
            raise ValueError(f"budget {b} is not reachable with delta={delta}, floor={floor} "
                             f"({total} channels in all)")
    ranks = torch.full((Lyr, H, 2), d, dtype=torch.long)
    base_logp = torch.log_softmax(model(input_ids=input_ids).logits.float(), -1)
    snapshots: dict[float, torch.Tensor] = {b: ranks.clone() for b in targets if b >= 1.0}
    history = []
    n_rounds = math.ceil((1 - targets[-1]) * total / delta / per_round)
    bar = tqdm(total=n_rounds, desc="rank search", disable=not progress, leave=False)
    with projection.frozen(), project_kv(model, projection, ranks, step=delta) as handle:
        while budget_of(ranks, d) > targets[-1] + 1e-12:
            t0 = time.perf_counter()
            handle.ranks = ranks
            cap = capture_layer_inputs(model, input_ids)
            current = forward_from(model, cap, 0, final_hidden=True) if criterion == "hidden_l2" else None
            cands = []
            for l in range(Lyr):
                for h in range(H):
                    for kv in (0, 1):
                        if ranks[l, h, kv] - delta < floor:
                            continue
                        trial = ranks.clone()
                        trial[l, h, kv] -= delta
                        handle.ranks = trial
                        if criterion == "kl":
                            err = float(kl_divergence(base_logp, forward_from(model, cap, l)))
                        else:
                            out = forward_from(model, cap, l, final_hidden=True)
                            err = float((out - current).norm() / current.norm())
                        cands.append((err, l, h, kv))
            if not cands:
                raise RuntimeError("no entry can be lowered further; the smallest target is below the floor")
            cands.sort()
            for err, l, h, kv in cands[:per_round]:
                ranks[l, h, kv] -= delta
                b = budget_of(ranks, d)
                for t in targets:
                    if t not in snapshots and abs(b - t) < 1e-9:
                        snapshots[t] = ranks.clone()
                if b <= targets[-1] + 1e-12:
                    break
            history.append({"round": len(history), "budget": budget_of(ranks, d), "best_err": cands[0][0],
                            "worst_taken": cands[min(per_round, len(cands)) - 1][0], "candidates": len(cands),
                            "seconds": time.perf_counter() - t0})
            bar.update(1)
            bar.set_postfix(budget=f"{budget_of(ranks, d):.3f}")
    bar.close()
    missing = [t for t in targets if t not in snapshots]
    if missing:
        raise RuntimeError(f"search skipped budgets {missing}")
    return SearchResult(snapshots, history)


def split_summary(ranks: torch.Tensor, head_dim: int) -> dict:
    """Budget, K/V channel fractions and the per-layer kept fractions of a rank configuration."""
    r = ranks.double()
    return {"budget": budget_of(ranks, head_dim), **channel_split(ranks, head_dim),
            "per_layer_k": (r[..., 0].mean(-1) / head_dim).tolist(),
            "per_layer_v": (r[..., 1].mean(-1) / head_dim).tolist()}
