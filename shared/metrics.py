"""The one home for the evaluation statistics every paper reports: each defined once, inputs validated up front.

Distribution metrics (torch, computed in fp32 over the last = vocabulary dimension ``V``; leading dims are positions):
    kl_divergence    KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)        p = exp(ref_logp), log q = log_softmax(logits)
    top1_agreement   1[argmax_v ref_v = argmax_v x_v]                 fraction of positions whose greedy token agrees
    token_nll        −log softmax(logits)_y                           NLL of target token y (``ignore_index`` skipped)

Uncertainty (numpy / scipy):
    wilson_interval     Wilson score interval for k successes out of n (scipy ``binomtest(...).proportion_ci``)
    exact_sign_test     paired binary outcomes: exact McNemar / sign test on the discordant pairs
    sign_flip_test      paired continuous differences: exact sign-flip permutation test (all 2ⁿ patterns, n ≤ 16;
                        a seeded Monte-Carlo permutation p-value above, valid by construction)
    paired_binary_bounds simultaneous exact bounds on P(A wins) − P(A loses) (margin tests of binary metrics)
    holm                Holm step-down adjustment of several p-values of one claim
    paired_bootstrap    BCa bootstrap interval — kept only to show how miscalibrated it is at small n
                        (``python -m shared.verdicts calibrate``); no verdict uses it
    paired_verdict_text one-line report of a paired_bootstrap result

Every function raises ``ValueError`` naming the bad value and the allowed range before computing anything.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Literal, Sequence

import numpy as np
import torch

Reduction = Literal["mean", "none", "sum"]
REDUCTIONS = ("mean", "none", "sum")
STATISTICS = {"mean": np.mean, "median": np.median}
# |logsumexp(ref_logp)| above this means ref_logp is not log-probabilities (e.g. raw logits were passed); loose enough
# for log-probs computed in bf16/fp16 and upcast.
LOGP_NORM_ATOL = 5e-2


# ----------------------------------------------------------------------------------------------------- validation

def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not allowed; use one of {REDUCTIONS}")


def _check_confidence(confidence: float) -> None:
    if not (isinstance(confidence, (int, float)) and 0.0 < float(confidence) < 1.0):
        raise ValueError(f"confidence={confidence!r} must be a number in the open interval (0, 1)")


def _as_float_dist(x: Any, name: str) -> torch.Tensor:
    """fp32 tensor [..., V] with V ≥ 1, at least one position, no NaN / +inf (−inf allowed: probability 0)."""
    t = torch.as_tensor(x)
    if not (t.is_floating_point()):
        raise ValueError(f"{name} must be a floating-point tensor [..., V], got dtype {t.dtype}")
    if t.dim() < 1 or t.shape[-1] < 1 or t.numel() == 0:
        raise ValueError(f"{name} must have shape [..., V] with V ≥ 1 and ≥ 1 position, got {tuple(t.shape)}")
    t = t.detach().float()
    if torch.isnan(t).any() or torch.isposinf(t).any():
        raise ValueError(f"{name} contains NaN or +inf; allowed values are finite or -inf")
    return t


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} shape {tuple(a.shape)} != {nb} shape {tuple(b.shape)}; they must be equal")


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    return x.mean() if reduction == "mean" else x.sum() if reduction == "sum" else x


# ---------------------------------------------------------------------------------------------- distribution metrics

def kl_divergence(ref_logp: Any, logits_or_logp: Any, *, reduction: Reduction = "mean") -> torch.Tensor:
    """KL(p ‖ q) of next-token distributions over the last (vocab) dim, in fp32.

        KL(p ‖ q) = Σ_v p_v (log p_v − log q_v),   p_v = exp(ref_logp_v),   log q = log_softmax(logits_or_logp)

    ``ref_logp`` must already be log-probabilities [..., V] (checked: |logsumexp| ≤ ``LOGP_NORM_ATOL``); the second
    argument may be raw logits or log-probs (log_softmax is idempotent on log-probs). Terms with p_v = 0 contribute 0.
    reduction: "mean" over all leading positions → scalar, "none" → [...], "sum" → scalar.
    """
    _check_reduction(reduction)
    ref = _as_float_dist(ref_logp, "ref_logp")
    x = _as_float_dist(logits_or_logp, "logits_or_logp")
    _check_same_shape(ref, x, "ref_logp", "logits_or_logp")
    norm = torch.logsumexp(ref, dim=-1).abs().max().item()
    if not norm <= LOGP_NORM_ATOL:
        raise ValueError(f"ref_logp must be log-probabilities: max |logsumexp(ref_logp, -1)| = {norm:.4g}, allowed "
                         f"≤ {LOGP_NORM_ATOL} (apply log_softmax to reference logits first)")
    logq = torch.log_softmax(x, dim=-1)
    p = ref.exp()
    kl = torch.where(p > 0, p * (ref - logq), torch.zeros_like(p)).sum(-1).clamp_min(0.0)
    return _reduce(kl, reduction)


def top1_agreement(ref_logits: Any, logits: Any, *, reduction: Reduction = "mean") -> torch.Tensor:
    """Greedy-token agreement 1[argmax_v ref_v = argmax_v x_v] per position (fp32 0/1); "mean" gives the fraction.

    Either argument may be logits or log-probs (argmax is invariant to log_softmax)."""
    _check_reduction(reduction)
    ref = _as_float_dist(ref_logits, "ref_logits")
    x = _as_float_dist(logits, "logits")
    _check_same_shape(ref, x, "ref_logits", "logits")
    return _reduce((ref.argmax(-1) == x.argmax(-1)).float(), reduction)


def token_nll(logits: Any, targets: Any, *, reduction: Reduction = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Negative log-likelihood of integer targets under logits [..., V], in fp32.

        NLL_i = −log softmax(logits_i)_{y_i} = logsumexp_v(logits_i,v) − logits_i,y_i

    Positions with ``targets == ignore_index`` are skipped: 0 under "none", excluded from "sum" and from the "mean"
    denominator (same as ``F.cross_entropy``). Other targets must lie in [0, V)."""
    _check_reduction(reduction)
    x = _as_float_dist(logits, "logits")
    y = torch.as_tensor(targets)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got dtype {y.dtype}")
    if tuple(y.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"targets shape {tuple(y.shape)} must equal logits shape without the vocab dim, "
                         f"{tuple(x.shape[:-1])}")
    y = y.long()
    V = x.shape[-1]
    keep = y != ignore_index
    bad = keep & ((y < 0) | (y >= V))
    if bad.any():
        raise ValueError(f"target {int(y[bad][0])} out of range: targets must be in [0, {V}) or ignore_index="
                         f"{ignore_index}")
    if reduction == "mean" and not keep.any():
        raise ValueError(f"all targets equal ignore_index={ignore_index}; 'mean' needs ≥ 1 scored position")
    logp = torch.log_softmax(x, dim=-1)
    nll = -logp.gather(-1, torch.where(keep, y, 0).unsqueeze(-1)).squeeze(-1)
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    if reduction == "mean":
        return nll.sum() / keep.sum()
    return _reduce(nll, reduction)


