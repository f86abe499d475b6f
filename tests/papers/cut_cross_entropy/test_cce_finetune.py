"""Cut Cross-Entropy paper folder: the fine-tuning module, the frozen-prefix split, memory accounting, params."""
from __future__ import annotations

import pytest
import torch
import yaml

from papers.cut_cross_entropy.memory import analytic_loss_memory, measure_loss_memory
from papers.cut_cross_entropy.module import (CausalLMFineTune, fine_tune, freeze_all_but_last, frozen_prefix_hidden,
                                             trainable_suffix)
from papers.cut_cross_entropy.stages import moving_average, paper
from shared.io import read_yaml
from shared.paths import PAPERS_DIR


@pytest.fixture()
def tiny_lm():
    """A 3-layer random Llama with hidden 32 and vocabulary 97 (tied embeddings), fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 16), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels}


def test_torch_and_chunked_losses_and_gradients_agree(tiny_lm, batch):
    freeze_all_but_last(tiny_lm, 1)
    losses, grads = {}, {}
    for impl in ("torch", "torch_chunked"):
        tiny_lm.zero_grad()
        module = CausalLMFineTune(tiny_lm, impl=impl, chunk_size=5)
        loss = module.loss(batch)
        loss.backward()
        losses[impl] = loss.detach()
        grads[impl] = [p.grad.clone() for p in tiny_lm.parameters() if p.requires_grad]
    torch.testing.assert_close(losses["torch"], losses["torch_chunked"], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads["torch"], grads["torch_chunked"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_baseline_is_the_hf_loss(tiny_lm, batch):
    freeze_all_but_last(tiny_lm, 1)
    ref = tiny_lm(**batch).loss
    torch.testing.assert_close(CausalLMFineTune(tiny_lm, impl="torch").loss(batch), ref)


def test_frozen_parameters_stay_bit_identical_after_a_step(tiny_lm, batch):
    trainable = set(freeze_all_but_last(tiny_lm, 1))
    assert trainable and all(n.startswith(("model.layers.2.", "model.norm.")) for n in trainable)
    before = {n: p.detach().clone() for n, p in tiny_lm.named_parameters()}
    fine_tune(tiny_lm, [batch], "torch_chunked", steps=2, lr=1e-2, weight_decay=0.1, chunk_size=7, progress=False)
    for n, p in tiny_lm.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_trainable_suffix_on_prefix_features_equals_the_full_model(tiny_lm, batch):
    full = tiny_lm(**batch).loss
    h = frozen_prefix_hidden(tiny_lm, batch["input_ids"], 2)
    suffix = trainable_suffix(tiny_lm, 2)
    assert len(suffix.model.layers) == 1 and len(tiny_lm.model.layers) == 3
    assert suffix.lm_head.weight is suffix.model.embed_tokens.weight
    torch.testing.assert_close(suffix(inputs_embeds=h, labels=batch["labels"]).loss, full, rtol=1e-5, atol=1e-6)


def test_same_seed_same_curve_for_both_impls(tiny_lm, batch):
    curves = {}
    for impl in ("torch", "torch_chunked"):
        h = frozen_prefix_hidden(tiny_lm, batch["input_ids"], 2)
        suffix = trainable_suffix(tiny_lm, 2)
        freeze_all_but_last(suffix, 1)
        curves[impl] = fine_tune(suffix, [{"inputs_embeds": h, "labels": batch["labels"]}], impl, steps=4, lr=1e-2,
                                 progress=False).step_losses
    assert len(curves["torch"]) == 4
    assert max(abs(a - b) for a, b in zip(*curves.values())) < 1e-4
    assert curves["torch"][-1] < curves["torch"][0]


def test_analytic_bytes_for_a_small_shape():
    n, d, v = 8, 4, 16
    base = analytic_loss_memory("torch", n, d, v, dtype_bytes=2)
    assert base.fw_peak == n * v * (2 + 4 + 4)         # bf16 logits, fp32 copy, fp32 log-softmax
    assert base.fw_saved == n * v * 4
    assert base.fwbw_peak == 3 * n * v * 4
    cce = analytic_loss_memory("triton", n, d, v, dtype_bytes=2)
    assert cce.fw_peak == 2 * n * 4                    # LSE + target logit only
    assert cce.fwbw_peak == 2 * n * 4 + (n * d + v * d) * 2 + v * d * 4
    chunked = analytic_loss_memory("torch_chunked", n, d, v, dtype_bytes=4, chunk_size=n)
    assert chunked.fw_peak == n * d * 4 + 3 * n * v * 4 + 3 * n * 4   # e copy, logits + 2 LSE temporaries, stats
    assert chunked.fw_saved == n * d * 4 + 3 * n * 4


def test_measured_baseline_bytes_match_the_analytic_count():
    measured, _ = measure_loss_memory("torch", 64, 16, 512, torch.float32)
    analytic = analytic_loss_memory("torch", 64, 16, 512, dtype_bytes=4)
    assert abs(measured.fw_peak / analytic.fw_peak - 1) < 0.01
    assert abs(measured.fwbw_peak / analytic.fwbw_peak - 1) < 0.01
    assert measured.largest_tensor == 64 * 512 * 4


def test_chunking_reduces_measured_forward_memory():
    full, _ = measure_loss_memory("torch", 64, 16, 512)
    chunked, _ = measure_loss_memory("torch_chunked", 64, 16, 512, chunk_size=8)
    # saved for backward: the compacted e and per-token stats (O(N·D + N)), not the O(N·V) log-softmax
    assert chunked.fw_peak < full.fw_peak / 3 and chunked.fw_saved < full.fw_saved / 10


@pytest.mark.parametrize("call", [
    lambda: analytic_loss_memory("cce", 8, 4, 16),
    lambda: analytic_loss_memory("torch", 0, 4, 16),
    lambda: analytic_loss_memory("torch", 8, 4, 16, dtype_bytes=3),
    lambda: analytic_loss_memory("torch_chunked", 8, 4, 16, chunk_size=0),
    lambda: measure_loss_memory("liger", 8, 4, 16),
    lambda: moving_average([1.0], window=0),
])
def test_bad_memory_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_bad_module_arguments_raise(tiny_lm):
    with pytest.raises(ValueError, match="no trainable"):
        CausalLMFineTune(tiny_lm.requires_grad_(False))
    freeze_all_but_last(tiny_lm, 1)
    with pytest.raises(ValueError, match="impl"):
        CausalLMFineTune(tiny_lm, impl="liger")
    with pytest.raises(ValueError, match="lr"):
        CausalLMFineTune(tiny_lm, lr=0)
    with pytest.raises(ValueError, match="chunk_size"):
        CausalLMFineTune(tiny_lm, chunk_size=0)
    with pytest.raises(ValueError, match="n_blocks"):
        freeze_all_but_last(tiny_lm, 4)
    with pytest.raises(ValueError, match="n_frozen"):
        trainable_suffix(tiny_lm, 3)
    with pytest.raises(ValueError, match="exactly one"):
        CausalLMFineTune(tiny_lm).loss({"labels": torch.zeros(1, 4, dtype=torch.long)})


def test_params_validate_and_reject_bad_values(tmp_path):
    p = paper.load_params()
    assert p.convergence.impl != p.convergence.baseline
    bad = tmp_path / "params.yaml"
    for path, value, match in [(("convergence", "impl"), "cce", "convergence.impl"),
                               (("convergence", "steps"), 0, "convergence.steps"),
                               (("convergence", "lr"), -1.0, "convergence.lr"),
                               (("memory", "ns"), [2048, 1024], "memory.ns"),
                               (("memory", "official_impl"), "liger", "memory.official_impl"),
                               (("filter", "block"), [100, 128], "filter.block"),
                               (("filter", "eps"), 0.0, "filter.eps"),
                               (("memory", "chunks"), 0, "memory.chunks")]:
        q = read_yaml(PAPERS_DIR / "cut_cross_entropy" / "params.yaml")
        q[path[0]][path[1]] = value
        bad.write_text(yaml.safe_dump(q))
        with pytest.raises(ValueError, match=match):
            paper.load_params(bad)


def test_per_window_validation_losses_weighted_give_the_batch_loss(tiny_lm, batch):
    from papers.cut_cross_entropy.module import CausalLMFineTune

    m = CausalLMFineTune(tiny_lm, impl="torch")
    per = m.evaluate_windows([batch])
    counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()
    assert len(per) == 2 and counts[0] < counts[1]
    weighted = sum(x * c for x, c in zip(per, counts)) / sum(counts)   # each window's mean, weighted by its tokens
    assert weighted == pytest.approx(m.evaluate([batch]), rel=1e-6)


def test_kernel_claims_are_untestable_without_a_gpu_run(tmp_path, monkeypatch):
    import papers.cut_cross_entropy.claims as cl

    rows = [{"shape": "gemma (real)", "n": 1024, "v": 10, "method": "torch", "fw_peak_mb": 8.0, "fwbw_peak_mb": 9.0,
             "paper_fw_mb": 7.0, "paper_fwbw_mb": 8.0},
            {"shape": "tiny", "n": 64, "method": "triton", "fw_peak_mb": 0.001}]
    monkeypatch.setattr(cl, "REPORTS_DIR", tmp_path)
    got = cl._untestable_without_gpu({"memory.json": {"rows": rows}}, "fw")
    assert got["verdict"] == "untestable here" and "N=1024" in got["text"] and "needs a GPU" in got["text"]
    (tmp_path / cl.BENCH).write_text("{}")
    monkeypatch.setattr(cl, "_gpu_bench", lambda reports_dir=tmp_path: {})
    with pytest.raises(NotImplementedError):
        cl.kernel_speed({"memory.json": {"rows": rows}}, None)


def test_filtered_fine_tuning_passes_the_filter_to_the_loss(tiny_lm, batch):
    """filter_eps=0 keeps every tile (exact); a threshold above every |S − Y| drops the softmax part of the
    gradient, so the update differs — the module really runs the filtered backward."""
    freeze_all_but_last(tiny_lm, 1)
    grads = {}
    for eps in (None, 0.0, 0.9):
        tiny_lm.zero_grad()
        CausalLMFineTune(tiny_lm, impl="torch_chunked", chunk_size=16, filter_eps=eps,
                         filter_block=(16, 16)).loss(batch).backward()
        grads[eps] = torch.cat([p.grad.flatten() for p in tiny_lm.parameters() if p.requires_grad])
    torch.testing.assert_close(grads[0.0], grads[None])
    assert not torch.allclose(grads[0.9], grads[None], rtol=1e-3, atol=1e-6)


def test_windows_start_with_bos_when_the_tokenizer_adds_one(monkeypatch):
    import importlib

    import papers.cut_cross_entropy.stages as st

    ppl = importlib.import_module("shared.tasks.perplexity")   # shared.tasks re-exports a function of this name

    class Tok:
        bos_token_id = 2

        def __call__(self, text):
            return {"input_ids": [2, 7]}

    monkeypatch.setattr(ppl, "corpus_ids", lambda tok, split, max_chars, corpus=None: torch.arange(10, 40))
    w = st._windows(Tok(), "train", 8, 3, None)
    assert w.shape == (3, 8) and (w[:, 0] == 2).all() and w[0, 1:].tolist() == list(range(10, 17))
    Tok.bos_token_id = None                             # no BOS: plain consecutive windows
    assert st._windows(Tok(), "train", 8, 3, None)[1].tolist() == list(range(18, 26))


def test_gemma3_suffix_on_prefix_features_equals_the_full_model():
    """Gemma 3's mixed sliding/full attention layers and separate RoPE per layer type survive the prefix split."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                           attn_implementation="eager")
    model = Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))
    full = model(input_ids=ids, labels=ids).loss
    h = frozen_prefix_hidden(model, ids, 1)
    suffix = trainable_suffix(model, 1)
    assert suffix.config.layer_types == cfg.layer_types[1:]
    torch.testing.assert_close(suffix(inputs_embeds=h, labels=ids).loss, full, rtol=1e-5, atol=1e-6)
    freeze_all_but_last(suffix, 1)
    for impl in ("torch_chunked",):
        ours = CausalLMFineTune(suffix, impl=impl, chunk_size=5).loss({"inputs_embeds": h, "labels": ids})
        torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)


