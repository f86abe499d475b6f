"""The bookkeeping every KV-cache method shares, on transformers' public ``Cache`` API (no modeling copies).

How a method plugs in (kvpress-style):

* The evaluation prefills the context **exactly** once with :func:`record_prefill`, which keeps per layer the
  post-RoPE keys, the values, the attention input ``X`` (post-norm hidden states) and RoPE ``cos/sin``.
* A method (a :class:`shared.cache.registry.KVMethod`, registered by name) turns that :class:`PrefillRecord` into a
  :class:`CompressedCache` (one :class:`CompressedLayer` per model layer) — only the compression is method-specific.
* Decoding then runs the unmodified model with that cache inside :func:`attach`, which (a) registers forward
  pre-hooks so each layer sees its input ``X`` and ``cos/sin`` before ``update`` is called (low-rank methods need
  ``X`` to form latents ``X·A``) and (b) routes attention through the **one attention router** of the project.

The router (:func:`routed_attention`, registered with transformers' ``AttentionInterface`` as ``"reprise"``): a cache
layer that attends by itself (CSKV's fused low-rank decode, MatryoshkaKV's latent attention) overrides
:meth:`CompressedLayer.attend`; a context that changes every attention call without a cache (``project_kv``) sets a
per-module handler; every other call runs the model's own attention implementation unchanged.

Left padding: ``record_prefill(..., attention_mask=)`` keeps the mask and per-row positions; a cache carries a
``kv_mask`` [B, S] over its context slots (False = padding) that :func:`shared.kv_eval.decode_through` extends while
decoding, so a padded row decodes as it would alone.

Teacher forcing (:func:`shared.kv_eval.forced_forward`): the forced tokens of an evaluation (question + answer) can
run as ONE multi-token forward instead of n one-token steps. A layer opts in with
:attr:`CompressedLayer.supports_forced_forward` (default False: an unknown layer is decoded step by step): it then
guarantees that, while :func:`forced_decoding` is active, one ``update`` + attention over n new tokens gives every
query the attention it would get at its own decode step (up to float reassociation), and leaves the layer's storage
as the n steps would. Appending exactly (:class:`ExactLayer`) or a fixed per-token transform (MatryoshkaKV) is
causal already; a layer whose stored form of a key depends on the query step (CSKV's blocked window) returns several
copies of the keys and a per-query mask choosing one copy per key (see ``shared.cache.lowrank``).

Byte accounting counts the real storage of the tensors a layer *keeps* (:meth:`CompressedLayer.stored_tensors`);
compute scratch (e.g. a materialized reconstruction, identical to re-reconstructing every step) is excluded.
Every layer also states its :meth:`CompressedLayer.analytic_bytes` (the formula), and tests assert both agree.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from shared.memory import tensor_bytes
from shared.models import decoder_layers

ROUTER = "reprise"


def attention_modules(model) -> list:
    """The per-layer self-attention modules of a decoder-only HF model (Llama/Mistral/Qwen-style)."""
    return [layer.self_attn for layer in decoder_layers(model)]


# ---- the one attention router ------------------------------------------------------------------------------
def _fallback_attention(module, previous: str):
    """The attention function the model used before routing (its own ``eager`` lives in its modeling file)."""
    if previous in AttentionInterface._global_mapping and previous != ROUTER:
        return AttentionInterface._global_mapping[previous]
    if previous == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is not None:
            return _additive_mask(fn)
    return sdpa_attention_forward


def _additive_mask(eager):
    """Routed masks are sdpa's boolean masks (True = attend, :data:`AttentionMaskInterface` below); a model's eager
    attention *adds* its mask to the logits, so it gets the additive form (0 / dtype min) of the same mask."""
    def forward(module, query, key, value, attention_mask, **kwargs):
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device
                                         ).masked_fill_(~attention_mask, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, attention_mask, **kwargs)
    return forward


def model_attention(module, query, key, value, attention_mask, scaling, **kwargs) -> torch.Tensor:
    """The model's own attention implementation (what the router falls back to) on given K/V and mask; for a
    layer's :meth:`CompressedLayer.attend` that changes the K/V or the mask but not the attention itself."""
    previous = getattr(module, "_reprise_previous_impl", "sdpa")
    kwargs.pop("dropout", None)
    return _fallback_attention(module, previous)(module, query, key, value, attention_mask, scaling=scaling,
                                                 dropout=0.0, **kwargs)[0]


