import pytest
import torch

from shared.cache.base import record_prefill
from shared.cache.eviction import h2o_cache, h2o_scores, kept_tokens, streaming_llm_cache


@pytest.fixture(scope="module")
def record(tiny_llama):
    ids = torch.randint(3, 97, (2, 50), generator=torch.Generator().manual_seed(0))
    return record_prefill(tiny_llama, ids)


def test_streaming_llm_keeps_sinks_and_recent(record):
    cache = streaming_llm_cache(record, 0.8, n_sink=4)
    keep = kept_tokens(50, 0.8)
    k = cache.layers[0].keys
    assert k.shape[2] == keep == 10
    torch.testing.assert_close(k[:, :, :4], record.layers[0].keys[:, :, :4])
    torch.testing.assert_close(k[:, :, 4:], record.layers[0].keys[:, :, 50 - 6:])
    assert cache.stored_bytes() == pytest.approx(0.2 * sum(
        l.keys.untyped_storage().nbytes() * 2 for l in record.layers))


def test_h2o_keeps_budget_recent_half_and_heaviest_hitters(tiny_llama, record):
    scores = h2o_scores(tiny_llama, record, max_queries=50)
    assert scores[0].shape == (2, 2, 50)
    # every query row is a probability distribution: total mass = number of queries x query heads per KV head
    torch.testing.assert_close(scores[0].sum(-1), torch.full((2, 2), 50.0 * 2))
    cache = h2o_cache(record, 0.5, scores)
    k = cache.layers[0].keys
    assert k.shape[2] == 25
    torch.testing.assert_close(k[:, :, -12:], record.layers[0].keys[:, :, -12:])  # recent half (round(12.5) = 12)
    top = scores[0][0, 0, :38].topk(13).indices.sort().values
    torch.testing.assert_close(k[0, 0, :13], record.layers[0].keys[0, 0, top])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2])
def test_bad_ratio_raises(record, bad):
    with pytest.raises(ValueError, match="compression ratio"):
        streaming_llm_cache(record, bad)
