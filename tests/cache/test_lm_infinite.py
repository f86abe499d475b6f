"""LM-Infinite's must-pass tests L1–L8 (spec papers/long_context.md §5) and its bad-input errors, on the spec's tiny
random Llama (6 query / 2 KV heads, head_dim 16). References are re-derived from spec §2, not the official code."""
import pytest
import torch
import torch.nn.functional as F

from shared.cache.base import record_prefill
from shared.cache.registry import build, compress
from shared.kv_eval import decode_through
from shared.lambda_attention import (lambda_attention, lambda_attention_context, lambda_attention_reference,
                                     rope_inv_freq, rotate)

pytestmark = pytest.mark.usefixtures("one_thread")

D, HQ, HKV = 16, 6, 2
INV = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))


def _qkv(T, B=1, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    return (torch.randn(B, HQ, T, D, generator=g), torch.randn(B, HKV, S, D, generator=g),
            torch.randn(B, HKV, S, D, generator=g))


def _pos(T, B=1):
    return torch.arange(T)[None].expand(B, -1)


def _ids(T, seed=0):
    return torch.randint(3, 97, (1, T), generator=torch.Generator().manual_seed(seed))


def test_l1_window_covering_the_sequence_is_full_causal_attention(tiny_llama_gqa3):
    ids = _ids(96)
    ref = tiny_llama_gqa3(ids).logits
    with lambda_attention_context(tiny_llama_gqa3, n_global=4, n_local=96, limit=96, block=16):
        got = tiny_llama_gqa3(ids).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_local", [1, 5, 16])
def test_l2_no_globals_no_ceiling_is_a_sliding_window(n_local):
    q, k, v = _qkv(40, B=2)
    got = lambda_attention(q, k, v, _pos(40, 2), _pos(40, 2), n_global=0, n_local=n_local, inv_freq=INV,
                           scaling=0.25, ceiling=False, block=8)
    i, j = torch.arange(40)[:, None], torch.arange(40)[None]
    band = (i - j >= 0) & (i - j < n_local)                                  # sliding window of width n_l
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=band,
                                         scale=0.25)
    torch.testing.assert_close(got, ref.transpose(1, 2), rtol=0, atol=1e-5)


def test_l3_chunked_equals_dense_two_logit_reference_over_the_grid():
    worst = 0.0
    for T in (1, 7, 64, 257):
        q, k, v = _qkv(T, seed=T)
        for n_l in (1, 4, 16, 300):
            for n_g in (0, 1, 3, 10):
                ref = lambda_attention_reference(q, k, v, _pos(T), _pos(T), n_global=n_g, n_local=n_l,
                                                 inv_freq=INV, scaling=0.25)
                for block in (4, 16, 64):
                    got = lambda_attention(q, k, v, _pos(T), _pos(T), n_global=n_g, n_local=n_l,
                                           inv_freq=INV, scaling=0.25, block=block)
                    worst = max(worst, float((got - ref).abs().max()))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("n_g,n_l", [(0, 3), (2, 3), (3, 1), (5, 4), (12, 2)])
