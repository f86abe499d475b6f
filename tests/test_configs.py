"""Every paper's params.yaml and paper.yaml load and validate (litgpt-style config test)."""
from pathlib import Path

import pytest

from shared.io import read_yaml
from shared.paths import PAPERS_DIR
from shared.verdicts import VERDICTS, load_paper

PAPERS = sorted(p.parent.name for p in PAPERS_DIR.glob("*/paper.yaml"))


def test_there_is_at_least_one_paper():
    assert "cskv" in PAPERS


@pytest.mark.parametrize("paper_id", PAPERS)
def test_paper_yaml_has_claims_with_ids_and_sources(paper_id):
    paper = read_yaml(PAPERS_DIR / paper_id / "paper.yaml")
    assert paper["title"] and paper.get("bibtex")
    ids = [c["id"] for c in paper["claims"]]
    assert len(ids) == len(set(ids)) > 0
    for c in paper["claims"]:
        assert c["claim"] and c["table"] and "paper" in c


@pytest.mark.parametrize("paper_id", PAPERS)
def test_paper_folder_is_complete_and_self_contained(paper_id):
    folder = PAPERS_DIR / paper_id
    for name in ("README.md", "params.yaml", "dvc.yaml", "paper.yaml"):
        assert (folder / name).is_file(), f"papers/{paper_id}/{name} missing"
    for py in folder.glob("*.py"):
        text = py.read_text()
        for other in PAPERS:
            if other != paper_id:
                assert f"papers.{other}" not in text, f"{py} imports another paper folder ({other})"


def _paper(paper_id):
    import importlib

    return importlib.import_module(f"papers.{paper_id}.stages").paper


@pytest.mark.parametrize("paper_id", PAPERS)
def test_params_validate_with_the_runner(paper_id):
    p = _paper(paper_id).load_params()
    assert p.seed == 0 and p.model


@pytest.mark.parametrize("paper_id", PAPERS)
def test_unknown_param_key_is_rejected(paper_id, tmp_path):
    import yaml

    p = read_yaml(PAPERS_DIR / paper_id / "params.yaml")
    p["sede"] = 1                                   # a typo must not fall back to a default silently
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(p))
    with pytest.raises(ValueError, match=r"sede: unknown parameter"):
        _paper(paper_id).load_params(bad)


@pytest.mark.parametrize("path,value,match", [
    (("window",), -1, r"window = -1: Input should be greater than or equal to 0"),
    (("eval", "tasks"), ["trivia"], "unknown task"),
    (("methods", "snapkv", "windw_size"), 8, r"has no parameter\(s\) \['windw_size'\]"),
    (("methods", "h2o", "method"), "h3o", "unknown KV method 'h3o'"),
    (("table1", "methods"), ["cskv", "nope"], r"\['nope'\] are not defined"),
    (("ablation", "compression_ratio"), 1.0, "compression_ratio = 1.0"),
])
def test_cskv_params_validation_names_key_value_and_rule(tmp_path, path, value, match):
    import yaml

    p = read_yaml(PAPERS_DIR / "cskv" / "params.yaml")
    node = p
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(p))
    with pytest.raises(ValueError, match=match):
        _paper("cskv").load_params(Path(bad))


def test_verdict_vocabulary_is_closed():
    assert VERDICTS == ("reproduced", "partially reproduced", "not reproduced", "inconclusive", "untestable here")


@pytest.mark.parametrize("paper_id", PAPERS)
def test_every_claim_carries_its_rule_as_data(paper_id):
    _, claims, checks = load_paper(PAPERS_DIR / paper_id)
    assert claims and all(c.rule is not None or c.fn for c in claims)
    assert all(c.rule.file.endswith(".json") for c in claims if c.rule)


def test_matryoshka_params_validate():
    p = _paper("matryoshka_kv").load_params()
    assert set(p.eval.choice.budgets) <= set(p.search.budgets)


@pytest.mark.parametrize("path,value,match", [
    (("eval", "budgets"), [1.0, 1.5], "budget"),
    (("eval", "methods"), ["pca_uniform", "h2o"], r"\['h2o'\] are not defined"),
    (("eval", "budgets"), [1.0, 0.625], "no searched ranks"),
    (("search", "budgets"), [0.0], "budget"),
])
def test_matryoshka_params_reject_bad_values(tmp_path, path, value, match):
    import yaml

    p = read_yaml(PAPERS_DIR / "matryoshka_kv" / "params.yaml")
    p[path[0]][path[1]] = value
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(p))
    with pytest.raises(ValueError, match=match):
        _paper("matryoshka_kv").load_params(f)


def test_matryoshka_rules_in_paper_yaml_judge_constructed_results():
    """MatryoshkaKV's claims as written in its paper.yaml, judged on constructed result files."""
    from shared.verdicts import judge_claim

    _, claims, _ = load_paper(PAPERS_DIR / "matryoshka_kv")
    by = {c.id: c for c in claims}

    def cases(label, budget, nll, kls, seeds=(None,), shift=0.0):
        return [{"label": label, "budget": budget, "seed": sd, "task": "lm", "length": 8, "protocol": None,
                 "case": i, "correct": False, "kl": k + shift * j, "answer_nll": n + k, "top1": 1.0}
                for j, sd in enumerate(seeds) for i, (n, k) in enumerate(zip(nll, kls))]

    base = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 0.8, 1.0]
    lm = (cases("full", 1.0, base, [0.0] * 8) + cases("pca_uniform", 0.5, base, [k * 1.5 for k in base])
          + cases("pca_uniform", 0.375, base, [k * 2 for k in base])
          + cases("mkv_uniform", 0.5, base, [k * 0.3 for k in base], (0, 1, 2), 0.01)
          + cases("mkv_uniform", 0.375, base, [k * 0.5 for k in base], (0, 1, 2)))
    results = {"lm.json": {"cases": lm}}
    assert judge_claim(by["pca_collapse"], results)["verdict"] == "reproduced"       # NLL up by > ln 2 per seq
    assert judge_claim(by["mkv_beats_pca"], results)["verdict"] == "reproduced"

    def choice(label, budget, correct, seed=None):
        return [{"label": label, "budget": budget, "seed": seed, "task": "choice", "length": None, "protocol": None,
                 "case": i, "correct": float(c), "kl": 0.0, "answer_nll": 0.0, "top1": 0.0}
                for i, c in enumerate(correct)]

    full = [i % 2 == 0 for i in range(50)]
    worse = choice("mkv_searched", 0.375, [c and i % 10 == 0 for i, c in enumerate(full)], seed=0)
    got = judge_claim(by["mkv_holds_375"], {"choice.json": {"cases": choice("full", 1.0, full) + worse}})
    assert got["verdict"] == "not reproduced"
    same = choice("mkv_searched", 0.375, full, seed=0)
    got = judge_claim(by["mkv_holds_375"], {"choice.json": {"cases": choice("full", 1.0, full) + same}})
    assert got["verdict"] == "inconclusive"      # identical on 50 items: exact bounds ±0.07 > margin 0.1 × 0.5
