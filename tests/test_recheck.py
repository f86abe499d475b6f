"""The committed reports agree with the committed per-case results, and the READMEs' claims tables are the
generated ones: no hand-typed number can go stale."""
import pytest

from shared.paths import PAPERS_DIR, REPORTS_DIR
from shared.reports import readme_updates
from shared.verdicts import main as verdicts_main
from shared.verdicts import recheck

REPORTED = sorted(p.parent.name for p in PAPERS_DIR.glob("*/paper.yaml")
                  if (REPORTS_DIR / p.parent.name / "verdicts.json").is_file())


def test_every_paper_has_results_and_a_recheckable_report():
    """Every paper folder ships its committed per-case results and the report judged from them."""
    papers = {p.parent.name for p in PAPERS_DIR.glob("*/paper.yaml")}
    assert all(any((PAPERS_DIR / p / "results").glob("*.json")) for p in papers)
    assert set(REPORTED) == papers


@pytest.mark.parametrize("paper_id", REPORTED)
def test_report_verdicts_equal_the_verdicts_recomputed_from_results(paper_id):
    assert recheck(PAPERS_DIR / paper_id) == []


def test_recheck_cli_exits_zero_on_the_committed_results(capsys):
    assert verdicts_main(["recheck"]) == 0
    out = capsys.readouterr().out
    assert all(f"{p}: OK" in out for p in REPORTED)


def test_readme_claims_tables_are_generated_from_the_reports():
    stale = [str(path) for path, text in readme_updates().items() if path.read_text() != text]
    assert not stale, f"run `python -m shared.reports --readme`: stale claims tables in {stale}"