def test_measure_memory_counts_any_loss_callable():
    from papers.cut_cross_entropy.memory import kernel_loss_fn, measure_memory

    g = torch.Generator().manual_seed(0)
    e, c = torch.randn(32, 8, generator=g), torch.randn(256, 8, generator=g)
    y = torch.randint(0, 256, (32,), generator=g)
    ours, _ = measure_memory(kernel_loss_fn("torch"), e, c, y)
    plain, _ = measure_memory(lambda e, c, y: torch.nn.functional.cross_entropy(e @ c.T, y), e, c, y)
    assert abs(ours.fw_peak - plain.fw_peak) < 1024                # same N×V buffers; scalars aside
    assert abs(ours.fw_peak / analytic_loss_memory("torch", 32, 8, 256, 4).fw_peak - 1) < 0.01
    assert ours.fwbw_peak >= 32 * 256 * 4 + 256 * 8 * 4         # ∇C is counted
    assert e.grad is None and c.grad is None                    # the caller's tensors are untouched
    with pytest.raises(ValueError, match="shapes"):
        measure_memory(kernel_loss_fn("torch"), e, c, y[:5])


def test_official_package_is_optional(monkeypatch):
    import sys

    from papers.cut_cross_entropy.memory import official_loss_fn

    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)   # import fails as if not installed
    assert official_loss_fn() is None


