"""RefreshKV / Recycled Attention must-pass tests R1–R8 (spec papers/long_context.md §5) and its bad-input errors, on
the spec's tiny random Llama (6 query / 2 KV heads, head_dim 16). References are re-derived from spec §2."""
import pytest
import torch
import torch.nn.functional as F

from shared.cache.base import record_prefill
from shared.cache.registry import build, compress
from shared.cache.refreshkv import RefreshLayer, RefreshKV, pooled_group_max_scores
from shared.kv_eval import decode_through

pytestmark = pytest.mark.usefixtures("one_thread")

P, T, K = 64, 24, 16


@pytest.fixture(scope="module")
def data(tiny_llama_gqa3):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (1, P + T), generator=g)
    rec = record_prefill(tiny_llama_gqa3, ids[:, :P])
    full = decode_through(tiny_llama_gqa3, compress("full", rec), ids[:, P:], P)
    return rec, ids[:, P:], full


def _decode(model, rec, nxt, **kw):
    cache = compress("refreshkv", rec, **kw)
    return cache, decode_through(model, cache, nxt, P)


def test_r1_refresh_every_step_is_vanilla(tiny_llama_gqa3, data):
    rec, nxt, full = data
    _, got = _decode(tiny_llama_gqa3, rec, nxt, budget=K, refresh_every=1)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)


def test_r2_budget_covering_everything_is_vanilla(tiny_llama_gqa3, data):
    rec, nxt, full = data
    _, got = _decode(tiny_llama_gqa3, rec, nxt, budget=P + T, refresh_every=None)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
    _, small = _decode(tiny_llama_gqa3, rec, nxt, budget=K, refresh_every=None)
    assert not torch.allclose(small, full, atol=1e-3)                        # the budget matters when it binds


def test_r3_no_refresh_is_snapkv_window1_kernel7_max(tiny_llama_gqa3, data):
    """Cp at the prefill is a top-K set of the shared SnapKV's scores at window 1, kernel 7, max pooling, max over
    the group, pooled over the tokens before the window (the official scope): the last token + the K − 1 best.
    (Max pooling makes plateaus of equal scores; the two implementations may break such ties differently.)"""
    rec, nxt, full = data
    ra = compress("refreshkv", rec, budget=K, refresh_every=None)
    snap = build("snapkv", 1 - K / P, window_size=1, kernel_size=7, pooling="max", group="max", pool_scope="prefix")
    for la, scores in zip(ra.layers, snap._scores(rec)):
        for h in range(2):
            kept = la.cp_pos[0, h]
            assert kept[-1] == P - 1 and len(set(kept.tolist())) == K            # the window token, newest last
            s = scores[0, h, :P - 1]
            dropped = torch.ones(P - 1, dtype=torch.bool)
            dropped[kept[:-1]] = False
            assert s[kept[:-1]].min() >= s[dropped].max()                        # a top-(K − 1) set
            assert torch.equal(s[kept[:-1]], s[kept[:-1]].sort().values)          # Cp ascending by score
    # without refresh, every later step only rotates Cp: decoding differs from the full cache
    _, got = _decode(tiny_llama_gqa3, rec, nxt, budget=K, refresh_every=None)
    assert not torch.allclose(got, full, atol=1e-3)


def test_r4_partial_step_is_full_attention_masked_to_cp(data):
    """At the layer: keys stay at their absolute positions, so a partial step equals attention over ALL keys so far
    with every key outside Cp ∪ {t} masked — for steps with evictions in between."""
    rec, _, _ = data
    layer_rec = rec.layers[1]
    g = torch.Generator().manual_seed(5)
    q0 = torch.randn(1, 6, 1, 16, generator=g)
    layer = RefreshLayer(layer_rec.keys, layer_rec.values, rec.valid, q0, torch.tensor([K]),
                         RefreshKV(budget=K, refresh_every=None), 0.25)
    all_k, all_v = layer_rec.keys.clone(), layer_rec.values.clone()
    for t in range(6):
        q = torch.randn(1, 6, 1, 16, generator=g)
        k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
        allowed = torch.zeros(1, 2, P + t + 1, dtype=torch.bool)
        allowed.scatter_(2, layer.cp_pos, True)
        allowed[..., P + t] = True                                             # itself
        layer.update(k, v)
        got = layer.attend(None, q, None, None, None, 0.25)
        all_k, all_v = torch.cat([all_k, k], 2), torch.cat([all_v, v], 2)
        ref = F.scaled_dot_product_attention(q, all_k.repeat_interleave(3, 1), all_v.repeat_interleave(3, 1),
                                             attn_mask=allowed.repeat_interleave(3, 1)[:, :, None], scale=0.25)
        torch.testing.assert_close(got, ref.transpose(1, 2), rtol=0, atol=1e-6)
        assert layer.keys.shape[2] == K