# ------------------------------------------------------------------------------------------------------ uncertainty

def wilson_interval(k: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion with k successes out of n trials.

        centre ± half = (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n),   p̂ = k/n,  z = Φ⁻¹((1+confidence)/2)

    Integer k: ``scipy.stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")``. A
    fractional k (per-case means over training seeds, summed over n cases) uses the same closed form; averaging
    Bernoulli outcomes over seeds can only lower the per-case variance, so the interval is conservative there."""
    from scipy.stats import binomtest, norm

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"n={n!r} must be an integer")
    if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)) or not math.isfinite(k):
        raise ValueError(f"k={k!r} must be a finite number")
    if n < 1:
        raise ValueError(f"n={n} must be ≥ 1")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be in [0, n={n}]")
    _check_confidence(confidence)
    if float(k).is_integer():
        ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=float(confidence), method="wilson")
        return float(ci.low), float(ci.high)
    z = float(norm.ppf((1 + float(confidence)) / 2))
    p = float(k) / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


# ---------------------------------------------------------------------------------------------- calibrated tests

#: below this many informative pairs a two-sided exact test at 5% cannot reject even when every pair agrees:
#: its smallest p-value is 2 · 2⁻ⁿ (n = 5: 0.0625, n = 6: 0.031)
MIN_DECIDABLE = 6
EXACT_FLIP_MAX_N = 16
MC_PERMUTATIONS = 1 << 16


def exact_sign_test(b: int, c: int) -> float:
    """Two-sided exact McNemar (sign) test of paired binary outcomes: ``b`` pairs where only A succeeds, ``c`` where
    only B does. Under H0 (no method effect) b ~ Binomial(b + c, ½); p = P(|X − m/2| ≥ |b − m/2|), m = b + c.
    Concordant pairs carry no information. Returns 1.0 when b + c = 0."""
    from scipy.stats import binomtest

    for name, v in (("b", b), ("c", c)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name}={v!r} must be a non-negative integer (a count of discordant pairs)")
    if b + c == 0:
        return 1.0
    return float(binomtest(int(b), int(b + c), 0.5).pvalue)


@functools.lru_cache(maxsize=64)
def _sign_patterns(n: int) -> np.ndarray:
    """[P, n] ±1: all 2ⁿ patterns for n ≤ EXACT_FLIP_MAX_N, else MC_PERMUTATIONS drawn with a fixed seed."""
    if n <= EXACT_FLIP_MAX_N:
        return (1 - 2 * ((np.arange(1 << n)[:, None] >> np.arange(n)) & 1)).astype(np.float64)
    return np.random.default_rng(0).choice(np.array([-1.0, 1.0]), size=(MC_PERMUTATIONS, n))


def sign_flip_test(d: Sequence[float] | np.ndarray, shift: float = 0.0,
                   alternative: Literal["two-sided", "greater", "less"] = "two-sided") -> float | np.ndarray:
    """Exact sign-flip permutation test of paired differences ``d`` (one per unit) against mean ``shift``.

        T = mean(d − shift);  under H0 the differences are symmetric about ``shift`` (methods exchangeable within a
        unit), so each of the 2ⁿ sign patterns of (d − shift) is equally likely; p = P(T* ≥ T) ("greater"),
        P(T* ≤ T) ("less"), P(|T*| ≥ |T|) ("two-sided"), T* over the patterns.

    All 2ⁿ patterns for n ≤ 16; above, 65,536 patterns drawn with a fixed seed and p = (1 + #{T* ≥ T}) / (1 + N),
    which is a valid (never anti-conservative) permutation p-value. Ties count as extreme (conservative).
    A 2-D ``d`` [trials, n] gives one p-value per row (the calibration simulations)."""
    x = np.asarray(d, dtype=np.float64) - float(shift)
    if x.ndim not in (1, 2) or x.shape[-1] < 1:
        raise ValueError(f"d must be a non-empty 1-D sequence of differences, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("d contains NaN/inf; every difference must be finite")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative={alternative!r}; use 'two-sided', 'greater' or 'less'")
    X = x[None] if x.ndim == 1 else x
    n = X.shape[1]
    signs = _sign_patterns(n)
    extra = 0 if n <= EXACT_FLIP_MAX_N else 1
    out = np.empty(len(X))
    for s in range(0, len(X), 32):
        chunk = X[s:s + 32]
        t_obs = chunk.mean(1)
        t = chunk @ signs.T / n                                    # [chunk, P]
        tol = 1e-12 * np.maximum(1.0, np.abs(chunk).max(1))
        if alternative == "greater":
            hits = (t >= (t_obs - tol)[:, None]).sum(1)
        elif alternative == "less":
            hits = (t <= (t_obs + tol)[:, None]).sum(1)
        else:
            hits = (np.abs(t) >= (np.abs(t_obs) - tol)[:, None]).sum(1)
        out[s:s + 32] = (hits + extra) / (len(signs) + extra)
    return float(out[0]) if x.ndim == 1 else out


def paired_binary_bounds(wins: int, losses: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Simultaneous (1 − alpha) bounds on P(A wins) − P(A loses) for n paired binary outcomes with ``wins`` pairs
    where only A succeeds and ``losses`` where only B does: Clopper–Pearson one-sided bounds at alpha/2 for each of
    the two discordant probabilities, combined (Bonferroni; exact, conservative). The margin tests of binary
    metrics (non-inferiority, equivalence) use these: the sign-flip test on shifted 0/±1 differences is not
    calibrated there (42% decisive at n = 5 in ``shared.calibration``)."""
    from scipy.stats import beta

    for name, v in (("wins", wins), ("losses", losses), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name}={v!r} must be a non-negative integer")
    if wins + losses > n or n < 1:
        raise ValueError(f"wins + losses = {wins + losses} must be ≤ n = {n} (n ≥ 1)")
    _check_confidence(1 - alpha)
    q = alpha / 2

    def lower(k):
        return 0.0 if k == 0 else float(beta.ppf(q, k, n - k + 1))

    def upper(k):
        return 1.0 if k == n else float(beta.ppf(1 - q, k + 1, n - k))

    return lower(wins) - upper(losses), upper(wins) - lower(losses)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error ≤ α when every adjusted p < α is called significant):
    sorted p₍ᵢ₎ → max_{j ≤ i} min(1, (k − j + 1) · p₍ⱼ₎), returned in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"pvalues must be a 1-D sequence in [0, 1], got {pvalues!r}")
    k = len(p)
    order = np.argsort(p, kind="stable")
    adj, running = np.empty(k), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p[i]))
        adj[i] = running
    return [float(v) for v in adj]


