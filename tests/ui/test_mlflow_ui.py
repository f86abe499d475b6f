"""The MLflow UI as a user meets it, in a real (headless) Chromium: the link `make ui` prints opens the runs table
of a paper's experiment (not MLflow 3's GenAI overview), with the stage run, its nested cells and the nested
Lightning run. Skipped where Chromium is not installed (Debian: `apt-get install chromium`); `make ui-check` runs it
and keeps the screenshot in reports/mlflow_ui.png."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shared import tracking

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium(args: list[str], profile: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_make_ui_link_opens_the_runs_table_with_nested_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRISE_MLFLOW_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("REPRISE_MLFLOW_ARTIFACTS", str(tmp_path / "art"))
    with tracking.stage_run("cskv", "table1", {"window": 32}, seed=0) as run:
        run.cell("passkey/1024/decode/snapkv@0.5", {"accuracy": 1.0})
        logger = tracking.lightning_logger("cskv", "train/k-asvd")
        logger.log_metrics({"loss": 0.5}, step=0)
        logger.finalize("success")
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                               tracking.tracking_uri(), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        link = tracking.runs_table_links(base)["cskv"]
        assert "workflowType=machine_learning" in link
        shot = Path(os.environ.get("REPRISE_UI_SCREENSHOT", tmp_path / "mlflow_ui.png"))
        shot.parent.mkdir(parents=True, exist_ok=True)
        wait = ["--virtual-time-budget=20000", "--window-size=1400,900"]
        dom = _chromium([*wait, "--dump-dom", link], tmp_path / "profile1").stdout
        _chromium([*wait, f"--screenshot={shot}", link], tmp_path / "profile2")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot"
    # the runs table (run names are rendered), not the GenAI overview/traces page
    assert "table1" in dom, dom[-2000:]
    assert "Traces" not in dom or "table1" in dom
