"""Pre-train a tiny Llama for 2 steps under ``strategy="ddp"`` with 2 CPU processes (gloo) and write each rank's
final parameters, so a test can check that the ranks agree: ``python -m shared.pretrain.ddp_check OUT``.

Synthetic tokens (vocab 64, 4 windows of 16 tokens, batch 4 → 2 rows per rank); torch AdamW. No data files needed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main(out: str) -> None:
    from shared.pretrain.data import batch_order
    from shared.pretrain.model import build_llama
    from shared.pretrain.module import pretrain

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 64, (8, 16), generator=g)
    val = torch.randint(0, 64, (2, 16), generator=g)
    order = batch_order(train.shape[0], batch_size=4, steps=2, seed=0)
    model = build_llama("tiny", vocab_size=64, seed=0, max_positions=16)
    module = pretrain(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2), train, order, val,
                      warmup_steps=0, total_steps=2, val_every=1, seed=0, strategy="ddp", devices=2, progress=False)
    rank = module.global_rank
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file({n: p.detach().contiguous() for n, p in module.model.named_parameters()}, f"{out}/rank{rank}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
