"""What each eviction method keeps (the generic rules are in test_kv_methods.py)."""
import pytest
import torch

from shared.cache.base import attention_modules, record_prefill
from shared.cache.eviction import H2O, StreamingLLM, accumulated_attention
from shared.cache.registry import compress
from shared.cache.scorer import kept_tokens
from shared.cache.snapkv import SnapKV


@pytest.fixture(scope="module")
def record(tiny_llama):
    ids = torch.randint(3, 97, (2, 50), generator=torch.Generator().manual_seed(0))
    return record_prefill(tiny_llama, ids)


def test_streaming_llm_keeps_sinks_and_recent(record):
    cache = compress("streaming_llm", record, 0.8, n_sink=4)
    keep = kept_tokens(50, 0.8)
    k = cache.layers[0].keys
    assert k.shape[2] == keep == 10
    torch.testing.assert_close(k[:, :, :4], record.layers[0].keys[:, :, :4])
    torch.testing.assert_close(k[:, :, 4:], record.layers[0].keys[:, :, 50 - 6:])
    assert cache.stored_bytes() == pytest.approx(0.2 * sum(
        l.keys.untyped_storage().nbytes() * 2 for l in record.layers))


def test_h2o_keeps_budget_recent_half_and_heaviest_hitters(tiny_llama, record):
    scores = H2O(0.5, max_queries=50)._scores(record)
    assert scores[0].shape == (2, 2, 50)
    # every query row is a probability distribution: total mass = number of queries x query heads per KV head
    torch.testing.assert_close(scores[0].sum(-1), torch.full((2, 2), 50.0 * 2))
    cache = compress("h2o", record, 0.5, max_queries=50)
    k = cache.layers[0].keys
    assert k.shape[2] == 25
    torch.testing.assert_close(k[:, :, -12:], record.layers[0].keys[:, :, -12:])  # recent half (round(12.5) = 12)
    top = scores[0][0, 0, :38].topk(13).indices.sort().values
    torch.testing.assert_close(k[0, 0, :13], record.layers[0].keys[0, 0, top])


def test_scores_are_computed_once_per_record_and_shared_across_ratios(record):
    a = H2O(0.5, max_queries=50)._scores(record)
    b = H2O(0.8, max_queries=50)._scores(record)
    assert a is b


def test_snapkv_keeps_the_observation_window_and_the_top_pooled_scores(tiny_llama, record):
    m = SnapKV(0.5, window_size=8, kernel_size=3, pooling="max")
    cache = m(record)
    k, rec = cache.layers[1].keys, record.layers[1]
    assert k.shape[2] == 25
    torch.testing.assert_close(k[:, :, -8:], rec.keys[:, :, -8:])              # the observation window, exact
    # the score by hand: window queries' softmax attention, mean over the GQA group, summed, max-pooled (width 3)
    attn = attention_modules(tiny_llama)[1]
    raw = accumulated_attention(attn, rec, record.valid, torch.arange(42, 50)) / 2
    pooled = torch.nn.functional.max_pool1d(raw.view(4, 1, 50), 3, stride=1, padding=1).view(2, 2, 50)
    torch.testing.assert_close(m._scores(record)[1], pooled)
    top = pooled[1, 0, :42].topk(17).indices.sort().values
    torch.testing.assert_close(k[1, 0, :17], rec.keys[1, 0, top])


def test_snapkv_selection_is_per_head(record):
    cache = compress("snapkv", record, 0.7, window_size=4)
    k = cache.layers[0].keys
    rec = record.layers[0].keys
    # recover kept positions per head by matching keys: heads choose different tokens (per-head selection)
    pos = [[int((rec[0, h] == k[0, h, j]).all(-1).nonzero()[0]) for j in range(k.shape[2])] for h in range(2)]
    assert pos[0] != pos[1]


@pytest.mark.parametrize("kw", [{"window_size": 0}, {"kernel_size": 4}, {"pooling": "median"}])
def test_snapkv_bad_params_raise(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SnapKV(0.5, **kw)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2])
def test_bad_ratio_raises(record, bad):
    with pytest.raises(ValueError, match="compression_ratio"):
        StreamingLLM(bad)
