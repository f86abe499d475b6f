"""SinkGD and SWAN (papers/sinkgd/optimizer.py): no official code exists, so the spec's exact identities stand in
(../shared/papers/optimizers.md §5): SR-Sinkhorn = square root of a Sinkhorn–Knopp sweep, its norms and fixed
points, Newton–Schulz whitening = the SVD polar factor, GradNorm moments, stateless Linear weights and torch AdamW
on the rest."""
import copy
import math

import pytest
import torch

from optim_helpers import one_thread  # noqa: F401  (autouse: one torch thread)
from optim_helpers import batches, set_grads, synthetic_grads, tiny_model, train
from papers.sinkgd.optimizer import grad_norm, sr_sinkhorn, swan_direction, whiten
from shared.pretrain.groups import param_groups
from shared.pretrain.optim import build_optimizer, state_bytes

GEN = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_one_sr_sinkhorn_iteration_is_the_root_of_a_sinkhorn_knopp_sweep(shape):
    m, n = shape
    x = randn(*shape)
    a = x * x
    a = a * (n / a.sum(dim=1, keepdim=True))          # rows of X⊙X sum to n
    a = a * (m / a.sum(dim=0, keepdim=True))          # then columns to m
    torch.testing.assert_close(sr_sinkhorn(x, 1), x.sign() * a.sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_sinkhorn_norms_after_one_and_at_convergence(shape):
    m, n = shape
    x = randn(*shape)
    one = sr_sinkhorn(x, 1)
    torch.testing.assert_close(one.norm(dim=0), torch.full((n,), math.sqrt(m), dtype=x.dtype), rtol=1e-12, atol=0)
    many = sr_sinkhorn(x, 300)
    torch.testing.assert_close(many.norm(dim=1), torch.full((m,), math.sqrt(n), dtype=x.dtype), rtol=1e-6, atol=0)
    torch.testing.assert_close(many.norm(dim=0), torch.full((n,), math.sqrt(m), dtype=x.dtype), rtol=1e-12, atol=0)


def test_sinkhorn_is_scale_invariant_and_rank_one_is_a_fixed_point_after_one_iteration():
    x = randn(7, 5)
    torch.testing.assert_close(sr_sinkhorn(3.7 * x, 5), sr_sinkhorn(x, 5), rtol=1e-12, atol=0)
    r1 = torch.outer(randn(7), randn(5))
    one = sr_sinkhorn(r1, 1)
    torch.testing.assert_close(one.abs(), torch.ones_like(one), rtol=1e-12, atol=0)       # entries ±1
    torch.testing.assert_close(sr_sinkhorn(one, 4), one, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_newton_schulz_whitening_is_the_polar_factor(shape):
    g = torch.randn(*shape, generator=GEN)
    U, _, Vh = torch.linalg.svd(g.double(), full_matrices=False)
    torch.testing.assert_close(whiten(g, 10).double(), U @ Vh, rtol=0, atol=1e-3)
    if shape[0] <= shape[1]:
        w = whiten(g, 10)
        torch.testing.assert_close(w @ w.T, torch.eye(shape[0]), rtol=0, atol=1e-3)      # U Uᵀ = I (m ≤ n)


def test_grad_norm_rows_have_mean_zero_and_std_one_and_swan_update_is_rms_one():
    g = randn(9, 30) * 5 + 2
    gn = grad_norm(g)
    torch.testing.assert_close(gn.mean(dim=1), torch.zeros(9, dtype=g.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(gn.std(dim=1, unbiased=False), torch.ones(9, dtype=g.dtype), rtol=1e-12, atol=0)
    d = swan_direction(g.float(), 10)
    torch.testing.assert_close(d.pow(2).mean().sqrt(), torch.tensor(1.0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["sinkgd", "swan"])
def test_stateless_linear_weights_and_torch_adamw_on_the_rest(name):
    """Linear state 0 B measured; the regular group moves exactly as torch.optim.AdamW; the Linear weights move
    by lr·free_lr_scale·direction(G)."""
    a = tiny_model()
    ref = copy.deepcopy(a)
    opt = build_optimizer(name, a, lr=1e-3, free_lr_scale=2.0)
    ga, gr = param_groups(a), param_groups(ref)
    adam = torch.optim.AdamW([p for _, p in gr.regular], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for grads in synthetic_grads(a, 3):                    # the same gradients on both sides
        before = {n: p.detach().clone() for n, p in ga.linear}
        for model, o in ((a, opt), (ref, adam)):
            set_grads(model, grads)
            o.step()
        for n, p in ga.linear:
            direction = opt.direction(p.grad, opt.param_groups[-1])
            torch.testing.assert_close(p.detach(), before[n] - 2e-3 * direction, rtol=0, atol=1e-7)
        for o in (opt, adam):
            o.zero_grad(set_to_none=True)
    for (n, p), (_, q) in zip(ga.regular, gr.regular):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert state_bytes(opt, ga)["linear"] == 0
    assert not any(opt.state.get(p) for _, p in ga.linear)


def test_stateless_runs_train():
    for name in ("sinkgd", "swan"):
        m = tiny_model()
        data = batches(1) * 20
        first = m(input_ids=data[0], labels=data[0]).loss.item()
        train(m, build_optimizer(name, m, lr=1e-3), data)
        assert m(input_ids=data[0], labels=data[0]).loss.item() < first
