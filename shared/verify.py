"""Check our published numbers: a fresh clone, a cold ``dvc repro papers/<id>``, then every output hash of the
clone's ``dvc.lock`` files compared with the committed ones.

    python -m shared.verify cskv            # or: make verify PAPER=cskv
    -> "cskv: reproduced byte for byte (12/12 outputs)"  or the outputs that differ, with both hashes

The clone shares this checkout's DVC cache (the data stages' outputs are checked out from it, not re-downloaded)
and runs with this checkout's Python environment; the paper's committed results, reports and artifacts are removed
from the clone first, so every stage of the paper — model artifacts, results, reports — is recomputed there. ``compare_locks`` is the comparison alone (two checkouts' lock files).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from shared.paths import REPO_ROOT


def lock_outputs(root: Path, paper_id: str) -> dict[str, str]:
    """``{stage:out path: hash}`` of the paper's own lock file and of its root publish stage."""
    out = {}
    for lock in (root / "papers" / paper_id / "dvc.lock", root / "dvc.lock"):
        if not lock.is_file():
            continue
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for name, st in stages.items():
            if lock.parent == root and name != f"papers/{paper_id}":
                continue
            for o in st.get("outs", []) or []:
                out[f"{name}:{o['path']}"] = o.get("md5") or o.get("hash") or ""
    return out


def compare_locks(committed: dict[str, str], fresh: dict[str, str]) -> list[str]:
    """Outputs whose hash differs, or that only one side has."""
    diffs = []
    for key in sorted(set(committed) | set(fresh)):
        a, b = committed.get(key), fresh.get(key)
        if a != b:
            diffs.append(f"{key}: committed {a or 'absent'} vs fresh {b or 'absent'}")
    return diffs


def _run(cmd: list[str], cwd: Path, env: dict) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, env=env, check=True)


def verify(paper_id: str, repo: Path = REPO_ROOT, workdir: Path | None = None) -> list[str]:
    if not (repo / "papers" / paper_id / "dvc.yaml").is_file():
        raise ValueError(f"no paper {paper_id!r} (papers/<id>/dvc.yaml); papers: "
                         f"{sorted(p.parent.name for p in (repo / 'papers').glob('*/dvc.yaml'))}")
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"reprise-verify-{paper_id}-"))
    clone = workdir / "clone"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(clone)}
    env.pop("REPRISE_ROOT", None)
    _run(["git", "clone", "-q", str(repo), str(clone)], workdir, env)
    _run(["dvc", "cache", "dir", "--local", str(repo / ".dvc" / "cache")], clone, env)
    # the committed outputs (results, reports) come with the clone: remove them, so that DVC recomputes every stage
    # of the paper (the data stages' outputs are checked out from the shared cache, not recomputed)
    for path in (clone / "papers" / paper_id / "results", clone / "papers" / paper_id / "artifacts",
                 clone / "reports" / paper_id, clone / "reports" / f"{paper_id}.md"):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    _run(["dvc", "repro", "--no-run-cache", f"papers/{paper_id}"], clone, env)   # recompute, never restore
    _run(["dvc", "repro", "-f", "-s", f"papers/{paper_id}"], clone, env)          # DVC may still restore the report
    return compare_locks(lock_outputs(repo, paper_id), lock_outputs(clone, paper_id))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shared.verify", description=__doc__.split("\n")[0])
    ap.add_argument("paper_id")
    ap.add_argument("--workdir", type=Path, default=None, help="where to clone (default: a new temporary folder)")
    args = ap.parse_args(argv)
    diffs = verify(args.paper_id, workdir=args.workdir)
    n = len(lock_outputs(REPO_ROOT, args.paper_id))
    if diffs:
        print(f"{args.paper_id}: {len(diffs)} of {n} outputs differ from the committed dvc.lock:")
        for d in diffs:
            print("  " + d)
        return 1
    print(f"{args.paper_id}: reproduced byte for byte ({n}/{n} outputs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
