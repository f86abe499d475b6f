import math

import pytest
import torch

from shared.models import EMBEDDED_MODELS, ModelSpec, _gguf_cache_dir, load_model
from shared.tasks import corpus_text, perplexity

pytestmark = pytest.mark.model


def test_embedded_spec_matches_smollm2_architecture(smollm):
    _, _, spec = smollm
    assert spec == ModelSpec(name="smollm2-135m", num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                             hidden_size=576, rope_theta=100000.0, max_context=8192, vocab_size=49152)
    assert spec.kv_channels == 192


def test_gguf_and_cached_safetensors_give_identical_logits(smollm):
    model, tok, _ = smollm  # loaded through the safetensors cache (created on first load)
    folder, gguf = EMBEDDED_MODELS["smollm2-135m"]
    assert (_gguf_cache_dir(str(folder), gguf) / "model.safetensors").is_file()
    direct, _, _ = load_model("smollm2-135m", use_gguf_cache=False)
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, model(ids).logits)


def test_validation_perplexity_in_measured_range(smollm):
    model, tok, _ = smollm
    ids = torch.tensor(tok(corpus_text("validation")[:20000], add_special_tokens=False).input_ids[:1024])
    out = perplexity(model, ids, window=512, stride=256, progress=False)
    # Measured 2026-11-23 on this setting (first 1024 validation tokens, window 512, stride 256): see README.
    assert 15.0 < out["ppl"] < 40.0, out
    assert out["tokens"] == 1023 and math.isclose(math.exp(out["nll"]), out["ppl"])


def test_unknown_model_name_is_rejected():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")


def test_bad_attention_implementation_is_rejected():
    with pytest.raises(ValueError, match="attn_implementation"):
        load_model("smollm2-135m", attn_implementation="flash")


def test_missing_embedded_files_raise_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(EMBEDDED_MODELS, "smollm2-135m", (tmp_path / "absent", "x.gguf"))
    with pytest.raises(FileNotFoundError, match="make data"):
        load_model("smollm2-135m")


def test_missing_gemma_names_its_fetch_stage(monkeypatch, tmp_path):
    monkeypatch.setitem(EMBEDDED_MODELS, "gemma3-270m", (tmp_path / "absent", "gemma-3-270m-q4_k_m.gguf"))
    with pytest.raises(FileNotFoundError, match="dvc repro fetch-gemma"):
        load_model("gemma3-270m")


@pytest.mark.gemma
def test_gemma3_270m_loads_through_the_shared_loader():
    folder, gguf = EMBEDDED_MODELS["gemma3-270m"]
    if not (folder / gguf).is_file():
        pytest.skip("Gemma 3 270M not fetched; run `dvc repro fetch-gemma`")
    model, tok, spec = load_model("gemma3-270m")   # ~95 s the first time (dequantize + cache), then seconds
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (_gguf_cache_dir(str(folder), gguf) / "model.safetensors").is_file()
    assert (spec.vocab_size, spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads,
            spec.head_dim) == (262144, 640, 18, 4, 1, 256)
    assert 265e6 < sum(p.numel() for p in model.parameters()) < 271e6
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight   # tied
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert 0.5 < float(loss) < 6.0, float(loss)    # a trained model, not random weights (log V = 12.5)
