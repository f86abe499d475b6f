"""The claim engine (shared/verdicts.py): rules as data, exact tests chosen by the data, floors, Holm, seeds,
checks, provenance, recheck; the row helpers it reads (shared.kv_eval); verdicts stable under another thread count."""
import json
import subprocess

import pytest
import torch

from shared.kv_eval import average_over, breakpoint
from shared.verdicts import Check, Claim, Rule, judge_check, judge_claim, judge_rule, provenance, rule_text


def _rows(label, values, seed=None, field="kl", **extra):
    return [{"label": label, "seed": seed, "task": "t", "length": 8, "protocol": "decode", "case": i,
             "correct": float(v > 0.5) if field == "kl" else v, "kl": 0.0, "answer_nll": 0.0, "top1": 1.0,
             field: v, **extra}
            for i, v in enumerate(values)]


def _rule(**kw):
    base = {"file": "r.json", "unit": "case", "metric": "kl", "expect": "less",
            "compare": [{"name": "A vs B", "a": {"label": "a"}, "b": {"label": "b"}}]}
    return Rule.model_validate({**base, **kw})


def test_continuous_difference_uses_the_exact_sign_flip_test():
    a = _rows("a", [0.1, 0.2, 0.3, 0.4, 0.5, 0.15, 0.25, 0.35])
    b = _rows("b", [0.6, 0.8, 0.7, 0.9, 1.0, 0.65, 0.75, 0.95])
    got = judge_rule(_rule(), a + b)
    c = got["comparisons"][0]
    assert c["test"] == "exact sign-flip" and c["n"] == 8
    assert c["p"] == pytest.approx(2 / 2 ** 8)                     # every sign agrees: 2 of 256 patterns as extreme
    assert got["verdict"] == "reproduced"
    assert judge_rule(_rule(expect="greater"), a + b)["verdict"] == "not reproduced"


def test_five_agreeing_pairs_cannot_decide_and_say_so():
    a, b = _rows("a", [0.1] * 5), _rows("b", [0.9, 0.8, 0.7, 0.95, 0.85])
    got = judge_rule(_rule(), a + b)
    assert got["comparisons"][0]["outcome"] == "cannot decide"
    assert got["verdict"] == "inconclusive" and "cannot decide below n = 6" in got["label"]


def test_binary_outcomes_use_exact_mcnemar_on_discordant_pairs():
    # 4 of 20 discordant, all one way: p = 0.125, not decided (the bootstrap used to decide this)
    a = _rows("a", [1.0] * 4 + [0.0] * 16, field="correct")
    b = _rows("b", [0.0] * 20, field="correct")
    got = judge_rule(_rule(metric="accuracy", expect="greater"), a + b)
    c = got["comparisons"][0]
    assert c["test"] == "exact McNemar" and c["discordant"] == [4, 0] and c["outcome"] == "cannot decide"
    a = _rows("a", [1.0] * 7 + [0.0] * 13, field="correct")
    got = judge_rule(_rule(metric="accuracy", expect="greater"), a + b)
    assert got["comparisons"][0]["p"] == pytest.approx(2 / 2 ** 7) and got["verdict"] == "reproduced"


def test_both_sides_at_the_floor_are_untestable_not_inconclusive():
    a, b = _rows("a", [0.0] * 20, field="correct"), _rows("b", [0.0] * 20, field="correct")
    got = judge_rule(_rule(metric="accuracy", expect="greater", also={"kl": "less"}), a + b)
    assert got["verdict"] == "untestable here" and "floor" in got["text"]
    full = _rows("full", [0.0] * 20, field="correct")
    a = _rows("a", [1.0] * 10 + [0.0] * 10, field="correct")
    got = judge_rule(_rule(metric="accuracy", expect="greater", floor={"label": "full"}), a + b + full)
    assert got["verdict"] == "untestable here" and "cannot do the task" in got["text"]


def test_holm_over_several_comparisons_and_partial_verdicts():
    rows = _rows("a", [0.1] * 8) + _rows("b", [0.9, 0.8, 0.7, 0.95, 0.85, 0.9, 0.8, 0.7]) \
        + _rows("c", [0.0, 0.01, 0.02, 0.0, 0.01, 0.03, 0.02, 0.01])
    rule = _rule(compare=[{"name": "a vs b", "a": {"label": "a"}, "b": {"label": "b"}},
                          {"name": "a vs c", "a": {"label": "a"}, "b": {"label": "c"}}])
    got = judge_rule(rule, rows)
    assert [c["outcome"] for c in got["comparisons"]] == ["favours", "against"]
    assert got["verdict"] == "partially reproduced"
    assert all(c["p_holm"] == pytest.approx(2 * 2 / 2 ** 8) for c in got["comparisons"])


