"""CSKV parity: our quantizer (``scheme="official"``, ``ste="clipped"``) and factor inits against golden outputs of
the official code (github.com/wln20/CSKV; files, commit and functions: tests/golden/golden.json, generator
tools/golden/make_golden.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels.quant import dequantize_int4, fake_quant_int4, head_group_size, quant_error, quantize_int4
from shared.cache.decompose import factorize

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
QUANT = torch.load(GOLDEN / "cskv_quant.pt")
FACT = torch.load(GOLDEN / "cskv_factors.pt")
# official KVQuantizer: per token per head (group = r/n_kv channels, axis -1); KVQuantizerChannel: per channel over
# q_window_size tokens (axis -2)
LAYOUTS = [("token", -1), ("channel", -2)]


@pytest.mark.parametrize("dtype", sorted(QUANT))
@pytest.mark.parametrize("name,axis", LAYOUTS)
def test_official_scheme_fake_quant_forward_and_clipped_ste_are_bit_exact(dtype, name, axis):
    case = QUANT[dtype]
    x = case["z"].clone().requires_grad_(True)
    y = fake_quant_int4(x, case[f"{name}_group"], axis, scheme="official", ste="clipped")
    y.backward(case["grad_out"])
    assert torch.equal(y.detach(), case[f"{name}_out"])          # Eqs. O1–O4, op for op
    assert torch.equal(x.grad, case[f"{name}_grad"])             # gradient zeroed at/outside [lo_g, hi_g]
    assert 0.05 < float((x.grad == 0).float().mean()) < 0.5      # the clip mask is exercised, not trivial


@pytest.mark.parametrize("dtype", sorted(QUANT))
@pytest.mark.parametrize("name,axis", LAYOUTS)
def test_official_scheme_int4_storage_dequantizes_to_the_official_values(dtype, name, axis):
    """Int4Tensor holds the integer zero point as zero = −zp·scale (rounded to the dtype): x̂ = code·scale + zero
    equals the official (code − zp)·scale up to the roundings of zero and of the sum (≤ 2 ulp of |x̂| + |zero|)."""
    case = QUANT[dtype]
    group = case[f"{name}_group"]
    q = quantize_int4(case["z"], group, axis, scheme="official")
    x_hat = dequantize_int4(q).float()
    off = case[f"{name}_out"].float()
    zero = q.zero.float().repeat_interleave(group, dim=axis)
    bound = 2 * torch.finfo(case["z"].dtype).eps * (off.abs() + zero.abs())
    err = (x_hat - off).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.max()) > 0 or dtype == "float32"           # (fp16: the stored zero's rounding is visible)


def test_official_value_groups_per_head_on_a_joint_latent():
    """The official per-head value groups = ``head_group_size(r, n_kv)`` along the last axis of a joint latent."""
    case = QUANT["float32"]
    z = case["z"]                                                # [B, n_kv, T, r/n_kv]
    b, n_kv, t, rh = z.shape
    joint = z.transpose(1, 2).reshape(b, t, n_kv * rh)[:, None]  # [B, 1, T, r]: head i owns channels i·r/n_kv …
    group = head_group_size(n_kv * rh, n_kv)
    y = fake_quant_int4(joint, group, -1, scheme="official")
    assert torch.equal(y[:, 0].reshape(b, t, n_kv, rh).transpose(1, 2), case["token_out"])


def test_official_scheme_clips_groups_without_zero_where_ours_does_not():
    """The reviewer's finding, on the golden latents: the official zero-point clamp loses the groups whose range
    excludes 0 (per-channel keys with a channel offset); ours keeps [min, max] representable."""
    z = QUANT["float32"]["z"]
    official, ours = quant_error(z, "official", 32, -2), quant_error(z, "reprise", 32, -2)
    assert official > 20 * ours
    assert official == pytest.approx(float((z - QUANT["float32"]["channel_out"]).pow(2).sum() / z.pow(2).sum()),
                                     rel=1e-5)


def _dense(a_weight: torch.Tensor, b_weight: torch.Tensor) -> torch.Tensor:
    """Official nn.Linear weights (proj_a [r, d_model], proj_b [C, r]) → W_eff [d_model, C] with y = x·W_eff."""
    return a_weight.T.double() @ b_weight.T.double()


def test_svd_init_product_matches_official_init_svd():
    W = FACT["W_k"].T                                            # math convention [d_model, C]
    r = FACT["per_head"] * FACT["n_kv"]
    f = factorize(W, r, 1, "svd")
    off = _dense(FACT["init_svd_a"], FACT["init_svd_b"])
    assert torch.allclose(f.dense().double(), off, atol=5e-6, rtol=0)
    # same A/B balance (A = U√Σ, B = √ΣVᵀ): factors equal up to a sign per latent channel
    sign = torch.sign((f.A[0] * FACT["init_svd_a"].T).sum(0))
    assert torch.allclose(f.A[0] * sign, FACT["init_svd_a"].T, atol=3e-5)      # official SVD is fp32, ours fp64
    assert torch.allclose(f.B[0] * sign[:, None], FACT["init_svd_b"].T, atol=3e-5)


def test_official_asvd_statistic_is_n_samples_times_the_mean_abs():
    """asvd_init_calib.py's hook: Σ over N batch-1 samples of per-sample mean_t |x| (equal lengths → N·mean|x|)."""
    m = FACT["X"].abs().mean(0)
    for kind in ("k", "v"):
        assert torch.allclose(FACT["n_samples"] * m, FACT[f"calib_{kind}"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["k", "v"])
def test_asvd_official_sum_matches_official_init_asvd_factors_and_mean_only_the_product(kind):
    W, r, n = FACT[f"W_{kind}"].T, FACT["per_head"] * FACT["n_kv"], FACT["n_samples"]
    m = FACT["X"].abs().mean(0)
    A_off, B_off = FACT[f"init_asvd_{kind}_a"].T, FACT[f"init_asvd_{kind}_b"].T
    off = _dense(FACT[f"init_asvd_{kind}_a"], FACT[f"init_asvd_{kind}_b"])
    official = factorize(W, r, 1, "asvd", act_abs_mean=m, asvd_stat="official_sum", asvd_samples=n)
    ours = factorize(W, r, 1, "asvd", act_abs_mean=m)
    for f in (official, ours):                                   # A·B is the same either way
        assert torch.allclose(f.dense().double(), off, atol=5e-6, rtol=0)
    sign = torch.sign((official.A[0] * A_off).sum(0))
    assert torch.allclose(official.A[0] * sign, A_off, atol=3e-5 * float(A_off.abs().max()))
    assert torch.allclose(official.B[0] * sign[:, None], B_off, atol=3e-5 * float(B_off.abs().max()))
    # the mean statistic splits the scale differently: A·N^{α/2}, B·N^{−α/2} (α = 0.5)
    ratio = ours.A[0].norm(dim=0) / A_off.norm(dim=0)
    assert torch.allclose(ratio, torch.full_like(ratio, n ** 0.25), rtol=1e-4)


def test_asvd_stat_option_is_validated():
    W, m = FACT["W_k"].T, FACT["X"].abs().mean(0)
    with pytest.raises(ValueError, match="asvd_stat must be one of"):
        factorize(W, 8, 1, "asvd", act_abs_mean=m, asvd_stat="sum")
    with pytest.raises(ValueError, match="asvd_samples"):
        factorize(W, 8, 1, "asvd", act_abs_mean=m, asvd_stat="official_sum")
    default = factorize(W, 8, 1, "asvd", act_abs_mean=m)
    explicit = factorize(W, 8, 1, "asvd", act_abs_mean=m, asvd_stat="mean", asvd_samples=7)
    assert torch.equal(default.A, explicit.A) and torch.equal(default.B, explicit.B)
