"""The one stage runner every paper uses: a paper declares its typed params schema and its stages; the runner does
everything else.

    from shared.stages import Paper, StageContext
    paper = Paper("cskv", CSKVParams, __file__)          # CSKVParams: a pydantic model of params.yaml

    @paper.stage("table1")
    def table1(ctx: StageContext) -> dict:               # returns {result file name: JSON-able result}
        model, tok, spec = ctx.model()
        ...
        return {"table1.json": result_table(...)}

    main = paper.main                                    # `python -m papers.cskv.stages table1`

What the runner owns, in order, for ``python -m papers.<id>.stages <stage>``:

1. **Params first.** ``params.yaml`` is validated against the paper's schema before anything heavy is imported or
   any model loads; a bad value fails with one ``ValueError`` naming the key, the value and what is allowed. Unknown
   keys fail too (a typo never silently falls back to a default).
2. **Where.** The paper folder is the working copy DVC runs the stage in (its ``wdir`` = ``papers/<id>``), not
   wherever the package happens to be installed; params, artifacts and results resolve from there.
3. **Seed.** ``torch.manual_seed(seed)`` before the body; bodies derive every other seed from ``params.seed``.
4. **MLflow.** One parent run per stage (experiment = paper), with params, provenance tags (git sha + dirty flag,
   DVC stage, versions, device, seed); bodies log table cells as nested runs with ``ctx.cell``.
5. **Results.** The body's returned files are written atomically (temp + rename) to ``results/`` first, then logged
   to the stage run as artifacts with the stage's wall time — MLflow is a browser, files are the source of truth.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.io import read_yaml, write_json


def mlflow_name(key: str) -> str:
    """A metric name as MLflow accepts it (letters, digits, ``_ - . / :`` and spaces; e.g. a run label's ``+``
    becomes ``_``). Timings use it for MLflow and the timings file alike, so that the two names never differ."""
    return "".join(ch if ch.isalnum() or ch in "_-./: " else "_" for ch in key)


class Params(BaseModel):
    """Base of every paper's params schema: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _where(loc: tuple) -> str:
    return ".".join(str(x) for x in loc) or "<root>"


