"""One writer per format (shared/io.py, shared/reports.py): the same content written by two processes has the same
sha256 — DVC's hashes of a re-run equal the committed ones."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

WRITE = r"""
import sys, torch
from pathlib import Path
from shared.io import save_safetensors, write_json
from shared.reports import line_plot
out = Path(sys.argv[1])
t = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(4, dtype=torch.float16)}
save_safetensors(out / "x.safetensors", t, {"seed": 0, "model": "m", "init": "pca", "zeta": 1.5})
write_json(out / "x.json", {"z": 1.0 / 3.0, "a": [0.1, 0.2], "m": {"y": None, "b": True}})
rows = [{"m": s, "x": x, "accuracy": 0.1 * x, "ci95": [0.05 * x, 0.15 * x]} for s in ("p", "q") for x in (1, 2)]
line_plot(out / "x.png", rows + [{"m": "full", "x": None, "accuracy": 0.5}], "x", "accuracy", "m", title="t")
"""


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_two_processes_write_identical_bytes(tmp_path):
    runs = []
    for i in range(2):
        d = tmp_path / str(i)
        d.mkdir()
        subprocess.run([sys.executable, "-c", WRITE, str(d)], check=True, cwd=Path(__file__).parents[1])
        runs.append(_digests(d))
    assert runs[0].keys() == {"x.safetensors", "x.json", "x.png"} and runs[0] == runs[1]


def test_safetensors_metadata_is_sorted_and_readable(tmp_path):
    import torch
    from safetensors import safe_open

    from shared.io import save_safetensors

    path = save_safetensors(tmp_path / "m.safetensors", {"w": torch.eye(3)}, {"z": 1, "a": "x", "m": 2.5})
    header = path.read_bytes()
    n = int.from_bytes(header[:8], "little")
    text = header[8:8 + n].decode()
    assert text.index('"a"') < text.index('"m"') < text.index('"z"')
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"a": "x", "m": "2.5", "z": "1"} and torch.equal(f.get_tensor("w"), torch.eye(3))


def test_timings_never_enter_result_files(tmp_path):
    from shared.stages import Paper, Params

    class P(Params):
        seed: int = 0

    paper = Paper("toy", P, __file__)

    @paper.stage("s")
    def s(ctx):
        ctx.timing("seconds/x", 1.25)
        ctx.timing("seconds/a+filter", 2.0)            # a name MLflow rejects ('+'), the same in both places
        return {"r.json": {"value": 1}}

    (tmp_path / "params.yaml").write_text("seed: 0\n")
    written = paper.run("s", P(), paper_dir=tmp_path, track=False)
    assert written["r.json"].read_text() == '{\n  "value": 1\n}\n'
    timings = (tmp_path / "timings" / "s.json").read_text()
    assert '"seconds/x": 1.25' in timings and '"seconds/a_filter": 2.0' in timings and "stage_seconds" in timings
    from mlflow.utils.validation import _validate_metric_name

    from shared.stages import mlflow_name
    _validate_metric_name(mlflow_name("n4096.torch_chunked+filter.fw_peak_mb"))


def test_verify_compares_every_output_hash_of_the_locks(tmp_path):
    from shared.verify import compare_locks, lock_outputs

    for side, h in (("a", "111"), ("b", "222")):
        root = tmp_path / side
        (root / "papers" / "p").mkdir(parents=True)
        (root / "papers" / "p" / "dvc.lock").write_text(
            "schema: '2.0'\nstages:\n  train:\n    outs:\n    - path: artifacts/x\n      md5: " + h +
            "\n    - path: results/train.json\n      md5: aaa\n")
        (root / "dvc.lock").write_text("schema: '2.0'\nstages:\n  papers/p:\n    outs:\n    - path: reports/p.md\n"
                                       "      md5: rrr\n  papers/q:\n    outs:\n    - path: reports/q.md\n      md5: "
                                       + h + "\n")
    a, b = lock_outputs(tmp_path / "a", "p"), lock_outputs(tmp_path / "b", "p")
    assert set(a) == {"train:artifacts/x", "train:results/train.json", "papers/p:reports/p.md"}
    assert compare_locks(a, a) == []
    assert compare_locks(a, b) == ["train:artifacts/x: committed 111 vs fresh 222"]
    with pytest.raises(ValueError, match="no paper"):
        from shared.verify import verify
        verify("nope", repo=tmp_path / "a")
