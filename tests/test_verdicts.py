"""Paired verdicts (shared/verdicts.py): exact statistics on constructed rows, seed consistency, breakpoints, and
the same verdicts under another CPU thread count on the real model."""
import pytest
import torch

from shared.verdicts import (average_over, breakpoint, combine, compare, noninferior, outcome, paired_claim,
                             per_case)


def _rows(label, values, seed=None, field="kl", **extra):
    return [{"label": label, "seed": seed, "task": "t", "length": 8, "protocol": "decode", "case": i,
             "correct": v > 0.5 if field == "kl" else v, field: v, "answer_nll": 0.0, "top1": 1.0, **extra}
            for i, v in enumerate(values)]


def test_compare_is_the_paired_mean_difference_with_an_interval():
    a = _rows("a", [0.1, 0.2, 0.3, 0.4, 0.5, 0.15, 0.25, 0.35])
    b = _rows("b", [0.6, 0.8, 0.7, 0.9, 1.0, 0.65, 0.75, 0.95])
    res = compare(a + b, {"label": "a"}, {"label": "b"}, "kl")
    assert res["diff"] == pytest.approx(sum(x["kl"] - y["kl"] for x, y in zip(a, b)) / 8)
    assert res["high"] < 0 and res["verdict"] == "a<b" and res["n"] == 8
    assert outcome(res, "a<b") == "reproduced" and outcome(res, "a>b") == "not reproduced"


def test_a_tie_is_inconclusive():
    a = _rows("a", [0.1, 0.9, 0.2, 0.8, 0.5, 0.4])
    b = _rows("b", [0.9, 0.1, 0.8, 0.2, 0.4, 0.5])
    res = compare(a + b, {"label": "a"}, {"label": "b"}, "kl")
    assert res["low"] < 0 < res["high"] and outcome(res, "a<b") == "inconclusive"
    c = paired_claim("c", a + b, {"label": "a"}, {"label": "b"}, "A", "B", {"kl": "a<b"})
    assert c["verdict"] == "inconclusive" and "inconclusive at n = 6" in c["ours"]


def test_seeds_that_disagree_make_a_significant_difference_inconclusive():
    b = _rows("b", [0.5] * 6)
    s0 = _rows("a", [0.1, 0.12, 0.11, 0.09, 0.1, 0.13], seed=0)     # far below b ...
    s1 = _rows("a", [0.6, 0.61, 0.62, 0.6, 0.63, 0.6], seed=1)      # ... but this seed is above it
    s2 = _rows("a", [0.1, 0.1, 0.1, 0.1, 0.1, 0.12], seed=2)
    res = compare(s0 + s1 + s2 + b, {"label": "a"}, {"label": "b"}, "kl")
    assert res["verdict"] == "a<b"                                   # the seed-mean per case is clearly lower
    assert set(res["per_seed"]) == {0, 1, 2} and res["per_seed"][1] > 0 and not res["seed_consistent"]
    assert outcome(res, "a<b") == "inconclusive"


def test_per_case_refuses_ambiguous_selections():
    rows = _rows("a", [0.1, 0.2], compression_ratio=0.5) + _rows("a", [0.3, 0.4], compression_ratio=0.8)
    with pytest.raises(ValueError, match="select more keys"):
        per_case(rows, {"label": "a"}, "kl")
    assert per_case(rows, {"label": "a", "compression_ratio": 0.8}, "kl")[("t", 8, "decode", 1)] == {None: 0.4}
    with pytest.raises(ValueError, match="no common cases"):
        compare(rows, {"label": "a", "compression_ratio": 0.5}, {"label": "zzz"}, "kl")
    with pytest.raises(ValueError, match="metric"):
        per_case(rows, {"label": "a"}, "bleu")


def test_average_over_ratios_gives_one_row_per_case_and_seed():
    rows = (_rows("a", [1.0, 0.0], field="correct", compression_ratio=0.2)
            + _rows("a", [0.0, 0.0], field="correct", compression_ratio=0.8)
            + _rows("full", [1.0, 1.0], field="correct"))
    for r in rows:
        r["kl"] = 0.0
    area = average_over(rows, "compression_ratio")
    assert sorted((r["label"], r["case"], r["correct"], r["points"]) for r in area) == [("a", 0, 0.5, 2),
                                                                                     ("a", 1, 0.0, 2)]


def test_breakpoint_is_the_last_ratio_before_the_first_failure():
    rows = [{"label": "m", "compression_ratio": r, "accuracy": a}
            for r, a in ((0.2, 1.0), (0.35, 0.95), (0.5, 0.7), (0.65, 0.95))]
    assert breakpoint(rows, "m", full_accuracy=1.0) == 0.35          # 0.65 recovers, but 0.5 already broke
    assert breakpoint(rows, "m", full_accuracy=1.0, frac=0.6) == 0.65
    assert breakpoint([{"label": "m", "compression_ratio": 0.2, "accuracy": 0.1}], "m", 1.0) is None
    with pytest.raises(ValueError):
        breakpoint(rows, "other", 1.0)
    with pytest.raises(ValueError):
        breakpoint(rows, "m", 1.0, frac=0)


def test_combine_and_noninferiority_rules():
    assert combine(["reproduced", "reproduced"]) == "reproduced"
    assert combine(["reproduced", "inconclusive"]) == "partially reproduced"
    assert combine(["reproduced", "not reproduced"]) == "not reproduced"
    assert combine(["inconclusive"]) == "inconclusive"
    base = {"seed_consistent": True}
    assert noninferior({**base, "low": -0.05, "high": 0.1}, 0.1) == "reproduced"
    assert noninferior({**base, "low": -0.4, "high": -0.2}, 0.1) == "not reproduced"
    assert noninferior({**base, "low": -0.3, "high": 0.0}, 0.1) == "inconclusive"


def test_verdicts_survive_another_thread_count(smollm):
    """CPU float order changes with the thread count (as it does between machines): per-case numbers move in the
    last digits, the paired verdicts must not."""
    from shared.cache.registry import build
    from shared.kv_eval import evaluate_task

    model, tok, _ = smollm
    methods = {f"{m}@{r}": build(m, r) for m in ("streaming_llm", "h2o") for r in (0.5, 0.9)}
    labels = {k: {"label": k.split("@")[0], "compression_ratio": float(k.split("@")[1])} for k in methods}
    labels["full"] = {"label": "full"}
    before = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _, cases = evaluate_task(model, tok, "passkey", 256, 6, 0, methods, batch_size=3, labels=labels,
                                     return_cases=True)
            runs[threads] = cases
    finally:
        torch.set_num_threads(before)
    a, b = runs[1], runs[2]
    assert [r["correct"] for r in a] == [r["correct"] for r in b]
    assert max(abs(x["kl"] - y["kl"]) for x, y in zip(a, b)) < 1e-3

    def verdicts(cases):
        out = []
        for r in (0.5, 0.9):
            for metric, expect in (("kl", "a<b"), ("accuracy", "a>b")):
                res = compare(cases, {"label": "h2o", "compression_ratio": r},
                              {"label": "streaming_llm", "compression_ratio": r}, metric)
                out.append(outcome(res, expect))
        return out

    assert verdicts(a) == verdicts(b)
