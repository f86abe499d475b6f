"""shared/metrics.py: each statistic against a hand computation or torch / scipy reference, plus input validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.metrics import (kl_divergence, paired_bootstrap, paired_verdict_text, token_nll, top1_agreement,
                            wilson_interval)


# ------------------------------------------------------------------------------------------------------------- KL

def test_kl_identical_is_zero():
    logits = torch.randn(3, 5, 11)
    ref = torch.log_softmax(logits, -1)
    assert kl_divergence(ref, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(kl_divergence(ref, ref, reduction="none"), torch.zeros(3, 5), atol=1e-6)


def test_kl_hand_example():
    p, q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.5, 0.25])
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # Σ p (log p − log q) = 0.25·ln 2
    # q passed as raw logits shifted by a constant: log_softmax removes the shift
    got = kl_divergence(p.log(), q.log() + 3.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_kl_matches_torch_kl_div_and_nonnegative():
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(torch.randn(4, 7, 50, generator=g) * 3, -1)
    logits = torch.randn(4, 7, 50, generator=g) * 3
    ours = kl_divergence(ref, logits, reduction="none")
    theirs = F.kl_div(torch.log_softmax(logits, -1), ref, log_target=True, reduction="none").sum(-1)
    assert ours.shape == (4, 7)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (ours >= 0).all() and (ours > 0).all()
    torch.testing.assert_close(kl_divergence(ref, logits), theirs.mean())
    torch.testing.assert_close(kl_divergence(ref, logits, reduction="sum"), theirs.sum())
    assert kl_divergence(ref, logits).shape == ()


def test_kl_fp32_from_half_and_zero_prob():
    ref = torch.log(torch.tensor([1.0, 0.0, 0.0]))  # -inf entries: probability 0 contributes 0
    logits = torch.tensor([0.0, 1.0, 2.0], dtype=torch.bfloat16)
    out = kl_divergence(ref, logits)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(-torch.log_softmax(torch.tensor([0.0, 1.0, 2.0]), -1)[0].item(), rel=1e-5)


def test_kl_validation():
    ref = torch.log_softmax(torch.randn(2, 5), -1)
    with pytest.raises(ValueError, match="reduction"):
        kl_divergence(ref, ref, reduction="avg")
    with pytest.raises(ValueError, match="shape"):
        kl_divergence(ref, torch.randn(2, 6))
    with pytest.raises(ValueError, match="log-probabilities"):
        kl_divergence(torch.randn(2, 5) + 5, ref)  # raw logits as reference
    with pytest.raises(ValueError, match="NaN"):
        kl_divergence(ref, torch.full((2, 5), float("nan")))


# ----------------------------------------------------------------------------------------------------------- top-1

def test_top1_constructed():
    ref = torch.tensor([[[5.0, 0, 0], [0, 5, 0]], [[0, 0, 5], [1, 2, 3]]])
    x = torch.tensor([[[9.0, 1, 1], [3, 0, 0]], [[0, 1, 2], [3, 2, 1]]])
    # agree at (0,0) and (1,0); disagree at (0,1) and (1,1)
    assert top1_agreement(ref, x).item() == pytest.approx(0.5)
    assert top1_agreement(ref, x, reduction="none").tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert top1_agreement(ref, x, reduction="sum").item() == 2.0
    assert top1_agreement(ref, torch.log_softmax(ref, -1)).item() == 1.0
    with pytest.raises(ValueError, match="shape"):
        top1_agreement(ref, x[:1])


# ------------------------------------------------------------------------------------------------------------- NLL

def test_nll_matches_cross_entropy_with_ignore_index():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 13, generator=g)
    targets = torch.randint(0, 13, (3, 6), generator=g)
    targets[0, :2] = -100
    targets[2, 5] = -100
    flat_l, flat_t = logits.flatten(0, 1), targets.flatten()
    for red in ("mean", "sum", "none"):
        want = F.cross_entropy(flat_l, flat_t, reduction=red)
        got = token_nll(logits, targets, reduction=red)
        torch.testing.assert_close(got.flatten() if red == "none" else got, want)
    assert token_nll(logits, targets, reduction="none").shape == (3, 6)
    # custom ignore_index
    t2 = targets.clone()
    t2[t2 == -100] = 7
    torch.testing.assert_close(token_nll(logits, t2, ignore_index=7),
                               F.cross_entropy(flat_l, t2.flatten(), ignore_index=7))


def test_nll_validation():
    logits = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        token_nll(logits, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer"):
        token_nll(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        token_nll(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="ignore_index"):
        token_nll(logits, torch.tensor([-100, -100]))


# -------------------------------------------------------------------------------------------------------- Wilson

def test_wilson_known_values():
    lo, hi = wilson_interval(5, 5)
    assert lo == pytest.approx(0.5655, abs=1e-3) and hi == pytest.approx(1.0)
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.2366, abs=1e-3)
    lo99, hi99 = wilson_interval(5, 10, confidence=0.99)
    assert lo99 < lo and hi99 > hi


@pytest.mark.parametrize("k,n,conf,match", [(1, 0, 0.95, "n=0"), (6, 5, 0.95, r"k=6"), (-1, 5, 0.95, "k=-1"),
                                            (1, 5, 1.5, "confidence"), (float("nan"), 5, 0.95, "finite"),
                                            (1, 5.0, 0.95, "integer")])
def test_wilson_bad_input(k, n, conf, match):
    with pytest.raises(ValueError, match=match):
        wilson_interval(k, n, confidence=conf)


# ----------------------------------------------------------------------------------------------- paired bootstrap

def test_paired_bootstrap_separated():
    rng = np.random.default_rng(0)
    b = rng.normal(0.0, 1.0, 30)
    a = b + 2.0 + rng.normal(0.0, 0.1, 30)
    r = paired_bootstrap(a, b, n_resamples=2000)
    assert r["verdict"] == "a>b" and r["low"] > 0 and r["low"] <= r["diff"] <= r["high"]
    assert r["diff"] == pytest.approx(float(np.mean(a - b)))
    assert r["n"] == 30 and r["confidence"] == 0.95
    assert paired_bootstrap(b, a, n_resamples=2000)["verdict"] == "a<b"


def test_paired_bootstrap_identical_and_constant_shift():
    a = [0.0, 1.0, 1.0, 0.0, 1.0]
    r = paired_bootstrap(a, a)
    assert r["verdict"] == "tie" and r["low"] == r["high"] == r["diff"] == 0.0
    r = paired_bootstrap([x + 0.5 for x in a], a)  # every difference is exactly 0.5
    assert r["low"] == r["high"] == r["diff"] == 0.5 and r["verdict"] == "a>b"


def test_paired_bootstrap_binary_tie_and_seed():
    a = np.array([1, 0, 1, 1, 0, 1, 0, 1, 0, 1], float)
    b = np.array([1, 1, 0, 1, 0, 0, 1, 1, 0, 1], float)
    r1 = paired_bootstrap(a, b, n_resamples=2000, seed=3)
    r2 = paired_bootstrap(a, b, n_resamples=2000, seed=3)
    assert r1 == r2
    assert r1["verdict"] == "tie" and r1["low"] < 0 < r1["high"]
    c = np.random.default_rng(0).normal(size=20)  # continuous data: a different seed moves the bounds
    r3, r4 = (paired_bootstrap(c + 0.1, c[::-1], n_resamples=500, seed=s) for s in (3, 4))
    assert r3 == paired_bootstrap(c + 0.1, c[::-1], n_resamples=500, seed=3) and r3["low"] != r4["low"]


def test_paired_bootstrap_bad_input():
    with pytest.raises(ValueError, match="len"):
        paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="n ≥ 2"):
        paired_bootstrap([1.0], [2.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1.0, 2.0], [2.0, 1.0], confidence=95)
    with pytest.raises(ValueError, match="statistic"):
        paired_bootstrap([1.0, 2.0], [2.0, 1.0], statistic="mode")
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1.0, float("nan")], [2.0, 1.0])


def test_paired_verdict_text():
    r = {"diff": 0.4, "low": 0.2, "high": 0.6, "n": 10, "confidence": 0.95, "verdict": "a>b"}
    assert paired_verdict_text(r, "CSKV", "ASVD", "accuracy") == \
        "CSKV − ASVD accuracy = +0.40 [0.20, 0.60] (95% paired bootstrap, n = 10)"
    tie = {**r, "low": -0.1, "verdict": "tie"}
    assert paired_verdict_text(tie, "CSKV", "ASVD", "accuracy").endswith("inconclusive at n = 10")
    with pytest.raises(ValueError, match="missing"):
        paired_verdict_text({"diff": 0.1}, "a", "b", "m")
