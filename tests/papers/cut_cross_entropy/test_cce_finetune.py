"""Cut Cross-Entropy paper folder: the fine-tuning module, the frozen-prefix split, memory accounting, params."""
from __future__ import annotations

import pytest
import torch
import yaml

from papers.cut_cross_entropy.memory import analytic_loss_memory, measure_loss_memory
from papers.cut_cross_entropy.module import (CausalLMFineTune, fine_tune, freeze_all_but_last, frozen_prefix_hidden,
                                             trainable_suffix)
from papers.cut_cross_entropy.stages import _convergence_claims, moving_average, paper
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
    assert chunked.fw_peak == n * v * 4 + 2 * n * 4
    assert chunked.fw_saved == n * 4


def test_measured_baseline_bytes_match_the_analytic_count():
    measured, _ = measure_loss_memory("torch", 64, 16, 512, torch.float32)
    analytic = analytic_loss_memory("torch", 64, 16, 512, dtype_bytes=4)
    assert abs(measured.fw_peak / analytic.fw_peak - 1) < 0.01
    assert abs(measured.fwbw_peak / analytic.fwbw_peak - 1) < 0.01
    assert measured.largest_tensor == 64 * 512 * 4


def test_chunking_reduces_measured_forward_memory():
    full, _ = measure_loss_memory("torch", 64, 16, 512)
    chunked, _ = measure_loss_memory("torch_chunked", 64, 16, 512, chunk_size=8)
    assert chunked.fw_peak < full.fw_peak / 3 and chunked.fw_saved < full.fw_saved / 100


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
                               (("memory", "measured_dtype"), "int8", "measured_dtype"),
                               (("memory", "chunks"), 0, "memory.chunks")]:
        q = read_yaml(PAPERS_DIR / "cut_cross_entropy" / "params.yaml")
        q[path[0]][path[1]] = value
        bad.write_text(yaml.safe_dump(q))
        with pytest.raises(ValueError, match=match):
            paper.load_params(bad)


def test_convergence_verdict_rule():
    ok = {"max_ma10_gap": 1e-5, "final_rel_diff": 1e-6, "final_ma10_ours": 3.0, "final_ma10_baseline": 3.0,
          "val_after_ours": 3.0, "val_after_baseline": 3.0}
    assert _convergence_claims(ok, "triton")[0]["verdict"] == "reproduced"
    assert _convergence_claims(ok, "torch_chunked")[0]["verdict"] == "partially reproduced"
    assert _convergence_claims({**ok, "max_ma10_gap": 0.1}, "triton")[0]["verdict"] == "not reproduced"
    assert _convergence_claims({**ok, "final_rel_diff": 0.02}, "triton")[0]["verdict"] == "not reproduced"
