"""impl="triton" decode through the fused latent-attention kernel equals the rebuild-then-attend torch path
(tiny random Llama, Triton interpreter on CPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shared.cache.base import record_prefill  # noqa: E402
from shared.cache.decompose import factorize  # noqa: E402
from shared.cache.fused import use_fused_latent_attention  # noqa: E402
from shared.cache.lowrank import lowrank_cache  # noqa: E402
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
    with use_fused_latent_attention(tiny_llama):
        got = decode_through(tiny_llama, lowrank_cache(rec, f, 2, window=window, quantize=quantize, impl="triton"),
                             nxt, 70)
    assert tiny_llama.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_triton_impl_needs_per_head_decomposition(tiny_llama):
    rec = record_prefill(tiny_llama, torch.randint(3, 97, (1, 10)))
    joint = [(factorize(l.self_attn.k_proj.weight.T, 16, 1, "svd"), factorize(l.self_attn.v_proj.weight.T, 16, 1, "svd"))
             for l in tiny_llama.model.layers]
    with pytest.raises(ValueError, match="per-head"):
        lowrank_cache(rec, joint, 2, impl="triton")
