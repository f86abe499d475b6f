"""Fira paper folder: the similarity statistics (Spearman ρ, Kendall τ-b), the shadow scaling factors, the
similarity claim's permutation test, and reuse of another paper's identical runs."""
import itertools
import math

import pytest
import torch

from papers.fira.claims import scaling_factors_similar
from papers.fira.module import ShadowScaling, kendall, spearman
from shared.pretrain.family import reusable_runs
from shared.pretrain.runs import Run, Train


def brute_kendall(x, y):
    pairs = list(itertools.combinations(range(len(x)), 2))
    s = sum(float((x[i] - x[j]).sign() * (y[i] - y[j]).sign()) for i, j in pairs)
    tx = sum(1 for i, j in pairs if x[i] == x[j])
    ty = sum(1 for i, j in pairs if y[i] == y[j])
    return s / math.sqrt((len(pairs) - tx) * (len(pairs) - ty))


def test_rank_correlations_against_definitions():
    x = torch.tensor([1.0, 2, 2, 3, 5, 4, 0.5])
    y = torch.tensor([2.0, 1, 3, 3, 6, 5, 0.0])
    assert kendall(x, y, chunk=3) == pytest.approx(brute_kendall(x, y), abs=1e-12)
    assert spearman(x, x.exp()) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    assert kendall(x, -x) == pytest.approx(-1.0)
    # Spearman = Pearson of average ranks: ties share their mean rank
    rx = torch.tensor([2.0, 3.5, 3.5, 5, 7, 6, 1], dtype=torch.float64)
    ry = torch.tensor([3.0, 2, 4.5, 4.5, 7, 6, 1], dtype=torch.float64)
    assert spearman(x, y) == pytest.approx(float(torch.corrcoef(torch.stack([rx, ry]))[0, 1]), abs=1e-12)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_shadow_factors_are_galores_low_rank_state_and_full_rank_adams(shape):
    """The low-rank shadow is GaLoreAdamW's own moments (same projector refreshes, no reset); the full-rank one is
    the same Adam on G. Weights frozen (lr 0) so both see the given gradients."""
    from shared.pretrain.optim.galore import GaLoreAdamW

    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(shape))
    galore = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 2}], lr=0.0)
    sh = ShadowScaling(rank=3, gap=2)
    m = v = 0
    for _ in range(5):
        grad = torch.randn(shape, generator=g)
        f = sh.update(grad)
        w.grad = grad
        galore.step()
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad * grad
    st = galore.state[w]
    n_low = st["exp_avg"] / (st["exp_avg_sq"].sqrt() + 1e-6)
    r = GaLoreAdamW._down(st, grad)
    torch.testing.assert_close(f["matrix_low"], n_low.norm() / r.norm(), rtol=1e-6, atol=0)
    n_full = m / (v.sqrt() + 1e-6)
    torch.testing.assert_close(f["matrix_full"], n_full.norm() / grad.norm(), rtol=1e-6, atol=0)
    dim = 1 if shape[0] >= shape[1] else 0                 # rows if right-projected (m ≥ n), else columns
    torch.testing.assert_close(f["index_low"], n_low.norm(dim=dim) / (r.norm(dim=dim) + 1e-8), rtol=1e-6, atol=0)
    assert len(f["index_full"]) == max(shape)


def test_similarity_claim_reproduced_for_aligned_factors_and_not_for_shuffled_ones():
    g = torch.Generator().manual_seed(1)
    full = torch.rand(28, generator=g)
    aligned = {"factors": [{"trajectory": t, "step": 100, "full": full.tolist(),
                            "low": (full * 0.5 + 0.01 * torch.rand(28, generator=g)).tolist()} for t in ("A", "B")]}
    assert scaling_factors_similar({"similarity.json": aligned}, None)["verdict"] == "reproduced"
    anti = {"factors": [{"trajectory": "A", "step": 100, "full": full.tolist(), "low": (-full).tolist()}]}
    assert scaling_factors_similar({"similarity.json": anti}, None)["verdict"] == "not reproduced"


def test_reuse_only_when_train_block_and_run_are_identical(tmp_path):
    import yaml

    from shared.io import write_json

    (tmp_path / "papers" / "src" / "results").mkdir(parents=True)
    train = {"shape": "tiny", "batch_size": 4, "seq_len": 256, "steps": 100, "warmup_steps": 10,
             "min_lr_ratio": 0.1, "val_every": 10, "val_windows": 32, "weight_decay": 0.0}
    runs = {"adamw": {"optimizer": "adamw", "lr": 1e-3}, "galore": {"optimizer": "galore", "lr": 1e-2, "rank": 64}}
    (tmp_path / "papers" / "src" / "params.yaml").write_text(yaml.safe_dump({"train": train, "runs": runs}))
    write_json(tmp_path / "papers" / "src" / "results" / "main.json",
               {"runs": {"adamw": [{"seed": 0}], "galore": [{"seed": 0}]}})
    ours = {k: Run(**v) for k, v in runs.items()}
    got, why = reusable_runs("src", "main.json", ["adamw", "galore"], Train(**train), ours, root=tmp_path)
    assert set(got) == {"adamw", "galore"} and not why
    ours["galore"] = Run(optimizer="galore", lr=1e-2, rank=32)
    got, why = reusable_runs("src", "main.json", ["adamw", "galore"], Train(**train), ours, root=tmp_path)
    assert set(got) == {"adamw"} and "galore" in why
    got, why = reusable_runs("src", "main.json", ["adamw"], Train(**{**train, "steps": 50}), ours, root=tmp_path)
    assert not got and "train" in why["adamw"]
