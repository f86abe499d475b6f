"""Train the CSKV layer-wise module for a few steps under ``strategy="ddp"`` with 2 CPU processes (gloo) and write
each rank's final parameters, so a test can check that the ranks agree: ``python -m papers.cskv.ddp_check OUT``."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main(out: str) -> None:
    import lightning as L

    from papers.cskv.module import train_factors
    from shared.cache.decompose import factorize

    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 4 * 16, 24, generator=g)          # 2 layers, 64 tokens, d_model 24
    W = torch.randn(2, 24, 8, generator=g)
    init = [factorize(W[l], 4, 1, "svd") for l in range(2)]
    factors, module = train_factors(X, W, init, "k", steps=2, seq_len=16, lr=1e-2, strategy="ddp", devices=2,
                                    progress=False)
    rank = module.global_rank
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file({"A": module.A.detach().contiguous(), "B": module.B.detach().contiguous()}, f"{out}/rank{rank}.safetensors")
    del L


if __name__ == "__main__":
    main(sys.argv[1])
