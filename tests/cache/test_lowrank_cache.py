"""Must-pass list of the CSKV spec for the low-rank bi-branch cache, on a tiny random Llama (GQA 4/2 heads)."""
import pytest
import torch
from transformers.cache_utils import DynamicCache

from shared.cache.base import attach, full_cache, record_prefill
from shared.cache.decompose import factorize, rank_for_density
from shared.cache.lowrank import QUANT_GROUP, LowRankLayer, lowrank_cache
from shared.kv_eval import decode_through, evaluate_methods
from shared.tasks.base import PromptCase


def _factors(model, density, per_head=False, init="svd"):
    out = []
    for layer in model.model.layers:
        a = layer.self_attn
        r = rank_for_density(density, 16, 2)
        g = 2 if per_head else 1
        out.append((factorize(a.k_proj.weight.T, r, g, init), factorize(a.v_proj.weight.T, r, g, init)))
    return out


def _ids(seed, n, batch=1):
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_prefill_logits_identical_to_uncompressed_model(tiny_llama):
    ids = _ids(0, 40)
    layers = [LowRankLayer(fk, fv, 2, window=8) for fk, fv in _factors(tiny_llama, 0.25)]
    from shared.cache.base import CompressedCache

    cache = CompressedCache(layers, "cskv")
    with attach(tiny_llama, cache):
        got = tiny_llama(ids, past_key_values=cache, use_cache=True).logits
    assert torch.equal(got, tiny_llama(ids).logits)


@pytest.mark.parametrize("per_head", [False, True])
def test_full_rank_latent_cache_reproduces_keys_and_values(tiny_llama, per_head):
    ids = _ids(1, 37)
    rec = record_prefill(tiny_llama, ids)
    cache = lowrank_cache(rec, _factors(tiny_llama, 1.0, per_head), 2, window=0)
    for layer, lr in zip(cache.layers, rec.layers):
        (k, v), = layer._latent_kv()
        torch.testing.assert_close(k, lr.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v, lr.values, rtol=1e-4, atol=1e-5)
    nxt = _ids(2, 6)
    full = decode_through(tiny_llama, full_cache(rec), nxt, 37)
    low = decode_through(tiny_llama, cache, nxt, 37)
    torch.testing.assert_close(low, full, rtol=1e-4, atol=1e-4)


def test_incremental_decode_equals_one_full_forward(tiny_llama):
    ids = _ids(3, 30)
    rec = record_prefill(tiny_llama, ids[:, :20])
    logits = decode_through(tiny_llama, full_cache(rec), ids[:, 20:], 20)
    torch.testing.assert_close(logits, tiny_llama(ids).logits[:, 20:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantize", [False, True])
def test_materialized_reconstruction_equals_rebuilding_every_step(tiny_llama, quantize):
    ids, nxt = _ids(4, 70), _ids(5, 40)
    rec = record_prefill(tiny_llama, ids)
    f = _factors(tiny_llama, 0.5)
    a = decode_through(tiny_llama, lowrank_cache(rec, f, 2, window=8, quantize=quantize), nxt, 70)
    b = decode_through(tiny_llama, lowrank_cache(rec, f, 2, window=8, quantize=quantize, materialize=False), nxt, 70)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 1, 8, 32])
