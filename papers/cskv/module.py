"""CSKV (Wang et al., 2024) — only what is new in this paper: calibration of K/V projection inputs, the
layer-wise reconstruction training (§3.3) as a LightningModule, and factor files. The cache itself (bi-branch
low-rank latents) is ``shared.cache.lowrank``; the SVD/ASVD/whitened initialisations are ``shared.cache.decompose``.

Training objective (CSKV Eq. 5), attention run on the *original* K/V so layers decouple:

    L = Σ_l  MSE(X_l W_K,l , X_l A_K,l B_K,l)  +  MSE(X_l W_V,l , X_l A_V,l B_V,l)

K and V are independent problems, so they are trained (and cached) separately: one :class:`LayerwiseLowRank`
fits one kind (``"k"`` or ``"v"``) for all layers at one density. Optional QAT (§3.4): the latent ``z = X·A`` goes
through 4-bit fake quantization with a straight-through estimator (keys per-channel over 32-token groups, values
per-token), exactly the quantizer the cache applies when ``quantize=True``.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from kernels.quant import fake_quant_int4
from shared.cache.base import attention_modules, record_prefill
from shared.cache.decompose import KINDS, Factors, factorize, projection_weights, rank_for_density  # noqa: F401
from shared.cache.lowrank import QUANT_GROUP
from shared.io import save_safetensors

@torch.no_grad()
def collect_inputs(model, token_ids: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Inputs X of the K/V projections (post input-norm hidden states) on ``n_samples`` random windows of
    ``seq_len`` tokens from ``token_ids`` → [L, n_samples·seq_len, d_model] (fp32)."""
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    if token_ids.numel() <= seq_len:
        raise ValueError(f"corpus has {token_ids.numel()} tokens, fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len, (n_samples,), generator=g)
    chunks = []
    for s in tqdm(starts.tolist(), desc="calibration", leave=False):
        rec = record_prefill(model, token_ids[s:s + seq_len][None])
        chunks.append(torch.stack([lr.hidden[0].float() for lr in rec.layers]))
    return torch.cat(chunks, dim=1)


def activation_stats(X: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer: mean |x| (ASVD's scaling) and the Gram matrix XᵀX/n (whitened SVD)."""
    n = X.shape[1]
    return {"abs_mean": X.abs().mean(dim=1), "gram": torch.einsum("lnd,lne->lde", X.double(), X.double()) / n}


def init_factors(W: torch.Tensor, stats: dict, density: float, head_dim: int, num_kv_heads: int, init: str,
                 per_head: bool, seed: int = 0, alpha: float = 0.5, asvd_stat: str = "mean",
                 asvd_samples: int | None = None) -> list[Factors]:
    """One :class:`Factors` per layer for ``W`` [L, d_model, C] at CSKV's rank for ``density`` (``alpha``: ASVD's
    scaling exponent, S = diag(stat^α); ``asvd_stat``: ``"mean"`` = mean|x|, ``"official_sum"`` = the official
    code's Σ over ``asvd_samples`` calibration samples of each sample's mean|x| — same A·B, other A/B balance)."""
    rank = rank_for_density(density, head_dim, num_kv_heads)
    groups = num_kv_heads if per_head else 1
    g = torch.Generator().manual_seed(seed)
    return [factorize(W[l], rank, groups, init, act_abs_mean=stats["abs_mean"][l], gram=stats["gram"][l],
                      alpha=alpha, generator=g, asvd_stat=asvd_stat, asvd_samples=asvd_samples)
            for l in range(W.shape[0])]


def reconstruction_error(X: torch.Tensor, W: torch.Tensor, factors: list[Factors]) -> float:
    """Mean over layers of the relative error ‖XW − XAB‖² / ‖XW‖² (the training loss, normalised)."""
    errs = []
    for l, f in enumerate(factors):
        target = X[l] @ W[l]
        errs.append(((target - X[l] @ f.dense()).pow(2).sum() / target.pow(2).sum()).item())
    return sum(errs) / len(errs)


class _TokenChunks(Dataset):
    """Sequences of ``seq_len`` calibration tokens with their fixed targets ``X·W`` (computed once)."""

    def __init__(self, X: torch.Tensor, W: torch.Tensor, seq_len: int):
        self.X, self.target, self.seq_len = X, torch.einsum("lnd,ldc->lnc", X, W.float()), seq_len

    def __len__(self) -> int:
        return self.X.shape[1] // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = slice(i * self.seq_len, (i + 1) * self.seq_len)
        return self.X[:, s], self.target[:, s]


class LayerwiseLowRank(L.LightningModule):
    """Learns ``A_l, B_l`` for every layer of one projection kind by the layer-wise MSE (CSKV Eq. 5)."""

    def __init__(self, W: torch.Tensor, init: list[Factors], kind: str, lr: float = 5e-5, weight_decay: float = 0.0,
                 total_steps: int = 100, qat: bool = False, quant: dict | None = None, value_group: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.lr, self.weight_decay, self.total_steps, self.qat = kind, lr, weight_decay, total_steps, qat
        # quantizer options forwarded to fake_quant_int4 (scheme / STE: reprise default, or the official code's);
        # value_group: values quantized per token in groups of this many latent channels (None: the whole row;
        # the official code: r / n_kv, one group per head)
        self.quant, self.value_group = dict(quant or {}), value_group
        self.register_buffer("W", W.float())
        self.A = torch.nn.Parameter(torch.stack([f.A.float() for f in init]))  # [L, g, d, r/g]
        self.B = torch.nn.Parameter(torch.stack([f.B.float() for f in init]))  # [L, g, r/g, C/g]

    def latent(self, X: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("lnd,lgdr->lgnr", X, self.A)
        if self.qat:  # 4-bit fake quant + STE, keys per-channel/32 tokens, values per-token (§3.4)
            z = fake_quant_int4(z, QUANT_GROUP, axis=-2, **self.quant) if self.kind == "k" else \
                fake_quant_int4(z, self.value_group or z.shape[-1], axis=-1, **self.quant)
        return z

    def loss(self, X: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if target is None:
            target = torch.einsum("lnd,ldc->lnc", X, self.W)
        y = torch.einsum("lgnr,lgrc->lgnc", self.latent(X), self.B)
        Lyr, g, n, cg = y.shape
        y = y.permute(0, 2, 1, 3).reshape(Lyr, n, g * cg)
        return ((y - target) ** 2).mean(dim=(1, 2)).sum()  # Σ_l MSE_l

    def training_step(self, batch, batch_idx):
        X, target = batch
        loss = self.loss(X, target)
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(1, self.total_steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def factors(self) -> list[Factors]:
        return [Factors(self.A[l].detach().clone(), self.B[l].detach().clone()) for l in range(self.A.shape[0])]


def train_factors(X: torch.Tensor, W: torch.Tensor, init: list[Factors], kind: str, steps: int, seq_len: int,
                  lr: float, qat: bool = False, seed: int = 0, logger=None, strategy: str = "auto", devices: int = 1,
                  progress: bool = True, grad_clip: float | None = None, quant: dict | None = None,
                  value_group: int | None = None) -> tuple[list[Factors], LayerwiseLowRank]:
    """Fit the factors with Lightning (AdamW + linear decay, batch 1 sequence of ``seq_len`` tokens).

    ``grad_clip``: clip the global gradient norm to this value (the official code trains with the HF Trainer
    default ``max_grad_norm = 1.0``); ``None`` = no clipping. ``quant`` / ``value_group``: see
    :class:`LayerwiseLowRank` (QAT only)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    L.seed_everything(seed, workers=True, verbose=False)
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be None or > 0, got {grad_clip!r}")
    module = LayerwiseLowRank(W, init, kind, lr=lr, total_steps=steps, qat=qat, quant=quant, value_group=value_group)
    data = DataLoader(_TokenChunks(X, W, seq_len), batch_size=None, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu" if not torch.cuda.is_available() else "auto",
                        devices=devices, strategy=strategy, logger=logger or False, enable_checkpointing=False,
                        enable_progress_bar=progress, enable_model_summary=False, deterministic=True,
                        log_every_n_steps=10, gradient_clip_val=grad_clip)
    trainer.fit(module, data)
    return module.factors(), module


def save_factors(path: Path, factors: list[Factors], meta: dict) -> None:
    tensors = {f"{l}.A": f.A.contiguous() for l, f in enumerate(factors)}
    tensors.update({f"{l}.B": f.B.contiguous() for l, f in enumerate(factors)})
    save_safetensors(path, tensors, meta)


def load_factors(path: Path, dtype: torch.dtype = torch.float32) -> list[Factors]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no factor file at {path}; run the cskv `train` stage")
    t = load_file(str(path))
    n = len(t) // 2
    return [Factors(t[f"{l}.A"].to(dtype), t[f"{l}.B"].to(dtype)) for l in range(n)]


def latent_quant_error(X: torch.Tensor, factors: list[Factors], kind: str, scheme: str, value_groups: str,
                       num_kv_heads: int, key_group: int = QUANT_GROUP) -> float:
    """Relative squared 4-bit reconstruction error of the real latents ``z_l = X_l · A_l`` pooled over layers,
    ``Σ_l ‖z_l − ẑ_l‖² / Σ_l ‖z_l‖²`` (:func:`kernels.quant.quant_error` per layer, weighted by ‖z_l‖²).

    Keys: per channel over ``key_group``-token groups (axis −2); values: per token over the whole latent row
    (``value_groups="row"``, ours) or per KV head (``"head"``: r / n_kv channels, the official code)."""
    from kernels.quant import head_group_size, quant_error

    if kind not in KINDS or value_groups not in ("row", "head"):
        raise ValueError(f"kind must be one of {KINDS} and value_groups 'row' or 'head', got {kind!r}, "
                         f"{value_groups!r}")
    num = den = 0.0
    for l, f in enumerate(factors):
        z = torch.einsum("td,gdr->gtr", X[l].float(), f.A.float())          # [g, T, r/g]
        z = z.permute(1, 0, 2).reshape(1, z.shape[1], -1)                    # joint latent [1, T, r], head-major
        zz = float(z.double().pow(2).sum())
        if kind == "k":
            e = quant_error(z, scheme, key_group, -2)
        else:
            g = z.shape[-1] if value_groups == "row" else head_group_size(z.shape[-1], num_kv_heads)
            e = quant_error(z, scheme, g, -1)
        num, den = num + e * zz, den + zz
    return num / den
