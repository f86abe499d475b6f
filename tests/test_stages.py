"""The stage runner (shared/stages.py): params validated before any work, paper dir = the working copy, results
written atomically then logged to the stage's MLflow run (artifacts, nested cells, timing)."""
import json

import pytest
import yaml
from pydantic import Field

from shared import tracking
from shared.stages import Paper, Params, StageContext


class ToyParams(Params):
    seed: int
    model: str = "none"
    n: int = Field(ge=1)


def _toy(tmp_path, calls):
    folder = tmp_path / "papers" / "toy"
    folder.mkdir(parents=True)
    (folder / "dvc.yaml").write_text("stages: {}\n")
    (folder / "params.yaml").write_text(yaml.safe_dump({"seed": 3, "n": 4}))
    paper = Paper("toy", ToyParams, folder / "stages.py")

    @paper.stage("count")
    def count(ctx: StageContext) -> dict:
        calls.append(ctx.params.n)
        for i in range(ctx.params.n):
            ctx.cell(f"cell/{i}", {"value": float(i)}, {"i": i})
        return {"count.json": {"n": ctx.params.n, "seed": ctx.seed}}

    return paper, folder


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRISE_MLFLOW_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("REPRISE_MLFLOW_ARTIFACTS", str(tmp_path / "art"))
    return tmp_path


def test_runner_writes_results_then_logs_them_with_nested_cells(store, monkeypatch):
    import mlflow

    calls = []
    paper, folder = _toy(store, calls)
    monkeypatch.chdir(folder)                       # DVC runs a paper's stages with wdir = papers/<id>
    assert paper.paper_dir() == folder
    assert paper.main(["count"]) == 0
    assert json.loads((folder / "results" / "count.json").read_text()) == {"n": 4, "seed": 3}
    assert not list((folder / "results").glob(".*tmp"))          # nothing half-written left behind
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name("toy")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "count")
    cells = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(cells) == 4 and parent.data.tags["seed"] == "3" and parent.data.params["n"] == "4"
    assert "stage_seconds" in parent.data.metrics
    arts = [a.path for a in client.list_artifacts(parent.info.run_id, "results")]
    assert arts == ["results/count.json"]


def test_bad_params_fail_before_the_stage_body_runs(store, monkeypatch, capsys):
    calls = []
    paper, folder = _toy(store, calls)
    (folder / "params.yaml").write_text(yaml.safe_dump({"seed": 3, "n": 0, "extra": 1}))
    monkeypatch.chdir(folder)
    assert paper.main(["count"]) == 2
    err = capsys.readouterr().err
    assert "n = 0: Input should be greater than or equal to 1" in err
    assert "extra: unknown parameter" in err
    assert calls == [] and not (folder / "results").exists()
    with pytest.raises(ValueError, match="n = 0"):
        paper.load_params()


def test_paper_dir_is_the_working_copy_not_the_installed_package(store, monkeypatch):
    calls = []
    paper, folder = _toy(store, calls)
    copy = store / "elsewhere" / "papers" / "toy"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")
    (copy / "params.yaml").write_text(yaml.safe_dump({"seed": 3, "n": 2}))
    monkeypatch.chdir(copy)
    paper.run("count")
    assert calls == [2]                               # the copy's params, not the package folder's (n = 4)
    assert (copy / "results" / "count.json").is_file() and not (folder / "results").exists()
    monkeypatch.chdir(store / "elsewhere")            # from the copy's root, too
    assert paper.paper_dir() == copy


def test_unknown_stage_and_bad_result_names_raise(store, monkeypatch):
    paper, folder = _toy(store, [])
    monkeypatch.chdir(folder)
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        paper.run("nope")

    @paper.stage("bad")
    def bad(ctx):
        return {"../escape.json": {}}

    with pytest.raises(ValueError, match="plain '<name>.json'"):
        paper.run("bad", track=False)
