"""Fira (papers/fira/optimizer.py): parity with the official code (PyPI fira 1.0.2, installed by `make setup` with
--no-deps) and pytorch-optimizer's port, and the spec's identities (../shared/papers/optimizers.md §5)."""
import copy
import warnings

import pytest
import torch

import papers.fira.optimizer as fira_mod
from optim_helpers import one_thread  # noqa: F401  (autouse: one torch thread)
from optim_helpers import assert_same_params, batches, max_abs_diff, tiny_model, train
from papers.fira.optimizer import FiraAdamW, limit_growth
from shared.pretrain.groups import param_groups
from shared.pretrain.optim import build_optimizer

T, RANK, ALPHA, LR, WD = 3, 8, 0.25, 1e-2, 0.1




def official_fira(model):
    pytest.importorskip("fira", reason="pip install --no-deps fira==1.0.2 (make setup does)")
    from fira import FiraAdamW as Official

    g = param_groups(model)
    return Official([{"params": [p for _, p in g.regular]},
                     {"params": [p for _, p in g.linear], "rank": RANK, "update_proj_gap": T, "alpha": ALPHA,
                      "proj_type": "std"}], lr=LR, weight_decay=WD, no_deprecation_warning=True)


def ours(model, **kw):
    return build_optimizer("fira", model, lr=LR, weight_decay=WD, rank=RANK, update_proj_gap=T, scale=ALPHA, **kw)


def test_equals_official_fira_over_four_refreshes_both_sides_limiter_active():
    """12 steps, T = 3 (refreshes at 0, 3, 6, 9), α 0.25, λ 0.1; the tiny Llama has right- (64×32) and
    left-projected (32×64) matrices. Bit for bit."""
    a = tiny_model()
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    data = batches(12)
    train(a, ours(a), data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(b, official_fira(b), data)
    assert_same_params(a, b, rtol=0, atol=0)
    shapes = {tuple(p.shape) for _, p in param_groups(a).linear}
    assert any(m > n for m, n in shapes) and any(m < n for m, n in shapes)
    train(c, ours(c, limiter_gamma=float("inf")), data)         # the limiter did act on this run
    assert max_abs_diff(a, c) > 1e-6


def test_zero_scaling_is_galore_bit_for_bit(monkeypatch):
    monkeypatch.setattr(fira_mod, "scaling_factor", lambda *a: 0.0)      # φ ≡ 0 -> S = 0
    a = tiny_model()
    b = copy.deepcopy(a)
    data = batches(8)
    train(a, ours(a), data)
    train(b, build_optimizer("galore", b, lr=LR, weight_decay=WD, rank=RANK, update_proj_gap=T, scale=ALPHA), data)
    assert_same_params(a, b, rtol=0, atol=0)


def test_equals_pytorch_optimizer_fira_until_its_earlier_refresh():
    """pytorch-optimizer 4.1.0 counts steps from 1 and refreshes at steps T, 2T, … (ours and the official code: at
    T+1, 2T+1, …): equal within 1e-6 for the first T−1 steps, different once its refresh comes a step early."""
    pto = pytest.importorskip("pytorch_optimizer", reason="pip install --no-deps pytorch-optimizer==4.1.0")
    gap = 5
    a = tiny_model()
    b = copy.deepcopy(a)
    g = param_groups(b)
    peer = pto.Fira([{"params": [p for _, p in g.regular]},
                     {"params": [p for _, p in g.linear], "rank": RANK, "update_proj_gap": gap, "scale": ALPHA,
                      "projection_type": "std"}], lr=LR, weight_decay=WD)
    mine = build_optimizer("fira", a, lr=LR, weight_decay=WD, rank=RANK, update_proj_gap=gap, scale=ALPHA)
    diffs = []
    for ids in batches(gap + 1):
        for model, opt in ((a, mine), (b, peer)):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        diffs.append(max_abs_diff(a, b))
    assert max(diffs[:gap - 1]) < 1e-6, diffs
    assert diffs[gap] > 1e-4, diffs             # its refresh at step T used a different gradient


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_full_rank_with_alpha_one_has_no_residual(shape):
    """rank = min(m, n), α = 1: lift(R) = G (P square orthogonal), so S = 0 up to rounding and every Fira step is
    GaLore's (one step each on four N(0, 1) gradients: a whole run would amplify rounding through Adam)."""
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        grad = torch.randn(shape, generator=g)
        a = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
        b = torch.nn.Parameter(a.detach().clone())
        opts = dict(lr=LR, rank=min(shape), update_proj_gap=T, scale=1.0)
        fira = FiraAdamW([{"params": [a], "rank": min(shape)}], **{k: v for k, v in opts.items() if k != "rank"})
        galore = fira_mod.GaLoreAdamW([{"params": [b], "rank": min(shape)}],
                                      **{k: v for k, v in opts.items() if k != "rank"})
        for p, opt in ((a, fira), (b, galore)):
            p.grad = grad.clone()
            opt.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
        assert fira.state[a]["scaling_grad"] < 1e-4 * grad.norm()


def test_limiter_cuts_a_tenfold_spike_to_gamma_and_passes_slower_growth():
    state = {}
    s = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert limit_growth(s, state, 1.01) is s and state["scaling_grad"] == torch.norm(s)
    spike = limit_growth(10 * s, state, 1.01)
    torch.testing.assert_close(torch.norm(spike), 1.01 * torch.norm(s), rtol=1e-6, atol=0)
    torch.testing.assert_close(state["scaling_grad"], torch.norm(spike))
    slow = limit_growth(1.005 * spike, state, 1.01)             # growth 0.5% < 1%: untouched
    torch.testing.assert_close(slow, 1.005 * spike, rtol=0, atol=0)
    free = {}
    assert limit_growth(s, free, float("inf")) is s and limit_growth(10 * s, free, float("inf")).norm() > 9 * s.norm()
    assert free == {}                                           # γ = ∞ stores nothing


def test_paper_and_code_residuals_agree_at_alpha_one_and_differ_below():
    data = batches(6)
    runs = {}
    for residual in ("code", "paper"):
        for alpha in (1.0, 0.25):
            m = tiny_model()
            train(m, build_optimizer("fira", m, lr=LR, rank=RANK, update_proj_gap=T, scale=alpha,
                                     residual=residual), data)
            runs[residual, alpha] = m
    assert_same_params(runs["code", 1.0], runs["paper", 1.0], rtol=0, atol=0)
    assert max_abs_diff(runs["code", 0.25], runs["paper", 0.25]) > 1e-6


def test_scaling_ablations_change_the_run_and_fira_differs_from_galore():
    data = batches(6)
    out = {}
    for kw in ({}, {"scaling": "matrix"}, {"scaling": "none"}):
        m = tiny_model()
        train(m, ours(m, **kw), data)
        out[str(kw)] = m
    g = tiny_model()
    train(g, build_optimizer("galore", g, lr=LR, weight_decay=WD, rank=RANK, update_proj_gap=T, scale=ALPHA), data)
    models = list(out.values()) + [g]
    assert all(max_abs_diff(x, y) > 1e-6 for i, x in enumerate(models) for y in models[i + 1:])


def test_class_validates_its_own_group():
    W = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="0.99"):
        FiraAdamW([{"params": [W], "rank": 2}], limiter_gamma=0.99)
    with pytest.raises(ValueError, match="'rows'"):
        FiraAdamW([{"params": [W], "rank": 2, "scaling": "rows"}])
