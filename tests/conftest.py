"""Shared fixtures: a tiny random Llama (fast, no data needed) and the embedded SmolLM2 (needs `make data`)."""
from __future__ import annotations

import os

import pytest
import torch

# @triton.jit reads TRITON_INTERPRET when a kernel module is imported: set it before any test imports kernels.*
# (cache methods import kernels.quant), so CPU runs use the Triton interpreter. Left alone on a CUDA machine.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from shared.models import EMBEDDED_MODELS


@pytest.fixture(scope="session")
def tiny_llama():
    """A 2-layer random Llama with GQA (4 query / 2 KV heads, head_dim 16) in fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      rope_theta=10000.0, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def smollm():
    folder, gguf = EMBEDDED_MODELS["smollm2-135m"]
    if not (folder / gguf).is_file():
        pytest.skip("embedded model not fetched; run `make data`")
    from shared.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def ddp_ranks(tmp_path):
    """Run ``python -m <module> OUT`` (a 2-process gloo DDP check writing rank{0,1}.safetensors) and return both
    ranks' tensors."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from shared.paths import REPO_ROOT

    def run(module: str):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run([sys.executable, "-m", module, str(tmp_path)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))

    return run


@pytest.fixture(scope="session")
def tiny_llama_gqa3():
    """The long-context spec's test model (papers/long_context.md §5): 2 layers, 6 query / 2 KV heads (groups of 3),
    head_dim 16, fp32, seed 0, room for 1024 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      rope_theta=10000.0, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.fixture
def one_thread():
    """Tiny-tensor tests run on one intra-op thread: on a shared 2-core machine, thread hand-offs for ops of a few
    microseconds cost far more than the op (the Λ grid test: 0.3 s on 1 thread, 16 s on 2 under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
