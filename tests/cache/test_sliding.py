"""Models with sliding-window layers (Gemma 3's local layers): every registered method keeps the model's own window
on them (shared/cache/sliding.py), and the queries methods re-derive from the prefill record are the model's own
(q_norm before RoPE, the module's softmax scale, the RoPE of the layer's type). On a tiny random Gemma 3 with
window 4 and one global layer in three, so the window binds at every decode step."""
import pytest
import torch

from shared.cache.base import attention_modules, record_prefill
from shared.cache.eviction import accumulated_attention
from shared.cache.registry import build, compress
from shared.cache.rope import project_queries, query_scaling
from shared.cache.sliding import SlidingWindowLayer, has_sliding_layers, sliding_windows
from shared.kv_eval import decode_through

pytestmark = pytest.mark.usefixtures("one_thread")

P, T, W = 20, 8, 4
KINDS = ["sliding_attention", "sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def tiny_gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=W,
                           layer_types=KINDS, max_position_embeddings=256, query_pre_attn_scalar=24,
                           attn_implementation="eager")
    model = Gemma3ForCausalLM(cfg).eval().requires_grad_(False)
    for attn in attention_modules(model):                 # random q/k norms (the init is all-ones: a no-op)
        attn.q_norm.weight.normal_(0, 0.5)
        attn.k_norm.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def data(tiny_gemma):
    ids = torch.randint(3, 97, (1, P + T), generator=torch.Generator().manual_seed(1))
    reference = tiny_gemma(ids).logits[0, P - 1:].float()           # the model's own full forward
    return ids, record_prefill(tiny_gemma, ids[:, :P]), reference


def test_layer_windows(tiny_gemma, tiny_llama):
    assert sliding_windows(tiny_gemma) == [W, W, None]
    assert has_sliding_layers(tiny_gemma) and not has_sliding_layers(tiny_llama)
    assert sliding_windows(tiny_llama) == [None, None]


UNCOMPRESSED = [("full", {}), ("refreshkv", {"refresh_every": 1, "budget": 8}),
                ("refreshkv", {"refresh_every": None, "budget": P + T}),
                ("lm_infinite", {"n_global": 2, "n_local": P + T, "ceiling": False, "lambda_prefill": False}),
                ("snapkv", {})]


@pytest.mark.parametrize("mode", ["step", "forward"])
@pytest.mark.parametrize("name,params", UNCOMPRESSED, ids=lambda x: str(x))
def test_methods_that_keep_every_global_key_equal_the_model(tiny_gemma, data, name, params, mode):
    """The window binds (P = 5 W) and the methods compress nothing on the global layer: the decoded logits are the
    model's own forward's — which fails if a method attends beyond W on a local layer (it would see P + t keys)."""
    ids, rec, reference = data
    cache = compress(name, rec, **params)
    assert [type(l) for l in cache.layers[:2]] == [SlidingWindowLayer, SlidingWindowLayer]
    got = decode_through(tiny_gemma, cache, ids[:, P:], P, mode=mode)[0]
    torch.testing.assert_close(got, reference[1:], rtol=0, atol=1e-5)


def test_window_storage_and_reads(tiny_gemma, data):
    ids, rec, _ = data
    cache = compress("full", rec)
    decode_through(tiny_gemma, cache, ids[:, P:], P)
    layer = cache.layers[0]
    assert layer.keys.shape[2] == W - 1 and layer.stored_bytes() == layer.analytic_bytes()
    assert layer.reads == [W * 2] * T                       # W keys × 2 KV heads per decoded query
    assert cache.layers[2].keys.shape[2] == P + T           # the global layer is the full cache


