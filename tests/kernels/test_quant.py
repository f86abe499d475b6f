"""4-bit asymmetric min-max quantizer (CSKV/KIVI): reference properties and Triton == torch parity."""
from __future__ import annotations


import pytest
import torch

from kernels.quant import (
    Int4Tensor,
    cat_int4_tokens,
    dequantize_int4,
    fake_quant_int4,
    quantize_int4,
)
from kernels.quant import head_group_size, quant_error
from kernels.quant.quant_ref import _grouped_minmax, pack_codes, unpack_codes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_triton = pytest.mark.requires_triton  # tests/kernels/conftest.py

# (shape, group_size, axis): keys grouped over tokens (per channel), values over channels (per token / whole row).
LAYOUTS = [((2, 3, 40, 12), 8, -2), ((2, 3, 40, 12), 12, -1), ((2, 64, 26), 32, -2), ((5, 12), 4, -1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _x(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 0.5
    return x.to(dtype=dtype).to(DEVICE)


def _expand(stat: torch.Tensor, q: Int4Tensor) -> torch.Tensor:
    return stat.float().repeat_interleave(q.group_size, dim=q.axis)


@pytest.mark.parametrize("shape,group_size,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_is_bounded_by_half_a_step(shape, group_size, axis, dtype):
    x = _x(shape, dtype)
    q = quantize_int4(x, group_size, axis)
    x_hat = dequantize_int4(q)
    assert x_hat.dtype == dtype and x_hat.shape == x.shape
    err = (x.float() - x_hat.float()).abs()
    step = _expand(q.scale, q)
    # |x - x̂| <= scale/2, plus the dtype rounding of x̂ (and of a scale rounded down in low precision).
    slack = torch.finfo(dtype).eps * (x.float().abs() + 16 * step)
    assert torch.all(err <= step / 2 + slack), (err - step / 2 - slack).max()


@pytest.mark.parametrize("shape,group_size,axis", LAYOUTS)
def test_group_min_and_max_map_to_codes_0_and_15(shape, group_size, axis):
    x = _x(shape, torch.float32)
    q = quantize_int4(x, group_size, axis)
    codes = unpack_codes(q.packed)
    *lead, t, c = codes.shape
    if axis == -2:
        grouped, dim = codes.reshape(*lead, t // group_size, group_size, c), -2
    else:
        grouped, dim = codes.reshape(*lead, t, c // group_size, group_size), -1
    assert torch.all(grouped.amin(dim=dim) == 0) and torch.all(grouped.amax(dim=dim) == 15)


def test_constant_group_is_reproduced_exactly_without_nan():
    x = torch.full((4, 32, 8), 1.25, device=DEVICE)
    x[1] = torch.randn(32, 8, device=DEVICE)
    for axis, gs in ((-2, 32), (-1, 8)):
        q = quantize_int4(x, gs, axis)
        x_hat = dequantize_int4(q)
        assert torch.isfinite(x_hat).all()
        assert torch.equal(x_hat[0], x[0]) and torch.equal(x_hat[2:], x[2:])


def test_pack_unpack_is_exact_on_all_codes():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (3, 7, 32), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 7, 16)
    assert torch.equal(unpack_codes(packed), codes)
    assert torch.equal(packed[..., 0], codes[..., 0] | (codes[..., 1] << 4))  # channel 2i low nibble, 2i+1 high


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nbytes_equals_real_storage_and_analytic_count(dtype):
    b, h, t, r = 2, 3, 64, 16
    x = _x((b, h, t, r), dtype)
    elt = torch.finfo(dtype).bits // 8
    keys = quantize_int4(x, 32, axis=-2)  # per channel over 32-token groups
    values = quantize_int4(x, r, axis=-1)  # per token, whole row
    want_k = b * h * (t * r // 2 + 2 * (t // 32) * r * elt)
    want_v = b * h * (t * r // 2 + 2 * t * (r // r) * elt)
    assert keys.nbytes() == want_k == keys.analytic_nbytes()
    assert values.nbytes() == want_v == values.analytic_nbytes()
    real = sum(s.untyped_storage().nbytes() for s in (keys.packed, keys.scale, keys.zero))
    assert keys.nbytes() == real


@requires_triton
@pytest.mark.parametrize("shape,group_size,axis", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_quantizer_matches_torch_bit_for_bit(shape, group_size, axis, dtype):
    x = _x(shape, dtype, seed=3)
    ref = quantize_int4(x, group_size, axis, impl="torch")
    tri = quantize_int4(x, group_size, axis, impl="triton")
    assert tri.shape == ref.shape and tri.axis == ref.axis and tri.group_size == ref.group_size
    assert torch.equal(tri.packed, ref.packed)
    assert torch.equal(tri.scale, ref.scale) and torch.equal(tri.zero, ref.zero)
    assert torch.equal(dequantize_int4(ref, impl="triton"), dequantize_int4(ref, impl="torch"))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=requires_triton)])
def test_fake_quant_forward_is_round_trip_and_gradient_is_identity(impl):
    x = _x((2, 32, 16), torch.float32).requires_grad_(True)
    y = fake_quant_int4(x, 16, axis=-1, impl=impl)
    assert torch.equal(y.detach(), dequantize_int4(quantize_int4(x.detach(), 16, -1)))
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.randn(4, 7), group_size=7, axis=-1), "last dim"),
    (dict(x=torch.randn(40, 8), group_size=32, axis=-2), "group_size must divide"),
    (dict(x=torch.randn(4, 12), group_size=3, axis=-1), "must be even"),
    (dict(x=torch.randn(4, 8), group_size=0, axis=-1), "positive int"),
    (dict(x=torch.randn(4, 8), group_size=4, axis=2), "axis must be"),
    (dict(x=torch.randn(2, 4, 8), group_size=4, axis=0), "axis must be"),
    (dict(x=torch.randn(8), group_size=4, axis=-1), "at least 2 dims"),
    (dict(x=torch.randint(0, 5, (4, 8)), group_size=4, axis=-1), "dtype"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64), group_size=4, axis=-1), "dtype"),
])
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=requires_triton)])
def test_bad_quantizer_inputs_raise_value_error(kwargs, match, impl):
    with pytest.raises(ValueError, match=match):
        quantize_int4(**kwargs, impl=impl)


