"""Small Llama models for pre-training from scratch, built from a config with HF transformers' own
``LlamaForCausalLM`` (no modeling copy): RMSNorm, SwiGLU MLP, RoPE, untied LM head, every weight drawn from
N(0, 0.02²) (``initializer_range``), fp32.

The bodies are GaLore's ``configs/llama_*.json`` (hidden, intermediate, heads, layers; rms_norm_eps 1e-6); the
vocabulary is the caller's: ``tiny`` (GaLore's 20M body) with the 8192-entry Shakespeare BPE has 7.36M parameters,
3.16M of them in the attention/MLP Linear weights (FRUGAL report §4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    layers: int


# GaLore configs/llama_{20m,60m,130m,350m,1b}.json (the "tiny" CPU model is GaLore's 20M body).
SHAPES: dict[str, Shape] = {
    "tiny": Shape(256, 688, 4, 4),
    "60m": Shape(512, 1376, 8, 8),
    "130m": Shape(768, 2048, 12, 12),
    "350m": Shape(1024, 2736, 16, 24),
    "1b": Shape(2048, 5461, 32, 24),
}


def llama_config(shape: str, vocab_size: int, max_positions: int = 256) -> LlamaConfig:
    """The ``LlamaConfig`` of one named shape (validates the arguments; allocates nothing)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {sorted(SHAPES)}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if max_positions < 2:
        raise ValueError(f"max_positions must be >= 2, got {max_positions}")
    s = SHAPES[shape]
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_attention_heads=s.heads, num_key_value_heads=s.heads, num_hidden_layers=s.layers,
        max_position_embeddings=max_positions, hidden_act="silu", rms_norm_eps=1e-6, initializer_range=0.02,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attention_dropout=0.0, use_cache=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")


def build_llama(shape: str, vocab_size: int, seed: int, max_positions: int = 256,
                device: str | torch.device | None = None) -> LlamaForCausalLM:
    """A freshly initialised fp32 ``LlamaForCausalLM`` of ``shape`` (a key of :data:`SHAPES`), in train mode.

    Deterministic given ``seed``; the global RNG state is left untouched. ``device="meta"`` builds the module
    structure without allocating (to count parameters of the large shapes)."""
    config = llama_config(shape, vocab_size, max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device is not None:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        else:
            model = LlamaForCausalLM(config)
    return model.float().train()
