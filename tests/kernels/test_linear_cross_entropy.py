"""Cut Cross-Entropy: Triton kernels and the chunked PyTorch version vs an fp64 reference (flash-attn tolerance
rule), gradient filtering and vocabulary sorting, the Hugging Face causal-LM drop-in, input validation, and a tiny
CPU run of the benchmark CLI."""
from __future__ import annotations

import json

import pytest
import torch

from kernels.linear_cross_entropy import (
    causal_lm_loss,
    default_filter_block,
    default_filter_eps,
    gradient_filter_stats,
    linear_cross_entropy,
    linear_cross_entropy_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V_DEFAULT = 101  # not a multiple of any block size

requires_triton = pytest.mark.requires_triton  # tests/kernels/conftest.py


def make_inputs(lead=(2, 19), d=40, v=V_DEFAULT, bias=False, n_ignored=3, logit_scale=1.0, seed=0):
    """fp64 master inputs: ``e [*lead, d]``, ``c [v, d]`` (logits ~ N(0, logit_scale²)), optional bias, targets with
    ``n_ignored`` positions set to -100."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    c = torch.randn(v, d, generator=g, dtype=torch.float64) * (logit_scale / d ** 0.5)
    b = 0.3 * torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, lead, generator=g)
    flat = t.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:n_ignored]] = -100
    return e, c, b, t


def run_loss_and_grads(fn, e, c, b, t, dtype, reduction, weight_seed=1):
    """Loss and (∇e, ∇c, ∇b) in fp64 of ``fn`` on inputs cast to ``dtype``; ``"none"`` is reduced with fixed random
    weights so every per-position gradient is exercised."""
    leaves = [x.detach().to(device=DEVICE, dtype=dtype).requires_grad_() if x is not None else None for x in (e, c, b)]
    loss = fn(leaves[0], leaves[1], t.to(DEVICE), leaves[2])
    if reduction == "none":
        w = torch.rand(loss.shape, generator=torch.Generator().manual_seed(weight_seed), dtype=torch.float64)
        scalar = (loss.double() * w.to(DEVICE)).sum()
    else:
        scalar = loss.double()
    grads = torch.autograd.grad(scalar, [x for x in leaves if x is not None])
    return loss.detach().double().cpu(), [gr.double().cpu() for gr in grads]


def max_err(a, b) -> float:
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    return float(torch.where(both_nan, 0.0, (a - b).abs()).max()) if a.numel() else 0.0


#: absolute slack of the flash-attn rule, relative to the largest reference magnitude (fp32 rounding noise of the
#: fp32 accumulators, which the fp32 torch reference does not share bit for bit).
SLACK = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def assert_flash_rule(impl_out, torch_out, ref_out, dtype, what):
    """kernel error vs fp64 <= 2 × (torch reference in ``dtype``) error vs fp64 + slack."""
    (li, gi), (lt, gt), (lr, gr) = impl_out, torch_out, ref_out
    for name, a, tt, r in [("loss", li, lt, lr)] + [(f"grad[{k}]", x, y, z) for k, (x, y, z) in
                                                    enumerate(zip(gi, gt, gr))]:
        scale = float(r.abs().max()) if r.numel() else 1.0
        if name == "loss":  # nats: fp32 rounding of O(1)-size logits sets the floor even for a near-zero loss
            scale = max(scale, 1.0)
        err, tol = max_err(a, r), 2 * max_err(tt, r) + SLACK[dtype] * max(scale, 1e-3)
        assert err <= tol, f"{what} {name}: error {err:.3e} > tolerance {tol:.3e} (torch {dtype} error " \
                           f"{max_err(tt, r):.3e})"


def _impl_fn(impl, reduction, shift, **kw):
    return lambda e, c, t, b: linear_cross_entropy(e, c, t, b, reduction=reduction, shift=shift, impl=impl, **kw)


CASES = [  # (lead, d, v, bias, shift, reduction, n_ignored)
    ((2, 19), 40, 101, False, False, "mean", 3),
    ((2, 19), 40, 101, True, True, "sum", 2),
    ((3, 11), 24, 70, True, True, "none", 4),
    ((37,), 33, 129, False, False, "none", 0),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=requires_triton), "torch_chunked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_loss_and_grads_match_fp64_reference_within_flash_rule(impl, dtype, case):
    lead, d, v, bias, shift, reduction, n_ign = CASES[case]
    e, c, b, t = make_inputs(lead, d, v, bias, n_ign, seed=case)
    kw = {"filter_eps": None} if impl == "triton" else {"chunk_size": 7}
    ref = run_loss_and_grads(_impl_fn("torch", reduction, shift), e, c, b, t, torch.float64, reduction)
    low = run_loss_and_grads(_impl_fn("torch", reduction, shift), e, c, b, t, dtype, reduction)
    out = run_loss_and_grads(_impl_fn(impl, reduction, shift, **kw), e, c, b, t, dtype, reduction)
    assert out[0].shape == ref[0].shape
    assert_flash_rule(out, low, ref, dtype, f"{impl}/{dtype}/case{case}")


def make_peaked_inputs(n=48, d=32, v=300, alpha=45.0, seed=7):
    """Confident predictions, as in a trained LM: ``e_i ≈ α c_{y_i}``, so each token's softmax has one large entry
    and most vocabulary tiles are numerically zero (§4.3's premise for gradient filtering)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5
    t = torch.randint(0, v, (n,), generator=g)
    e = alpha * c[t] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(v, generator=g, dtype=torch.float64)
    t[:2] = -100
    return e, c, b, t


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("vocab_sort", [False, True])
def test_gradient_filtering_skips_tiles_and_stays_within_flash_rule(dtype, vocab_sort):
    """§4.3: with peaked softmaxes most tiles are below eps and skipped; gradients stay as accurate as torch's."""
    from kernels.linear_cross_entropy.linear_cross_entropy_triton import TritonOptions, linear_cross_entropy_triton

    e, c, b, t = make_peaked_inputs()
    stats: dict = {}
    eps = default_filter_eps(dtype)
    fn = lambda e_, c_, t_, b_: linear_cross_entropy_triton(  # noqa: E731
        e_, c_, t_, b_, filter_eps=eps, vocab_sort=vocab_sort, options=TritonOptions(stats=stats))
    out = run_loss_and_grads(fn, e, c, b, t, dtype, "mean")
    assert 0 < stats["tiles_computed"] < stats["tiles_total"], stats
    ref = run_loss_and_grads(_impl_fn("torch", "mean", False), e, c, b, t, torch.float64, "mean")
    low = run_loss_and_grads(_impl_fn("torch", "mean", False), e, c, b, t, dtype, "mean")
    assert_flash_rule(out, low, ref, dtype, f"filtered/{dtype}/sort={vocab_sort}")


@requires_triton
@pytest.mark.parametrize("impl", ["triton", "torch_chunked"])
def test_filter_eps_above_one_drops_every_tile_including_the_targets(impl):
    """The official rule filters on |S − Y| with the target entries included: every entry is < 1.5, so every tile
    is dropped — all gradients are exactly zero (the loss is unchanged), and the statistics say 0 tiles kept."""
    e, c, b, t = make_inputs((30,), 24, 90, bias=True, n_ignored=4, seed=3)
    fn = _impl_fn(impl, "sum", False, filter_eps=1.5, filter_block=(16, 32))
    loss, grads = run_loss_and_grads(fn, e, c, b, t, torch.float32, "sum")
    exact, _ = run_loss_and_grads(_impl_fn("torch", "sum", False), e, c, b, t, torch.float32, "sum")
    torch.testing.assert_close(loss, exact, atol=1e-5, rtol=1e-6)
    for gr in grads:
        assert gr.abs().max() == 0
    stats = gradient_filter_stats(e.float(), c.float(), t, b.float(), filter_eps=1.5, filter_block=(16, 32))
    assert stats["blocks_kept"] == 0 and stats["blocks_total"] == 2 * 3 and stats["tokens"] == 26


def _popular_tokens(n: int, d: int, v: int):
    """Inputs whose softmax mass sits on 6 popular tokens scattered over the vocabulary (6 of the 8 tiles of 32 for
    v = 256): every hidden state points along one direction u, the popular classifier rows too; targets are popular."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    e = u * 4.0 + 0.1 * torch.randn(n, d, generator=g)
    c = 0.05 * torch.randn(v, d, generator=g)
    popular = torch.arange(5, v, 37)[:6]
    c[popular] += 3.0 * u
    return e, c, popular[torch.randint(0, len(popular), (n,), generator=g)]


@requires_triton
def test_vocabulary_sorting_clusters_popular_tokens_into_fewer_tiles():
    """§4.3: a few tokens with high logits for every input, scattered over the vocabulary, share one tile once the
    vocabulary is ordered by average logit — fewer tiles survive the filter, gradients are unchanged."""
    from kernels.linear_cross_entropy.linear_cross_entropy_triton import TritonOptions, linear_cross_entropy_triton

    n, d, v = 32, 16, 256
    e, c, t = _popular_tokens(n, d, v)
    eps = default_filter_eps(torch.bfloat16)
    results = {}
    for sort, filt in ((False, eps), (True, eps), (False, None)):
        stats: dict = {}
        fn = lambda e_, c_, t_, b_: linear_cross_entropy_triton(  # noqa: E731
            e_, c_, t_, b_, filter_eps=filt, vocab_sort=sort, options=TritonOptions(stats=stats))
        results[sort, filt] = (run_loss_and_grads(fn, e.double(), c.double(), None, t, torch.float32, "mean"), stats)
    # 2 token blocks × (6 scattered tiles unsorted, 1 tile sorted) hold the popular tokens; the rest are skipped
    assert results[False, eps][1]["tiles_computed"] == 12, results[False, eps][1]
    assert results[True, eps][1]["tiles_computed"] == 2, results[True, eps][1]
    (l_exact, g_exact) = results[False, None][0]
    # a skipped entry has S < eps and g = 1/n: |Δ∇C_v| <= eps·max|e|, |Δ∇E_i| <= (v/n)·eps·max|c|
    bounds = (eps * v / n * float(c.abs().max()), eps * float(e.abs().max()))
    for key in ((False, eps), (True, eps)):
        lo, gs = results[key][0]
        torch.testing.assert_close(lo, l_exact, atol=1e-6, rtol=1e-6)
        for got, want, bound in zip(gs, g_exact, bounds):
            assert max_err(got, want) <= bound, (key, max_err(got, want), bound)


# ------------------------------------------------------------------------- filtering in the torch path, softcap
FILTER_CASES = [  # (eps, vocab_sort, softcap, bias, shift, reduction)
    (1e-4, False, None, True, False, "mean"),
    (1e-4, True, None, False, True, "sum"),
    (3e-3, True, 20.0, True, True, "none"),
    (3e-3, False, 20.0, False, False, "mean"),
]


@requires_triton
@pytest.mark.parametrize("case", range(len(FILTER_CASES)))
def test_torch_chunked_filter_equals_triton_filter_tile_for_tile(case):
    """The torch path's gradient filter (same tiles, same rule, same vocabulary order) gives the Triton kernel's
    loss and gradients, keeps the same number of tiles as the kernel counts, and that number is what
    :func:`gradient_filter_stats` reports; the filter really dropped tiles (gradients differ from the exact ones)."""
    from kernels.linear_cross_entropy.linear_cross_entropy_triton import (
        BlockConfig,
        TritonOptions,
        linear_cross_entropy_triton,
    )

    eps, sort, cap, bias, shift, red = FILTER_CASES[case]
    e, c, b, t = make_peaked_inputs(n=40, d=32, v=200, alpha=25.0, seed=case)
    e = e.view(2, 20, 32)
    t = t.view(2, 20)
    b = b if bias else None
    block = (16, 32)
    chunked = run_loss_and_grads(_impl_fn("torch_chunked", red, shift, filter_eps=eps, vocab_sort=sort, softcap=cap,
                                          filter_block=block, chunk_size=7), e, c, b, t, torch.float32, red)
    stats: dict = {}
    opts = TritonOptions(stats=stats, backward_config=BlockConfig(*block, 32))
    tri_fn = lambda e_, c_, t_, b_: linear_cross_entropy_triton(  # noqa: E731
        e_, c_, t_, b_, reduction=red, shift=shift, filter_eps=eps, vocab_sort=sort, options=opts, softcap=cap)
    tri = run_loss_and_grads(tri_fn, e, c, b, t, torch.float32, red)
    torch.testing.assert_close(chunked[0], tri[0], atol=2e-5, rtol=1e-5)
    for x, y in zip(chunked[1], tri[1]):  # fp32 rounding of O(α²) logits; a flipped tile would differ by >= eps·|e|
        torch.testing.assert_close(x, y, atol=2e-6 * max(float(y.abs().max()), 1.0), rtol=1e-5)
    st = gradient_filter_stats(e.float(), c.float(), t, None if b is None else b.float(), shift=shift, softcap=cap,
                               filter_eps=eps, filter_block=block, vocab_sort=sort, chunk_size=5)
    assert (st["blocks_kept"], st["blocks_total"]) == (stats["tiles_computed"], stats["tiles_total"]), (st, stats)
    assert 0 < st["blocks_kept"] < st["blocks_total"]
    exact = run_loss_and_grads(_impl_fn("torch", red, shift, softcap=cap), e, c, b, t, torch.float32, red)
    assert max(max_err(x, y) for x, y in zip(chunked[1], exact[1])) > 0


@requires_triton
@pytest.mark.parametrize("impl", ["triton", "torch_chunked"])
def test_filter_eps_zero_is_bitwise_the_exact_gradient(impl):
    """eps = 0 drops nothing (no |S − Y| is < 0): identical to ``filter_eps=None``; for torch_chunked the default
    ``"auto"`` is exact too."""
    e, c, b, t = make_peaked_inputs(n=40, d=32, v=200, alpha=12.0)
    kw = dict(filter_block=(16, 32), vocab_sort=True)
    zero = run_loss_and_grads(_impl_fn(impl, "mean", False, filter_eps=0.0, **kw), e, c, b, t, torch.float32, "mean")
    none = run_loss_and_grads(_impl_fn(impl, "mean", False, filter_eps=None, **kw), e, c, b, t, torch.float32, "mean")
    assert torch.equal(zero[0], none[0]) and all(torch.equal(x, y) for x, y in zip(zero[1], none[1]))
    if impl == "torch_chunked":
        auto = run_loss_and_grads(_impl_fn(impl, "mean", False), e, c, b, t, torch.float32, "mean")
        assert all(torch.equal(x, y) for x, y in zip(auto[1], none[1]))


def test_gradient_filter_stats_counts_tiles_independent_of_chunking():
    """Chunk sizes do not change the count (chunks are rounded to whole tiles); a larger eps keeps fewer tiles;
    eps = 0 keeps all; popular tokens scattered over the vocabulary fall into fewer tiles once sorted."""
    n, d, v = 64, 16, 256
    e, c, t = _popular_tokens(n, d, v)
    t[:3] = -100
    kw = dict(filter_block=(16, 32))
    base = gradient_filter_stats(e, c, t, filter_eps=1e-4, **kw)
    for chunk in (1, 17, 1000):
        assert gradient_filter_stats(e, c, t, filter_eps=1e-4, chunk_size=chunk, **kw) == base
    assert base["blocks_total"] == 4 * 8 and base["tokens"] == 61
    assert base["blocks_kept"] == 4 * 6  # the 6 tiles holding a popular token, in each of the 4 token blocks
    assert gradient_filter_stats(e, c, t, filter_eps=1e-4, vocab_sort=True, **kw)["blocks_kept"] == 4
    assert gradient_filter_stats(e, c, t, filter_eps=0.0, **kw)["fraction_kept"] == 1.0
    assert gradient_filter_stats(e, c, t, filter_eps=2.0, **kw)["blocks_kept"] == 0
    with pytest.raises(ValueError, match="filter_eps must be"):
        gradient_filter_stats(e, c, t, filter_eps=None)


def test_default_filter_block_is_the_triton_gpu_backward_tile():
    from kernels.linear_cross_entropy.linear_cross_entropy_triton import GPU_BACKWARD, GPU_BACKWARD_FP32

    assert default_filter_block(torch.bfloat16) == (GPU_BACKWARD.block_n, GPU_BACKWARD.block_v) == (128, 128)
    assert default_filter_block(torch.float32) == (GPU_BACKWARD_FP32.block_n, GPU_BACKWARD_FP32.block_v)


def test_softcap_reference_is_cross_entropy_of_capped_logits():
    e, c, b, t = make_inputs(logit_scale=30.0, bias=True)
    z = e @ c.T + b
    want = torch.nn.functional.cross_entropy((7.0 * torch.tanh(z / 7.0)).flatten(0, 1), t.flatten())
    got = linear_cross_entropy(e, c, t, b, impl="torch", softcap=7.0)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert abs(float(linear_cross_entropy(e, c, t, b, impl="torch")) - float(want)) > 1.0


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=requires_triton), "torch_chunked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_softcap_loss_and_grads_match_fp64_reference(impl, dtype):
    e, c, b, t = make_inputs(logit_scale=20.0, bias=True)
    fn = _impl_fn(impl, "mean", True, softcap=5.0, filter_eps=None)
    out = run_loss_and_grads(fn, e, c, b, t, dtype, "mean")
    ref = run_loss_and_grads(_impl_fn("torch", "mean", True, softcap=5.0), e, c, b, t, torch.float64, "mean")
    low = run_loss_and_grads(_impl_fn("torch", "mean", True, softcap=5.0), e, c, b, t, dtype, "mean")
    assert_flash_rule(out, low, ref, dtype, f"softcap/{impl}/{dtype}")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_vocab_chunked_scratch_and_split_forward_match_default_launch(dtype):
    """∇C accumulated through several small fp32 scratch chunks (with and without sorting) and a forward split over
    several vocabulary ranges give the same loss and gradients as one launch."""
    from kernels.linear_cross_entropy.linear_cross_entropy_triton import (
        BlockConfig,
        TritonOptions,
        linear_cross_entropy_triton,
    )

    e, c, b, t = make_inputs((2, 13), 40, 150, bias=True, n_ignored=3, logit_scale=3.0, seed=5)
    outs = []
    small = TritonOptions(num_splits=3, scratch_bytes=4 * 40 * 48, forward_config=BlockConfig(16, 16, 16),
                          backward_config=BlockConfig(32, 16, 16))  # 3 forward splits, 4 ∇C scratch chunks
    for opts, sorts in ((TritonOptions(), (False,)), (small, (False, True))):
        for sort in sorts:
            fn = lambda e_, c_, t_, b_: linear_cross_entropy_triton(  # noqa: E731
                e_, c_, t_, b_, shift=True, filter_eps=None, vocab_sort=sort, options=opts)
            outs.append(run_loss_and_grads(fn, e, c, b, t, dtype, "mean"))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for lo, gs in outs[1:]:
        torch.testing.assert_close(lo, outs[0][0], atol=tol, rtol=tol)
        for a, ref in zip(gs, outs[0][1]):
            torch.testing.assert_close(a, ref, atol=tol * float(ref.abs().max()), rtol=0)


@requires_triton
@pytest.mark.parametrize("which", ["e", "c"])
def test_only_requested_gradients_are_computed_and_strided_inputs_work(which):
    """A frozen LM head (only ∇e) or frozen hidden states (only ∇c); ``e`` a non-contiguous view."""
    e, c, b, t = make_inputs((2, 11), 24, 70, bias=True, n_ignored=2, seed=11)
    big = torch.randn(2, 11, 48, dtype=torch.float32)
    big[..., ::2] = e.float()
    outs = {}
    for impl in ("torch", "triton"):
        e_ = big.clone()[..., ::2].to(DEVICE).requires_grad_(which == "e")
        c_ = c.float().to(DEVICE).requires_grad_(which == "c")
        assert not e_.is_contiguous()
        loss = linear_cross_entropy(e_, c_, t.to(DEVICE), b.float().to(DEVICE), shift=True, impl=impl)
        (grad,) = torch.autograd.grad(loss, [e_ if which == "e" else c_])
        outs[impl] = (loss.detach().cpu(), grad.cpu())
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["triton"][1], outs["torch"][1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=requires_triton), "torch", "torch_chunked"])
def test_every_position_ignored_gives_nan_mean_and_zero_sum(impl):
    e, c, _, t = make_inputs((2, 5), 16, 40, n_ignored=10)
    e, c = e.float().to(DEVICE).requires_grad_(), c.float().to(DEVICE)
    assert torch.isnan(linear_cross_entropy(e, c, t.to(DEVICE), impl=impl))
    s = linear_cross_entropy(e, c, t.to(DEVICE), reduction="sum", impl=impl)
    assert float(s.detach()) == 0.0
    s.backward()
    assert float(e.grad.abs().max()) == 0.0


def test_reference_equals_cross_entropy_on_materialised_logits_and_hf_shift():
    e, c, b, t = make_inputs((2, 9), 16, 50, bias=True, n_ignored=3)
    logits = e @ c.T + b
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), t[:, 1:].reshape(-1))
    got = linear_cross_entropy_ref(e, c, t, b, shift=True)
    torch.testing.assert_close(got, want)
    none = linear_cross_entropy_ref(e, c, t, b, shift=True, reduction="none")
    assert none.shape == (2, 8)


def test_default_filter_eps_follows_the_paper():
    assert default_filter_eps(torch.bfloat16) == 2.0 ** -12
    assert default_filter_eps(torch.float16) == 2.0 ** -15


# ------------------------------------------------------------------------------------------------ causal-LM drop-in
@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_loss_equals_the_models_own_loss(tied, triton_runnable):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).to(DEVICE).float()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, 97, (2, 12), device=DEVICE)
    labels = ids.clone()
    labels[0, :3] = -100
    want = model(input_ids=ids, labels=labels).loss
    want.backward()
    want_grad = model.get_output_embeddings().weight.grad.clone()
    impls = ["torch", "torch_chunked"] + (["triton"] if triton_runnable else [])
    for impl in impls:
        model.zero_grad()
        got = causal_lm_loss(model, ids, labels, impl=impl, filter_eps=None)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{impl}: {m}")
        got.backward()
        torch.testing.assert_close(model.get_output_embeddings().weight.grad, want_grad, atol=1e-6, rtol=1e-4)


def test_causal_lm_loss_applies_gemma2_final_logit_softcapping(triton_runnable):
    """Gemma 2 soft-caps its logits (``final_logit_softcapping``): the drop-in picks it up and equals the model's own
    loss and LM-head gradient."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM(cfg).to(DEVICE).float()
    with torch.no_grad():  # large logits so the cap (2.0) bites
        model.get_output_embeddings().weight.mul_(50.0)
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    labels = ids.clone()
    labels[1, :2] = -100
    want = model(input_ids=ids, labels=labels).loss
    want.backward()
    want_grad = model.get_output_embeddings().weight.grad.clone()
    for impl in ["torch", "torch_chunked"] + (["triton"] if triton_runnable else []):
        model.zero_grad()
        got = causal_lm_loss(model, ids, labels, impl=impl, filter_eps=None)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{impl}: {m}")
        got.backward()
        torch.testing.assert_close(model.get_output_embeddings().weight.grad, want_grad, atol=1e-6, rtol=1e-4)
    model.config.final_logit_softcapping = None  # without the cap the loss is different: the cap was applied
    with torch.no_grad():
        assert abs(float(causal_lm_loss(model, ids, labels, impl="torch")) - float(want.detach())) > 1e-2


# ----------------------------------------------------------------------------------------------------- validation
def _ok():
    return torch.randn(2, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 5))


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.update(c=torch.randn(11, 7)), r"c.shape\[1\] must equal"),
    (lambda a: a.update(targets=torch.randint(0, 11, (2, 4))), "targets.shape must equal"),
    (lambda a: a["targets"].__setitem__((0, 0), 11), r"targets must be in \[0, 11\)"),
    (lambda a: a["targets"].__setitem__((0, 0), -5), r"got -5"),
    (lambda a: a.update(targets=a["targets"].float()), "targets must be an int64"),
    (lambda a: a.update(e=a["e"].int(), c=a["c"].int()), "e.dtype must be one of"),
    (lambda a: a.update(c=a["c"].double()), "c.dtype must equal"),
    (lambda a: a.update(e=torch.randn(8)), "at least 2 dims"),
    (lambda a: a.update(bias=torch.randn(10)), r"bias must be None or a \[11\]"),
    (lambda a: a.update(reduction="avg"), "reduction must be one of"),
    (lambda a: a.update(impl="cuda"), "impl must be one of"),
    (lambda a: a.update(filter_eps=-1.0), "filter_eps must be"),
    (lambda a: a.update(filter_eps="high"), "filter_eps must be"),
    (lambda a: a.update(shift=1), "shift must be a bool"),
    (lambda a: a.update(chunk_size=0), "chunk_size must be"),
    (lambda a: a.update(impl="triton", e=a["e"].double(), c=a["c"].double()), "for impl='triton'"),
    (lambda a: a.update(filter_eps=1e-3), r"needs impl in \('triton', 'torch_chunked'\)"),
    (lambda a: a.update(softcap=0.0), "softcap must be None or a finite float > 0"),
    (lambda a: a.update(softcap=float("inf")), "softcap must be None or a finite float > 0"),
    (lambda a: a.update(softcap="30"), "softcap must be None or a finite float > 0"),
    (lambda a: a.update(impl="torch_chunked", filter_block=(0, 4)), "filter_block must be"),
    (lambda a: a.update(impl="torch_chunked", filter_block=(8,)), "filter_block must be"),
    (lambda a: a.update(impl="triton", filter_block=(16, 24)), "powers of two >= 16"),
])
def test_bad_inputs_raise_value_error_naming_the_value(mutate, match):
    e, c, t = _ok()
    args = dict(e=e, c=c, targets=t, bias=None, reduction="mean", impl="torch", filter_eps="auto", shift=False,
                chunk_size=None)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(**args)