def test_bad_impl_and_malformed_int4_tensor_raise_value_error():
    x = torch.randn(8, 8)
    with pytest.raises(ValueError, match="impl"):
        quantize_int4(x, 4, -1, impl="cuda")
    q = quantize_int4(x, 4, -1)
    bad = Int4Tensor(q.packed, q.scale[:, :1], q.zero, q.shape, q.group_size, q.axis)
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_int4(bad)


@pytest.mark.parametrize("axis,group_size", [(-2, 32), (-1, 16)])
def test_appending_quantized_blocks_equals_quantizing_the_whole_cache(axis, group_size):
    x = _x((2, 3, 96, 16), torch.float16)
    whole = quantize_int4(x, group_size, axis)
    parts = cat_int4_tokens([quantize_int4(x[..., :32, :], group_size, axis),
                             quantize_int4(x[..., 32:, :], group_size, axis)])
    assert parts.shape == whole.shape and parts.nbytes() == whole.nbytes()
    for name in ("packed", "scale", "zero"):
        assert torch.equal(getattr(parts, name), getattr(whole, name))
    with pytest.raises(ValueError, match="does not match"):
        cat_int4_tokens([whole, quantize_int4(x, 8 if axis == -1 else 16, axis)])


# ---- the official CSKV scheme (integer zero point in [0, 15]) and the clipped STE ------------------------------
def test_official_scheme_clips_a_group_that_excludes_zero_and_ours_does_not():
    """min > 0 ⇒ zp = clamp(−round(min/scale), 0, 15) = 0 ⇒ representable range [0, max − min]: values above
    max − min saturate. Ours (zero = min) represents [min, max]."""
    x = (torch.linspace(0, 1, 16) + 10.0).reshape(1, 16)          # one group, all positive, range 1
    off = quantize_int4(x, 16, -1, scheme="official")
    assert torch.equal(off.zero, torch.zeros_like(off.zero)) and float(off.scale) == pytest.approx(1 / 15)
    assert float(dequantize_int4(off).max()) == pytest.approx(1.0)     # 15·scale: everything saturates at 1.0
    ours = dequantize_int4(quantize_int4(x, 16, -1))
    assert float((ours - x).abs().max()) <= float(quantize_int4(x, 16, -1).scale) / 2 + 1e-6


