"""DVC experiments run as users run them: ``dvc exp run --temp`` (and the queue) execute stages in a copy under
``.dvc/tmp/exps/``, with the stage code imported from outside that copy (as from an editable install). The stage
runner must read params and data from the copy, and keep its MLflow runs in the repository's store."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

DVC = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(DVC is None, reason="dvc not installed")]

TOY_STAGES = '''
from pydantic import Field
from shared.paths import DATA_DIR
from shared.stages import Paper, Params

class ToyParams(Params):
    seed: int = 0
    model: str = "none"
    n: int = Field(ge=1)

paper = Paper("toy", ToyParams, __file__)

@paper.stage("count")
def count(ctx):
    return {"count.json": {"n": ctx.params.n, "data": (DATA_DIR / "toy.txt").read_text().strip(),
                           "paper_dir": str(ctx.paper_dir)}}

if __name__ == "__main__":
    raise SystemExit(paper.main())
'''


def _run(cmd, cwd, env, timeout=240):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture
def toy_repo(tmp_path):
    """A git + DVC repository shaped like Reprise: a cached root data stage and a paper pipeline whose stage code
    lives outside the repository (importable through PYTHONPATH, like the editable install)."""
    pkg, repo = tmp_path / "pkg", tmp_path / "repo"
    pkg.mkdir()
    (pkg / "toy_stages.py").write_text(TOY_STAGES)
    (repo / "shared").mkdir(parents=True)                      # the project-root markers shared.paths looks for
    (repo / "pyproject.toml").write_text("[project]\nname = 'toy'\n")
    (repo / "make_data.py").write_text("from pathlib import Path\nPath('data').mkdir(exist_ok=True)\n"
                                       "Path('data/toy.txt').write_text('from-the-cache\\n')\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fetch": {
        "cmd": "python make_data.py", "deps": ["make_data.py"], "outs": ["data/toy.txt"]}}}))
    paper = repo / "papers" / "toy"
    paper.mkdir(parents=True)
    (paper / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "n": 4}))
    (paper / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"count": {
        "cmd": "python -m toy_stages count", "deps": ["../../data/toy.txt"], "params": ["n"],
        "outs": [{"results/count.json": {"cache": False}}]}}}))
    (repo / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n")
    env = {**os.environ, "PYTHONPATH": str(pkg), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "DVC_NO_ANALYTICS": "1"}
    for k in ("REPRISE_MLFLOW_URI", "REPRISE_MLFLOW_ARTIFACTS", "REPRISE_ROOT"):
        env.pop(k, None)
    _run(["git", "init", "-q"], repo, env)
    _run([DVC, "init", "-q"], repo, env)
    _run([DVC, "config", "cache.type", "reflink,hardlink,symlink,copy"], repo, env)
    _run([DVC, "repro", "-q", "fetch"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "toy"], repo, env)
    return repo, env


def _mlflow_params(repo: Path) -> list[dict]:
    """(run name, param n) of every stage run in the repository's MLflow store, read with sqlite directly."""
    con = sqlite3.connect(repo / "mlflow.db")
    rows = con.execute("select r.name, p.value from runs r join params p on p.run_uuid = r.run_uuid "
                       "where p.key = 'n'").fetchall()
    con.close()
    return rows


def test_exp_run_temp_uses_the_copy_params_and_data_and_the_repo_store(toy_repo):
    repo, env = toy_repo
    _run([DVC, "exp", "run", "--temp", "papers/toy/dvc.yaml", "-S", "papers/toy/params.yaml:n=7"], repo, env)
    # the workspace is untouched: its params and (absent) results
    assert yaml.safe_load((repo / "papers/toy/params.yaml").read_text())["n"] == 4
    assert not (repo / "papers/toy/results").exists()
    # the experiment's result (committed to its exp ref by DVC) reflects -S, and read data from the copy
    ref = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env).split()[-1]
    res = json.loads(_run(["git", "show", f"{ref}:papers/toy/results/count.json"], repo, env))
    assert res["n"] == 7 and res["data"] == "from-the-cache"
    assert "/.dvc/tmp/exps/" in res["paper_dir"]                 # resolved from the copy, not the package
    # and the MLflow run landed in the repository's store (the temporary copy is gone)
    assert ("count", "7") in _mlflow_params(repo)


def test_queued_sweep_runs_each_value(toy_repo):
    repo, env = toy_repo
    for n in (2, 3):
        _run([DVC, "exp", "run", "--queue", "papers/toy/dvc.yaml", "-S", f"papers/toy/params.yaml:n={n}"], repo, env)
    t0 = time.perf_counter()
    # one worker runs both: in a fresh-clone CI run (2026-12-06) `dvc queue start -j 2` once hung for 240 s (two celery
    # workers starting at once; it passed in 17.5 s alone). The test is about each queued value running.
    _run([DVC, "queue", "start", "-j", "1"], repo, env)
    deadline = time.time() + 240
    while time.time() < deadline:
        status = _run([DVC, "queue", "status"], repo, env)
        if "Success" in status and "Running" not in status and "Queued" not in status:
            break
        time.sleep(2)
    print(f"queue of 2 experiments, -j 1: {time.perf_counter() - t0:.1f} s\n{status}")
    assert status.count("Success") == 2, status
    assert {("count", "2"), ("count", "3")} <= set(_mlflow_params(repo))


def test_a_params_typo_fails_before_any_output_is_touched_and_the_fix_reruns_nothing(toy_repo):
    """Outputs are ``persist: true`` (DVC does not delete them before running the stage) and the runner validates
    params before writing anything: a typo fails with the key and value, the outputs stay, and once the typo is fixed
    the lock matches again, so nothing re-runs."""
    repo, env = toy_repo
    paper = repo / "papers" / "toy"
    spec = yaml.safe_load((paper / "dvc.yaml").read_text())
    spec["stages"]["count"]["outs"] = [{"results/count.json": {"cache": False, "persist": True}}]
    (paper / "dvc.yaml").write_text(yaml.safe_dump(spec))
    _run([DVC, "repro", "papers/toy/dvc.yaml"], repo, env)
    out = paper / "results" / "count.json"
    before = out.read_bytes()
    (paper / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "n": 0}))          # the typo: n must be ≥ 1
    proc = subprocess.run([DVC, "repro", "papers/toy/dvc.yaml"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0 and "n = 0" in proc.stdout + proc.stderr
    assert out.read_bytes() == before                                               # nothing lost
    (paper / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "n": 4}))          # fixed
    log = _run([DVC, "repro", "papers/toy/dvc.yaml"], repo, env)
    assert "didn't change" in log and "Running stage" not in log and out.read_bytes() == before
