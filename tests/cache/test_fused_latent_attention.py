"""The one attention router (shared.cache.base): impl="triton" decode through the fused latent-attention kernel
equals the rebuild-then-attend torch path, and a MatryoshkaKV latent cache equals its projected-forward reference,
both through the same router (tiny random Llama, Triton interpreter on CPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shared.cache.base import ROUTER, record_prefill  # noqa: E402
from shared.cache.decompose import factorize  # noqa: E402
from shared.cache.lowrank import lowrank_cache  # noqa: E402
from shared.cache.orthogonal import KVProjection, cayley, matryoshka_cache, project_kv, uniform_ranks  # noqa: E402
from shared.kv_eval import decode_through  # noqa: E402


def _per_head_factors(model, rank):
    return [(factorize(l.self_attn.k_proj.weight.T, rank, 2, "svd"), factorize(l.self_attn.v_proj.weight.T, rank, 2, "svd"))
            for l in model.model.layers]


@pytest.mark.parametrize("quantize,window", [(False, 8), (True, 32), (False, 0)])
def test_fused_triton_decode_matches_torch_path(tiny_llama, quantize, window):
    g = torch.Generator().manual_seed(0)
    ids, nxt = torch.randint(3, 97, (2, 70), generator=g), torch.randint(3, 97, (2, 4), generator=g)
    rec = record_prefill(tiny_llama, ids)
    f = _per_head_factors(tiny_llama, 16)
    ref = decode_through(tiny_llama, lowrank_cache(rec, f, 2, window=window, quantize=quantize), nxt, 70)
    cache = lowrank_cache(rec, f, 2, window=window, quantize=quantize, impl="triton")
    calls = []
    orig = cache.layers[0].fused_attention
    cache.layers[0].fused_attention = lambda *a: calls.append(1) or orig(*a)
    got = decode_through(tiny_llama, cache, nxt, 70)
    assert len(calls) == nxt.shape[1]                        # the kernel really served every decode step
    assert tiny_llama.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def _random_projection(L, H, D, seed):
    g = torch.Generator().manual_seed(seed)
    p = KVProjection(L, H, D)
    with torch.no_grad():
        for t in (p.x_k, p.x_v):
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        for t in (p.mu_k, p.mu_v):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    assert torch.allclose(cayley(p.x_k[0, 0]) @ cayley(p.x_k[0, 0]).T, torch.eye(D), atol=1e-5)
    return p


def test_one_router_serves_fused_lowrank_and_matryoshka_caches(tiny_llama):
    """Both self-attending layers go through the same router; each equals its torch reference, one after the other
    and with a projection context active (the old second router would have attended over the window only)."""
    g = torch.Generator().manual_seed(3)
    ids, nxt = torch.randint(3, 97, (1, 40), generator=g), torch.randint(3, 97, (1, 3), generator=g)
    rec = record_prefill(tiny_llama, ids)
    f = _per_head_factors(tiny_llama, 16)
    lr_ref = decode_through(tiny_llama, lowrank_cache(rec, f, 2, window=8), nxt, 40)
    proj, ranks = _random_projection(2, 2, 16, 0), uniform_ranks(2, 2, 16, 0.5)
    with proj.frozen(), project_kv(tiny_llama, proj, ranks):
        mkv_ref = tiny_llama(torch.cat([ids, nxt], 1)).logits[:, 39:]      # projected full forward
        lr_inside = decode_through(tiny_llama, lowrank_cache(rec, f, 2, window=8, impl="triton"), nxt, 40)
        assert tiny_llama.config._attn_implementation == ROUTER
    mkv_cache = matryoshka_cache(tiny_llama, proj, ranks)(rec)
    mkv = decode_through(tiny_llama, mkv_cache, nxt, 40)
    lr = decode_through(tiny_llama, lowrank_cache(rec, f, 2, window=8, impl="triton"), nxt, 40)
    torch.testing.assert_close(lr, lr_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lr_inside, lr_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([mkv_cache.prefill_logits[:, None], mkv], 1), mkv_ref, rtol=1e-4, atol=1e-4)
    assert tiny_llama.config._attn_implementation == "sdpa"



def test_triton_impl_needs_per_head_decomposition(tiny_llama):
    rec = record_prefill(tiny_llama, torch.randint(3, 97, (1, 10)))
    joint = [(factorize(l.self_attn.k_proj.weight.T, 16, 1, "svd"), factorize(l.self_attn.v_proj.weight.T, 16, 1, "svd"))
             for l in tiny_llama.model.layers]
    with pytest.raises(ValueError, match="per-head"):
        lowrank_cache(rec, joint, 2, impl="triton")