@pytest.mark.parametrize("shape,group_size,axis", LAYOUTS)
def test_official_scheme_is_within_one_step_on_groups_that_contain_zero(shape, group_size, axis):
    """min < 0 < max ⇒ zp = round(−min/scale) ∈ [0, 15]: the range [−zp·s, (15 − zp)·s] misses [min, max] by at most
    s/2 at either end, so |x − x̂| ≤ s (rounding s/2 + zero-point rounding s/2)."""
    x = _x(shape, torch.float32, seed=5) - 0.5                    # zero-mean
    q = quantize_int4(x, group_size, axis, scheme="official")
    mn, mx = (_expand(t, q) for t in _grouped_minmax(x, group_size, axis))
    spans = (mn < 0) & (mx > 0)
    assert float(spans.float().mean()) > 0.8
    s, z = _expand(q.scale, q), _expand(q.zero, q)
    zp = torch.round(-z / s)
    assert bool(((zp >= 0) & (zp <= 15)).all()) and torch.allclose(zp * s, -z, atol=1e-6)   # integer zero point
    assert bool(((dequantize_int4(q) - x).abs() <= s * (1 + 1e-5))[spans].all())


def test_official_fake_quant_forward_equals_its_int4_storage():
    x = _x((2, 3, 64, 8), torch.float32)
    for axis, group in ((-2, 32), (-1, 8)):
        fq = fake_quant_int4(x, group, axis, scheme="official")
        st = dequantize_int4(quantize_int4(x, group, axis, scheme="official"))
        assert torch.allclose(fq, st, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", ["reprise", "official"])
def test_clipped_ste_zeroes_the_gradient_at_and_outside_the_range_only(scheme):
    x = _x((4, 32, 8), torch.float32).requires_grad_(True)
    y = fake_quant_int4(x, 8, -1, scheme=scheme, ste="clipped")
    grad = torch.randn_like(y)
    y.backward(grad)
    q = quantize_int4(x.detach(), 8, -1, scheme=scheme)
    lo = _expand(q.zero, q)
    hi = lo + 15 * _expand(q.scale, q)
    xs = x.detach()
    outside = (xs <= lo) | (xs >= hi)
    inside = (xs > lo + 1e-5) & (xs < hi - 1e-5)
    assert torch.equal(x.grad[inside], grad[inside])
    assert bool((x.grad[outside] == 0).all()) and int(outside.sum()) >= 32   # each group's min is on the bound
    if scheme == "reprise":                                       # [min, max] is representable: only the bounds
        assert bool((outside == ((xs == xs.amin(-1, keepdim=True)) | (xs >= hi))).all())


def test_identity_ste_stays_the_default_and_head_groups_and_errors():
    x = _x((2, 32, 16), torch.float32).requires_grad_(True)
    fake_quant_int4(x, 16, -1).backward(torch.ones(2, 32, 16))
    assert torch.equal(x.grad, torch.ones(2, 32, 16))
    assert head_group_size(64, 2) == 32
    with pytest.raises(ValueError, match="divide"):
        head_group_size(10, 3)
    z = _x((1, 64, 16), torch.float32)
    assert quant_error(z, "reprise", 16, -1) == pytest.approx(
        float((dequantize_int4(quantize_int4(z, 16, -1)) - z).pow(2).sum() / z.pow(2).sum()))


@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="kivi"), "scheme must be one of"),
    (dict(ste="sigmoid"), "ste must be one of"),
    (dict(scheme="official", impl="triton"), "only with impl='torch'"),
])
def test_bad_scheme_ste_or_official_triton_raise_value_error(kwargs, match):
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=match):
        fake_quant_int4(x, 4, -1, **kwargs)
    if "ste" not in kwargs:
        with pytest.raises(ValueError, match=match):
            quantize_int4(x, 4, -1, **kwargs)
