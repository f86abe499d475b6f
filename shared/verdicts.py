"""Method-vs-method verdicts from per-case rows: paired intervals over cases, seed consistency, breakpoints.

Every KV method of a table is scored on the same seeded cases (``shared.kv_eval.evaluate_task(...,
return_cases=True)``), so a comparison is *paired*: per case ``d_i = m_A(case i) − m_B(case i)`` and the verdict
comes from the 95% paired-bootstrap interval of ``mean_i d_i`` (``shared.metrics.paired_bootstrap``):

    reproduced       the interval excludes 0 on the side the paper claims
    not reproduced   the interval excludes 0 on the other side
    inconclusive     the interval contains 0 ("inconclusive at n = …"), or the training seeds disagree

A trained method is evaluated once per training seed (rows carry ``seed``). Its per-case value is the mean over
seeds, and each seed's own mean difference must have the sign of the pooled one: a verdict that flips with the
seed is not a verdict. CPU float order differs between machines (thread count, BLAS); differences that small move
a point estimate but not an interval that excludes the tie by a margin — ``tests/test_verdicts.py`` re-runs a
comparison under another thread count and asserts the same verdicts.

A **breakpoint** (ratio sweeps) is the largest compression ratio up to which a method's accuracy stays ≥ ``frac``
(default 90%) of the full cache's accuracy at every swept ratio.
"""
from __future__ import annotations

import math
from collections import defaultdict
from statistics import fmean
from typing import Iterable

from shared.metrics import paired_bootstrap, paired_verdict_text
from shared.reports import claim

CASE_KEY = ("task", "length", "protocol", "case")
METRICS = {"accuracy": ("correct", True), "kl": ("kl", False), "answer_nll": ("answer_nll", False),
           "top1": ("top1", True)}


def _matches(row: dict, sel: dict) -> bool:
    return all(row.get(k) == v for k, v in sel.items())


def per_case(cases: Iterable[dict], select: dict, metric: str) -> dict[tuple, dict]:
    """``{case key: {seed: value}}`` of the rows matching ``select`` (``seed`` is ``None`` for untrained rows)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    field = METRICS[metric][0]
    out: dict[tuple, dict] = defaultdict(dict)
    for r in cases:
        if _matches(r, select):
            key = tuple(r.get(k) for k in CASE_KEY)
            if r.get("seed") in out[key]:
                raise ValueError(f"two rows for case {key} seed {r.get('seed')} match {select}: select more keys")
            out[key][r.get("seed")] = float(r[field])
    return dict(out)


def compare(cases: list[dict], a: dict, b: dict, metric: str, seed: int = 0) -> dict:
    """Paired comparison of the rows selected by ``a`` and ``b`` on their common cases.

    Returns :func:`~shared.metrics.paired_bootstrap`'s dict (``diff = mean(A) − mean(B)``, ``low``, ``high``,
    ``n``, ``verdict`` a>b / a<b / tie) plus ``per_seed`` (each seed's mean difference, when either side has
    several seeds) and ``seed_consistent`` (every per-seed difference has the pooled sign, or is 0)."""
    A, B = per_case(cases, a, metric), per_case(cases, b, metric)
    keys = sorted(set(A) & set(B), key=str)
    if not keys:
        raise ValueError(f"no common cases between {a} ({len(A)} cases) and {b} ({len(B)} cases)")
    res = paired_bootstrap([fmean(A[k].values()) for k in keys], [fmean(B[k].values()) for k in keys], seed=seed)
    seeds = sorted({s for k in keys for s in (*A[k], *B[k]) if s is not None})
    per_seed = {}
    if len(seeds) > 1:
        def at(values: dict, s):       # a seedless (untrained) side is the same for every seed
            return values[s] if s in values else fmean(values.values())

        for s in seeds:
            per_seed[s] = fmean(at(A[k], s) - at(B[k], s) for k in keys)
    sign = math.copysign(1.0, res["diff"]) if res["diff"] else 0.0
    res["per_seed"] = per_seed
    res["seed_consistent"] = all(d == 0 or math.copysign(1.0, d) == sign for d in per_seed.values())
    res["metric"] = metric
    return res


def outcome(res: dict, expect: str) -> str:
    """``reproduced`` / ``not reproduced`` / ``inconclusive`` of one comparison; ``expect`` is the claimed
    direction, ``"a>b"`` or ``"a<b"``."""
    if expect not in ("a>b", "a<b"):
        raise ValueError(f"expect must be 'a>b' or 'a<b', got {expect!r}")
    if res["verdict"] == "tie" or not res["seed_consistent"]:
        return "inconclusive"
    return "reproduced" if res["verdict"] == expect else "not reproduced"


def describe(res: dict, name_a: str, name_b: str, digits: int = 3) -> str:
    """One line: the paired interval, and the per-seed differences when there are several seeds."""
    text = paired_verdict_text(res, name_a, name_b, res.get("metric", ""), digits=digits)
    if res.get("per_seed"):
        text += "; per seed " + ", ".join(f"{d:+.{digits}f}" for d in res["per_seed"].values())
        if not res["seed_consistent"]:
            text += " (seeds disagree: inconclusive)"
    return text


def combine(outcomes: list[str]) -> str:
    """All reproduced → reproduced; any not reproduced → not reproduced; some (partially) reproduced and the rest
    inconclusive → partially reproduced; else inconclusive."""
    if not outcomes:
        raise ValueError("no outcomes to combine")
    if all(o == "reproduced" for o in outcomes):
        return "reproduced"
    if any(o == "not reproduced" for o in outcomes):
        return "not reproduced"
    if any(o in ("reproduced", "partially reproduced") for o in outcomes):
        return "partially reproduced"
    return "inconclusive"


def noninferior(res: dict, margin: float) -> str:
    """Non-inferiority of A to B within ``margin`` (higher is better): reproduced iff the interval of A − B lies
    above −margin, not reproduced iff it lies below −margin, else inconclusive."""
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not res["seed_consistent"]:
        return "inconclusive"
    return "reproduced" if res["low"] > -margin else "not reproduced" if res["high"] < -margin else "inconclusive"


def average_over(cases: list[dict], key: str) -> list[dict]:
    """Per-case rows averaged over ``key`` (e.g. the swept compression ratio) per (label, seed, case): the area
    under a method's curve, case by case, so that two methods' areas can be compared paired. Rows lacking ``key``
    (the full cache) are left out."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in cases:
        if r.get(key) is not None:
            groups[(r.get("label"), r.get("seed"), *(r.get(k) for k in CASE_KEY))].append(r)
    out = []
    for (label, seed, *case), rs in groups.items():
        row = {"label": label, "seed": seed, **dict(zip(CASE_KEY, case)), "points": len(rs)}
        for field, _ in METRICS.values():
            row[field] = fmean(float(r[field]) for r in rs)
        out.append(row)
    return out