def test_ignore_index_targets_pass_validation():
    e, c, t = _ok()
    t[0, 0] = -1
    linear_cross_entropy(e, c, t, ignore_index=-1, impl="torch")


# ---------------------------------------------------------------------------------------------------- benchmark
@requires_triton
def test_bench_cli_tiny_cpu_run_writes_json_and_markdown(tmp_path):
    from kernels.bench.linear_cross_entropy_bench import main

    out = tmp_path / "cce"
    main(["--device", "cpu", "--tiny", "--out", str(out), "--reps", "1", "--warmup", "0", "--shapes", "tiny",
          "--inputs", "random", "--methods", "cce_ours", "cce_official", "liger", "torch", "torch_chunked"])
    doc = json.loads((tmp_path / "cce.json").read_text())
    rows = {(r["method"], r["pass"]): r for r in doc["results"]}
    assert len(rows) == 5 * 3
    for p in ("fw", "bw", "fw+bw"):
        assert rows[("cce_ours", p)]["status"] == "ok" and rows[("cce_ours", p)]["median_ms"] > 0
        assert rows[("cce_ours", p)]["peak_MiB"] is None  # CPU: memory is n/a
    assert rows[("cce_ours", "fw")]["loss"] == pytest.approx(rows[("torch", "fw")]["loss"], rel=1e-2)
    for m in ("cce_official", "liger"):  # the official Triton kernel does not run in the CPU interpreter
        st = rows[(m, "fw")]["status"]
        assert st in ("ok", "not installed") or (DEVICE == "cpu" and st.startswith("error: InterpreterError")), st
    md = (tmp_path / "cce.md").read_text()
    assert "| cce_ours |" in md and "n/a" in md
