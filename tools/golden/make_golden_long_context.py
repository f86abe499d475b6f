"""Golden outputs of the official LM-Infinite Λ-attention and SnapKV selection (tests/golden/lmi_lambda.pt,
tests/golden/snapkv_select.pt), written once; never imported by the tests (tests/parity/test_parity_long_context.py
reads the files). Entries are merged into tests/golden/golden.json.

Usage (official snapshots extracted with ``git -C <git dir> archive HEAD | tar -x -C <path>``)::

    python tools/golden/make_golden_long_context.py --lmi /tmp/lmi_off --snapkv /tmp/snapkv_off \\
        --lmi-commit a0ce64c6b7ae54f6059668c899603a6eb0c94c18 --snapkv-commit e216ddc84c5bd210378cbdbbba12ba02102aa640

How the official code is loaded (nothing from it is copied into the project):

* LM-Infinite ``models/lambda_attention.py`` imports only torch: imported from its file; ``lambda_matmul``
  (= ``Lambda_Attention_Matrix``) is called as ``models/llama.py:176-184`` calls it:
  ``(lambda_matmul(k_rot, k_stationary, q_rot, q_stationary, local, global) / √d).softmax().matmul(v)``, with
  k_stationary = the unrotated keys and q_stationary = q rotated at ``min(limit, kv_len − 1)``, limit = local
  (``convert_llama_model``, llama.py:342-349, 150-158). MHA, as the official code (llama.py:125-127).
* SnapKV ``snapkv/monkeypatch/snapkv_utils.py`` imports only torch: imported from its file;
  ``SnapKVCluster(window_size, max_capacity_prompt, kernel_size, pooling).update_kv`` is called on MHA query/key
  states; the kept indices are recovered by matching the returned key rows to the input rows.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[2] / "tests" / "golden"
D, H = 16, 2
LMI_CASES = [  # (name, q_len = kv_len, local, global): the official modes long_seq (with/without padding), short_seq
    ("long_seq_padded", 70, 16, 4), ("long_seq_exact", 64, 16, 4), ("long_seq_global10", 100, 8, 10),
    ("short_seq", 12, 16, 4)]
SNAPKV_CASES = [  # (name, T, window, max_capacity_prompt, kernel, pooling)
    ("default_w64_k5_avg", 200, 64, 128, 5, "avgpool"), ("refreshkv_w1_k7_max", 200, 1, 48, 7, "maxpool")]


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """HF rotate-half RoPE, θ = 10⁴, angles in float64 (the inputs' rotation; not the code under test)."""
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = pos.double()[:, None] * inv[None]
    ang = torch.cat([ang, ang], -1)
    x1, x2 = x.chunk(2, -1)
    return x * ang.cos().float() + torch.cat([-x2, x1], -1) * ang.sin().float()


def lmi_golden(root: Path) -> dict:
    mod = load_module(root / "models" / "lambda_attention.py", "lmi_lambda_attention")
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, T, local, glob in LMI_CASES:
        q, k, v = (torch.randn(1, H, T, D, generator=g) for _ in range(3))
        pos = torch.arange(T)
        q_rot, k_rot = rope(q, pos), rope(k, pos)
        limit = min(local, T - 1)
        q_stat = rope(q, torch.full((T,), limit))
        o = (mod.lambda_matmul(k_rot, k, q_rot, q_stat, local, glob) / math.sqrt(D)).softmax().matmul(v)
        out[name] = {"q_rot": q_rot, "k_rot": k_rot, "v": v, "local": local, "global": glob, "out": o}
    # decode mode (single query at the last position over the whole key sequence)
    T, local, glob = 70, 16, 4
    q, k, v = (torch.randn(1, H, n, D, generator=g) for n in (1, T, T))
    q_rot, k_rot = rope(q, torch.tensor([T - 1])), rope(k, torch.arange(T))
    q_stat = rope(q, torch.tensor([min(local, T - 1)]))
    o = (mod.lambda_matmul(k_rot, k, q_rot, q_stat, local, glob) / math.sqrt(D)).softmax().matmul(v)
    out["single_query"] = {"q_rot": q_rot, "k_rot": k_rot, "v": v, "local": local, "global": glob, "out": o}
    return out


def snapkv_golden(root: Path) -> dict:
    mod = load_module(root / "snapkv" / "monkeypatch" / "snapkv_utils.py", "snapkv_utils")
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, T, window, cap, kernel, pooling in SNAPKV_CASES:
        q, k, v = (torch.randn(1, H, T, D, generator=g) for _ in range(3))
        cluster = mod.SnapKVCluster(window_size=window, max_capacity_prompt=cap, kernel_size=kernel, pooling=pooling)
        k_out, _ = cluster.update_kv(k, q, v, None, 1)
        sel = k_out[:, :, :cap - window]                                   # the selected pre-window rows
        idx = (sel[:, :, :, None, :] == k[:, :, None, :, :]).all(-1).float().argmax(-1)   # row match
        assert torch.equal(k.gather(2, idx[..., None].expand(-1, -1, -1, D)), sel)
        out[name] = {"q": q, "k": k, "v": v, "window": window, "max_capacity_prompt": cap, "kernel": kernel,
                     "pooling": pooling, "kept": idx.sort(-1).values}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lmi", type=Path, required=True, help="extracted Glaciohound/LM-Infinite snapshot")
    ap.add_argument("--snapkv", type=Path, required=True, help="extracted FasterDecoding/SnapKV snapshot")
    ap.add_argument("--lmi-commit", required=True)
    ap.add_argument("--snapkv-commit", required=True)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    files = {
        "lmi_lambda.pt": (lmi_golden(args.lmi), "Glaciohound/LM-Infinite", args.lmi_commit,
                          ["models/lambda_attention.py:Lambda_Attention_Matrix (lambda_matmul), modes long_seq, "
                           "short_seq, single_query; called as models/llama.py:176-184"]),
        "snapkv_select.pt": (snapkv_golden(args.snapkv), "FasterDecoding/SnapKV", args.snapkv_commit,
                             ["snapkv/monkeypatch/snapkv_utils.py:SnapKVCluster.update_kv (window 64 / kernel 5 / "
                              "avgpool = the default; window 1 / kernel 7 / maxpool = RefreshKV's baseline)"]),
    }
    sidecar = json.loads((OUT / "golden.json").read_text())
    for name, (obj, repo, commit, functions) in files.items():
        torch.save(obj, OUT / name)
        sidecar["files"][name] = {"repo": f"https://github.com/{repo}", "commit": commit, "functions": functions,
                                  "generator": "tools/golden/make_golden_long_context.py",
                                  "bytes": (OUT / name).stat().st_size}
    (OUT / "golden.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    print(json.dumps({k: sidecar["files"][k] for k in files}, indent=2))


if __name__ == "__main__":
    main()