def test_blocked_window_rule(tiny_llama, window):
    """At step t key j is exact iff j >= W*floor(t/W) (W = 0: nothing exact)."""
    rec = record_prefill(tiny_llama, _ids(6, 45))
    cache = lowrank_cache(rec, _factors(tiny_llama, 0.5), 2, window=window)
    for t in range(45, 60):
        layer = cache.layers[0]
        n_exact = 0 if layer.wk is None else layer.wk.shape[2]
        expect = (t - 1) + 1 - (window * ((t - 1) // window) if window else t)
        assert n_exact == expect, (t, n_exact, expect)
        decode_through(tiny_llama, cache, _ids(t, 1), t)


@pytest.mark.parametrize("per_head,quantize", [(False, False), (True, False), (False, True), (True, True)])
def test_bytes_are_real_storage_and_match_analytic_count(tiny_llama, per_head, quantize):
    rec = record_prefill(tiny_llama, _ids(7, 100, batch=2))
    cache = lowrank_cache(rec, _factors(tiny_llama, 0.5, per_head), 2, window=8, quantize=quantize)
    decode_through(tiny_llama, cache, _ids(8, 3, batch=2), 100)
    for layer in cache.layers:
        real = sum(t.untyped_storage().nbytes() for t in layer.stored_tensors())
        assert layer.stored_bytes() == real
        assert abs(real - layer.analytic_bytes()) <= 0.02 * real
    if quantize:
        assert len(cache.layers[0].q_chunks) == 96 // QUANT_GROUP


def test_compression_ratio_accounting(tiny_llama):
    """Paper ratio 1 - density vs measured bytes: latents only (W = 0) hit the paper's ratio exactly."""
    rec = record_prefill(tiny_llama, _ids(9, 64))
    full = full_cache(rec).stored_bytes()
    assert full == 2 * 2 * 64 * 32 * 4  # K,V x layers x tokens x channels x fp32
    low = lowrank_cache(rec, _factors(tiny_llama, 0.25), 2, window=0).stored_bytes()
    assert low / full == pytest.approx(0.25)
    windowed = lowrank_cache(rec, _factors(tiny_llama, 0.25), 2, window=32).stored_bytes()
    assert windowed > low  # the exact window and its pending latents cost real bytes


@pytest.mark.parametrize("window,n_pad", [(4, 8), (0, 6), (64, 6)])
def test_batch_with_left_padding_matches_unpadded_rows(tiny_llama, window, n_pad):
    """Window blocks are aligned on batch positions, so a padded row equals its solo run whenever the pad count
    is a multiple of W (or W = 0 / W longer than the sequence); otherwise its boundary shifts by < W tokens."""
    a, b = _ids(10, 24 + n_pad), _ids(11, 24)
    pad = torch.cat([torch.zeros(1, n_pad, dtype=torch.long), b], 1)
    batch = torch.cat([a, pad])
    mask = torch.ones_like(batch)
    mask[1, :n_pad] = 0
    f = _factors(tiny_llama, 0.5)
    from shared.cache.base import CompressedCache

    def run(ids, m):
        cache = CompressedCache([LowRankLayer(fk, fv, 2, window=window) for fk, fv in f], "cskv")
        with attach(tiny_llama, cache):
            # HF generate's convention: positions count real tokens only (cumsum of the mask)
            prefill_pos = (m.cumsum(1) - 1).clamp_min(0)
            out = tiny_llama(ids, attention_mask=m, position_ids=prefill_pos, past_key_values=cache, use_cache=True)
            pos = m.sum(1, keepdim=True)
            nxt = torch.full((ids.shape[0], 1), 5)
            m2 = torch.cat([m, torch.ones_like(m[:, :1])], 1)
            step = tiny_llama(nxt, attention_mask=m2, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits[:, -1], step.logits[:, -1]

    batched = run(batch, mask)
    single = run(b, torch.ones_like(b))
    torch.testing.assert_close(batched[0][1], single[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[1][1], single[1][0], rtol=1e-4, atol=1e-4)


def test_evaluate_methods_full_rank_matches_full_cache(tiny_llama):
    cases = [PromptCase("t", _ids(20 + i, 32)[0].tolist(), _ids(30 + i, 5)[0].tolist(), _ids(40 + i, 3)[0].tolist(),
                        "x") for i in range(3)]
    f = _factors(tiny_llama, 1.0)
    rows = evaluate_methods(tiny_llama, cases, {"lr": lambda rec: lowrank_cache(rec, f, 2, window=4)}, batch_size=2)
    full = [r for r in rows if r["method"] == "full"]
    low = [r for r in rows if r["method"] == "lr"]
    assert len(full) == len(low) == 3
    for a, b in zip(full, low):
        assert abs(a["answer_nll"] - b["answer_nll"]) < 1e-4 and b["kl"] < 1e-6 and b["top1"] == 1.0
        assert a["correct"] == b["correct"]


def test_bad_arguments_raise_clear_errors(tiny_llama):
    W = tiny_llama.model.layers[0].self_attn.k_proj.weight.T
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="density must be in"):
            rank_for_density(bad, 16, 2)
    with pytest.raises(ValueError, match="exceeds"):
        factorize(W, 64, 1, "svd")
    with pytest.raises(ValueError, match="unknown init"):
        factorize(W, 8, 1, "pca++")
    fk, fv = _factors(tiny_llama, 0.5)[0]
    with pytest.raises(ValueError, match="window must be"):
        LowRankLayer(fk, fv, 2, window=-1)
    with pytest.raises(RuntimeError, match="attach"):
        LowRankLayer(fk, fv, 2).update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))


@pytest.mark.parametrize("scheme,groups", [("official", "head"), ("official", "row"), ("reprise", "head")])
def test_quantizer_semantics_options(tiny_llama, scheme, groups):
    """The official quantizer / per-head value groups store real int4 latents, count bytes exactly, quantize the
    latents with the chosen scheme and group, and change the output vs ours (same factors, same tokens)."""
    from kernels.quant import dequantize_int4, quantize_int4

    rec = record_prefill(tiny_llama, _ids(7, 100))
    f = _factors(tiny_llama, 0.5)
    ours = lowrank_cache(rec, f, 2, window=8, quantize=True)
    other = lowrank_cache(rec, f, 2, window=8, quantize=True, quant_scheme=scheme, value_groups=groups)
    for layer in other.layers:
        real = sum(t.untyped_storage().nbytes() for t in layer.stored_tensors())
        assert layer.stored_bytes() == real == layer.analytic_bytes()
    layer, (qk, qv) = other.layers[0], other.layers[0].q_chunks[0]
    rv = layer.fv.A.shape[-1]
    assert layer.value_group == (rv // 2 if groups == "head" else rv)
    # the stored first key group is exactly what kernels.quant gives for that scheme
    z = torch.cat([dequantize_int4(qk)], 2)
    zk_again = quantize_int4(z.contiguous(), QUANT_GROUP, axis=-2, scheme=scheme)
    torch.testing.assert_close(dequantize_int4(zk_again), z, rtol=0, atol=1e-5)
    a = decode_through(tiny_llama, ours, _ids(8, 4), 100)
    b = decode_through(tiny_llama, other, _ids(8, 4), 100)
    assert (a - b).abs().max() > 1e-5
    with pytest.raises(ValueError, match="value_groups"):
        lowrank_cache(rec, f, 2, window=8, quantize=True, value_groups="token")
