"""The KV-cache method registry: one builder signature for every method.

A method is a dataclass subclass of :class:`KVMethod` whose fields are its parameters (``compression_ratio`` first,
then method params); calling it on a :class:`~shared.cache.base.PrefillRecord` returns a
:class:`~shared.cache.base.CompressedCache`::

    cache = build("snapkv", compression_ratio=0.5, window_size=32)(record)   # == compress("snapkv", record, 0.5, ...)

``compression_ratio`` is the one word for the compression amount at every interface (as kvpress says): the fraction
of the context's KV cache removed, in [0, 1); 0 keeps everything. Decompositions convert it to a density
(``1 − compression_ratio``) inside. A method declares what it needs in ``needs`` so callers (and the generic rules
test) know what to pass: ``"scores"`` (reads attention from the model that made the record), ``"factors"``
(low-rank factors; a default is computed from the model's weights), ``"projection"`` (orthogonal per-head bases),
``"fused"`` (a layer that attends by itself through the attention router).

Adding a method = its file + one line in :data:`METHODS` (``name: "module:Class"``, imported lazily).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import ClassVar

from shared.cache.base import CompressedCache, PrefillRecord
from shared.cache.sliding import keep_model_windows

#: name → "module:Class" (the registry; one line per method)
METHODS: dict[str, str] = {
    "full": "shared.cache.registry:FullCache",
    "streaming_llm": "shared.cache.eviction:StreamingLLM",
    "h2o": "shared.cache.eviction:H2O",
    "snapkv": "shared.cache.snapkv:SnapKV",
    "lowrank": "shared.cache.lowrank:LowRank",
    "matryoshka": "shared.cache.orthogonal:Matryoshka",
    "lm_infinite": "shared.cache.lm_infinite:LMInfinite",
    "refreshkv": "shared.cache.refreshkv:RefreshKV",
}

def check_ratio(compression_ratio: float) -> float:
    if isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float)) \
            or not 0.0 <= compression_ratio < 1.0:
        raise ValueError(f"compression_ratio must be a number in [0, 1), got {compression_ratio!r}")
    return float(compression_ratio)


@dataclass
class KVMethod:
    """Base of every registered method: holds ``compression_ratio`` (validated) and the method's params."""

    compression_ratio: float = 0.0
    needs: ClassVar[frozenset[str]] = frozenset()
    name: ClassVar[str] = "kv_method"

    def __post_init__(self) -> None:
        self.compression_ratio = check_ratio(self.compression_ratio)

    def __call__(self, record: PrefillRecord) -> CompressedCache:
        """Compress ``record``; a sliding-window layer of the model keeps the model's own window exactly (it is
        bounded already; :mod:`shared.cache.sliding` — the identity for models without such layers)."""
        cache = keep_model_windows(record, self.compress(record))
        cache.method = self.name
        return cache

    def compress(self, record: PrefillRecord) -> CompressedCache:  # pragma: no cover - abstract
        raise NotImplementedError

    def full_sequence(self, model):
        """A context in which plain full-sequence forwards of ``model`` see this compression in every attention
        call (teacher-forced perplexity/KL without a cache); only methods with such a form implement it."""
        raise ValueError(f"KV method {self.name!r} has no full-sequence form (it compresses a prefilled cache); "
                         "evaluate it through a cache (shared.kv_eval)")


@dataclass
class FullCache(KVMethod):
    """The uncompressed cache (the reference every table compares with); only ``compression_ratio = 0``."""

    name: ClassVar[str] = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compression_ratio != 0.0:
            raise ValueError(f"the full cache compresses nothing: compression_ratio must be 0, got "
                             f"{self.compression_ratio!r}")

    def compress(self, record: PrefillRecord) -> CompressedCache:
        from shared.cache.base import full_cache

        return full_cache(record)


def method_class(name: str) -> type[KVMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown KV method {name!r}; registered: {sorted(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build(name: str, compression_ratio: float = 0.0, **params) -> KVMethod:
    """The registered method ``name`` at ``compression_ratio`` with ``params``: a callable record → cache.
    Unknown names and unknown or invalid params raise ``ValueError`` naming them, before any compute."""
    cls = method_class(name)
    allowed = {f.name for f in dataclasses.fields(cls)} - {"compression_ratio"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"KV method {name!r} has no parameter(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(compression_ratio=compression_ratio, **params)


def compress(name: str, record: PrefillRecord, compression_ratio: float = 0.0, **params) -> CompressedCache:
    """One call: compress ``record`` with the registered method ``name``."""
    return build(name, compression_ratio, **params)(record)
