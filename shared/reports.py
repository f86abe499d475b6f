"""Render a paper's report from its ``paper.yaml`` and its result files — the same code for every paper.

A table stage writes ``papers/<id>/results/<table>.json`` in this declared shape::

    {"title": "Table 1 analogue — ...", "table_ref": "Table 1", "setting": "...",
     "columns": [["method", "method"], ["accuracy", "acc"], ...],     # [key, header] pairs, in order
     "rows": [{...}, ...],
     "claims": [{"id": "t1_cskv_vs_asvd", "ours": "0.90 vs 0.10", "verdict": "reproduced", "note": "..."}],
     "plot": {"x": "ratio", "y": "accuracy", "series": "method", "xlabel": "...", "ylabel": "..."},   # optional
     "plots": [{...}, {...}],                                          # optional, several plots (instead of "plot")
     "notes": ["..."]}

``paper.yaml`` lists the paper's claims (``claims: [{id, table, claim, paper}]``) and the transcribed numbers.
:func:`render` writes ``reports/<id>.md`` (claims table first: paper's number, ours, verdict) and
``reports/<id>/*.png``. Run as ``python -m shared.reports <id>``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.io import read_json, read_yaml, write_text_atomic
from shared.paths import PAPERS_DIR, REPORTS_DIR

VERDICTS = ("reproduced", "partially reproduced", "not reproduced", "inconclusive", "not comparable", "pending")


def verdict(strong: bool, weak: bool = False) -> str:
    """The verdict of a rule fixed before the run: ``strong`` → reproduced, else ``weak`` → partially, else not."""
    return "reproduced" if strong else ("partially reproduced" if weak else "not reproduced")


def claim(claim_id: str, ours: str, strong: bool | None = None, weak: bool = False, note: str = "",
          verdict_: str | None = None) -> dict:
    """One claim row of a result file: our number (text), the verdict from the rule, the rule/setting as a note.
    Pass ``strong``/``weak`` (see :func:`verdict`) or an explicit ``verdict_`` from :data:`VERDICTS`."""
    v = verdict_ if verdict_ is not None else verdict(bool(strong), weak)
    if v not in VERDICTS:
        raise ValueError(f"claim {claim_id}: verdict must be one of {VERDICTS}, got {v!r}")
    return {"id": claim_id, "ours": ours, "verdict": v, "note": note}


def result_table(title: str, columns: list, rows: list[dict], claims: list[dict] = (), setting: str = "",
                 table_ref: str | None = None, plot: dict | None = None, notes: list[str] = (), **extra) -> dict:
    """A result file in the shape :func:`render` reads (see the module docstring)."""
    if not columns:
        raise ValueError("columns must not be empty")
    out = {"title": title, "columns": [list(c) for c in columns], "rows": list(rows), "claims": list(claims),
           "setting": setting, "notes": list(notes)}
    if table_ref:
        out["table_ref"] = table_ref
    if plot:
        out["plot"] = plot
    out.update(extra)
    return out


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:.2f}, {v[1]:.2f}]"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    if not columns:
        raise ValueError("columns must not be empty")
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    # A reference row (e.g. the full cache) may lack the first column's key: show its label there instead.
    first = columns[0][0]
    body = ["| " + " | ".join(fmt(r.get(k) if not (k == first and r.get(k) is None) else r.get("label"))
                              for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def claims_table(paper: dict, results: list[dict]) -> str:
    ours = {c["id"]: c for res in results for c in res.get("claims", [])}
    rows = []
    for claim in paper.get("claims", []):
        got = ours.get(claim["id"], {})
        verdict = got.get("verdict", "pending")
        if verdict not in VERDICTS:
            raise ValueError(f"claim {claim['id']}: verdict must be one of {VERDICTS}, got {verdict!r}")
        rows.append({"claim": claim["claim"], "table": claim.get("table", ""), "paper": claim.get("paper", ""),
                     "ours": got.get("ours", "not run"), "verdict": verdict, "note": got.get("note", "")})
    return markdown_table(rows, [("claim", "claim"), ("table", "where"), ("paper", "paper"), ("ours", "ours"),
                                 ("verdict", "verdict"), ("note", "why / setting")])


def line_plot(path: Path, rows: list[dict], x: str, y: str, series: str, title: str = "", xlabel: str = "",
              ylabel: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in dict.fromkeys(r[series] for r in rows):
        pts = sorted((r[x], r[y]) for r in rows
                     if r[series] == name and r.get(x) is not None and r.get(y) is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(name))
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def render(paper_id: str, papers_dir: Path = PAPERS_DIR, reports_dir: Path = REPORTS_DIR) -> Path:
    folder = papers_dir / paper_id
    paper = read_yaml(folder / "paper.yaml")
    result_files = sorted((folder / "results").glob("*.json"))
    if not result_files:
        raise FileNotFoundError(f"no result files in {folder / 'results'}; run `dvc repro papers/{paper_id}`")
    results = [read_json(p) for p in result_files]
    results = [r for r in results if "rows" in r]
    lines = [f"# {paper['title']} — reproduction report", "",
             f"Generated by `python -m shared.reports {paper_id}` from `papers/{paper_id}/results/*.json`; "
             f"paper numbers from `papers/{paper_id}/paper.yaml`.", "", "## Claims", "", claims_table(paper, results), ""]
    for res, path in zip(results, [p for p in result_files if "rows" in read_json(p)]):
        lines += [f"## {res['title']}", ""]
        if res.get("setting"):
            lines += [f"Setting: {res['setting']}", ""]
        cols = [tuple(c) for c in res["columns"]]
        lines += [markdown_table(res["rows"], cols), ""]
        plots = res.get("plots") or ([res["plot"]] if res.get("plot") else [])
        for i, p in enumerate(plots):
            name = f"{path.stem}.png" if i == 0 else f"{path.stem}_{p['y']}.png"
            png = line_plot(reports_dir / paper_id / name, res["rows"], p["x"], p["y"], p["series"],
                            title=res["title"], xlabel=p.get("xlabel", ""), ylabel=p.get("ylabel", ""))
            lines += [f"![{res['title']} ({p.get('ylabel') or p['y']})]({paper_id}/{png.name})", ""]
        for note in res.get("notes", []):
            lines += [f"- {note}"]
        if res.get("notes"):
            lines.append("")
    out = reports_dir / f"{paper_id}.md"
    write_text_atomic(out, "\n".join(lines).rstrip() + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Render reports/<paper>.md from a paper's result files")
    ap.add_argument("paper_id")
    ap.add_argument("--no-track", action="store_true", help="do not log the report to MLflow")
    args = ap.parse_args(argv)
    out = render(args.paper_id)                       # the file first ...
    print(out)
    if not args.no_track:                             # ... then MLflow (a `report` run in the paper's experiment)
        from shared.tracking import log_report

        log_report(args.paper_id, out, sorted((out.parent / args.paper_id).glob("*.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
