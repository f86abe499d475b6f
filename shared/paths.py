"""Where things live. Every path is absolute, so stages behave the same whether DVC runs them from the root or from
inside a paper folder — and they resolve from the **working copy** DVC runs them in, not from wherever the package
is installed: ``dvc exp run --temp`` / ``--queue`` run stages in a copy under ``<repo>/.dvc/tmp/exps/…`` while the
editable install still points at ``<repo>``.

* ``REPO_ROOT`` — the working copy: the nearest folder above the current directory holding ``dvc.yaml``,
  ``pyproject.toml`` and ``shared/``; else the installed checkout. Data, papers and reports resolve from it.
* ``STORE_ROOT`` — where results are *kept* across experiments: the MLflow store (``mlflow.db``, ``mlartifacts/``)
  and the dequantized-model cache. For a DVC experiment copy it is the repository the experiment belongs to (a
  temporary copy is deleted after the run); otherwise it is ``REPO_ROOT``.

``REPRISE_ROOT`` overrides ``REPO_ROOT`` (and hence ``STORE_ROOT``) for tests.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_EXPS = os.sep + os.path.join(".dvc", "tmp", "exps") + os.sep


def is_project_root(folder: Path) -> bool:
    return (folder / "dvc.yaml").is_file() and (folder / "pyproject.toml").is_file() and (folder / "shared").is_dir()


def find_repo_root(start: Path | None = None) -> Path:
    """The working copy containing ``start`` (default: the current directory), else the installed checkout."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if is_project_root(folder):
            return folder
    return PACKAGE_ROOT


def store_root(repo_root: Path) -> Path:
    """The repository a DVC experiment copy (``<repo>/.dvc/tmp/exps/…``) belongs to; else ``repo_root`` itself."""
    text = str(repo_root)
    if _EXPS in text:
        return Path(text.split(_EXPS)[0])
    return repo_root


REPO_ROOT = Path(os.environ["REPRISE_ROOT"]).resolve() if os.environ.get("REPRISE_ROOT") else find_repo_root()
STORE_ROOT = store_root(REPO_ROOT)
DATA_DIR = REPO_ROOT / "data"
MODELS_DIR = DATA_DIR / "models"
CORPORA_DIR = DATA_DIR / "corpora"
CACHE_DIR = STORE_ROOT / "data" / "cache"
REPORTS_DIR = REPO_ROOT / "reports"
PAPERS_DIR = REPO_ROOT / "papers"
