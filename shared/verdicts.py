"""The claim engine: every claim's rule is data in ``papers/<id>/paper.yaml``; one engine judges every claim of every
paper from the committed result files, with tests whose false-positive rate is ≤ 5% at the n used.

A claim (``paper.yaml``)::

    - id: t1_cskv_vs_asvd_80
      table: "Table 1"
      claim: "At 80% compression CSKV keeps retrieval; ASVD at the same rank collapses."
      paper: "LongEval: CSKV 0.92 vs ASVD 0.26"
      rule:
        file: table1.json                 # papers/<id>/results/<file>, its per-unit rows under `rows` (default cases)
        where: {protocol: decode}         # filter applied to both sides
        unit: case                        # unit of replication: case | seed | [field, ...]
        metric: accuracy                  # decides the claim (accuracy = the per-case `correct`)
        expect: greater                   # the direction the paper claims for A vs B
        test: superiority                 # superiority | noninferiority | equivalence (margin: absolute, or
                                          #   margin_of: b → margin × mean(B))
        compare:                          # one or more A-vs-B comparisons; several → Holm-adjusted
          - {name: "CSKV vs ASVD", a: {label: cskv, compression_ratio: 0.8}, b: {label: asvd, compression_ratio: 0.8}}
        also: {kl: less}                  # supporting metrics: tested and shown, never deciding
        floor: {label: full}              # untestable when this reference sits at the metric's floor

How a comparison is decided (``judge_comparison``): rows matching a side are grouped by the unit key and averaged
within a unit (over training seeds, over a swept ratio when the selector leaves it open); A and B are paired on
their common units. The test follows the data:

    both sides 0/1 per unit     exact McNemar / sign test on the discordant pairs (two-sided, α = 5%)
    otherwise                   exact sign-flip permutation test of the mean difference (two-sided, α = 5%)
    noninferiority              one-sided sign-flip test of d + margin > 0 (and d + margin < 0 for "not")
    equivalence                 two one-sided tests (TOST) against ±margin

Outcomes: ``favours`` (significant in the claimed direction), ``against`` (significant the other way),
``undecided`` (more data could decide), ``cannot decide`` (fewer than 6 informative pairs: no exact two-sided 5%
test can reject), ``untestable`` (both sides at the metric's floor or ceiling, or the reference at its floor: the
model cannot do the task). A trained method's seeds must agree: a per-seed mean difference of the other sign
turns a significant result into ``undecided``. ``tests/test_verdict_calibration.py`` simulates null data and
shows each test's decisive rate ≤ 5% (+ Monte-Carlo error); ``python -m shared.verdicts calibrate`` prints it.

Verdict of a claim: every comparison favours → reproduced; favours and against both present → partially
reproduced; against (and none favours) → not reproduced; every comparison untestable → untestable here; else
inconclusive at n (or "cannot decide below n = 6"). Checks (``checks:`` in paper.yaml) are tests of our code —
true by construction or ours against our own formula — reported apart from the paper's claims.

Pre-registration: :func:`provenance` finds, in git, the commit that last changed each rule and the commit that
last changed its result file; a rule committed after its data is flagged "rule revised after results", and a
claim's ``revised:`` list keeps earlier rules (as data), each judged on the same data beside the current one.

CLI: ``python -m shared.verdicts recheck papers/<id>`` recomputes every claim from the committed results and exits
non-zero when ``reports/<id>/verdicts.json`` disagrees; ``python -m shared.verdicts calibrate`` prints the table.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from statistics import fmean
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.metrics import MIN_DECIDABLE, exact_sign_test, holm, paired_binary_bounds, sign_flip_test

ALPHA = 0.05
VERDICTS = ("reproduced", "partially reproduced", "not reproduced", "inconclusive", "untestable here")
OUTCOMES = ("favours", "against", "undecided", "cannot decide", "untestable")
UNITS = {"case": ["task", "length", "protocol", "case"], "seed": ["seed"]}
#: metric name → the per-unit field holding it (identity when absent)
FIELDS = {"accuracy": "correct"}
#: a field's bounds (floor, ceiling); both sides at one bound → untestable
BOUNDS = {"correct": (0.0, 1.0), "top1": (0.0, 1.0), "kl": (0.0, None)}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Comparison(_Model):
    name: str
    a: dict[str, Any]
    b: dict[str, Any]
    metric_a: str | None = None      # compare two fields of the same rows (e.g. value vs key channels kept)
    metric_b: str | None = None


class Exercised(_Model):
    """A precondition on the data: the failure a claim is about must be present in the reference, else the claim is
    untestable here (e.g. LM-Infinite: vanilla's NLL must itself rise past its window, spec long_context.md §4.1).
    Descriptive, not a test: exercised iff the claimed-direction mean difference of A − B (on their common units)
    is ≥ ``margin``; ``why`` names the situation in the verdict ("failure not exercised at 2×")."""
    name: str
    a: dict[str, Any]
    b: dict[str, Any]
    metric: str | None = None          # default: the rule's metric
    expect: Literal["greater", "less"]
    margin: float = Field(0.0, ge=0)
    why: str


class Rule(_Model):
    file: str
    rows: str = "cases"
    where: dict[str, Any] = Field(default_factory=dict)
    unit: str | list[str] = "case"
    metric: str
    expect: Literal["greater", "less"]
    test: Literal["superiority", "noninferiority", "equivalence"] = "superiority"
    margin: float = Field(0.0, ge=0)
    margin_of: Literal["b"] | None = None
    compare: list[Comparison] = Field(min_length=1)
    also: dict[str, Literal["greater", "less"]] = Field(default_factory=dict)
    floor: dict[str, Any] | None = None
    exercised: Exercised | None = None
    seeds_agree: bool = True

    @field_validator("unit")
    @classmethod
    def _unit(cls, v):
        if isinstance(v, str) and v not in UNITS:
            raise ValueError(f"unit {v!r}: use one of {sorted(UNITS)} or a list of fields")
        return v

    @model_validator(mode="after")
    def _margin(self):
        if self.test != "superiority" and self.margin <= 0:
            raise ValueError(f"test {self.test!r} needs a margin > 0, got {self.margin}")
        if self.test != "superiority" and len(self.compare) != 1:
            raise ValueError(f"a {self.test} rule compares one pair (got {len(self.compare)}); split the claim")
        return self

    @property
    def unit_fields(self) -> list[str]:
        return UNITS[self.unit] if isinstance(self.unit, str) else list(self.unit)

    @property
    def unit_name(self) -> str:
        return self.unit if isinstance(self.unit, str) else "×".join(self.unit)


class Revision(_Model):
    """An earlier rule of a claim: as data (``rule``: judged again on the current data) or, for a rule that lived in
    stage code, its recorded ``verdict`` and ``text`` on the data of its time."""
    commit: str
    reason: str
    rule: Rule | None = None
    verdict: str | None = None
    text: str | None = None

    @model_validator(mode="after")
    def _either(self):
        if (self.rule is None) == (self.verdict is None):
            raise ValueError(f"revision @{self.commit}: give its `rule` (data) or its recorded `verdict`")
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise ValueError(f"revision @{self.commit}: verdict {self.verdict!r} not in {VERDICTS}")
        return self


class Claim(_Model):
    id: str
    table: str = ""
    claim: str
    paper: str = ""
    rule: Rule | None = None
    fn: str | None = None          # "module:function": (results, claim) → {"verdict", "text"}; judged by the engine
    headline: bool = False         # the claim the root README's table shows for this paper
    revised: list[Revision] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one(self):
        if (self.rule is None) == (self.fn is None):
            raise ValueError(f"claim {self.id}: give exactly one of `rule` (data) or `fn` (module:function)")
        return self


class Check(_Model):
    id: str
    what: str
    file: str
    rows: str = "rows"
    where: dict[str, Any] = Field(default_factory=dict)
    field: str
    op: Literal["<=", ">=", "=="]
    value: float | None = None
    value_field: str | None = None
    rtol: float = 0.0

    @model_validator(mode="after")
    def _target(self):
        if (self.value is None) == (self.value_field is None):
            raise ValueError(f"check {self.id}: give exactly one of `value` or `value_field`")
        return self


# ---------------------------------------------------------------------------------------------- selection

def _field(metric: str) -> str:
    return FIELDS.get(metric, metric)


def _matches(row: dict, sel: dict) -> bool:
    return all(row.get(k) == v for k, v in sel.items())


def select(rows: list[dict], sel: dict) -> list[dict]:
    """Rows matching ``sel``. A value ``"$max"`` / ``"$min"`` picks the largest / smallest value of that field
    among the rows matching the other keys (e.g. the last training step)."""
    plain = {k: v for k, v in sel.items() if v not in ("$max", "$min")}
    out = [r for r in rows if _matches(r, plain)]
    for k, v in sel.items():
        if v in ("$max", "$min"):
            vals = [r[k] for r in out if r.get(k) is not None]
            if not vals:
                return []
            pick = max(vals) if v == "$max" else min(vals)
            out = [r for r in out if r.get(k) == pick]
    return out


def per_unit(rows: list[dict], sel: dict, field: str, unit: list[str]) -> tuple[dict, dict]:
    """``({unit key: mean value}, {seed: {unit key: mean value}})`` of the rows matching ``sel``: values averaged
    within a unit (over seeds, over what the selector leaves open); the per-seed means for seed agreement."""
    got = select(rows, sel)
    vals, by_seed = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for r in got:
        if field not in r or r[field] is None:
            raise ValueError(f"row {({k: r.get(k) for k in unit})} selected by {sel} has no field {field!r}")
        key = tuple(r.get(k) for k in unit)
        vals[key].append(float(r[field]))
        if "seed" not in unit and r.get("seed") is not None:
            by_seed[r["seed"]][key].append(float(r[field]))
    return ({k: fmean(v) for k, v in vals.items()},
            {s: {k: fmean(v) for k, v in d.items()} for s, d in by_seed.items()})


# ---------------------------------------------------------------------------------------------- one comparison

def _fmt(x: float) -> str:
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _pfmt(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def judge_comparison(rows: list[dict], cmp: Comparison, metric: str, expect: str, rule: Rule,
                     floor_value: float | None = None) -> dict:
    """Test one A-vs-B comparison on ``metric``; returns ``{outcome, p, n, mean_a, mean_b, diff, test, text,
    ...}``. ``p`` is the p-value of the claimed direction's decision (before any Holm adjustment)."""
    field, unit = _field(metric), rule.unit_fields
    A, A_seeds = per_unit(rows, {**rule.where, **cmp.a}, _field(cmp.metric_a or metric), unit)
    B, B_seeds = per_unit(rows, {**rule.where, **cmp.b}, _field(cmp.metric_b or metric), unit)
    keys = sorted(set(A) & set(B), key=str)
    if not keys:
        raise ValueError(f"{cmp.name}: no common {rule.unit_name} units between A {cmp.a} ({len(A)} units) and "
                         f"B {cmp.b} ({len(B)} units) in {rule.file}")
    a, b = [A[k] for k in keys], [B[k] for k in keys]
    d = [x - y for x, y in zip(a, b)]
    n, ma, mb = len(keys), fmean(a), fmean(b)
    res = {"name": cmp.name, "metric": metric, "n": n, "unit": rule.unit_name, "mean_a": ma, "mean_b": mb,
           "diff": ma - mb}
    sign = 1 if expect == "greater" else -1            # the claimed sign of A − B
    lo, hi = BOUNDS.get(field, (None, None))
    binary = all(v in (0.0, 1.0) for v in a + b)
    at_bound = next((v for v in (lo, hi) if v is not None and all(x == v for x in a + b)), None)
    margin = rule.margin * (mb if rule.margin_of == "b" else 1.0)
    res["margin"] = margin
    pairs = _seed_pairs(A_seeds, B_seeds, A, B, keys)          # {seed: (A values, B values)} on the common units
    if floor_value is not None:
        res.update(outcome="untestable", p=1.0, test="—",
                   why=f"the reference sits at the floor ({_fmt(floor_value)}): the model cannot do the task here")
    elif at_bound is not None and not (rule.test != "superiority" and at_bound == (hi if sign > 0 else lo)):
        res.update(outcome="untestable", p=1.0, test="—",
                   why=f"both sides at the metric's {'floor' if at_bound == lo else 'ceiling'} ({_fmt(at_bound)}) "
                       f"on all {n} {rule.unit_name}s")
    elif rule.test == "superiority":
        if binary:
            if margin:
                raise ValueError(f"{cmp.name}: a superiority margin needs a continuous metric, {metric} is 0/1")
            wins = sum(1 for x in d if x > 0)
            losses = sum(1 for x in d if x < 0)
            informative, p2 = wins + losses, exact_sign_test(wins, losses)
            res.update(test="exact McNemar", discordant=[wins, losses],
                       detail=f"discordant {wins}/{losses}")
        else:       # a superiority margin: A beats B by more than it (e.g. perplexity at least doubles)
            shifted = [x - sign * margin for x in d]
            informative, p2 = sum(1 for x in shifted if x != 0), sign_flip_test(shifted)
            res.update(test="exact sign-flip")
        res["p"] = p2
        if informative < MIN_DECIDABLE:
            res.update(outcome="cannot decide",
                       why=f"{informative} informative pair(s): an exact two-sided 5% test needs ≥ {MIN_DECIDABLE}")
        else:
            res["outcome"] = "undecided" if p2 >= ALPHA else (
                "favours" if sign * (ma - mb - (0 if binary else sign * margin)) > 0 else "against")
    elif binary or all(v in (0.0, 1.0) for a_s, b_s in pairs.values() for v in a_s + b_s):
        # binary margin test: exact simultaneous bounds on P(A wins) − P(A loses), per training seed when a side has
        # several (every seed must agree: an intersection of exact tests, still ≤ 5%)
        res["test"] = "exact Clopper–Pearson bounds vs margin"
        outs, details = [], []
        for s_, (a_s, b_s) in pairs.items():
            dd = [sign * (x - y) for x, y in zip(a_s, b_s)]
            w, l = sum(1 for x in dd if x > 0), sum(1 for x in dd if x < 0)
            lo_b, hi_b = paired_binary_bounds(w, l, n)
            if rule.test == "noninferiority":
                o = "favours" if lo_b > -margin else "against" if hi_b < -margin else "undecided"
            else:
                o = ("favours" if -margin < lo_b and hi_b < margin else
                     "against" if hi_b < -margin or lo_b > margin else "undecided")
            outs.append(o)
            details.append(("" if s_ is None else f"s{s_} ") + f"[{lo_b:+.2f}, {hi_b:+.2f}]")
        res["detail"] = "95% bounds on claimed-direction Δ " + ", ".join(details)
        res["p"] = 1.0
        res["outcome"] = outs[0] if len(set(outs)) == 1 else "undecided"
        if len(set(outs)) > 1:
            res["why"] = "training seeds disagree"
    else:
        # continuous non-inferiority (claimed direction within margin) / equivalence (|d| < margin): sign-flip
        # tests of the shifted differences
        alt_fav, alt_bad = ("greater", "less") if sign > 0 else ("less", "greater")
        p_fav = sign_flip_test(d, shift=-sign * margin, alternative=alt_fav)      # A not worse than B − margin
        p_bad = sign_flip_test(d, shift=-sign * margin, alternative=alt_bad)      # A worse than B by > margin
        res["test"] = "one-sided sign-flip vs margin" if rule.test == "noninferiority" else "TOST sign-flip"
        if rule.test == "equivalence":
            p_fav = max(p_fav, sign_flip_test(d, shift=sign * margin, alternative=alt_bad))
            p_bad = min(p_bad, sign_flip_test(d, shift=sign * margin, alternative=alt_fav))
        res["p"] = p_fav
        if n < 5:      # one-sided exact: smallest p = 2⁻ⁿ, < 0.05 needs n ≥ 5
            res.update(outcome="cannot decide", why=f"n = {n}: a one-sided exact 5% test needs n ≥ 5")
        else:
            res["outcome"] = "favours" if p_fav < ALPHA else "against" if p_bad < ALPHA else "undecided"
    if res["outcome"] in ("favours", "against") and rule.seeds_agree:
        if len(pairs) > 1:
            per_seed = {s: fmean(x - y for x, y in zip(a_s, b_s)) for s, (a_s, b_s) in pairs.items()}
            res["per_seed"] = per_seed
            want = math.copysign(1, ma - mb) if ma != mb else 0
            if any(v != 0 and math.copysign(1, v) != want for v in per_seed.values()):
                res.update(outcome="undecided", why="training seeds disagree in sign: "
                           + ", ".join(f"s{s} {v:+.3g}" for s, v in per_seed.items()))
    return res


def _seed_pairs(A_seeds, B_seeds, A, B, keys) -> dict:
    """{seed: (A values, B values)} on ``keys``, one pair of lists per training seed (a seedless side is the same
    for every seed); ``{None: (A, B)}`` when neither side has seeds."""
    seeds = sorted(set(A_seeds) | set(B_seeds)) or [None]

    def side(S, full, s):
        return [S[s][k] if s in S and k in S[s] else full[k] for k in keys]
    return {s: (side(A_seeds, A, s), side(B_seeds, B, s)) for s in seeds}


def describe(res: dict) -> str:
    """One line: means, difference, test, p, n and unit (and why, when not decided)."""
    text = (f"{res['name']}: {res['metric']} {_fmt(res['mean_a'])} vs {_fmt(res['mean_b'])} "
            f"(Δ {res['diff']:+.3g}")
    if res.get("margin"):
        text += f", margin {_fmt(res['margin'])}"
    text += f"; {res['test']}"
    if res.get("detail"):
        text += f", {res['detail']}"
    if res["test"] not in ("—", "exact Clopper–Pearson bounds vs margin"):
        text += f", p = {_pfmt(res['p'])}"
        if res.get("p_holm") is not None:
            text += f" (Holm {_pfmt(res['p_holm'])})"
    text += f"; n = {res['n']} {res['unit']}s)"
    if res.get("why"):
        text += f" — {res['why']}"
    return text


# ---------------------------------------------------------------------------------------------- one claim

def _combine(outs: list[str]) -> str:
    if all(o == "untestable" for o in outs):
        return "untestable here"
    testable = [o for o in outs if o != "untestable"]
    if all(o == "favours" for o in testable):
        return "reproduced"
    if "favours" in testable and "against" in testable:
        return "partially reproduced"
    if "against" in testable and "favours" not in testable:
        return "not reproduced"
    return "inconclusive"


def judge_rule(rule: Rule, rows: list[dict]) -> dict:
    """Verdict of one rule on the rows of its result file: ``{verdict, label, text, comparisons, supporting}``."""
    floor_value = None
    if rule.floor is not None:
        ref, _ = per_unit(rows, {**rule.where, **rule.floor}, _field(rule.metric), rule.unit_fields)
        if not ref:
            raise ValueError(f"floor reference {rule.floor} selects no rows in {rule.file}")
        lo = BOUNDS.get(_field(rule.metric), (None, None))[0]
        if lo is not None and all(v == lo for v in ref.values()):
            floor_value = lo
    comps = [judge_comparison(rows, c, rule.metric, rule.expect, rule, floor_value) for c in rule.compare]
    if rule.exercised is not None:
        ex = rule.exercised
        field = _field(ex.metric or rule.metric)
        A, _ = per_unit(rows, {**rule.where, **ex.a}, field, rule.unit_fields)
        B, _ = per_unit(rows, {**rule.where, **ex.b}, field, rule.unit_fields)
        keys = sorted(set(A) & set(B), key=str)
        if not keys:
            raise ValueError(f"exercised {ex.name}: no common {rule.unit_name} units in {rule.file}")
        diff = fmean(A[k] - B[k] for k in keys) * (1 if ex.expect == "greater" else -1)
        if diff < ex.margin:
            for c in comps:
                c.update(outcome="untestable", why=f"{ex.why}: {ex.name} {field} Δ {diff:+.3g} < {ex.margin:g} "
                                                   f"(mean over {len(keys)} {rule.unit_name}s)")
    if len(comps) > 1:   # several comparisons inside one claim: Holm over the decisive p-values
        live = [i for i, c in enumerate(comps) if c["outcome"] in ("favours", "against", "undecided")]
        for i, p in zip(live, holm([comps[i]["p"] for i in live])):
            comps[i]["p_holm"] = p
            if p >= ALPHA and comps[i]["outcome"] in ("favours", "against"):
                comps[i]["outcome"], comps[i]["why"] = "undecided", "not significant after Holm's adjustment"
    verdict = _combine([c["outcome"] for c in comps])
    label = verdict
    if verdict == "inconclusive":
        if all(c["outcome"] in ("cannot decide", "untestable", "favours") for c in comps):
            label = f"inconclusive (cannot decide below n = {MIN_DECIDABLE} informative pairs)"
        else:
            label = f"inconclusive at n = {min(c['n'] for c in comps)}"
    supporting = []
    plain = rule.model_copy(update={"test": "superiority", "margin": 0.0, "margin_of": None})
    for metric, expect in rule.also.items():      # supporting metrics: a plain two-sided superiority test each
        for c in rule.compare:
            s = judge_comparison(rows, c, metric, expect, plain)
            s["claimed"] = expect
            supporting.append(s)
    text = " | ".join(describe(c) for c in comps)
    if supporting:
        text += " — supporting (not deciding): " + " | ".join(
            describe(s) + f" [{s['outcome']}]" for s in supporting)
    return {"verdict": verdict, "label": label, "text": text, "comparisons": comps, "supporting": supporting}


def rule_text(rule: Rule) -> str:
    """The rule in words, generated from the data."""
    sides = "; ".join(f"{c.name}" for c in rule.compare)
    what = {"superiority": f"{rule.metric} {'higher' if rule.expect == 'greater' else 'lower'} for A",
            "noninferiority": f"A's {rule.metric} not {'below' if rule.expect == 'greater' else 'above'} B's by more "
                              f"than {rule.margin:g}{' × B' if rule.margin_of else ''}",
            "equivalence": f"|Δ {rule.metric}| < {rule.margin:g}{' × B' if rule.margin_of else ''}"}[rule.test]
    text = (f"{sides}: {what}; paired over {rule.unit_name}s of `{rule.file}`"
            + (f" where {rule.where}" if rule.where else "") + "; exact test, two-sided 5%"
            + (" (Holm over comparisons)" if len(rule.compare) > 1 else ""))
    if rule.floor:
        text += f"; untestable if {rule.floor} is at the floor"
    if rule.exercised:
        ex = rule.exercised
        text += (f"; untestable unless {ex.name} shows {ex.metric or rule.metric} "
                 f"{'higher' if ex.expect == 'greater' else 'lower'} by ≥ {ex.margin:g} on average ({ex.why})")
    if rule.also:
        text += "; supporting: " + ", ".join(f"{m} {'higher' if e == 'greater' else 'lower'}"
                                             for m, e in rule.also.items())
    return text


def rule_hash(rule: Rule | None, fn: str | None = None) -> str:
    blob = json.dumps(rule.model_dump() if rule is not None else {"fn": fn}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- a paper

def load_paper(folder: Path) -> tuple[dict, list[Claim], list[Check]]:
    from shared.io import read_yaml

    paper = read_yaml(folder / "paper.yaml")
    claims = [Claim.model_validate(c) for c in paper.get("claims", [])]
    checks = [Check.model_validate(c) for c in paper.get("checks", []) or []]
    ids = [c.id for c in claims] + [c.id for c in checks]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"{folder / 'paper.yaml'}: duplicate claim/check ids {sorted(dup)}")
    return paper, claims, checks


def _rows_of(results: dict[str, dict], file: str, key: str) -> list[dict]:
    if file not in results:
        raise FileNotFoundError(f"result file {file!r} missing; have {sorted(results)} (run the paper's stages)")
    if key not in results[file]:
        raise ValueError(f"{file} has no {key!r} list; keys: {sorted(results[file])}")
    return results[file][key]


def judge_claim(claim: Claim, results: dict[str, dict]) -> dict:
    if claim.fn is not None:
        mod, _, name = claim.fn.partition(":")
        out = getattr(importlib.import_module(mod), name)(results, claim)
        if out.get("verdict") not in VERDICTS:
            raise ValueError(f"claim {claim.id}: {claim.fn} returned verdict {out.get('verdict')!r}")
        got = {"label": out["verdict"], **out}
    else:
        got = judge_rule(claim.rule, _rows_of(results, claim.rule.file, claim.rule.rows))
    got["earlier"] = [{"commit": r.commit, "reason": r.reason,
                       **({k: v for k, v in judge_rule(r.rule, _rows_of(results, r.rule.file, r.rule.rows)).items()
                           if k in ("verdict", "label", "text")} if r.rule is not None else
                          {"verdict": r.verdict, "label": f"{r.verdict} (recorded)", "text": r.text or ""})}
                      for r in claim.revised]
    return got


def judge_check(check: Check, results: dict[str, dict]) -> dict:
    rows = select(_rows_of(results, check.file, check.rows), check.where)
    if not rows:
        raise ValueError(f"check {check.id}: no rows of {check.file} match {check.where}")
    bad = []
    for r in rows:
        x = float(r[check.field])
        y = float(r[check.value_field]) if check.value_field else float(check.value)
        ok = (x <= y if check.op == "<=" else x >= y if check.op == ">=" else
              abs(x - y) <= check.rtol * max(abs(y), 1e-300))
        if not ok:
            bad.append(f"{check.field} = {_fmt(x)} vs {_fmt(y)}")
    worst = max(float(r[check.field]) for r in rows) if check.op == "<=" else \
        min(float(r[check.field]) for r in rows)
    text = (f"{len(rows) - len(bad)}/{len(rows)} rows satisfy {check.field} {check.op} "
            f"{check.value_field or _fmt(check.value)}" + (f" (rtol {check.rtol:g})" if check.op == "==" else "")
            + ("" if check.op == "==" else f"; {'max' if check.op == '<=' else 'min'} {_fmt(worst)}"))
    if bad:
        text += "; failing: " + "; ".join(bad[:3])
    return {"passed": not bad, "text": text}


def read_results(folder: Path) -> dict[str, dict]:
    from shared.io import read_json

    return {p.name: read_json(p) for p in sorted((folder / "results").glob("*.json"))}


def judge_paper(folder: Path) -> dict:
    """Every claim and check of a paper, from its results: ``{"claims": {id: ...}, "checks": {id: ...}}``."""
    _, claims, checks = load_paper(folder)
    results = read_results(folder)
    out = {"claims": {}, "checks": {}}
    for c in claims:
        out["claims"][c.id] = judge_claim(c, results)
    for c in checks:
        out["checks"][c.id] = judge_check(c, results)
    return out


def summary(judged: dict) -> dict:
    """What ``reports/<id>/verdicts.json`` records and ``recheck`` compares: verdict, label and text per claim,
    pass/fail per check."""
    return {"claims": {k: {"verdict": v["verdict"], "label": v["label"], "text": v["text"],
                           "earlier": [{x: e[x] for x in ("commit", "verdict", "label")} for e in v["earlier"]]}
                       for k, v in judged["claims"].items()},
            "checks": {k: {"passed": v["passed"], "text": v["text"]} for k, v in judged["checks"].items()}}


# ---------------------------------------------------------------------------------------------- provenance

def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(folder: Path, claims: list[Claim]) -> dict[str, dict]:
    """Per claim: ``rule_commit`` (the commit since which its rule is unchanged; "uncommitted" when the working
    copy differs), ``data_commit`` (last commit of its result file), and ``revised_after_results``."""
    import yaml

    root = Path(_git("rev-parse", "--show-toplevel", cwd=folder) or folder)
    rel = folder.resolve().relative_to(root.resolve()).as_posix()
    history = (_git("log", "--format=%H", "--", f"{rel}/paper.yaml", cwd=root) or "").split()
    past: list[tuple[str, dict]] = []
    for sha in history:
        text = _git("show", f"{sha}:{rel}/paper.yaml", cwd=root)
        try:
            data = yaml.safe_load(text) if text else {}
        except yaml.YAMLError:
            data = {}
        hashes = {}
        for c in (data or {}).get("claims", []) or []:
            try:
                cl = Claim.model_validate(c)
            except Exception:        # an older schema (claims without rules) cannot match a current rule
                continue
            hashes[cl.id] = rule_hash(cl.rule, cl.fn)
        past.append((sha, hashes))
    out = {}
    for c in claims:
        h = rule_hash(c.rule, c.fn)
        since = "uncommitted"
        for sha, hashes in past:                      # newest first: walk back while the rule is the same
            if hashes.get(c.id) != h:
                break
            since = sha
        files = [c.rule.file] if c.rule else []
        data = None
        for f in files:
            path = f"{rel}/results/{f}"
            dirty = _git("status", "--porcelain", "--", path, cwd=root)
            data = "uncommitted" if dirty else (_git("log", "-1", "--format=%H", "--", path, cwd=root) or None)
        after = False
        if data and data != "uncommitted" and since != "uncommitted" and since != data:
            after = _git("merge-base", "--is-ancestor", data, since, cwd=root) is not None
        out[c.id] = {"rule_commit": since[:10] if since != "uncommitted" else since,
                     "data_commit": (data[:10] if data and data != "uncommitted" else data),
                     "revised_after_results": bool(after or c.revised)}
    return out


# ---------------------------------------------------------------------------------------------- CLI

def recheck(folder: Path, reports_dir: Path | None = None) -> list[str]:
    """Differences between the verdicts recomputed from ``folder``'s results and ``reports/<id>/verdicts.json``."""
    from shared.io import read_json
    from shared.paths import REPORTS_DIR

    reports_dir = reports_dir or REPORTS_DIR
    stored = read_json(reports_dir / folder.name / "verdicts.json")
    fresh = summary(judge_paper(folder))
    diffs = []
    for kind in ("claims", "checks"):
        for k in sorted(set(stored.get(kind, {})) | set(fresh[kind])):
            if stored.get(kind, {}).get(k) != fresh[kind].get(k):
                diffs.append(f"{kind[:-1]} {k}: report {stored.get(kind, {}).get(k)} != recomputed "
                             f"{fresh[kind].get(k)}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shared.verdicts", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recheck", help="recompute every claim from the committed results; non-zero on disagreement")
    r.add_argument("papers", nargs="*", type=Path, help="papers/<id> folders (default: all)")
    c = sub.add_parser("calibrate", help="decisive rate of each test under simulated null data (markdown table)")
    c.add_argument("--trials", type=int, default=2000)
    args = ap.parse_args(argv)
    if args.cmd == "calibrate":
        from shared.calibration import calibration_table

        print(calibration_table(args.trials))
        return 0
    from shared.paths import PAPERS_DIR, REPORTS_DIR

    folders = args.papers or sorted(p.parent for p in PAPERS_DIR.glob("*/paper.yaml")
                                    if (REPORTS_DIR / p.parent.name / "verdicts.json").is_file())
    bad = 0
    for folder in folders:
        diffs = recheck(folder)
        n = len(load_paper(folder)[1])
        print(f"{folder.name}: {'OK' if not diffs else 'DIFFERS'} ({n} claims recomputed from results/)")
        for d in diffs:
            print("  " + d)
        bad += bool(diffs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