def _routed(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = getattr(module, "_reprise_cache_layer", None)
    if layer is not None:
        out = layer.attend(module, query, key, value, attention_mask, scaling, **kwargs)
        if out is not None:
            return out, None
    handler = getattr(module, "_reprise_attend", None)
    if handler is not None:
        return handler(module, query, key, value, attention_mask, scaling, **kwargs), None
    previous = getattr(module, "_reprise_previous_impl", "sdpa")
    return _fallback_attention(module, previous)(module, query, key, value, attention_mask, scaling=scaling,
                                                 dropout=dropout, **kwargs)


AttentionInterface.register(ROUTER, _routed)
AttentionMaskInterface.register(ROUTER, sdpa_mask)


@contextmanager
def routed_attention(model) -> Iterator[None]:
    """Route every attention call of ``model`` through the project's router (re-entrant; restores on exit)."""
    previous = model.config._attn_implementation
    if previous == ROUTER:
        yield
        return
    for attn in attention_modules(model):
        attn._reprise_previous_impl = previous
    model.set_attn_implementation(ROUTER)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextmanager
def attach(model, cache: "Cache") -> Iterator[None]:
    """While active, attention is routed (:func:`routed_attention`) and each attention module hands its input
    hidden states and RoPE cos/sin to ``cache.layers[layer_idx].observe(...)`` just before it runs (and hence before
    ``cache.update``); the layer's :meth:`CompressedLayer.attend` may then take over the attention call."""
    handles = []
    mods = attention_modules(model)
    for idx, attn in enumerate(mods):
        def hook(module, args, kwargs, idx=idx):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            layer = cache.layers[idx] if idx < len(cache.layers) else None
            module._reprise_cache_layer = layer if isinstance(layer, CompressedLayer) else None
            if layer is not None and hasattr(layer, "observe"):
                layer.observe(hidden, cos, sin)
        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with routed_attention(model):
            yield
    finally:
        for h in handles:
            h.remove()
        for attn in mods:
            attn._reprise_cache_layer = None


# ---- the exact prefill every method compresses -------------------------------------------------------------
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
    input_ids: torch.Tensor | None = None       # [B, T] the prefilled ids (methods that re-run the prefill need them)
    attention_mask: torch.Tensor | None = None  # [B, T] bool, False = left padding (None: no padding)
    model: Any = None                           # the model that produced it (score-based methods read its weights)
    memo: dict = field(default_factory=dict, repr=False)  # per-record scratch shared by methods (e.g. scores)

    @property
    def batch_size(self) -> int:
        return self.layers[0].keys.shape[0]

    @property
    def valid(self) -> torch.Tensor:
        """[B, T] bool: which context positions hold real tokens."""
        if self.attention_mask is None:
            k = self.layers[0].keys
            return torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
        return self.attention_mask.bool()

    @property
    def next_positions(self) -> torch.Tensor:
        """[B] RoPE position of the first token decoded after the context (= real tokens per row)."""
        return self.valid.sum(-1)


class _RecordingLayer(DynamicLayer):
    def observe(self, hidden, cos, sin):
        self.hidden, self.cos, self.sin = hidden.detach(), cos.detach(), sin.detach()


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row RoPE positions of a left-padded batch: 0 at each row's first real token (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def record_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PrefillRecord:
    """Run the exact (uncompressed) prefill once and keep what every method needs. ``input_ids``: [B, T];
    ``attention_mask`` [B, T] (1 = token, 0 = left padding) for batches of different lengths."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, tokens] with tokens >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"{tuple(input_ids.shape)}")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("only left padding is supported: every row's last position must be a real token")
        if bool(attention_mask.all()):
            attention_mask = None
    n_layers = len(attention_modules(model))
    cache = Cache(layers=[_RecordingLayer() for _ in range(n_layers)])
    pos = None if attention_mask is None else positions_from_mask(attention_mask)
    with attach(model, cache):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, past_key_values=cache,
                    use_cache=True)
    layers = [LayerRecord(l.keys, l.values, l.hidden, l.cos.expand(l.hidden.shape[0], -1, -1),
                          l.sin.expand(l.hidden.shape[0], -1, -1)) for l in cache.layers]
    return PrefillRecord(layers=layers, last_logits=out.logits[:, -1].float(), n_tokens=input_ids.shape[1],
                         input_ids=input_ids,
                         attention_mask=None if attention_mask is None else attention_mask.bool(), model=model)


# ---- compressed caches -------------------------------------------------------------------------------------
class CompressedLayer(DynamicLayer):
    """Base for one layer of a compressed cache. Subclasses implement :meth:`update` (return the keys/values the
    attention should read, post-RoPE), :meth:`stored_tensors` (what the method really keeps) and
    :meth:`analytic_bytes` (the same by formula). A layer that computes attention itself overrides :meth:`attend`."""

    #: True when one multi-token forward under :func:`forced_decoding` equals token-by-token decoding (module doc);
    #: a layer may make it depend on its configuration (a property). False: evaluators decode step by step.
    supports_forced_forward: bool = False

    def __init__(self):
        super().__init__()
        self.is_initialized = True
        self.forced_decode = False  # set by forced_decoding(): a multi-token update is decoded tokens, not a prefill

    def observe(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Called with the attention input before :meth:`update`; default: unused."""

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs) -> torch.Tensor | None:
        """Attention output [B, q_len, Hq, D] if this layer computes the call itself, else None (the router then
        runs the model's own attention on the ``key``/``value`` that :meth:`update` returned)."""
        return None

    def stored_tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values]

    def stored_bytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.stored_tensors())

    def analytic_bytes(self) -> int:
        """Bytes this layer should hold by formula; default: dense keys + values."""
        if self.keys is None:
            return 0
        return 2 * self.keys.numel() * self.keys.element_size()

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.keys is not None and self.keys.numel() else 0


