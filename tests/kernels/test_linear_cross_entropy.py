"""Cut Cross-Entropy: Triton kernels and the chunked PyTorch version vs an fp64 reference (flash-attn tolerance
rule), gradient filtering and vocabulary sorting, the Hugging Face causal-LM drop-in, input validation, and a tiny
CPU run of the benchmark CLI."""
from __future__ import annotations

import json

import pytest
import torch

from kernels.linear_cross_entropy import (
    causal_lm_loss,
    default_filter_eps,
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
def test_filter_eps_above_every_probability_leaves_only_the_exact_target_column():
    """eps = 1 skips every softmax tile; what remains is the target column of S − Y, applied exactly:
    ∇E_i = g (S_iy − 1) c_{y_i}, ∇C_v = Σ_{y_i = v} g (S_iy − 1) e_i, ∇b_v = Σ_{y_i = v} g (S_iy − 1)."""
    from kernels.linear_cross_entropy.linear_cross_entropy_triton import TritonOptions, linear_cross_entropy_triton

    e, c, b, t = make_inputs((30,), 24, 90, bias=True, n_ignored=4, seed=3)
    stats: dict = {}
    fn = lambda e_, c_, t_, b_: linear_cross_entropy_triton(  # noqa: E731
        e_, c_, t_, b_, reduction="sum", filter_eps=1.0, options=TritonOptions(stats=stats))
    _, (de, dc, db) = run_loss_and_grads(fn, e, c, b, t, torch.float32, "sum")
    assert stats["tiles_computed"] == 0 and stats["tiles_total"] > 0
    valid = t != -100
    y = torch.where(valid, t, 0)
    p_y = torch.softmax(e @ c.T + b, dim=-1).gather(1, y[:, None]).squeeze(1)
    a = torch.where(valid, p_y - 1, 0.0)
    want_de = a[:, None] * c[y]
    want_dc = torch.zeros_like(c).index_add_(0, y, a[:, None] * e)
    want_db = torch.zeros_like(b).index_add_(0, y, a)
    torch.testing.assert_close(de, want_de, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dc, want_dc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db, want_db, atol=1e-6, rtol=1e-5)


@requires_triton
def test_vocabulary_sorting_clusters_popular_tokens_into_fewer_tiles():
    """§4.3: a few tokens with high logits for every input, scattered over the vocabulary, share one tile once the
    vocabulary is ordered by average logit — fewer tiles survive the filter, gradients are unchanged."""
    from kernels.linear_cross_entropy.linear_cross_entropy_triton import TritonOptions, linear_cross_entropy_triton

    g = torch.Generator().manual_seed(0)
    n, d, v = 32, 16, 256
    u = torch.randn(d, generator=g)
    u /= u.norm()
    e = u * 4.0 + 0.1 * torch.randn(n, d, generator=g)
    c = 0.05 * torch.randn(v, d, generator=g)
    popular = torch.arange(5, v, 37)[:6]  # scattered over 6 of the 8 tiles of 32
    c[popular] += 3.0 * u
    t = popular[torch.randint(0, len(popular), (n,), generator=g)]
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


def test_causal_lm_loss_refuses_soft_capped_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.config.final_logit_softcapping = 30.0
    ids = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_loss(model, ids, ids, impl="torch")


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
    main(["--device", "cpu", "--tiny", "--out", str(out), "--reps", "1", "--warmup", "0",
          "--methods", "cce_ours", "cce_official", "liger", "torch", "torch_chunked"])
    doc = json.loads((tmp_path / "cce.json").read_text())
    rows = {(r["method"], r["pass"]): r for r in doc["results"]}
    assert len(rows) == 5 * 3
    for p in ("fw", "bw", "fw+bw"):
        assert rows[("cce_ours", p)]["status"] == "ok" and rows[("cce_ours", p)]["median_ms"] > 0
        assert rows[("cce_ours", p)]["peak_MiB"] is None  # CPU: memory is n/a
    assert rows[("cce_ours", "fw")]["loss"] == pytest.approx(rows[("torch", "fw")]["loss"], rel=1e-2)
    for m in ("cce_official", "liger"):
        assert rows[(m, "fw")]["status"] in ("ok", "not installed")
    md = (tmp_path / "cce.md").read_text()
    assert "| cce_ours |" in md and "n/a" in md