def validation_error(err: ValidationError, source: str) -> ValueError:
    """One readable ``ValueError`` from pydantic's errors: key, value, what is allowed."""
    lines = []
    for e in err.errors():
        loc = _where(e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown parameter (value {e['input']!r}); remove it or fix its name")
        elif e["type"] == "missing":
            lines.append(f"{loc}: missing (required)")
        elif not e["loc"]:                 # a cross-field rule: its message names the keys; no dump of the tree
            lines.append(e["msg"].removeprefix("Value error, "))
        elif isinstance(e["input"], (dict, list)) and len(repr(e["input"])) > 120:
            lines.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{loc} = {e['input']!r}: {e['msg']}")
    return ValueError(f"invalid params in {source}:\n  " + "\n  ".join(lines))


def parse_params(schema: type[BaseModel], raw: dict, source: str = "params") -> BaseModel:
    """Validate ``raw`` against ``schema``; raises ``ValueError`` (see :func:`validation_error`)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source} must be a mapping, got {type(raw).__name__}")
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err, source) from None


@dataclass
class StageContext:
    """What a stage body gets: typed params, its folders, the MLflow stage run and a cached model loader."""

    paper_id: str
    stage: str
    params: Any
    paper_dir: Path
    run: Any = None                               # shared.tracking.StageRun (None in dry runs)
    timings: dict = field(default_factory=dict)   # machine-dependent seconds: MLflow + timings/<stage>.json
    _model: tuple | None = field(default=None, repr=False)

    @property
    def seed(self) -> int:
        return int(getattr(self.params, "seed", 0))

    @property
    def results_dir(self) -> Path:
        return self.paper_dir / "results"

    @property
    def artifacts_dir(self) -> Path:
        return self.paper_dir / "artifacts"

    def artifact(self, name: str) -> Path:
        """Path of an artifact file (its folder is created)."""
        path = self.artifacts_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def fresh_artifact_dir(self, name: str) -> Path:
        """Empty ``artifacts/<name>/`` (created if needed). Trained outputs are ``persist: true`` in dvc.yaml, so DVC
        leaves them alone until the stage body runs — after the params were validated: a params mistake never costs
        a trained output. A body that writes a whole folder calls this first, so that files of an earlier setting do
        not linger in it (the folder's hash must equal a fresh clone's)."""
        import shutil

        path = self.artifacts_dir / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def model(self, name: str | None = None):
        """(model, tokenizer, spec) of ``params.model`` (or ``name``), loaded once per stage."""
        from shared.models import load_model

        name = name or self.params.model
        if self._model is None or self._model[0] != name:
            self._model = (name, load_model(name))
        return self._model[1]

    def cell(self, name: str, metrics: dict, params: dict | None = None) -> None:
        """Log one table cell as a nested MLflow run of this stage."""
        if self.run is not None:
            self.run.cell(name, metrics, params)

    def timing(self, key: str, seconds: float) -> None:
        """Record a wall time. Timings never enter result files (DVC hashes those: same inputs → same bytes);
        they go to MLflow and to ``papers/<id>/timings/<stage>.json`` (git-ignored, machine-dependent)."""
        key = mlflow_name(key)
        self.timings[key] = float(seconds)
        self.log_metrics({key: float(seconds)})

    def log_metrics(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log_metrics(metrics)

    def lightning_logger(self, run_name: str):
        """Lightning's ``MLFlowLogger`` on the project store (a run of this paper's experiment)."""
        from shared.tracking import lightning_logger

        return lightning_logger(self.paper_id, run_name)


StageFn = Callable[[StageContext], "dict[str, Any] | None"]


class Paper:
    """A paper's stages + params schema; ``main`` is its command line (``python -m papers.<id>.stages <stage>``)."""

    def __init__(self, paper_id: str, schema: type[BaseModel], module_file: str | Path,
                 before_stage: Callable[[str, BaseModel], None] | None = None):
        self.paper_id, self.schema = paper_id, schema
        self.package_dir = Path(module_file).resolve().parent
        self.stages: dict[str, StageFn] = {}
        self.before_stage = before_stage

    # ---- declaration -------------------------------------------------------------------------------------
    def stage(self, name: str) -> Callable[[StageFn], StageFn]:
        def register(fn: StageFn) -> StageFn:
            if name in self.stages:
                raise ValueError(f"stage {name!r} declared twice in {self.paper_id}")
            self.stages[name] = fn
            return fn
        return register

    # ---- resolution --------------------------------------------------------------------------------------
    def paper_dir(self, cwd: Path | None = None) -> Path:
        """The working copy's paper folder: the current directory when DVC runs the stage there (it holds this
        paper's dvc.yaml and params.yaml), else ``papers/<id>`` under the current directory, else the package."""
        cwd = (cwd or Path.cwd()).resolve()
        for cand in (cwd, cwd / "papers" / self.paper_id):
            if cand.name == self.paper_id and (cand / "params.yaml").is_file() and (cand / "dvc.yaml").is_file():
                return cand
        return self.package_dir

    def load_params(self, path: str | Path | None = None) -> BaseModel:
        path = Path(path) if path is not None else self.paper_dir() / "params.yaml"
        return parse_params(self.schema, read_yaml(path), str(path))

    # ---- execution ---------------------------------------------------------------------------------------
    def run(self, stage: str, params: BaseModel | None = None, paper_dir: Path | None = None,
            track: bool = True) -> dict[str, Path]:
        """Run one stage; returns the result files written."""
        import torch

        if stage not in self.stages:
            raise ValueError(f"unknown stage {stage!r} for {self.paper_id}; stages: {sorted(self.stages)}")
        paper_dir = paper_dir or self.paper_dir()
        params = params if params is not None else self.load_params(paper_dir / "params.yaml")
        if self.before_stage is not None:
            self.before_stage(stage, params)   # e.g. environment that must be set before imports
        ctx = StageContext(self.paper_id, stage, params, paper_dir)
        torch.manual_seed(ctx.seed)
        t0 = time.perf_counter()
        if not track:
            written = self._write(ctx, self.stages[stage](ctx) or {})
            self._write_timings(ctx, time.perf_counter() - t0)
            return written
        from shared.tracking import stage_run

        with stage_run(self.paper_id, stage, params.model_dump(), ctx.seed) as run:
            ctx.run = run
            results = self.stages[stage](ctx) or {}
            written = self._write(ctx, results)                 # files first ...
            seconds = time.perf_counter() - t0
            run.log_metrics({"stage_seconds": seconds})          # ... then MLflow
            self._write_timings(ctx, seconds)
            for path in written.values():
                run.log_artifact(path, "results")
        print(f"stage {self.paper_id}/{stage} done in {seconds:.1f}s", flush=True)
        return written

    @staticmethod
    def _write_timings(ctx: StageContext, seconds: float) -> None:
        write_json(ctx.paper_dir / "timings" / f"{ctx.stage}.json", {**ctx.timings, "stage_seconds": seconds})

    @staticmethod
    def _write(ctx: StageContext, results: dict[str, Any]) -> dict[str, Path]:
        written = {}
        for name, obj in results.items():
            if not name.endswith(".json") or "/" in name:
                raise ValueError(f"result file names are plain '<name>.json', got {name!r}")
            written[name] = write_json(ctx.results_dir / name, obj)
        return written

    def main(self, argv: list[str] | None = None) -> int:
        ap = argparse.ArgumentParser(prog=f"python -m papers.{self.paper_id}.stages",
                                     description=f"{self.paper_id} pipeline stages (run by papers/{self.paper_id}/"
                                                 "dvc.yaml)")
        ap.add_argument("stage", choices=sorted(self.stages))
        ap.add_argument("--params", type=Path, default=None, help="params file (default: the paper's params.yaml)")
        ap.add_argument("--check", action="store_true", help="validate params and exit")
        args = ap.parse_args(argv)
        try:
            params = self.load_params(args.params)
        except (ValueError, FileNotFoundError) as err:   # bad params: one message, no traceback, before any compute
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.check:
            print(f"{self.paper_id}: params OK")
            return 0
        self.run(args.stage, params)
        return 0