def paired_outcome(cases: list[dict], a: dict, b: dict, name_a: str, name_b: str,
                   metrics: dict[str, str]) -> tuple[str, str]:
    """``(text, verdict)`` of one or more paired comparisons of A vs B: ``metrics`` maps a metric to the direction
    the paper claims (``{"accuracy": "a>b", "kl": "a<b"}``); the verdict is :func:`combine` of the outcomes."""
    parts, outs = [], []
    for metric, expect in metrics.items():
        res = compare(cases, a, b, metric)
        outs.append(outcome(res, expect))
        parts.append(describe(res, name_a, name_b, digits=2 if metric == "accuracy" else 3))
    return "; ".join(parts), combine(outs)


def paired_claim(claim_id: str, cases: list[dict], a: dict, b: dict, name_a: str, name_b: str,
                 metrics: dict[str, str], note: str = "") -> dict:
    """A claim row from :func:`paired_outcome`."""
    text, verdict = paired_outcome(cases, a, b, name_a, name_b, metrics)
    return claim(claim_id, text, verdict_=verdict, note=note)


CASE_FIELDS = ("method", "case", "context_tokens", "correct", "answer_nll", "kl", "top1", "bytes", "full_bytes",
               "seed")


def summary_rows(cases: list[dict], keys: tuple[str, ...] = ("task", "length", "protocol", "label",
                                                              "compression_ratio")) -> list[dict]:
    """One table row per ``keys`` group of per-case rows (training seeds pooled, see
    :func:`shared.kv_eval.summarize`), carrying the group's other label fields (e.g. ``window``)."""
    from shared.kv_eval import summarize

    out = []
    for s in summarize(cases, keys):
        first = next(c for c in cases if all(c.get(k) == s[k] for k in keys))
        out.append({**{k: v for k, v in first.items() if k not in s and k not in CASE_FIELDS}, **s})
    return out


def breakpoint(rows: list[dict], label: str, full_accuracy: float, frac: float = 0.9,
               key: str = "compression_ratio") -> float | None:
    """The largest swept ratio ``r`` such that ``accuracy(r') ≥ frac · full_accuracy`` for every swept ``r' ≤ r``
    (summary rows of one method, selected by ``label``); ``None`` when the smallest ratio already fails."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    pts = sorted((r[key], r["accuracy"]) for r in rows if r.get("label") == label and r.get(key) is not None)
    if not pts:
        raise ValueError(f"no summary rows with label {label!r} and a {key!r}")
    best = None
    for ratio, acc in pts:
        if acc < frac * full_accuracy:
            break
        best = ratio
    return best
