"""Fused CSKV latent decode attention: Triton kernel vs the PyTorch reference (flash-attn tolerance rule), the
reference vs naive baselines, input validation, and a tiny CPU run of the benchmark CLI."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from kernels.latent_attention import (
    joint_rebuild_attention,
    latent_decode_attention,
    latent_decode_attention_ref,
    naive_rebuild_attention,
    rope_cos_sin,
)
from kernels.quant import quantize_int4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_triton = pytest.mark.requires_triton  # tests/kernels/conftest.py


def make_inputs(b=2, hkv=2, groups=2, t=40, d=16, rk=8, rv=8, w=0, dtype=torch.float32, int4=False,
                pad=False, window_pad=False, per_batch_rope=False, key_group=8, seed=0):
    """Tiny decode-step inputs; ``pad`` left-pads batch row 1 by 7 latent tokens."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    pos = torch.arange(t) if not per_batch_rope else torch.arange(t)[None] + 3 * torch.arange(b)[:, None]
    cos, sin = rope_cos_sin(pos, d)
    a = dict(q=rnd(b, hkv * groups, d), lk=rnd(b, hkv, t, rk), lv=rnd(b, hkv, t, rv),
             bk=rnd(hkv, rk, d) / math.sqrt(rk), bv=rnd(hkv, rv, d) / math.sqrt(rv), cos=cos, sin=sin,
             wk=rnd(b, hkv, w, d) if w else None, wv=rnd(b, hkv, w, d) if w else None)
    a = {k: (v.to(device=DEVICE, dtype=dtype) if v is not None else None) for k, v in a.items()}
    if int4:
        a["lk"] = quantize_int4(a["lk"], key_group, axis=-2)  # keys: per channel over token groups
        a["lv"] = quantize_int4(a["lv"], rv, axis=-1)  # values: per token
    a["key_mask"] = None
    a["window_mask"] = None
    if pad:
        km = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
        km[1, :7] = False
        a["key_mask"] = km
    if window_pad and w:
        wm = torch.ones(b, w, dtype=torch.bool, device=DEVICE)
        wm[0, :2] = False
        a["window_mask"] = wm
    return a


def assert_flash_attn_tolerance(out: torch.Tensor, inputs: dict) -> None:
    """kernel error vs fp64 reference <= 2 x (reference run in the same low dtype) error + one output ulp."""
    ref64 = latent_decode_attention_ref(**inputs, compute_dtype=torch.float64, out_dtype=torch.float64)
    ref_low = latent_decode_attention_ref(**inputs, compute_dtype=None)
    err_kernel = (out.double() - ref64).abs().max().item()
    err_ref = (ref_low.double() - ref64).abs().max().item()
    eps = torch.finfo(out.dtype).eps * ref64.abs().max().item() + 1e-6
    assert torch.isfinite(out).all()
    assert err_kernel <= 2 * err_ref + eps, f"kernel err {err_kernel:.3e} > 2 x ref err {err_ref:.3e} + {eps:.1e}"