def test_r5_cp_stays_at_k_and_cf_gains_exactly_the_generated_kvs(tiny_llama_gqa3, data):
    rec, nxt, _ = data
    S = 4
    cache = compress("refreshkv", rec, budget=K, refresh_every=S)
    layer = cache.layers[0]
    seen = []
    for t in range(T):
        pend_before = layer.pend_keys.clone()
        decode_through(tiny_llama_gqa3, cache, nxt[:, t:t + 1], P + t)
        full = (t + 1) % S == 0
        assert all(l.keys.shape[2] == K for l in cache.layers)                  # |Cp| = K after every step
        if not full:
            seen.append(layer.keys[:, :, -1:].clone())                          # the KV Cp just received
            assert torch.equal(layer.pend_keys[:, :, -1:], seen[-1])
            assert layer.reads[-1] == (K + 1) * 2                              # keys read: Cp ∪ {t}, 2 KV heads
        else:
            n = pend_before.shape[2]
            assert layer.full_keys.shape[2] == P + t + 1                        # Cf: every token so far
            # the generated KVs Cf gained are Cp's tensors, bit for bit (not recomputed)
            assert torch.equal(layer.full_keys[:, :, P + t - n:P + t], torch.cat(seen[-n:], 2))
            assert layer.reads[-1] == (P + t + 1) * 2
    assert layer.get_seq_length() == P + T


def test_r6_pooling_keeps_the_length_and_takes_the_group_max_per_kv_head():
    g = torch.Generator().manual_seed(2)
    q, keys = torch.randn(1, 6, 1, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g)
    valid = torch.ones(1, 30, dtype=torch.bool)
    got = pooled_group_max_scores(q, keys, valid, 0.25, 7)
    assert got.shape == (1, 2, 29)                                             # the 29 tokens before the query's own
    for h in range(2):
        per_head = torch.stack([(q[0, 3 * h + i, 0] @ keys[0, h].T * 0.25).softmax(-1) for i in range(3)])
        a = per_head.max(0).values[:29]                                        # max over the group of KV head h
        pooled = torch.stack([a[max(0, j - 3):j + 4].max() for j in range(29)])  # width 7, centred, same length
        torch.testing.assert_close(got[0, h], pooled, rtol=0, atol=1e-7)
        mean = per_head.mean(0)[:29]
        assert not torch.allclose(a, mean)                                     # max ≠ mean here: the test can tell


def test_r7_similarity_extremes_are_never_and_fixed_stride(tiny_llama_gqa3, data):
    rec, nxt, _ = data
    _, never = _decode(tiny_llama_gqa3, rec, nxt, budget=K, refresh_every=None)
    _, s_low = _decode(tiny_llama_gqa3, rec, nxt, budget=K, refresh_every=5, similarity=-1.0)
    _, fixed = _decode(tiny_llama_gqa3, rec, nxt, budget=K, refresh_every=5)
    _, s_high = _decode(tiny_llama_gqa3, rec, nxt, budget=K, refresh_every=5, similarity=1.01)
    assert torch.equal(s_low, never)
    assert torch.equal(s_high, fixed)
    assert not torch.equal(fixed, never)


def test_r8_runs_are_bitwise_deterministic(tiny_llama_gqa3, data):
    rec, nxt, _ = data
    a = _decode(tiny_llama_gqa3, rec, nxt, budget=K, refresh_every=5, similarity=0.5)[1]
    b = _decode(tiny_llama_gqa3, rec, nxt, budget=K, refresh_every=5, similarity=0.5)[1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw,match", [({"refresh_every": 0}, "refresh_every must be an int >= 1 or None, got 0"),
                                      ({"budget": 0}, "budget must be an int >= 1 or None, got 0"),
                                      ({"kernel_size": 4}, "kernel_size must be odd"),
                                      ({"similarity": "high"}, "similarity must be a number")])
def test_bad_refreshkv_params_raise_naming_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        build("refreshkv", 0.0, **kw)