def test_seeds_that_disagree_make_a_significant_difference_undecided():
    b = _rows("b", [0.5] * 8)
    s0 = _rows("a", [0.1, 0.12, 0.11, 0.09, 0.1, 0.13, 0.1, 0.1], seed=0)
    s1 = _rows("a", [0.6, 0.61, 0.62, 0.6, 0.63, 0.6, 0.6, 0.6], seed=1)
    s2 = _rows("a", [0.1] * 8, seed=2)
    got = judge_rule(_rule(), s0 + s1 + s2 + b)
    c = got["comparisons"][0]
    assert c["outcome"] == "undecided" and "seeds disagree" in c["why"] and c["per_seed"][1] > 0
    assert got["verdict"] == "inconclusive"


def test_binary_noninferiority_uses_exact_bounds_per_seed():
    full = _rows("full", [1.0] * 60, field="correct")
    good = [r for s in (0, 1) for r in _rows("a", [1.0] * 59 + [0.0], seed=s, field="correct")]
    rule = _rule(metric="accuracy", expect="greater", test="noninferiority", margin=0.1,
                 compare=[{"name": "a vs full", "a": {"label": "a"}, "b": {"label": "full"}}])
    assert judge_rule(rule, good + full)["verdict"] == "reproduced"
    bad = _rows("a", [1.0] * 30 + [0.0] * 30, seed=0, field="correct")
    assert judge_rule(rule, bad + full)["verdict"] == "not reproduced"
    few = _rows("a", [1.0] * 19 + [0.0], field="correct")          # n = 20 cannot show a 0.1 margin
    assert judge_rule(rule, few + full[:20])["verdict"] == "inconclusive"


def test_superiority_margin_on_a_continuous_metric():
    a = _rows("a", [1.0, 1.1, 0.9, 1.2, 1.0, 1.05], field="answer_nll")
    b = _rows("b", [0.0] * 6, field="answer_nll")
    rule = _rule(metric="answer_nll", expect="greater", margin=0.6931)
    assert judge_rule(rule, a + b)["verdict"] == "reproduced"
    assert judge_rule(_rule(metric="answer_nll", expect="greater", margin=1.5), a + b)["verdict"] == "not reproduced"


def test_rules_are_validated_and_rendered_from_data():
    with pytest.raises(ValueError, match="margin"):
        _rule(test="noninferiority")
    with pytest.raises(ValueError, match="unit"):
        _rule(unit="sample")
    with pytest.raises(ValueError, match="extra"):
        _rule(bogus=1)
    with pytest.raises(ValueError, match="no common"):
        judge_rule(_rule(), _rows("a", [0.1]) + _rows("zzz", [0.2]))
    text = rule_text(_rule(also={"answer_nll": "less"}, floor={"label": "full"}))
    assert "kl lower" in text and "answer_nll lower" in text and "floor" in text and "cases" in text


def test_selectors_pick_the_last_step_and_compare_two_fields():
    rows = [{"seed": s, "step": st, "budget": 0.375, "kl": 1.0 - 0.1 * st - 0.01 * s} for s in range(6)
            for st in (0, 5)]
    rule = _rule(rows="rows", unit="seed", compare=[{"name": "after vs before", "a": {"step": "$max"},
                                                    "b": {"step": 0}}])
    got = judge_rule(rule, rows)
    assert got["comparisons"][0]["n"] == 6 and got["comparisons"][0]["diff"] == pytest.approx(-0.5)
    assert got["verdict"] == "reproduced"
    split = [{"seed": s, "budget": 0.375, "value_fraction": 0.5, "key_fraction": 0.3} for s in range(3)]
    rule = _rule(rows="rows", unit="seed", metric="value_fraction", expect="greater",
                 compare=[{"name": "v vs k", "a": {}, "b": {}, "metric_b": "key_fraction"}])
    got = judge_rule(rule, split)
    assert got["comparisons"][0]["outcome"] == "cannot decide" and got["comparisons"][0]["diff"] == pytest.approx(0.2)


def test_checks_and_claims_judged_from_result_files():
    results = {"r.json": {"cases": _rows("a", [0.1] * 8) + _rows("b", [0.9] * 8),
                          "rows": [{"budget": 1.0, "kl": 1e-7}, {"budget": 1.0, "kl": 2e-6}]}}
    check = Check.model_validate({"id": "x", "what": "exact", "file": "r.json", "where": {"budget": 1.0},
                                  "field": "kl", "op": "<=", "value": 1e-5})
    assert judge_check(check, results)["passed"]
    check = check.model_copy(update={"value": 1e-6})
    assert not judge_check(check, results)["passed"]
    claim = Claim.model_validate({"id": "c", "claim": "a < b", "rule": _rule().model_dump(),
                                  "revised": [{"commit": "abc1234", "reason": "margin added after the run",
                                               "rule": _rule(expect="greater").model_dump()}]})
    got = judge_claim(claim, results)
    assert got["verdict"] == "reproduced" and got["earlier"][0]["verdict"] == "not reproduced"
    with pytest.raises(FileNotFoundError):
        judge_claim(claim, {})


