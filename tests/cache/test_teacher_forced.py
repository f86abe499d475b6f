"""Teacher forcing in one forward (shared.kv_eval.forced_forward) equals token-by-token decoding for every registered
KV method (the generic loop of test_kv_methods, on the same tiny random Llama), and CSKV's W = 0 ``current_exact``.

Forward mode is checked against step mode at ratios 0 / 0.5 / 0.8, with and without left padding (per-row start
positions), at both protocols' typical forced lengths (the paper protocol decodes the answer only, the decode
protocol question + answer); lowrank also at windows 0 / 2 / 8, int4 latents, and ``current_exact``, with more forced
tokens than the window so blocks leave the window (and int4 groups complete) in the middle of the forced tokens.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shared.cache.base import (CompressedCache, CompressedLayer, ExactLayer, attach, forced_decoding,  # noqa: E402
                               full_cache, record_prefill)
from shared.cache.decompose import factorize  # noqa: E402
from shared.cache.lowrank import QUANT_GROUP, LowRankLayer, lowrank_cache  # noqa: E402
from shared.cache.registry import METHODS, build, compress  # noqa: E402
from shared.kv_eval import decode_through, evaluate_methods, forced_forward  # noqa: E402
from shared.tasks.base import PromptCase  # noqa: E402

ATOL = 1e-4
T_CTX = 70                                   # context slots (a padded row has 13 fewer real tokens)
N_FORCED = {"paper": 12, "decode": 40}       # answer only / question + answer
LOWRANK = [dict(window=w, quantize=q) for w in (0, 2, 8) for q in (False, True)] + \
    [dict(window=0, quantize=q, current_exact=True) for q in (False, True)] + \
    [dict(window=2, quantize=True, quant_scheme="official", value_groups="head")]


def _ratio(name, ratio):
    if name == "full":
        return 0.0
    if name == "matryoshka" and ratio == 0.8:
        return 0.75                          # the rank grid of head_dim 16 (steps of 2 channels)
    return ratio


def _inputs(padded, n_forced, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, T_CTX), generator=g)
    nxt = torch.randint(3, 97, (2, n_forced), generator=g)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :13] = 0                     # not a multiple of any window: boundaries sit mid-row
        ids[1, :13] = 0
    return ids, mask, nxt


def _both(model, name, ratio, params, padded, n_forced):
    ids, mask, nxt = _inputs(padded, n_forced)
    rec = record_prefill(model, ids, attention_mask=mask)
    step_cache = compress(name, rec, ratio, **params)
    fwd_cache = compress(name, rec, ratio, **params)
    assert fwd_cache.supports_forced_forward
    step = decode_through(model, step_cache, nxt, rec.next_positions, mode="step")
    fwd = forced_forward(model, fwd_cache, nxt, rec.next_positions)
    return rec, (step_cache, step), (fwd_cache, fwd)


def _check(step, fwd, atol=ATOL):
    assert step.shape == fwd.shape
    torch.testing.assert_close(fwd, step, rtol=0, atol=atol)
    assert torch.equal(fwd.argmax(-1), step.argmax(-1))


def _same_storage(a: CompressedCache, b: CompressedCache):
    """The forward left the cache as the steps did: same layout and bytes, and it decodes on identically."""
    assert a.stored_bytes() == b.stored_bytes()
    assert [t.shape for l in a.layers for t in l.stored_tensors()] == \
        [t.shape for l in b.layers for t in l.stored_tensors()]


CASES = [(name, params) for name in sorted(METHODS) if name != "lowrank" for params in [{}]] + \
    [("lowrank", p) for p in LOWRANK]


@pytest.mark.parametrize("protocol", sorted(N_FORCED))
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("name,params", CASES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}{x if isinstance(x, str) else int(x)}" for k, x in v.items()) or "default")
def test_forward_equals_step(tiny_llama, name, params, ratio, padded, protocol):
    ratio = _ratio(name, ratio)
    if name == "full" and ratio != 0.0:
        pytest.skip("full has ratio 0 only")
    if params.get("value_groups") == "head" and ratio == 0.8:
        pytest.skip("rank 3 per head at ratio 0.8 on the tiny model: int4 packing needs an even group")
    n = N_FORCED[protocol]
    rec, (sc, step), (fc, fwd) = _both(tiny_llama, name, ratio, params, padded, n)
    _check(step, fwd)
    _same_storage(sc, fc)
    # ... and both caches continue identically (the forward left the state the steps leave)
    nxt = torch.full((2, 1), 7)
    a = decode_through(tiny_llama, sc, nxt, rec.next_positions + n)
    b = decode_through(tiny_llama, fc, nxt, rec.next_positions + n)
    _check(a, b)


@pytest.mark.parametrize("window", [2, 8])
def test_lowrank_blocks_leave_the_window_mid_answer(tiny_llama, window):
    """The forced tokens really cross window blocks and int4 groups: a plain multi-token forward (prefill-chunk
    semantics, every new token exact) is far from the steps, the forced forward is not."""
    ids, _, nxt = _inputs(False, N_FORCED["decode"])
    rec = record_prefill(tiny_llama, ids)
    method = build("lowrank", 0.5, window=window, quantize=True)
    before = method(rec)
    n_lat0, nq0 = before.layers[0].n_latent, len(before.layers[0].q_chunks)
    step = decode_through(tiny_llama, before, nxt, T_CTX)
    assert before.layers[0].n_latent > n_lat0 + window and len(before.layers[0].q_chunks) > nq0
    naive_cache = method(rec)
    with attach(tiny_llama, naive_cache):
        pos = (T_CTX + torch.arange(nxt.shape[1]))[None].expand(2, -1)
        naive = tiny_llama(nxt, position_ids=pos, past_key_values=naive_cache,
                           attention_mask=torch.ones(2, T_CTX + nxt.shape[1], dtype=torch.long)).logits
    assert (naive - step).abs().max() > 1e-2
    _check(step, forced_forward(tiny_llama, method(rec), nxt, T_CTX))


def test_every_registered_method_declares_the_forward(tiny_llama):
    """Evaluation gets the single forward for every registered method (none falls back)."""
    rec = record_prefill(tiny_llama, _inputs(False, 1)[0])
    for name in METHODS:
        assert compress(name, rec, 0.0).supports_forced_forward, name


class _SlidingLayer(CompressedLayer):
    """A made-up method that keeps only its last 8 tokens at every step: a multi-token update cannot express that
    (it does not declare ``supports_forced_forward``)."""

    def __init__(self, keys, values):
        super().__init__()
        self.keys, self.values = keys[:, :, -8:].clone(), values[:, :, -8:].clone()

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states], 2)[:, :, -8:]
        self.values = torch.cat([self.values, value_states], 2)[:, :, -8:]
        return self.keys, self.values


def _sliding(rec):
    return CompressedCache([_SlidingLayer(l.keys, l.values) for l in rec.layers], method="sliding")


def test_undeclared_layers_fall_back_to_steps(tiny_llama):
    assert CompressedLayer.supports_forced_forward is False and ExactLayer.supports_forced_forward is True
    ids, _, nxt = _inputs(False, 12)
    rec = record_prefill(tiny_llama, ids)
    assert not _sliding(rec).supports_forced_forward
    with pytest.raises(ValueError, match="step by step"):
        forced_forward(tiny_llama, _sliding(rec), nxt, T_CTX)
    with pytest.raises(ValueError, match="step by step"):
        with forced_decoding(_sliding(rec)):
            pass
    step = decode_through(tiny_llama, _sliding(rec), nxt, T_CTX, mode="step")
    assert torch.equal(decode_through(tiny_llama, _sliding(rec), nxt, T_CTX, mode="forward"), step)
    cases = [PromptCase("t", ids[0, :60].tolist(), ids[0, 60:66].tolist(), nxt[0, :4].tolist(), "x")]
    a = evaluate_methods(tiny_llama, cases, {"sliding": _sliding}, mode="forward")
    b = evaluate_methods(tiny_llama, cases, {"sliding": _sliding}, mode="step")
    # the full cache (the KL reference) does take the forward: equal up to float; the sliding rows' own logits are
    # the steps' bit for bit
    for x, y in zip(a, b):
        assert x["method"] == y["method"] and x["correct"] == y["correct"] and x["top1"] == y["top1"]
        assert abs(x["answer_nll"] - y["answer_nll"]) < 1e-5 and abs(x["kl"] - y["kl"]) < 1e-5


def test_evaluate_methods_forward_default_equals_step(tiny_llama):
    g = torch.Generator().manual_seed(5)
    cases = [PromptCase("t", torch.randint(3, 97, (48,), generator=g).tolist(),
                        torch.randint(3, 97, (9,), generator=g).tolist(),
                        torch.randint(3, 97, (3 + i,), generator=g).tolist(), "x") for i in range(3)]
    methods = {"h2o": build("h2o", 0.5), "snapkv": build("snapkv", 0.5, window_size=8),
               "lr": build("lowrank", 0.5, window=4, quantize=True), "lr0": build("lowrank", 0.8, window=0),
               "mkv": build("matryoshka", 0.5)}
    for protocol in ("decode", "paper"):
        fwd = evaluate_methods(tiny_llama, cases, methods, protocol=protocol, batch_size=2)
        step = evaluate_methods(tiny_llama, cases, methods, protocol=protocol, batch_size=2, mode="step")
        assert len(fwd) == len(step) == 3 * 6
        for a, b in zip(fwd, step):
            assert (a["method"], a["case"], a["correct"], a["top1"], a["bytes"]) == \
                (b["method"], b["case"], b["correct"], b["top1"], b["bytes"])
            assert abs(a["answer_nll"] - b["answer_nll"]) < 1e-5 and abs(a["kl"] - b["kl"]) < 1e-5
    with pytest.raises(ValueError, match="mode"):
        evaluate_methods(tiny_llama, cases, methods, mode="fast")
    with pytest.raises(ValueError, match="mode"):
        decode_through(tiny_llama, full_cache(record_prefill(tiny_llama, torch.ones(1, 4, dtype=torch.long))),
                       torch.ones(1, 2, dtype=torch.long), 4, mode="fast")


def _per_head(model, rank):
    return [(factorize(l.self_attn.k_proj.weight.T, rank, 2, "svd"), factorize(l.self_attn.v_proj.weight.T, rank, 2,
                                                                                "svd")) for l in model.model.layers]


@pytest.mark.parametrize("window,quantize,current_exact", [(8, False, False), (2, True, False), (0, True, True),
                                                           (0, False, False)])
def test_triton_lowrank_forward_equals_its_fused_steps(tiny_llama, window, quantize, current_exact):
    """impl="triton" caches take the torch mixed-mask path in forced mode; it equals the fused-kernel steps."""
    ids, _, nxt = _inputs(False, 10)
    rec = record_prefill(tiny_llama, ids)
    f = _per_head(tiny_llama, 16)
    kw = dict(window=window, quantize=quantize, impl="triton", current_exact=current_exact)
    cache = lowrank_cache(rec, f, 2, **kw)
    calls = []
    orig = cache.layers[0].fused_attention
    cache.layers[0].fused_attention = lambda *a: calls.append(1) or orig(*a)
    step = decode_through(tiny_llama, cache, nxt, T_CTX)
    assert len(calls) == nxt.shape[1]
    fc = lowrank_cache(rec, f, 2, **kw)
    _check(step, forced_forward(tiny_llama, fc, nxt, T_CTX))
    _same_storage(cache, fc)
    torch_step = decode_through(tiny_llama, lowrank_cache(rec, f, 2, **{**kw, "impl": "torch"}), nxt, T_CTX)
    _check(torch_step, step)


# ---- W = 0: the official code's exact current token ------------------------------------------------------------
def test_current_exact_reads_its_own_key_exact_and_stores_latents_only(tiny_llama):
    ids, _, nxt = _inputs(False, 5)
    rec = record_prefill(tiny_llama, ids)
    ours = build("lowrank", 0.5, window=0)(rec)
    official = build("lowrank", 0.5, window=0, current_exact=True)(rec)
    layer = official.layers[0]
    seen = []
    orig = layer.update
    layer.update = lambda k, v, *a, **kw: seen.append((k, v, orig(k, v, *a, **kw))) or seen[-1][2]
    got = decode_through(tiny_llama, official, nxt, T_CTX)
    assert len(seen) == nxt.shape[1]
    for i, (k, v, (keys, values)) in enumerate(seen):
        t = T_CTX + i
        assert keys.shape[2] == t + 1
        assert torch.equal(keys[:, :, -1:], k) and torch.equal(values[:, :, -1:], v)   # own K/V exact
        rk, rv = layer._rebuild(layer.zk[:, :, :t], layer.zv[:, :, :t], layer._lat_cos[:, :t], layer._lat_sin[:, :t])
        torch.testing.assert_close(keys[:, :, :-1], rk, rtol=0, atol=1e-6)           # older ones latent
        torch.testing.assert_close(values[:, :, :-1], rv, rtol=0, atol=1e-6)
    # storage: latents only, as W = 0 without it (the paper's ratio exactly)
    ref = decode_through(tiny_llama, ours, nxt, T_CTX)
    assert official.stored_bytes() == ours.stored_bytes() == official.analytic_bytes()
    assert all(l.wk.shape[2] == 0 for l in official.layers)
    assert (got - ref).abs().max() > 1e-3                    # the rule changes the numbers...
    one = decode_through(tiny_llama, build("lowrank", 0.5, window=1)(rec), nxt, T_CTX)
    torch.testing.assert_close(got, one, rtol=0, atol=1e-5)  # ... to exactly what a 1-token window reads


@pytest.mark.parametrize("window,quantize", [(2, False), (8, True), (32, True)])
def test_current_exact_changes_nothing_for_positive_windows(tiny_llama, window, quantize):
    ids, _, nxt = _inputs(False, 40)
    rec = record_prefill(tiny_llama, ids)
    a_cache = build("lowrank", 0.5, window=window, quantize=quantize)(rec)
    b_cache = build("lowrank", 0.5, window=window, quantize=quantize, current_exact=True)(rec)
    assert torch.equal(decode_through(tiny_llama, a_cache, nxt, T_CTX), decode_through(tiny_llama, b_cache, nxt, T_CTX))
    assert a_cache.stored_bytes() == b_cache.stored_bytes()


def test_current_exact_validation_and_full_sequence(tiny_llama):
    with pytest.raises(ValueError, match="current_exact"):
        build("lowrank", 0.5, current_exact="yes")
    with pytest.raises(ValueError, match="current_exact"):
        build("lowrank", 0.5, window=0, current_exact=True).full_sequence(tiny_llama)
    assert build("lowrank", 0.5).current_exact is False      # the default: ours (nothing exact at W = 0)


def test_quantized_window_zero_forward_crosses_groups(tiny_llama):
    """W = 0 with int4: every forced token becomes a latent at once and 32-token groups are quantized mid-answer;
    both W = 0 rules stay exact in one forward."""
    ids, _, nxt = _inputs(False, 40)
    rec = record_prefill(tiny_llama, ids)
    for ce in (False, True):
        m = build("lowrank", 0.5, window=0, quantize=True, current_exact=ce)
        c = m(rec)
        nq0 = len(c.layers[0].q_chunks)
        step = decode_through(tiny_llama, c, nxt, T_CTX)
        assert len(c.layers[0].q_chunks) * QUANT_GROUP == (T_CTX + 40) // QUANT_GROUP * QUANT_GROUP > nq0 * 32
        _check(step, forced_forward(tiny_llama, m(rec), nxt, T_CTX))


def test_forced_mask_picks_one_copy_per_key(tiny_llama):
    """Every query enables as many keys as it has causal, non-padding slots (one copy each; the logits tests show
    which copy)."""
    ids, mask, nxt = _inputs(True, 40)
    rec = record_prefill(tiny_llama, ids, attention_mask=mask)
    cache = build("lowrank", 0.5, window=8, quantize=True)(rec)
    layer: LowRankLayer = cache.layers[0]
    masks = []
    orig = layer.forced_mask
    layer.forced_mask = lambda *a: masks.append(orig(*a)) or masks[-1]
    forced_forward(tiny_llama, cache, nxt, rec.next_positions)
    (m,) = masks
    S, n = T_CTX, nxt.shape[1]
    n_slots = m.shape[-1]
    assert n_slots > S + n                                     # copies exist
    # count per (query, slot): rebuild the slot index of every key column from the layout
    per_query = m.sum(-1)[:, 0]                                 # [B, n] keys attended
    real = torch.stack([torch.arange(S + n) >= (13 if b else 0) for b in (0, 1)])
    expect = torch.stack([(real[b][None, :] & (torch.arange(S + n)[None, :] <= S + torch.arange(n)[:, None])).sum(-1)
                          for b in (0, 1)])
    assert torch.equal(per_query, expect)
