import json

import pytest
import yaml

from shared import reports, tracking


def test_tracking_round_trip_into_temporary_store(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRISE_MLFLOW_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("REPRISE_MLFLOW_ARTIFACTS", str(tmp_path / "art"))
    import mlflow

    with tracking.stage_run("demo", "table1", {"a": {"b": 1}}, seed=7) as run:
        run.cell("cell-1", {"accuracy": 0.5}, {"method": "x"})
        run.log_metrics({"seconds": 3.0})
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name("demo")
    assert exp.artifact_location.startswith((tmp_path / "art").as_uri())
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "table1")
    child = next(r for r in runs if r.info.run_name == "cell-1")
    assert parent.data.tags["seed"] == "7" and parent.data.tags["dvc_stage"] == "table1"
    assert "git_sha" in parent.data.tags and parent.data.tags["git_dirty"] in ("true", "false")
    assert "version.torch" in parent.data.tags
    assert parent.data.params["a.b"] == "1" and parent.data.metrics["seconds"] == 3.0
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.metrics["accuracy"] == 0.5


def _demo_paper(tmp_path, diffs=(0.5, 0.4, 0.6, 0.45, 0.55, 0.5, 0.42, 0.58)):
    papers, out = tmp_path / "papers", tmp_path / "reports"
    (papers / "demo" / "results").mkdir(parents=True)
    rule = {"file": "t1.json", "unit": "case", "metric": "kl", "expect": "less",
            "compare": [{"name": "a vs b", "a": {"label": "a"}, "b": {"label": "b"}}]}
    (papers / "demo" / "paper.yaml").write_text(yaml.safe_dump({
        "title": "Demo paper",
        "claims": [{"id": "c1", "table": "Table 1", "claim": "a beats b", "paper": "0.9", "rule": rule}],
        "checks": [{"id": "k1", "what": "kl is non-negative", "file": "t1.json", "rows": "cases", "field": "kl",
                    "op": ">=", "value": 0.0}]}))
    cases = [{"label": m, "task": "t", "length": 1, "protocol": None, "case": i, "kl": (1.0 if m == "b" else 1.0 - d)}
             for m in ("a", "b") for i, d in enumerate(diffs)]
    (papers / "demo" / "results" / "t1.json").write_text(json.dumps({
        "title": "T1", "columns": [["m", "method"], ["x", "x"], ["acc", "acc"], ["ci95", "CI"]],
        "rows": [{"m": "a", "x": 1, "acc": 0.5, "ci95": [0.3, 0.7]}, {"m": "a", "x": 2, "acc": 0.75,
                                                                       "ci95": [0.5, 0.9]},
                 {"m": "full", "x": None, "acc": 0.9}],
        "cases": cases, "plot": {"x": "x", "y": "acc", "series": "m"}, "notes": ["a note"]}))
    return papers, out


def test_report_renders_claims_from_rules_checks_verdicts_and_plot(tmp_path):
    papers, out = _demo_paper(tmp_path)
    path = reports.render("demo", papers_dir=papers, reports_dir=out)
    text = path.read_text()
    assert "| a beats b | Table 1 | 0.9 | a vs b: kl 0.5 vs 1 (Δ -0.5; exact sign-flip, p = 0.0078; n = 8 cases) " \
           "| reproduced | a vs b: kl lower for A; paired over cases of `t1.json`" in text
    assert "| kl is non-negative | 16/16 rows satisfy kl >= 0; min 0.4 | pass |" in text
    assert "| a | 1 | 0.5 |" in text and "- a note" in text
    assert (out / "demo" / "t1.png").stat().st_size > 1000
    stored = json.loads((out / "demo" / "verdicts.json").read_text())
    assert stored["claims"]["c1"]["verdict"] == "reproduced" and stored["checks"]["k1"]["passed"]


def test_recheck_agrees_with_the_report_and_catches_a_changed_result(tmp_path):
    from shared.verdicts import recheck

    papers, out = _demo_paper(tmp_path)
    reports.render("demo", papers_dir=papers, reports_dir=out)
    assert recheck(papers / "demo", out) == []
    path = papers / "demo" / "results" / "t1.json"
    data = json.loads(path.read_text())
    for c in data["cases"]:
        if c["label"] == "a":
            c["kl"] = 2.0                                  # a result edited after the report: the verdict flips
    path.write_text(json.dumps(data))
    diffs = recheck(papers / "demo", out)
    assert any(d.startswith("claim c1") and "'verdict': 'not reproduced'" in d for d in diffs)


def test_report_needs_results_and_rules(tmp_path):
    papers = tmp_path / "papers"
    (papers / "demo" / "results").mkdir(parents=True)
    (papers / "demo" / "paper.yaml").write_text(yaml.safe_dump({"title": "D", "claims": [
        {"id": "c1", "table": "T", "claim": "c", "paper": "1"}]}))
    with pytest.raises(ValueError, match="exactly one of `rule`"):
        reports.render("demo", papers_dir=papers, reports_dir=tmp_path)
    with pytest.raises(ValueError, match="claims are rules"):
        reports.result_table("T", [["a", "a"]], [], claims=[{"id": "c1"}])


def test_markdown_table_needs_columns():
    with pytest.raises(ValueError):
        reports.markdown_table([], [])


def test_lightning_runs_nest_under_the_stage_run_and_links_open_the_runs_table(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRISE_MLFLOW_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("REPRISE_MLFLOW_ARTIFACTS", str(tmp_path / "art"))
    import mlflow

    with tracking.stage_run("demo", "train", {}, seed=0) as run:
        logger = tracking.lightning_logger("demo", "train/lightning")
        logger.log_metrics({"loss": 1.0}, step=0)
        logger.finalize("success")
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    child = client.get_run(logger.run_id)
    assert child.data.tags["mlflow.parentRunId"] == run.run_id and child.data.metrics["loss"] == 1.0
    links = tracking.runs_table_links("http://h:5000")
    exp = client.get_experiment_by_name("demo")
    assert links == {"demo": f"http://h:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"}


def test_stage_run_logs_the_corpus_as_dataset_input_and_manifest_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRISE_MLFLOW_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("REPRISE_MLFLOW_ARTIFACTS", str(tmp_path / "art"))
    import mlflow

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text('{"files": []}')
    monkeypatch.setattr(tracking, "CORPORA_DIR", tmp_path)
    with tracking.stage_run("demo", "calibrate", {}, seed=0):
        import mlflow as m

        tracking.log_corpus(corpus, name="toy-corpus")
        run_id = m.active_run().info.run_id
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    run = client.get_run(run_id)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["toy-corpus"]
    assert [a.path for a in client.list_artifacts(run_id, "data")] == ["data/manifest.json"]
    assert tracking.log_corpus(tmp_path / "missing") is False


def test_report_run_holds_the_rendered_report(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRISE_MLFLOW_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("REPRISE_MLFLOW_ARTIFACTS", str(tmp_path / "art"))
    import mlflow

    md, png = tmp_path / "demo.md", tmp_path / "t1.png"
    md.write_text("# report\n")
    png.write_bytes(b"png")
    run_id = tracking.log_report("demo", md, [png])
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    assert client.get_run(run_id).info.run_name == "report"
    assert {a.path for a in client.list_artifacts(run_id, "report")} == {"report/demo.md", "report/figures"}