def test_provenance_finds_the_rule_commit_and_flags_a_rule_revised_after_results(tmp_path):
    def git(*a):
        subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t"), git("config", "user.name", "t")
    folder = tmp_path / "papers" / "p"
    (folder / "results").mkdir(parents=True)

    def write_rule(expect):
        import yaml
        claim = {"id": "c", "claim": "x", "rule": {**_rule(expect=expect).model_dump(exclude_defaults=True),
                                                  "compare": [{"name": "A vs B", "a": {"label": "a"},
                                                               "b": {"label": "b"}}]}}
        (folder / "paper.yaml").write_text(yaml.safe_dump({"claims": [claim]}))
        return Claim.model_validate(claim)

    c = write_rule("less")
    git("add", "-A"), git("commit", "-qm", "rule")
    (folder / "results" / "r.json").write_text(json.dumps({"cases": []}))
    git("add", "-A"), git("commit", "-qm", "data")
    pv = provenance(folder, [c])["c"]
    assert pv["rule_commit"] not in ("uncommitted", None) and not pv["revised_after_results"]
    c = write_rule("greater")
    assert provenance(folder, [c])["c"]["rule_commit"] == "uncommitted"
    git("add", "-A"), git("commit", "-qm", "rule changed after the data")
    assert provenance(folder, [c])["c"]["revised_after_results"]


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


def test_verdicts_survive_another_thread_count(smollm):
    """CPU float order changes with the thread count (as it does between machines): per-case numbers move in the
    last digits, the verdicts must not."""
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
            for metric, expect in (("kl", "less"), ("accuracy", "greater")):
                rule = _rule(metric=metric, expect=expect,
                             compare=[{"name": "h2o vs sllm", "a": {"label": "h2o", "compression_ratio": r},
                                       "b": {"label": "streaming_llm", "compression_ratio": r}}])
                out.append(judge_rule(rule, cases)["label"])
        return out

    assert verdicts(a) == verdicts(b)


def test_summary_counts_cases_not_case_times_seed():
    from shared.kv_eval import summarize
    from shared.metrics import wilson_interval

    rows = []
    for seed, outcomes in ((0, [1, 1, 0, 0]), (1, [1, 0, 0, 0]), (2, [1, 1, 1, 0])):
        rows += [{"label": "m", "seed": seed, "task": "t", "length": 8, "protocol": "decode", "case": i,
                  "correct": c, "kl": 0.1 * seed, "answer_nll": 0.0, "top1": 1.0, "bytes": 1, "full_bytes": 2}
                 for i, c in enumerate(outcomes)]
    (row,) = summarize(rows, ("label",))
    assert row["n"] == 4 and row["seeds"] == 3                  # 4 cases, not 12 evaluations
    assert row["accuracy"] == pytest.approx(6 / 12)
    lo, hi = row["ci95"]
    assert (lo, hi) == pytest.approx(wilson_interval(2, 4))      # k = 1 + 2/3 + 1/3 + 0 = 2 (a whole number here)
    assert row["accuracy_seed_range"] == [0.25, 0.75]
    with pytest.raises(ValueError):
        wilson_interval(5.5, 4)
    lo2, hi2 = wilson_interval(1.5, 4)                           # fractional k: same closed form
    assert lo2 < 1.5 / 4 < hi2 and lo2 > wilson_interval(1, 4)[0]


def test_a_failure_the_reference_does_not_show_makes_the_claim_untestable_not_a_pass():
    """`exercised`: LM-Infinite's C1 is only a test where vanilla itself degrades past its window."""
    lam = _rows("lam_late", [0.1] * 8) + _rows("lam_early", [0.1] * 8)
    flat = _rows("van_late", [0.11] * 8) + _rows("van_early", [0.1] * 8)       # vanilla rises 0.01 < 0.05
    rises = _rows("van_late", [0.5] * 8) + _rows("van_early", [0.1] * 8)      # vanilla rises 0.4
    rule = _rule(test="noninferiority", margin=0.05,
                 compare=[{"name": "Λ late vs early", "a": {"label": "lam_late"}, "b": {"label": "lam_early"}}],
                 exercised={"name": "vanilla late vs early", "a": {"label": "van_late"}, "b": {"label": "van_early"},
                            "expect": "greater", "margin": 0.05, "why": "failure not exercised at 2×"})
    got = judge_rule(rule, lam + flat)
    assert got["verdict"] == "untestable here" and "failure not exercised at 2×" in got["text"]
    assert judge_rule(rule, lam + rises)["verdict"] == "reproduced"
    assert "untestable unless vanilla late vs early" in rule_text(rule)
