"""MLflow tracking with one layout for every paper.

* Store: ``sqlite:///<repo>/mlflow.db`` (absolute, so DVC stages running inside ``papers/<id>/`` write to the same
  store) and artifacts under ``<repo>/mlartifacts/<paper>``. ``REPRISE_MLFLOW_URI`` / ``REPRISE_MLFLOW_ARTIFACTS``
  override both (tests use a temporary store).
* One experiment per paper, one parent run per DVC stage, nested runs per table cell.
* Provenance tags on every parent run: git sha + dirty flag, DVC stage, package versions, device, seed.
* Results are written to files first (by the stage), MLflow second — MLflow is a browser, not the source of truth.
"""
from __future__ import annotations

import os
import platform
import subprocess
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from shared.paths import CORPORA_DIR, REPO_ROOT, STORE_ROOT

TRACKED_PACKAGES = ("torch", "transformers", "lightning", "triton", "mlflow", "dvc", "datasets")


def tracking_uri() -> str:
    return os.environ.get("REPRISE_MLFLOW_URI", f"sqlite:///{STORE_ROOT / 'mlflow.db'}")


def artifact_root() -> Path:
    return Path(os.environ.get("REPRISE_MLFLOW_ARTIFACTS", STORE_ROOT / "mlartifacts"))


def git_state(root: Path = REPO_ROOT) -> dict[str, str]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    sha = run("rev-parse", "HEAD") or "unknown"
    dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    return {"git_sha": sha, "git_dirty": str(dirty).lower()}


def provenance_tags(stage: str, seed: int | None) -> dict[str, str]:
    import torch

    tags = {**git_state(), "dvc_stage": stage, "seed": str(seed), "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"}
    for pkg in TRACKED_PACKAGES:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _store_lock():
    """A file lock next to a sqlite store: concurrent stages (``dvc queue start -j 2``) must not both create the
    database (MLflow's schema migrations race) or the same experiment."""
    from contextlib import nullcontext

    from filelock import FileLock

    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock", timeout=300)


def ensure_experiment(paper_id: str) -> str:
    import mlflow

    with _store_lock():
        mlflow.set_tracking_uri(tracking_uri())
        exp = mlflow.get_experiment_by_name(paper_id)
        if exp is not None:
            return exp.experiment_id
        location = artifact_root() / paper_id
        location.mkdir(parents=True, exist_ok=True)
        return mlflow.create_experiment(paper_id, artifact_location=location.as_uri())


class StageRun:
    """Handle to the parent run of one DVC stage; :meth:`cell` logs one table cell as a nested run."""

    def __init__(self, run, experiment_id: str):
        self.run, self.experiment_id = run, experiment_id

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def cell(self, name: str, metrics: dict[str, float], params: dict | None = None) -> None:
        import mlflow

        with mlflow.start_run(run_name=name, nested=True, experiment_id=self.experiment_id):
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    def log_metrics(self, metrics: dict[str, float]) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                           run_id=self.run_id)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path, run_id=self.run_id)


@contextmanager
def stage_run(paper_id: str, stage: str, params: dict, seed: int | None = None) -> Iterator[StageRun]:
    """Parent MLflow run for a DVC stage, with provenance tags and the stage's params logged."""
    import mlflow

    exp_id = ensure_experiment(paper_id)
    with mlflow.start_run(run_name=stage, experiment_id=exp_id, tags=provenance_tags(stage, seed)) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        log_corpus(CORPORA_DIR / "shakespeare")
        yield StageRun(run, exp_id)


def log_corpus(folder: Path, name: str = "shakespeare") -> bool:
    """Log the corpus a stage read as an MLflow dataset input (digest = sha256 of its manifest) and its manifest as
    the ``data/manifest.json`` artifact of the active run. False (nothing logged) when the corpus is not fetched."""
    import hashlib

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    manifest = Path(folder) / "manifest.json"
    if not manifest.is_file():
        return False
    import warnings

    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    with warnings.catch_warnings():   # a file:// URI resolves to LocalArtifactDatasetSource (MLflow warns it is ambiguous)
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(folder).as_uri())
    mlflow.log_input(MetaDataset(source, name=name, digest=digest), context="corpus")
    mlflow.log_artifact(str(manifest), artifact_path="data")
    return True


def log_report(paper_id: str, report: Path, figures: list[Path]) -> str:
    """A ``report`` run in the paper's experiment holding the rendered report and its plots (one per publish)."""
    import mlflow

    exp_id = ensure_experiment(paper_id)
    with mlflow.start_run(run_name="report", experiment_id=exp_id, tags=provenance_tags("papers/" + paper_id,
                                                                                        None)) as run:
        mlflow.log_artifact(str(report), artifact_path="report")
        for fig in figures:
            mlflow.log_artifact(str(fig), artifact_path="report/figures")
        return run.info.run_id


def lightning_logger(paper_id: str, run_name: str):
    """Lightning's ``MLFlowLogger`` on the same store (``tracking_uri`` passed, or it would write ./mlruns). Inside a
    stage run the Lightning run is created as its nested child, so the UI shows it under the stage."""
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    exp_id = ensure_experiment(paper_id)
    parent = mlflow.active_run()
    run_id = None
    if parent is not None:
        child = mlflow.tracking.MlflowClient(tracking_uri()).create_run(
            exp_id, run_name=run_name, tags={"mlflow.parentRunId": parent.info.run_id, "lightning": "true"})
        run_id = child.info.run_id
    return MLFlowLogger(experiment_name=paper_id, run_name=run_name, tracking_uri=tracking_uri(), run_id=run_id,
                        artifact_location=(artifact_root() / paper_id).as_uri())


def runs_table_links(host: str = "http://127.0.0.1:5000") -> dict[str, str]:
    """Direct link to each experiment's runs table. MLflow 3's UI opens an experiment on its GenAI "Overview /
    Traces" page; ``workflowType=machine_learning`` opens the classic runs table instead."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri())
    return {e.name: f"{host}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning"
            for e in client.search_experiments() if e.name != "Default"}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="MLflow helpers: print each paper's runs-table link")
    ap.add_argument("command", choices=["links"])
    ap.add_argument("--host", default="http://127.0.0.1:5000")
    args = ap.parse_args(argv)
    links = runs_table_links(args.host)
    if not links:
        print("no experiments yet: run a paper first (`dvc repro papers/cskv`)")
    for name, url in links.items():
        print(f"  {name:<22} {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
