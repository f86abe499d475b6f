"""Calibration of the verdict engine's tests: decisive rate under simulated null data, and power at a stated effect.

Null data are *paired and exchangeable*: per unit i a shared effect μᵢ, then A = μᵢ + e_A, B = μᵢ + e_B with e_A, e_B
i.i.d. — two methods that do not differ, measured on the same cases. The noise families:

    normal        e ~ N(0, 1)
    skewed        e ~ Exponential(1)   (each side skewed; their difference is symmetric, as paired nulls are)
    heavy-tailed  e ~ Student t, 2 degrees of freedom
    binary ties   A, B ~ Bernoulli(pᵢ) with pᵢ ~ Beta(0.3, 0.3): most pairs concordant (both 0 or both 1)
    boundary NI   non-inferiority at its boundary: d = A − B has mean exactly −margin (continuous: normal,
                  margin 0.5; binary: P(A>B) = 0.05, P(A<B) = 0.15, margin 0.1)

"Decisive" = the engine calls a winner (favours or against) where none exists. ``before`` is the rule the suite
used until this engine: a 95% BCa paired-bootstrap interval that excludes 0 (``shared.metrics.paired_bootstrap``).
Power: normal differences with mean 1 (A − B ~ N(1, 2), standardised effect 0.71), and binary with
P(A>B) = 0.30, P(A<B) = 0.05.
"""
from __future__ import annotations

import numpy as np

from shared.metrics import MIN_DECIDABLE, exact_sign_test, paired_binary_bounds, paired_bootstrap, sign_flip_test

NS = (3, 5, 10, 20, 50)
ALPHA = 0.05


def _pairs(kind: str, n: int, trials: int, rng: np.random.Generator, effect: float = 0.0):
    mu = rng.normal(0, 1, size=(trials, 1))
    if kind == "normal":
        ea, eb = rng.normal(size=(2, trials, n))
    elif kind == "skewed":
        ea, eb = rng.exponential(size=(2, trials, n))
    elif kind == "heavy-tailed":
        ea, eb = rng.standard_t(2, size=(2, trials, n))
    elif kind == "binary ties":
        p = rng.beta(0.3, 0.3, size=(trials, n))
        a = (rng.random((trials, n)) < p).astype(float)
        b = (rng.random((trials, n)) < p).astype(float)
        return a, b
    else:
        raise ValueError(f"unknown null family {kind!r}")
    return mu + ea + effect, mu + eb


def _binary_pairs(n: int, trials: int, rng: np.random.Generator, p_win: float, p_loss: float):
    u = rng.random((trials, n))
    d = np.where(u < p_win, 1.0, np.where(u < p_win + p_loss, -1.0, 0.0))
    return d