@requires_triton
@pytest.mark.parametrize("pad", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("w", [0, 5], ids=["W0", "W5"])
@pytest.mark.parametrize("int4", [False, True], ids=["latfp", "latint4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_kernel_matches_reference(dtype, int4, w, pad):
    a = make_inputs(dtype=dtype, int4=int4, w=w, pad=pad, window_pad=pad)
    out = latent_decode_attention(**a, impl="triton", num_splits=2)
    assert out.shape == a["q"].shape and out.dtype == dtype
    assert_flash_attn_tolerance(out, a)


@requires_triton
@pytest.mark.parametrize("int4", [False, True], ids=["latfp", "latint4"])
def test_fused_kernel_matches_reference_bf16(int4):
    a = make_inputs(dtype=torch.bfloat16, int4=int4, w=5, pad=True)
    assert_flash_attn_tolerance(latent_decode_attention(**a, impl="triton"), a)


@requires_triton
@pytest.mark.parametrize("case", [
    dict(groups=1, hkv=1, b=1, rk=7, rv=9),  # MHA, odd ranks (not a multiple of 16)
    dict(groups=3, hkv=1, w=20),  # non power-of-2 GQA group, window longer than one window tile
    dict(per_batch_rope=True, w=3),  # per-sequence RoPE tables [B, T, D]
    dict(t=0, w=5),  # empty latent cache: window only
    dict(t=100, d=32, rk=16, rv=24, w=3),  # several tiles per split
], ids=["mha-odd-rank", "gqa3-long-window", "per-batch-rope", "window-only", "multi-tile"])
def test_fused_kernel_edge_shapes(case):
    a = make_inputs(**case)
    assert_flash_attn_tolerance(latent_decode_attention(**a, impl="triton"), a)


@requires_triton
def test_int4_latents_in_either_grouping_axis():
    a = make_inputs(w=4)
    a["lk"] = quantize_int4(a["lk"], 8, axis=-1)  # keys grouped per token (not the CSKV default)
    a["lv"] = quantize_int4(a["lv"], 8, axis=-2)  # values grouped over tokens
    assert_flash_attn_tolerance(latent_decode_attention(**a, impl="triton"), a)


@requires_triton
def test_split_count_and_tile_size_do_not_change_the_result():
    a = make_inputs(t=100, w=5)
    base = latent_decode_attention(**a, impl="triton", num_splits=1)
    for kw in (dict(num_splits=3), dict(num_splits=7), dict(block_t=32)):
        torch.testing.assert_close(latent_decode_attention(**a, impl="triton", **kw), base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=requires_triton)])
def test_row_with_no_attendable_key_returns_zeros(impl):
    a = make_inputs(w=0, pad=True)
    a["key_mask"][1] = False
    out = latent_decode_attention(**a, impl=impl)
    assert torch.isfinite(out).all() and torch.all(out[1] == 0)
    assert out[0].abs().sum() > 0


def test_naive_rebuild_and_torch_impl_match_fp64_reference():
    a = make_inputs(w=5, pad=True, window_pad=True)
    ref64 = latent_decode_attention_ref(**a, compute_dtype=torch.float64, out_dtype=torch.float64)
    torch.testing.assert_close(latent_decode_attention(**a, impl="torch").double(), ref64, rtol=1e-5, atol=1e-6)
    a64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in a.items()}
    torch.testing.assert_close(naive_rebuild_attention(**a64), ref64, rtol=1e-10, atol=1e-12)


def test_joint_decomposition_with_block_diagonal_b_equals_per_head():
    a = make_inputs(w=0, dtype=torch.float64)
    b, hkv, t, r = a["lk"].shape
    d = a["q"].shape[-1]
    bk_joint = torch.block_diag(*a["bk"].unbind(0))  # [Hkv*r, Hkv*D]
    bv_joint = torch.block_diag(*a["bv"].unbind(0))
    lk_joint = a["lk"].transpose(1, 2).reshape(b, t, hkv * r)
    lv_joint = a["lv"].transpose(1, 2).reshape(b, t, hkv * r)
    out = joint_rebuild_attention(a["q"], lk_joint, lv_joint, bk_joint, bv_joint, a["cos"], a["sin"])
    assert out.shape == (b, a["q"].shape[1], d)
    torch.testing.assert_close(out, latent_decode_attention_ref(**a, compute_dtype=torch.float64))


