"""Relative squared 4-bit reconstruction error of real CSKV latents, ours vs the official quantizer (issue #13).

    python tools/golden/cskv_quant_error.py [factor files …]   (default: every k-/v- pair in papers/cskv/artifacts/factors)

For each layer l the latent is z_l = X_val,l · A_l (pre-RoPE, [T, r]); keys are quantized per channel over 32-token
groups (axis -2), values per token (axis -1) over the whole row (ours) or per head (r / n_kv channels, the official
code). The error is Σ_l ‖z_l − ẑ_l‖² / Σ_l ‖z_l‖² (:func:`kernels.quant.quant_error` per layer, pooled by ‖z_l‖²).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from papers.cskv.module import latent_quant_error
from shared.cache.decompose import Factors

ART = Path(__file__).resolve().parents[2] / "papers" / "cskv" / "artifacts"
N_KV = 3          # SmolLM2-135M: 3 KV heads, head_dim 64


def latent_quant_errors(X: torch.Tensor, A: list[torch.Tensor], kind: str, n_kv: int = N_KV) -> dict[str, float]:
    """X [L, T, d_model], A[l] [g, d_model, r/g] → {setting: pooled relative squared error}."""
    factors = [Factors(a, a.new_empty(0)) for a in A]
    settings = [("reprise", "row"), ("official", "row")] if kind == "k" else \
        [("reprise", "row"), ("reprise", "head"), ("official", "head"), ("official", "row")]
    return {(s if kind == "k" else f"{s}/{g}"): latent_quant_error(X, factors, kind, s, g, n_kv) for s, g in settings}


def main(paths: list[str]) -> None:
    with safe_open(str(ART / "calibration.safetensors"), "pt") as h:
        X = h.get_tensor("X_val")
    files = [Path(p) for p in paths] or sorted((ART / "factors").glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            n = len(list(h.keys())) // 2
            A = [h.get_tensor(f"{l}.A").float() for l in range(n)]
        kind = f.name[0]
        out[f.stem] = latent_quant_errors(X, A, kind)
        print(f.stem, json.dumps({k: round(v, 5) for k, v in out[f.stem].items()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
