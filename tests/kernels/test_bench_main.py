"""``python -m kernels.bench``: runs every kernel benchmark on a bare machine (only torch + triton importable) and
the CPU ``--tiny`` smoke run writes both reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: what a bare GPU machine lacks (plus the optional peers, so their "not installed" path runs)
BLOCKED = ("mlflow", "dvc", "gguf", "transformers", "yaml", "tqdm", "datasets", "lightning", "shared",
           "cut_cross_entropy", "liger_kernel")


def _run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    prelude = f"import sys\nfor _m in {BLOCKED!r}:\n    sys.modules[_m] = None\n"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_bench_modules_import_with_only_torch_and_triton(tmp_path):
    code = ("import kernels.bench.common, kernels.bench.linear_cross_entropy_bench, "
            "kernels.bench.latent_attention_bench, kernels.bench.__main__\n"
            "import kernels.linear_cross_entropy, kernels.latent_attention\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('mlflow', 'dvc', 'gguf', 'transformers', 'yaml', 'tqdm') and sys.modules[m] is not None]\n"
            "assert not bad, bad\nprint('ok')\n")
    res = _run_blocked(code, tmp_path)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_python_m_kernels_bench_tiny_cpu_writes_both_reports(tmp_path):
    """The smoke run of ``python -m kernels.bench --device cpu --tiny`` (CPU, Triton interpreter), with the
    optional packages blocked: both benchmarks finish and write JSON + markdown; ours agrees with torch's loss."""
    if "torch" not in sys.modules:
        pytest.importorskip("torch")
    out = tmp_path / "reports"
    code = f"from kernels.bench.__main__ import main\nmain(['--device', 'cpu', '--tiny', '--out', {str(out)!r}])\n"
    res = _run_blocked(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("cut_cross_entropy_kernels", "cskv_kernels"):
        assert (out / f"{name}.json").is_file() and (out / f"{name}.md").read_text().startswith("#")
    doc = json.loads((out / "cut_cross_entropy_kernels.json").read_text())
    rows = {(r["shape"], r["method"], r["pass"]): r for r in doc["results"]}
    assert {s for s, _, _ in rows} == {"tiny", "tiny-softcap"}
    for shape in ("tiny", "tiny-softcap"):
        for m in ("cce_ours", "cce_ours_unsorted", "cce_ours_exact", "torch", "torch_chunked"):
            assert rows[(shape, m, "fw+bw")]["status"] == "ok", rows[(shape, m, "fw+bw")]
        for m in ("cce_official", "cce_official_exact", "liger"):
            assert rows[(shape, m, "fw")]["status"] == "not installed"
        assert rows[(shape, "cce_ours", "fw")]["loss"] == pytest.approx(rows[(shape, "torch", "fw")]["loss"],
                                                                        rel=2e-2, abs=2e-3)
    info = {i["shape"]: i for i in doc["meta"]["inputs"]}
    assert info["tiny"]["kept_fraction"] == pytest.approx(doc["meta"]["target_kept_fraction"], abs=0.15)