def test_left_padded_row_decodes_as_alone(tiny_gemma):
    g = torch.Generator().manual_seed(2)
    long, short = torch.randint(3, 97, (1, P + T), generator=g), torch.randint(3, 97, (1, P - 6 + T), generator=g)
    batch = torch.cat([long[:, :P], torch.cat([torch.zeros(1, 6, dtype=torch.long), short[:, :P - 6]], 1)])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    rec = record_prefill(tiny_gemma, batch, attention_mask=mask)
    nxt = torch.cat([long[:, P:], short[:, P - 6:]])
    got = decode_through(tiny_gemma, compress("full", rec), nxt, rec.next_positions, mode="forward")
    alone = decode_through(tiny_gemma, compress("full", record_prefill(tiny_gemma, short[:, :P - 6])),
                           short[:, P - 6:], P - 6)
    torch.testing.assert_close(got[1:], alone, rtol=0, atol=1e-5)


def test_bad_window():
    k = torch.zeros(1, 1, 3, 4)
    with pytest.raises(ValueError, match="window must be an int >= 1, got 0"):
        SlidingWindowLayer(k, k, torch.ones(1, 3, dtype=torch.bool), 0)


def test_queries_are_the_models_own(tiny_gemma, data):
    """project_queries + query_scaling reproduce the model's attention probabilities on every layer type (q_norm
    before RoPE, query_pre_attn_scalar^−½ ≠ 1/√d here, local and global RoPE), and accumulated_attention sums them."""
    ids, rec, _ = data
    out = tiny_gemma(ids[:, :P], output_attentions=True)
    for module, layer, probs in zip(attention_modules(tiny_gemma), rec.layers, out.attentions):
        D = layer.keys.shape[-1]
        assert query_scaling(module, D) == 24 ** -0.5
        q = project_queries(module, layer.hidden, layer.cos, layer.sin)                       # [1, 4, P, D]
        k = layer.keys.repeat_interleave(2, dim=1)
        logits = (q @ k.transpose(-1, -2)) * query_scaling(module, D)
        causal = torch.ones(P, P, dtype=torch.bool).tril()
        if module.sliding_window:
            causal &= ~torch.ones(P, P, dtype=torch.bool).tril(-W)
        mine = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        torch.testing.assert_close(mine, probs, rtol=0, atol=1e-5)
        if not module.sliding_window:                    # the eviction scorers' sum over queries (global layer)
            acc = accumulated_attention(module, layer, rec.valid, torch.arange(P))
            torch.testing.assert_close(acc, probs.view(1, 2, 2, P, P).sum((2, 3)), rtol=0, atol=1e-4)


def test_registry_builds_are_unchanged_for_models_without_windows(tiny_llama):
    """A Llama has no layer_types: the cache a method returns is exactly its own compress()."""
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    rec = record_prefill(tiny_llama, ids)
    method = build("refreshkv", budget=4, refresh_every=2)
    assert [type(l).__name__ for l in method(rec).layers] == [type(l).__name__ for l in method.compress(rec).layers]


@pytest.mark.gemma
def test_gemma3_270m_refreshkv_honours_its_local_layers():
    """The real model (make test-gemma): 15 of 18 layers slide over 512 tokens; at P = 700 RefreshKV refreshing every
    step and a budget above the context both equal the model's own forward."""
    from shared.models import EMBEDDED_MODELS, load_model
    from shared.tasks import corpus_ids

    folder, gguf = EMBEDDED_MODELS["gemma3-270m"]
    if not (folder / gguf).is_file():
        pytest.skip("Gemma 3 270M not fetched; run `dvc repro fetch-gemma`")
    model, tok, _ = load_model("gemma3-270m")
    assert sum(w is not None for w in sliding_windows(model)) == 15
    ids = corpus_ids(tok, "test")[:716][None]
    reference = model(ids).logits[0, 699:-1].float()
    rec = record_prefill(model, ids[:, :700])
    for params in ({"refresh_every": 1, "budget": 64}, {"refresh_every": None, "budget": 800}):
        got = decode_through(model, compress("refreshkv", rec, **params), ids[:, 700:], 700, mode="forward")[0]
        torch.testing.assert_close(got[:-1], reference[1:], rtol=0, atol=1e-3)