class CompressedCache(Cache):
    """A transformers ``Cache`` made of :class:`CompressedLayer` objects plus byte accounting."""

    def __init__(self, layers: list[CompressedLayer], method: str, kv_mask: torch.Tensor | None = None):
        super().__init__(layers=layers)
        self.method = method
        # [B, S] bool over the context slots every layer holds (False = padding); None = all real.
        self.kv_mask = kv_mask
        # Methods whose prefill itself differs from the exact one (e.g. attention in a latent space) put their own
        # last-position logits here; evaluators use them instead of the exact prefill's.
        self.prefill_logits: torch.Tensor | None = None

    def stored_bytes(self) -> int:
        """Bytes of real storage held by all layers (what a deployment would keep in memory)."""
        return sum(layer.stored_bytes() for layer in self.layers)

    def analytic_bytes(self) -> int:
        return sum(layer.analytic_bytes() for layer in self.layers)

    @property
    def supports_forced_forward(self) -> bool:
        """Every layer can decode n forced tokens in one forward exactly (:func:`shared.kv_eval.forced_forward`)."""
        return all(getattr(layer, "supports_forced_forward", False) for layer in self.layers)


@contextmanager
def forced_decoding(cache: CompressedCache) -> Iterator[None]:
    """While active, a multi-token update of ``cache``'s layers is n teacher-forced decode steps in one forward
    (not a prefill chunk); the cache must declare :attr:`CompressedCache.supports_forced_forward`."""
    if not cache.supports_forced_forward:
        bad = sorted({type(l).__name__ for l in cache.layers if not getattr(l, "supports_forced_forward", False)})
        raise ValueError(f"cache {cache.method!r} has layers that cannot decode forced tokens in one forward "
                         f"({', '.join(bad)}); decode it step by step (shared.kv_eval.decode_through mode='step')")
    for layer in cache.layers:
        layer.forced_decode = True
    try:
        yield
    finally:
        for layer in cache.layers:
            layer.forced_decode = False


class ExactLayer(CompressedLayer):
    """Keeps given keys/values and appends new tokens exactly (full cache, and eviction methods after selection).
    Appending n tokens at once is n steps under the causal mask: it supports the forced single forward."""

    supports_forced_forward = True

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
    return CompressedCache([ExactLayer(l.keys, l.values) for l in record.layers], method="full",
                           kv_mask=record.attention_mask)
