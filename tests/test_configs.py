"""Every paper's params.yaml and paper.yaml load and validate (litgpt-style config test)."""
from pathlib import Path

import pytest

from shared.io import read_yaml
from shared.paths import PAPERS_DIR
from shared.reports import VERDICTS

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


def test_cskv_params_validate():
    from papers.cskv.stages import load_params

    p = load_params()
    assert p["window"] >= 0 and 0 < p["ablation"]["ratio"] < 1


def test_cskv_params_validation_rejects_bad_values(tmp_path):
    import yaml

    from papers.cskv.stages import load_params

    p = read_yaml(PAPERS_DIR / "cskv" / "params.yaml")
    p["window"] = -1
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(p))
    with pytest.raises(ValueError, match="window"):
        load_params(Path(bad))
    p["window"], p["eval"]["tasks"] = 32, ["trivia"]
    bad.write_text(yaml.safe_dump(p))
    with pytest.raises(ValueError, match="unknown task"):
        load_params(Path(bad))


def test_verdict_vocabulary_is_closed():
    assert "reproduced" in VERDICTS and "pending" in VERDICTS
