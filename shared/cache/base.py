"""The bookkeeping every KV-cache method shares, on transformers' public ``Cache`` API (no modeling copies).

How a method plugs in (kvpress-style):

* The evaluation prefills the context **exactly** once with :func:`record_prefill`, which keeps per layer the
  post-RoPE keys, the values, the attention input ``X`` (post-norm hidden states) and RoPE ``cos/sin``.
* A method turns that :class:`PrefillRecord` into a :class:`CompressedCache` (one :class:`CompressedLayer` per model
  layer) — only ``compress`` is method-specific.
* Decoding then runs the unmodified model with that cache. :func:`attach` registers forward pre-hooks on the
  attention modules so each layer sees its input ``X`` and ``cos/sin`` before ``update`` is called (low-rank
  methods need ``X`` to form latents ``X·A``).

Byte accounting counts the real storage of the tensors a layer *keeps* (:meth:`CompressedLayer.stored_tensors`);
compute scratch (e.g. a materialized reconstruction, identical to re-reconstructing every step) is excluded.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers.cache_utils import Cache, DynamicLayer

from shared.memory import tensor_bytes


def attention_modules(model) -> list:
    """The per-layer self-attention modules of a decoder-only HF model (Llama/Mistral/Qwen-style)."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers; only decoder-only HF LMs are supported")
    return [layer.self_attn for layer in layers]


@contextmanager
def attach(model, cache: "Cache") -> Iterator[None]:
    """While active, each attention module hands its input hidden states and RoPE cos/sin to
    ``cache.layers[layer_idx].observe(...)`` just before it runs (and hence before ``cache.update``)."""
    handles = []
    for idx, attn in enumerate(attention_modules(model)):
        def hook(module, args, kwargs, idx=idx):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            layer = cache.layers[idx] if idx < len(cache.layers) else None
            module._reprise_cache_layer = layer  # read by shared.cache.fused's attention function
            if layer is not None and hasattr(layer, "observe"):
                layer.observe(hidden, cos, sin)
        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for attn in attention_modules(model):
            attn._reprise_cache_layer = None


@dataclass
class LayerRecord:
    keys: torch.Tensor     # [B, Hkv, T, D], post-RoPE (what HF caches)
    values: torch.Tensor   # [B, Hkv, T, D]
    hidden: torch.Tensor   # [B, T, d_model], input of k_proj/v_proj (after the layer's input norm)
    cos: torch.Tensor      # [B, T, D]
    sin: torch.Tensor      # [B, T, D]


@dataclass
class PrefillRecord:
    """Everything a method needs to compress an exactly-prefilled context."""

    layers: list[LayerRecord]
    last_logits: torch.Tensor  # [B, V] logits at the last context position
    n_tokens: int
    input_ids: torch.Tensor | None = None  # [B, T] the prefilled ids (methods that re-run the prefill need them)

    @property
    def batch_size(self) -> int:
        return self.layers[0].keys.shape[0]


class _RecordingLayer(DynamicLayer):
    def observe(self, hidden, cos, sin):
        self.hidden, self.cos, self.sin = hidden.detach(), cos.detach(), sin.detach()


@torch.no_grad()
def record_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PrefillRecord:
    """Run the exact (uncompressed) prefill once and keep what every method needs. ``input_ids``: [B, T]."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, tokens] with tokens >= 1, got {tuple(input_ids.shape)}")
    n_layers = len(attention_modules(model))
    cache = Cache(layers=[_RecordingLayer() for _ in range(n_layers)])
    with attach(model, cache):
        out = model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    layers = [LayerRecord(l.keys, l.values, l.hidden, l.cos.expand(l.hidden.shape[0], -1, -1),
                          l.sin.expand(l.hidden.shape[0], -1, -1)) for l in cache.layers]
    return PrefillRecord(layers=layers, last_logits=out.logits[:, -1].float(), n_tokens=input_ids.shape[1],
                         input_ids=input_ids)


class CompressedLayer(DynamicLayer):
    """Base for one layer of a compressed cache. Subclasses implement :meth:`update` (return the keys/values the
    attention should read, post-RoPE) and :meth:`stored_tensors` (what the method really keeps)."""

    def __init__(self):
        super().__init__()
        self.is_initialized = True

    def observe(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Called with the attention input before :meth:`update`; default: unused."""

    def stored_tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]

    def stored_bytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.stored_tensors())

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.keys is not None and self.keys.numel() else 0


class CompressedCache(Cache):
    """A transformers ``Cache`` made of :class:`CompressedLayer` objects plus byte accounting."""

    def __init__(self, layers: list[CompressedLayer], method: str):
        super().__init__(layers=layers)
        self.method = method
        # Methods whose prefill itself differs from the exact one (e.g. attention in a latent space) put their own
        # last-position logits here; evaluators use them instead of the exact prefill's.
        self.prefill_logits: torch.Tensor | None = None

    def stored_bytes(self) -> int:
        """Bytes of real storage held by all layers (what a deployment would keep in memory)."""
        return sum(layer.stored_bytes() for layer in self.layers)


class ExactLayer(CompressedLayer):
    """Keeps given keys/values and appends new tokens exactly (full cache, and eviction methods after selection)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys.clone(), values.clone()
        self.dtype, self.device = keys.dtype, keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values


def full_cache(record: PrefillRecord) -> CompressedCache:
    """The uncompressed baseline: an exact copy of the prefill's K/V."""
    return CompressedCache([ExactLayer(l.keys, l.values) for l in record.layers], method="full")