def test_l4_attended_set_is_globals_or_local_counted_once(n_g, n_l):
    """q = 0 makes every logit 0, so attention is uniform over the attended set; with one-hot values the output row
    i IS the attention row: 1/|set| on exactly {j ≤ i : j < n_g or i − j < n_l} (a key counted twice gets 2/(|set|+1))."""
    T = 12
    q = torch.zeros(1, HQ, T, D)
    k = torch.randn(1, HKV, T, D, generator=torch.Generator().manual_seed(0))
    v = torch.eye(T, D)[None, None].expand(1, HKV, T, D)
    out = lambda_attention(q, k, v, _pos(T), _pos(T), n_global=n_g, n_local=n_l, inv_freq=INV, scaling=0.25,
                           block=5)[0, :, 0, :T]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    attended = (j <= i) & ((j < n_g) | (i - j < n_l))
    expected = attended.float() / attended.sum(-1, keepdim=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_l5_ceiling_logit_is_the_rope_logit_at_distance_exactly_L(tiny_llama_gqa3):
    rotary = tiny_llama_gqa3.model.rotary_emb
    g = torch.Generator().manual_seed(3)
    q_raw, k_raw = torch.randn(1, 1, 1, D, generator=g), torch.randn(1, 1, 1, D, generator=g)
    i, gpos, L = 40, 2, 8

    def hf_rope(x, p):                                              # HF's own cos/sin at position p
        cos, sin = rotary(x, torch.tensor([[p]]))
        x1, x2 = x.chunk(2, -1)
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    q_rot, k_rot = hf_rope(q_raw, i), hf_rope(k_raw, gpos)          # what HF hands to attention
    at_L = (hf_rope(q_raw, L) * hf_rope(k_raw, 0)).sum()             # RoPE logit at distance L
    ours = (rotate(q_rot, torch.tensor([[L - i]]), INV) * rotate(k_rot, torch.tensor([[-gpos]]), INV)).sum()
    torch.testing.assert_close(ours, at_L, rtol=0, atol=1e-5)
    # and through the attention function: query 40 sees global key 2 (ceiling) and itself (n_l = 1)
    kk, vv = torch.zeros(1, HKV, 41, D), torch.zeros(1, HKV, 41, D)
    kk[:, :, gpos], kk[:, :, i] = k_rot[0, 0], torch.randn(D, generator=g)
    vv[:, :, gpos, 0], vv[:, :, i, 1] = 1.0, 1.0
    qq = q_rot.expand(1, HQ, 1, D).contiguous()
    only = torch.zeros(1, 41, dtype=torch.bool)
    only[0, [gpos, i]] = True                                       # the other slots are padding
    out = lambda_attention(qq, kk, vv, torch.tensor([[i]]), _pos(41), n_global=3, n_local=1, limit=L,
                           inv_freq=INV, scaling=0.25, k_valid=only)[0, 0, 0, :2]
    expected = torch.stack([at_L * 0.25, (q_rot[0, 0, 0] * kk[0, 0, i]).sum() * 0.25]).softmax(0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_l6_decode_through_the_lambda_cache_equals_the_lambda_forward(tiny_llama_gqa3):
    T, P, n_l, n_g = 300, 240, 32, 4
    ids = _ids(T)
    with lambda_attention_context(tiny_llama_gqa3, n_global=n_g, n_local=n_l, block=64):
        ref = tiny_llama_gqa3(ids).logits
    rec = record_prefill(tiny_llama_gqa3, ids[:, :P])
    cache = compress("lm_infinite", rec, n_global=n_g, n_local=n_l, block=64)
    torch.testing.assert_close(cache.prefill_logits, ref[:, P - 1], rtol=0, atol=1e-4)
    got = decode_through(tiny_llama_gqa3, cache, ids[:, P:], P, mode="step")
    torch.testing.assert_close(got, ref[:, P:], rtol=0, atol=1e-4)
    fwd_cache = compress("lm_infinite", rec, n_global=n_g, n_local=n_l, block=64)
    fwd = decode_through(tiny_llama_gqa3, fwd_cache, ids[:, P:], P, mode="forward")   # one forced forward
    torch.testing.assert_close(fwd, ref[:, P:], rtol=0, atol=1e-4)


def test_l7_cache_length_is_bounded_and_the_middle_is_evicted(tiny_llama_gqa3):
    P, N, n_g, n_l = 20, 30, 3, 12
    rec = record_prefill(tiny_llama_gqa3, _ids(P))
    cache = compress("lm_infinite", rec, n_global=n_g, n_local=n_l)
    layer = cache.layers[0]
    assert layer.n_stored == min(P, n_g + n_l)
    for t in range(N):
        decode_through(tiny_llama_gqa3, cache, torch.tensor([[5 + t]]), P + t)
        n = P + t + 1
        assert all(l.n_stored == min(n, n_g + n_l) for l in cache.layers)
        kept = layer.positions[0].tolist()
        assert kept == list(range(n_g)) + list(range(n - n_l, n))                # first n_g + last n_l
    assert cache.get_seq_length() == P + N


def test_l8_gqa_equals_a_per_head_reference():
    T, G = 50, HQ // HKV
    q, k, v = _qkv(T)
    got = lambda_attention(q, k, v, _pos(T), _pos(T), n_global=3, n_local=7, inv_freq=INV, scaling=0.25, block=16)
    for h in range(HQ):
        one = lambda_attention_reference(q[:, h:h + 1], k[:, h // G:h // G + 1], v[:, h // G:h // G + 1], _pos(T),
                                         _pos(T), n_global=3, n_local=7, inv_freq=INV, scaling=0.25)
        torch.testing.assert_close(got[:, :, h:h + 1], one, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw,match", [({"n_local": 0}, "n_local must be an int >= 1, got 0"),
                                      ({"n_global": -1}, "n_global must be an int >= 0, got -1"),
                                      ({"limit": 0}, "limit must be an int >= 1, got 0"),
                                      ({"block": 0}, "block must be an int >= 1, got 0")])
def test_bad_lambda_params_raise_naming_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        build("lm_infinite", 0.0, **kw)


def test_a_model_without_rope_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64))
    with pytest.raises(ValueError, match="needs a RoPE model; GPT2LMHeadModel"):
        rope_inv_freq(gpt2)
    with pytest.raises(ValueError, match="needs a RoPE model"):
        with lambda_attention_context(gpt2, n_global=4, n_local=8):
            pass


def test_keys_read_per_step_count_the_sink_and_window_slots(tiny_llama_gqa3):
    P, N, n_g, n_l = 20, 6, 3, 12
    rec = record_prefill(tiny_llama_gqa3, _ids(P + N)[:, :P])
    step = compress("lm_infinite", rec, n_global=n_g, n_local=n_l, ceiling=False,
                    lambda_prefill=False)
    fwd = compress("lm_infinite", rec, n_global=n_g, n_local=n_l, ceiling=False, lambda_prefill=False)
    nxt = _ids(P + N)[:, P:]
    decode_through(tiny_llama_gqa3, step, nxt, P, mode="step")
    decode_through(tiny_llama_gqa3, fwd, nxt, P, mode="forward")
    assert step.layers[0].reads == fwd.layers[0].reads == [(n_g + n_l) * HKV] * N