def test_official_torch_compile_eager_matches_our_baseline_bytes():
    pytest.importorskip("cut_cross_entropy")
    from papers.cut_cross_entropy.memory import kernel_loss_fn, measure_memory, official_loss_fn

    g = torch.Generator().manual_seed(0)
    e, c = torch.randn(16, 8, generator=g), torch.randn(128, 8, generator=g)
    y = torch.randint(0, 128, (16,), generator=g)
    theirs, _ = measure_memory(official_loss_fn(), e, c, y)    # eager even though imported with dynamo on
    ours, _ = measure_memory(kernel_loss_fn("torch"), e, c, y)
    assert abs(theirs.fw_peak / ours.fw_peak - 1) < 0.05 and abs(theirs.fwbw_peak / ours.fwbw_peak - 1) < 0.05
    torch.testing.assert_close(official_loss_fn()(e, c, y), kernel_loss_fn("torch")(e, c, y))


def test_paper_numbers_scale_with_the_shape():
    from papers.cut_cross_entropy.stages import paper_scaled

    assert paper_scaled("torch", 8192, 2304, 256000)["paper_fw_mb"] == 24000.0
    half = paper_scaled("torch", 4096, 640, 256000)
    assert half["paper_fw_mb"] == 12000.0 and half["paper_fwbw_mb"] == 14000.0     # × N·V, not D
    cce = paper_scaled("torch_chunked+filter", 4096, 1152, 256000)
    assert cce["paper_row"] == "cce" and cce["paper_fw_mb"] == 0.55 and cce["paper_fwbw_mb"] == 582.0
    assert paper_scaled("torch_chunked", 4096, 640, 256000)["paper_row"] is None
