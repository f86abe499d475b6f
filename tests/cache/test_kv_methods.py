"""The rules every registered KV-cache method must follow (one generic loop, as kvpress's test_presses does).

For each name in ``shared.cache.registry.METHODS``, on the tiny random Llama:
  * compression_ratio 0 reproduces the full cache's logits (prefill and token-by-token decode);
  * measured bytes (real tensor storage) = the method's analytic count;
  * a left-padded batch of 2 equals two single runs;
  * an invalid ratio raises ValueError naming it; unknown params raise;
  * same inputs → bit-identical output.
"""
import pytest
import torch

from shared.cache.base import record_prefill
from shared.cache.registry import METHODS, build, compress
from shared.kv_eval import decode_through

RATIO = 0.5  # on the rank grid of every projection method for head_dim 16


def _ratio(name):
    return 0.0 if name == "full" else RATIO


def _run(model, name, ids, mask=None, ratio=0.0, n_decode=3, **params):
    rec = record_prefill(model, ids, attention_mask=mask)
    cache = compress(name, rec, ratio, **params)
    nxt = torch.arange(5, 5 + n_decode).expand(ids.shape[0], -1)
    first = cache.prefill_logits if cache.prefill_logits is not None else rec.last_logits
    return cache, torch.cat([first[:, None], decode_through(model, cache, nxt, rec.next_positions)], 1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 97, (1, 72), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_ratio_zero_is_the_full_cache(tiny_llama, ids, name):
    _, ref = _run(tiny_llama, "full", ids)
    _, got = _run(tiny_llama, name, ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("ratio", [0.0, RATIO])
def test_measured_bytes_equal_analytic(tiny_llama, ids, name, ratio):
    ratio = 0.0 if name == "full" else ratio
    cache, _ = _run(tiny_llama, name, ids, ratio=ratio, n_decode=2)
    assert cache.stored_bytes() == cache.analytic_bytes() > 0
    full, _ = _run(tiny_llama, "full", ids, n_decode=2)
    if ratio > 0 and name != "lowrank":  # lowrank's exact window is extra (bytes shown in the tables)
        assert cache.stored_bytes() < full.stored_bytes()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_left_padded_batch_equals_single_runs(tiny_llama, name):
    g = torch.Generator().manual_seed(1)
    long, short = torch.randint(3, 97, (1, 72), generator=g), torch.randint(3, 97, (1, 40), generator=g)
    pad = long.shape[1] - short.shape[1]                     # 32: a multiple of lowrank's default window
    batch = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    _, got = _run(tiny_llama, name, batch, mask, ratio=_ratio(name))
    _, a = _run(tiny_llama, name, long, ratio=_ratio(name))
    _, b = _run(tiny_llama, name, short, ratio=_ratio(name))
    torch.testing.assert_close(got, torch.cat([a, b]), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", True])
def test_invalid_ratio_raises_naming_it(name, bad):
    with pytest.raises(ValueError, match="compression_ratio"):
        build(name, bad)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_unknown_param_raises(name):
    with pytest.raises(ValueError, match="no parameter"):
        build(name, 0.0, not_a_param=1)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown KV method 'nope'"):
        build("nope", 0.5)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_deterministic(tiny_llama, ids, name):
    _, a = _run(tiny_llama, name, ids, ratio=_ratio(name))
    _, b = _run(tiny_llama, name, ids, ratio=_ratio(name))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"full"}))
def test_compression_changes_the_output(tiny_llama, ids, name):
    """A method that ignored its ratio would pass every rule above; at 50% the logits must move."""
    _, ref = _run(tiny_llama, "full", ids)
    _, got = _run(tiny_llama, name, ids, ratio=RATIO, **({"window": 0} if name == "lowrank" else {}))
    assert not torch.allclose(got, ref, atol=1e-3)
