"""Where things live. Every path is absolute and derived from the repository root, so stages behave the same
whether DVC runs them from the root or from inside a paper folder."""
from __future__ import annotations

import os
from pathlib import Path

#: Repository root (the folder holding pyproject.toml). Overridable for tests with ``REPRISE_ROOT``.
REPO_ROOT = Path(os.environ.get("REPRISE_ROOT", Path(__file__).resolve().parents[1])).resolve()
DATA_DIR = REPO_ROOT / "data"
MODELS_DIR = DATA_DIR / "models"
CORPORA_DIR = DATA_DIR / "corpora"
CACHE_DIR = DATA_DIR / "cache"
REPORTS_DIR = REPO_ROOT / "reports"
PAPERS_DIR = REPO_ROOT / "papers"