def test_value_trick_projects_the_latent_average_once():
    """Eq. 5: Σ_j p_j (lv_j B_V) == (Σ_j p_j lv_j) B_V."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 40, generator=g, dtype=torch.float64), -1)
    lv, bv = torch.randn(40, 8, generator=g, dtype=torch.float64), torch.randn(8, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(p @ (lv @ bv), (p @ lv) @ bv)


def _bad(**over):
    a = make_inputs(w=3)
    a.update(over)
    return a


@pytest.mark.parametrize("over,match", [
    (dict(q=torch.randn(2, 3, 16)), "multiple of KV heads"),
    (dict(q=torch.randn(2, 4, 15)), "head_dim"),
    (dict(q=torch.randn(2, 4, 16, dtype=torch.float64)), "q.dtype"),
    (dict(q=torch.randn(3, 4, 16)), "batch size"),
    (dict(lk=torch.randn(2, 2, 40)), "4-d"),
    (dict(lv=torch.randn(2, 2, 39, 8)), "lv must have shape"),
    (dict(lk=torch.randn(2, 2, 40, 8, dtype=torch.float16)), "lk.dtype"),
    (dict(bk=torch.randn(2, 7, 16)), "bk must have shape"),
    (dict(bv=torch.randn(3, 8, 16)), "bv must have shape"),
    (dict(cos=torch.randn(41, 16)), "cos must have shape"),
    (dict(sin=torch.randn(3, 40, 16)), "sin must have shape"),
    (dict(wv=None), "both be given"),
    (dict(wk=torch.randn(2, 2, 4, 16)), "wv must have shape"),
    (dict(wk=torch.randn(2, 2, 3, 8), wv=torch.randn(2, 2, 3, 8)), "wk must have shape"),
    (dict(key_mask=torch.ones(2, 40)), "bool"),
    (dict(key_mask=torch.ones(2, 41, dtype=torch.bool)), "key_mask must have shape"),
    (dict(window_mask=torch.ones(2, 4, dtype=torch.bool)), "window_mask must have shape"),
    (dict(scale=0.0), "scale must be"),
    (dict(scale=float("nan")), "scale must be"),
])
def test_bad_inputs_raise_value_error_naming_the_value(over, match):
    with pytest.raises(ValueError, match=match):
        latent_decode_attention(**_bad(**over), impl="torch")


def test_bad_impl_and_tiling_raise_value_error():
    a = make_inputs()
    with pytest.raises(ValueError, match="impl"):
        latent_decode_attention(**a, impl="cuda")
    with pytest.raises(ValueError, match="block_t"):
        latent_decode_attention(**a, impl="torch", block_t=24)
    with pytest.raises(ValueError, match="num_splits"):
        latent_decode_attention(**a, impl="torch", num_splits=0)


@requires_triton
def test_benchmark_cli_tiny_cpu_run_writes_json_and_markdown(tmp_path):
    if DEVICE != "cpu":
        pytest.skip("the --tiny CPU smoke run is for machines without a GPU")
    from kernels.bench.latent_attention_bench import METHODS, main

    out = tmp_path / "cskv_kernels"
    main(["--device", "cpu", "--tiny", "--batches", "1", "--reps", "1", "--warmup", "0", "--out", str(out)])
    data = json.loads((tmp_path / "cskv_kernels.json").read_text())
    md = (tmp_path / "cskv_kernels.md").read_text()
    assert {r["method"] for r in data["latency"]} == set(METHODS)
    assert len(data["latency"]) == len(METHODS)  # 1 model x 1 batch x 1 context x 1 density
    assert all(r["status"] == "ok" and r["time_us"] > 0 and r["bytes_read"] > 0 for r in data["latency"])
    int4 = next(r for r in data["latency"] if r["method"] == "fused_int4")
    fp16 = next(r for r in data["latency"] if r["method"] == "fused_fp16")
    assert int4["bytes_read"] < fp16["bytes_read"]
    assert {r["method"] for r in data["memory"]} == {"full_sdpa", "fused_fp16", "fused_int4", "naive_perhead"}
    mem = {r["method"]: r["cache_bytes"] for r in data["memory"]}
    assert mem["fused_int4"] < mem["fused_fp16"] < mem["full_sdpa"]
    assert "| tiny-gqa | 1 | 64 | 0.5 |" in md and "## Whole-model decode step" in md


def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter does not check GPU code generation; lower every fp16 kernel variant to an sm_90 cubin with
    the ptxas bundled in the triton wheel (in a subprocess: TRITON_INTERPRET must be unset there)."""
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton wheel without the NVIDIA backend's ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.latent_attention.aot_check", "--dtypes", "fp16"],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("_latent_split_kernel") == 2 and "_latent_combine_kernel" in proc.stdout
    assert "STACK:0" in proc.stdout.split("_latent_split_kernel")[1]  # no register spills in the hot kernel