def _as_paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    for name, x in (("a", xa), ("b", xb)):
        if x.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one value per case), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN/inf; all values must be finite")
    if len(xa) != len(xb):
        raise ValueError(f"len(a)={len(xa)} != len(b)={len(xb)}; paired samples must have equal length")
    if len(xa) < 2:
        raise ValueError(f"n={len(xa)} cases; a paired bootstrap needs n ≥ 2")
    return xa, xb


def paired_bootstrap(a: Sequence[float], b: Sequence[float], statistic: Literal["mean", "median"] = "mean",
                     confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap CI of the difference stat(a) − stat(b) for two methods measured on the same cases (a[i], b[i]).

        diff = stat(a) − stat(b)   (for "mean": = (1/n) Σ_i (a_i − b_i));  cases are resampled jointly (paired=True)

    Uses ``scipy.stats.bootstrap((a, b), ..., paired=True, method="BCa")``, falling back to "percentile" when BCa is
    degenerate (NaN bounds / warnings); when all differences a_i − b_i are identical the interval is [diff, diff].
    Returns {"diff", "low", "high", "n", "confidence", "verdict", "method"}; verdict is "a>b" if low > 0, "a<b" if
    high < 0, else "tie" (inconclusive at this n)."""
    from scipy.stats import bootstrap

    xa, xb = _as_paired(a, b)
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r} is not allowed; use one of {tuple(STATISTICS)}")
    _check_confidence(confidence)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples!r} must be an integer ≥ 1")
    fn = STATISTICS[statistic]

    def stat_fn(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return fn(x, axis=axis) - fn(y, axis=axis)

    diff = float(stat_fn(xa, xb))
    d = xa - xb
    if np.all(d == d[0]):  # a shift a = b + c moves mean and median by exactly c: no sampling spread
        diff = low = high = float(d[0])  # exact, free of mean(a) − mean(b) rounding
        method = "degenerate"
    else:
        low = high = math.nan
        for method in ("BCa", "percentile"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ci = bootstrap((xa, xb), stat_fn, paired=True, vectorized=True, n_resamples=int(n_resamples),
                                   confidence_level=float(confidence), method=method,
                                   random_state=np.random.default_rng(seed)).confidence_interval
                except (ValueError, FloatingPointError):
                    continue
            low, high = float(ci.low), float(ci.high)
            if math.isfinite(low) and math.isfinite(high):
                break
        if not (math.isfinite(low) and math.isfinite(high)):  # every resample gave the same statistic
            low = high = diff
            method = "degenerate"
    verdict = "a>b" if low > 0 else "a<b" if high < 0 else "tie"
    return {"diff": diff, "low": low, "high": high, "n": int(len(xa)), "confidence": float(confidence),
            "verdict": verdict, "method": method}


def paired_verdict_text(result: dict[str, Any], name_a: str, name_b: str, metric: str, digits: int = 2) -> str:
    """One line, e.g. "CSKV − ASVD accuracy = +0.40 [0.20, 0.60] (95% paired bootstrap, n = 10)"; when the interval
    includes 0 it ends with "— inconclusive at n = 10"."""
    missing = {"diff", "low", "high", "n", "confidence", "verdict"} - set(result)
    if missing:
        raise ValueError(f"result is missing keys {sorted(missing)}; pass the dict returned by paired_bootstrap")
    if result["verdict"] not in ("a>b", "a<b", "tie"):
        raise ValueError(f"result['verdict']={result['verdict']!r} must be one of ('a>b', 'a<b', 'tie')")
    n, f = result["n"], f".{int(digits)}f"
    text = (f"{name_a} − {name_b} {metric} = {result['diff']:+{f}} [{result['low']:{f}}, {result['high']:{f}}] "
            f"({100 * result['confidence']:g}% paired bootstrap, n = {n})")
    return text + (f" — inconclusive at n = {n}" if result["verdict"] == "tie" else "")
