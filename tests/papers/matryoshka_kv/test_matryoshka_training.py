"""MatryoshkaKV: training (only X/μ learn, base frozen bit-identical, loss falls) and the greedy rank search."""
from __future__ import annotations

import itertools

import pytest
import torch

from papers.matryoshka_kv.module import MatryoshkaTraining, greedy_rank_search, train_projection
from shared.metrics import kl_divergence
from papers.matryoshka_kv.module import kv_statistics
from shared.cache.orthogonal import KVProjection, budget_of, project_kv, uniform_ranks
from shared.partial_forward import capture_layer_inputs, forward_from

L, H, D = 2, 2, 16


def _ids(seed, B=1, T=32):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def projection(tiny_llama):
    return KVProjection.from_statistics(kv_statistics(tiny_llama, [_ids(1, 4, 32)], progress=False))


def test_training_updates_only_projection_and_lowers_loss(tiny_llama, projection):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    x0 = projection.x_k.detach().clone()
    seqs = _ids(2, B=24, T=32)
    val = [_ids(3, B=2, T=32)]
    mod = MatryoshkaTraining(tiny_llama, projection, seed=0)
    ranks = uniform_ranks(L, H, D, 0.25)
    with torch.no_grad():
        loss0 = float(mod.losses(val[0], ranks)["loss"])
    module = train_projection(tiny_llama, projection, seqs, accumulate=2, lr=2e-2, warmup_steps=1, seed=0,
                              val_batches=val, val_every=4, val_budgets=(0.25, 1.0), progress=False)
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights changed"
    assert not torch.equal(projection.x_k.detach(), x0)
    assert all(not p.requires_grad for p in tiny_llama.parameters())
    with torch.no_grad():
        loss1 = float(module.losses(val[0], ranks)["loss"])
    assert loss1 < loss0
    # validation curve: first, every 4th and last step; KL at full rank stays ~0 (exact after training too)
    curve = module.curve
    assert [c["step"] for c in curve] == [0, 4, 8, 12]
    assert all(c["kl_1"] < 1e-6 and c["kl_0.25"] > 1e-4 for c in curve)
    from mlflow.utils.validation import _validate_metric_name
    for c in curve:                         # logged as val_<key>: names MLflow accepts unchanged (no renaming)
        for k in c:
            _validate_metric_name(f"val_{k}")


def test_loss_is_quarter_kl_plus_three_quarter_ce(tiny_llama, projection):
    mod = MatryoshkaTraining(tiny_llama, projection)
    ids = _ids(4, 2, 16)
    with torch.no_grad():
        out = mod.losses(ids, uniform_ranks(L, H, D, 0.5))
        full = mod.losses(ids, uniform_ranks(L, H, D, 1.0))
    assert torch.allclose(out["loss"], 0.25 * out["kl"] + 0.75 * out["ce"])
    assert float(full["kl"]) < 1e-6
    ref_ce = torch.nn.functional.cross_entropy(tiny_llama(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(full["ce"], ref_ce, atol=1e-5)


def test_bad_training_args_raise(tiny_llama, projection):
    with pytest.raises(ValueError, match="budget"):
        MatryoshkaTraining(tiny_llama, projection, val_budgets=(0.0,))
    with pytest.raises(ValueError, match="accumulate"):
        train_projection(tiny_llama, projection, _ids(0, 1, 8), accumulate=4, lr=1e-3, warmup_steps=0, seed=0)


# ---- partial recompute -------------------------------------------------------------------------------------
def test_partial_recompute_equals_full_forward(tiny_llama, projection):
    ids = _ids(5, 2, 20)
    ranks = torch.tensor([[[8, 16], [4, 12]], [[16, 8], [12, 4]]])
    with project_kv(tiny_llama, projection, ranks, step=4):
        cap = capture_layer_inputs(tiny_llama, ids)
        ref = tiny_llama(ids).logits
        for start in range(L):
            assert torch.allclose(forward_from(tiny_llama, cap, start), ref, atol=1e-5)
    assert torch.allclose(cap.logits, ref, atol=1e-6)
    with pytest.raises(ValueError, match="start"):
        forward_from(tiny_llama, cap, L)


# ---- search ------------------------------------------------------------------------------------------------
def test_search_invariants(tiny_llama, projection):
    ids = _ids(6, 1, 24)
    res = greedy_rank_search(tiny_llama, projection, ids, budgets=[0.75, 0.5, 0.25], delta=4, per_round=1,
                             progress=False)
    budgets = [h["budget"] for h in res.history]
    assert all(a > b for a, b in zip(budgets, budgets[1:])), "budget must strictly decrease"
    for b, r in res.snapshots.items():
        assert budget_of(r, D) == pytest.approx(b)
        assert bool(((r % 4) == 0).all() and (r >= 4).all() and (r <= D).all())


def test_search_code_variant_runs_and_hits_budgets(tiny_llama, projection):
    res = greedy_rank_search(tiny_llama, projection, _ids(7, 1, 16), budgets=[0.5], delta=8, per_round=3,
                             criterion="hidden_l2", progress=False)
    assert budget_of(res.snapshots[0.5], D) == pytest.approx(0.5)


def test_greedy_picks_match_brute_force(tiny_llama, projection):
    """One decrement: the greedy choice is the argmin of KL over all single-entry decrements (brute force)."""
    ids = _ids(8, 1, 16)
    d = 8
    res = greedy_rank_search(tiny_llama, projection, ids, budgets=[1 - d / (2 * L * H * D)], delta=d, progress=False)
    chosen = (uniform_ranks(L, H, D, 1.0) - res.snapshots[1 - d / (2 * L * H * D)]).nonzero().tolist()
    base = torch.log_softmax(tiny_llama(ids).logits, -1)
    errs = {}
    for l, h, kv in itertools.product(range(L), range(H), range(2)):
        r = uniform_ranks(L, H, D, 1.0)
        r[l, h, kv] -= d
        with project_kv(tiny_llama, projection, r):
            errs[(l, h, kv)] = float(kl_divergence(base, tiny_llama(ids).logits))
    assert chosen == [list(min(errs, key=errs.get))]


def test_search_bad_args(tiny_llama, projection):
    ids = _ids(9, 1, 8)
    with pytest.raises(ValueError, match="criterion"):
        greedy_rank_search(tiny_llama, projection, ids, [0.5], delta=4, criterion="mse")
    with pytest.raises(ValueError, match="delta"):
        greedy_rank_search(tiny_llama, projection, ids, [0.5], delta=5)
    with pytest.raises(ValueError, match="budget"):
        greedy_rank_search(tiny_llama, projection, ids, [1.5], delta=4)
    with pytest.raises(ValueError, match="not reachable"):
        greedy_rank_search(tiny_llama, projection, ids, [0.1], delta=4, floor=4)
