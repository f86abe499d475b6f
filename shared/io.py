"""Small file helpers used by every stage: atomic writes (never leave a half-written result), one deterministic
writer per format (JSON, safetensors), YAML/JSON reads.

Same content → same bytes, in any process: JSON with sorted keys; safetensors with its header's ``__metadata__``
keys sorted (the library writes a Rust ``HashMap``, whose order changes from process to process), so that DVC's
hashes of a re-run's outputs equal the committed ones."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (sorted keys, 2-space indent, trailing newline)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """Write ``tensors`` (name → contiguous tensor) to a safetensors file atomically, with ``metadata`` values
    stored as strings and the header's metadata keys in sorted order (deterministic bytes)."""
    import struct

    from safetensors.torch import save

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    blob = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=meta or None)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    # same entries, metadata sorted; tensor entries keep the library's (deterministic) order
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:
        raise RuntimeError(f"re-serialised safetensors header grew ({len(text)} > {n} bytes)")
    text += b" " * (n - len(text))                        # the format pads headers with spaces
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob[:8] + text + blob[8 + n:])
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a JSON file at {path}; run the stage that writes it first")
    return json.loads(path.read_text())


def read_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a YAML file at {path}")
    with open(path) as f:
        return yaml.safe_load(f)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