def engine_decisive(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The engine's superiority decision per trial (True = a winner was called), as in ``judge_comparison``."""
    d = a - b
    binary = np.all(np.isin(a, (0.0, 1.0)) & np.isin(b, (0.0, 1.0)), axis=1)
    out = np.zeros(len(d), dtype=bool)
    cont = ~binary
    if cont.any():
        dc = d[cont]
        p = sign_flip_test(dc)
        informative = (dc != 0).sum(1)
        out[cont] = (p < ALPHA) & (informative >= MIN_DECIDABLE)
    for i in np.flatnonzero(binary):
        w, l = int((d[i] > 0).sum()), int((d[i] < 0).sum())
        out[i] = (w + l >= MIN_DECIDABLE) and exact_sign_test(w, l) < ALPHA
    return out


def bootstrap_decisive(a: np.ndarray, b: np.ndarray, resamples: int = 999) -> np.ndarray:
    """The earlier rule: the 95% BCa paired-bootstrap interval excludes 0."""
    return np.array([paired_bootstrap(x, y, n_resamples=resamples, seed=i)["verdict"] != "tie"
                     for i, (x, y) in enumerate(zip(a, b))])


def noninferiority_decisive(d: np.ndarray, margin: float) -> np.ndarray:
    """The engine's non-inferiority 'favours' decision at the boundary (true mean difference = −margin): the
    one-sided sign-flip test for continuous d, exact Clopper–Pearson bounds for binary d ∈ {−1, 0, 1}."""
    if np.isin(d, (-1.0, 0.0, 1.0)).all():
        n = d.shape[1]
        return np.array([paired_binary_bounds(int((x > 0).sum()), int((x < 0).sum()), n)[0] > -margin for x in d])
    return sign_flip_test(d, shift=-margin, alternative="greater") < ALPHA


def calibration_rows(trials: int = 2000, seed: int = 0, ns=NS, before: bool = True,
                     before_trials: int = 300) -> list[dict]:
    """One row per (null family, test, n): decisive rate and its Monte-Carlo standard error."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind in ("normal", "skewed", "heavy-tailed", "binary ties"):
        for n in ns:
            a, b = _pairs(kind, n, trials, rng)
            rate = float(engine_decisive(a, b).mean())
            row = {"null": kind, "n": n, "trials": trials, "engine": rate,
                   "mc_se": float(np.sqrt(max(rate, ALPHA) * (1 - max(rate, ALPHA)) / trials))}
            if before and n >= 3:
                k = min(before_trials, trials)
                row["before"] = float(bootstrap_decisive(a[:k], b[:k]).mean())
                row["before_trials"] = k
            rows.append(row)
    for n in ns:
        d = rng.normal(-0.5, np.sqrt(2), size=(trials, n))
        rows.append({"null": "boundary NI (normal, margin 0.5)", "n": n, "trials": trials,
                     "engine": float(noninferiority_decisive(d, 0.5).mean())})
        d = _binary_pairs(n, trials, rng, 0.05, 0.15)
        rows.append({"null": "boundary NI (binary, margin 0.1)", "n": n, "trials": trials,
                     "engine": float(noninferiority_decisive(d, 0.1).mean())})
    for r in rows:
        r.setdefault("mc_se", float(np.sqrt(max(r["engine"], ALPHA) * (1 - max(r["engine"], ALPHA)) / r["trials"])))
    return rows


def power_rows(trials: int = 1000, seed: int = 1, ns=NS) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in ns:
        a, b = _pairs("normal", n, trials, rng, effect=1.0)
        rows.append({"effect": "normal, mean difference 1 (σ_d = √2)", "n": n,
                     "power": float(engine_decisive(a, b).mean())})
        d = _binary_pairs(n, trials, rng, 0.30, 0.05)
        rows.append({"effect": "binary, P(A>B) 0.30 vs P(A<B) 0.05", "n": n,
                     "power": float(engine_decisive((d > 0).astype(float), (d < 0).astype(float)).mean())})
    return rows


def calibration_table(trials: int = 2000) -> str:
    """Markdown: decisive rate under each null (engine vs the earlier bootstrap rule) and power."""
    rows = calibration_rows(trials)
    nulls = list(dict.fromkeys(r["null"] for r in rows))
    head = "| null (no true difference) | " + " | ".join(f"n = {n}" for n in NS) + " |"
    lines = [f"Decisive rate (a winner called) under the null, {trials} trials per cell; nominal 5%. "
             "`engine` = this engine; `before` = 95% BCa paired bootstrap (the earlier rule).", "",
             head, "|---|" + "---|" * len(NS)]
    for kind in nulls:
        cells = []
        for n in NS:
            r = next(x for x in rows if x["null"] == kind and x["n"] == n)
            cell = f"{100 * r['engine']:.1f}%"
            if "before" in r:
                cell += f" (before {100 * r['before']:.0f}%)"
            cells.append(cell)
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    pw = power_rows()
    lines += ["", "Power (decisive in the right direction or either; effect as stated):", "",
              "| effect | " + " | ".join(f"n = {n}" for n in NS) + " |", "|---|" + "---|" * len(NS)]
    for eff in dict.fromkeys(r["effect"] for r in pw):
        lines.append(f"| {eff} | " + " | ".join(f"{100 * next(r['power'] for r in pw if r['effect'] == eff and r['n'] == n):.0f}%"
                                                for n in NS) + " |")
    return "\n".join(lines)
