"""The small-Llama pre-training harness (shared/pretrain, FRUGAL report §4): model shapes and parameter counts,
tokenizer, windows and batch orders, LR schedule, training with Lightning (loss decreases, seeded runs repeat
exactly), and 2-process DDP on CPU."""
import math

import pytest
import torch

from shared.paths import CORPORA_DIR
from shared.pretrain.data import batch_order, encode_split, order_hash, validation_windows, windows
from shared.pretrain.groups import param_groups
from shared.pretrain.model import SHAPES, build_llama
from shared.pretrain.module import PretrainModule, pretrain, warmup_cosine
from shared.pretrain.tokenizer import fit_tokenizer, load_tokenizer, save_tokenizer

TEXT = """When in the chronicle of wasted time I see descriptions of the fairest wights,
And beauty making beautiful old rhyme in praise of ladies dead and lovely knights,
Then, in the blazon of sweet beauty's best, of hand, of foot, of lip, of eye, of brow,
I see their antique pen would have express'd even such a beauty as you master now.
So all their praises are but prophecies of this our time, all you prefiguring;
And, for they look'd but with divining eyes, they had not skill enough your worth to sing:
For we, which now behold these present days, have eyes to wonder, but lack tongues to praise.
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models train ~30× faster on 1 thread than on 2 when the 2 cores are shared with other jobs
    (OpenMP threads spin waiting for a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def adamw(lr):
    return lambda m: torch.optim.AdamW(m.parameters(), lr=lr)


# ---- model ---------------------------------------------------------------------------------------------------------
def test_tiny_model_has_the_reports_param_counts():
    model = build_llama("tiny", vocab_size=8192, seed=0)
    groups = param_groups(model)
    total = sum(p.numel() for p in model.parameters())
    assert total == 7_358_720 and round(total / 1e6, 2) == 7.36
    assert groups.numel("linear") == 3_162_112 and round(groups.numel("linear") / 1e6, 2) == 3.16
    assert len(groups.linear) == 28                      # 7 Linear weights × 4 layers
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied
    assert next(model.parameters()).dtype == torch.float32 and model.training


@pytest.mark.parametrize("shape,galore_millions", [("60m", 58.07), ("130m", 134.11), ("350m", 367.97)])
def test_paper_shapes_match_galore_configs(shape, galore_millions):
    model = build_llama(shape, vocab_size=32000, seed=0, device="meta")   # no memory allocated
    s, V = SHAPES[shape], 32000
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers) == \
        (s.hidden, s.intermediate, s.heads, s.layers)
    assert cfg.hidden_act == "silu" and not cfg.tie_word_embeddings and cfg.initializer_range == 0.02
    layer = model.model.layers[0]
    assert tuple(layer.self_attn.q_proj.weight.shape) == (s.hidden, s.hidden)
    assert tuple(layer.mlp.gate_proj.weight.shape) == (s.intermediate, s.hidden)
    assert tuple(layer.mlp.down_proj.weight.shape) == (s.hidden, s.intermediate)
    linear = s.layers * (4 * s.hidden ** 2 + 3 * s.hidden * s.intermediate)
    total = sum(p.numel() for p in model.parameters())
    assert param_groups(model).numel("linear") == linear
    assert total == linear + 2 * V * s.hidden + (2 * s.layers + 1) * s.hidden
    assert round(total / 1e6, 2) == galore_millions
    assert next(model.parameters()).is_meta


def test_build_is_seeded_initialised_at_002_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_llama("tiny", vocab_size=64, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b, c = build_llama("tiny", vocab_size=64, seed=5), build_llama("tiny", vocab_size=64, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert abs(a.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 1e-3
    assert torch.equal(a.model.norm.weight, torch.ones(256))


def test_unknown_shape_and_bad_vocab_raise():
    with pytest.raises(ValueError, match="'7b'"):
        build_llama("7b", vocab_size=100, seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        build_llama("tiny", vocab_size=0, seed=0)


# ---- tokenizer -----------------------------------------------------------------------------------------------------
def test_tokenizer_round_trips_has_exact_vocab_and_is_deterministic(tmp_path):
    tok = fit_tokenizer([TEXT], vocab_size=300)
    assert tok.get_vocab_size() == 300
    assert fit_tokenizer([TEXT], vocab_size=300).to_str() == tok.to_str()
    for s in (TEXT, "  odd\tspacing\n\n\nand ünïcödé — 日本語 😀 unseen!"):
        assert tok.decode(tok.encode(s).ids) == s
    assert len(tok.encode(TEXT).ids) < 0.7 * len(TEXT.encode())          # the 43 merges compress
    path = save_tokenizer(tok, tmp_path / "t.json")
    assert load_tokenizer(path).to_str() == tok.to_str()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro fit-tokenizer"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="vocab_size"):
        fit_tokenizer([TEXT], vocab_size=100)
    with pytest.raises(ValueError, match="fewer than vocab_size"):
        fit_tokenizer(["ab ab"], vocab_size=8192)


@pytest.mark.skipif(not (CORPORA_DIR / "shakespeare" / "validation").is_dir(), reason="corpus not fetched")
def test_validation_windows_are_the_first_windows_of_the_split():
    tok = fit_tokenizer([TEXT], vocab_size=300)
    ids = encode_split(tok, "validation")
    assert encode_split(tok, "validation") is ids                       # cached
    v = validation_windows(tok, 4, 32)
    assert torch.equal(v, ids[:128].view(4, 32))
    with pytest.raises(ValueError, match="validation split holds only"):
        validation_windows(tok, 10 ** 9, 32)


# ---- windows and batch orders --------------------------------------------------------------------------------------
def test_windows_are_contiguous_without_padding():
    ids = torch.arange(1000)
    w = windows(ids, 256)
    assert w.shape == (3, 256) and torch.equal(w.flatten(), ids[:768])
    with pytest.raises(ValueError, match="no window"):
        windows(torch.arange(10), 256)
    with pytest.raises(ValueError, match="1-D"):
        windows(torch.zeros(2, 300, dtype=torch.long), 256)


def test_batch_order_is_seeded_covers_epochs_and_hashes():
    a, b, c = batch_order(10, 4, 7, seed=0), batch_order(10, 4, 7, seed=0), batch_order(10, 4, 7, seed=1)
    assert a.shape == (7, 4) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    flat = a.flatten()
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))
    assert not torch.equal(flat[:10], flat[10:20])                      # each epoch reshuffled
    assert order_hash(a) == order_hash(b) != order_hash(c)
    assert order_hash(a) != order_hash(a.reshape(14, 2)) and len(order_hash(a)) == 64
    with pytest.raises(ValueError):
        batch_order(0, 4, 7, seed=0)


# ---- schedule ------------------------------------------------------------------------------------------------------
def test_warmup_then_cosine_to_ten_percent():
    f = lambda s: warmup_cosine(s, warmup_steps=10, total_steps=110)  # noqa: E731
    assert [f(s) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5) and f(110) == pytest.approx(0.1) and f(200) == pytest.approx(0.1)
    assert f(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert all(f(s) >= f(s + 1) for s in range(10, 110))
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 10, 10)


# ---- training ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repeated_data():
    """A fixed 32-token random phrase repeated: every window is the same sequence, so the model can memorise it."""
    phrase = torch.randint(0, 64, (32,), generator=torch.Generator().manual_seed(0))
    return windows(phrase.repeat(16), 32), windows(phrase.repeat(2), 32)


def test_loss_decreases_and_lr_follows_schedule(repeated_data):
    train, val = repeated_data
    order = batch_order(train.shape[0], 4, 20, seed=0)
    model = build_llama("tiny", vocab_size=64, seed=0, max_positions=32)
    m = pretrain(model, adamw(3e-3), train, order, val, warmup_steps=2, total_steps=20, val_every=10, seed=0,
                 progress=False)
    assert len(m.train_losses) == 20 and len(m.step_seconds) == 20 and m.seconds_per_step > 0
    assert m.train_losses[0] == pytest.approx(math.log(64), abs=0.2)
    assert m.train_losses[-1] < 0.5 * m.train_losses[0]
    assert [p["step"] for p in m.curve] == [0, 10, 20]
    assert m.curve[-1]["val_loss"] < 0.5 * m.curve[0]["val_loss"]
    assert m.curve[-1]["val_ppl"] == pytest.approx(math.exp(m.curve[-1]["val_loss"]))
    assert m.lrs == pytest.approx([3e-3 * warmup_cosine(s, 2, 20) for s in range(20)])


def test_same_seed_gives_the_same_curve(repeated_data):
    train, _ = repeated_data
    noisy = torch.randint(0, 64, (12, 32), generator=torch.Generator().manual_seed(1))
    order = batch_order(noisy.shape[0], 4, 4, seed=3)

    def run(seed):
        model = build_llama("tiny", vocab_size=64, seed=seed, max_positions=32)
        return pretrain(model, adamw(1e-3), noisy, order, noisy[:2], warmup_steps=1, total_steps=4, val_every=2,
                        seed=seed, progress=False)

    a, b, c = run(0), run(0), run(1)
    assert a.train_losses == b.train_losses and a.curve == b.curve and a.order_hash == b.order_hash
    assert [p["step"] for p in a.curve] == [0, 2, 4]
    assert a.train_losses != c.train_losses


def test_pretrain_validates_inputs(repeated_data):
    train, val = repeated_data
    model = build_llama("tiny", vocab_size=64, seed=0, max_positions=32)
    with pytest.raises(ValueError, match="train windows exist"):
        pretrain(model, adamw(1e-3), train, torch.tensor([[0, 99]]), val, 0, 1, 0, seed=0, progress=False)
    with pytest.raises(ValueError, match="warmup_steps"):
        PretrainModule(model, adamw(1e-3), warmup_steps=5, total_steps=5)


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(ddp_ranks):
    r0, r1 = ddp_ranks("shared.pretrain.ddp_check")
    init = dict(build_llama("tiny", vocab_size=64, seed=0, max_positions=16).named_parameters())
    assert r0.keys() == r1.keys() == init.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert not torch.equal(r0["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"])
