"""Citation and licence metadata: CITATION.cff (CFF 1.2.0), LICENSE (Apache-2.0) and each paper's "## Citation"."""
from __future__ import annotations

import datetime as dt
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CFF = ROOT / "CITATION.cff"
PAPER_READMES = sorted((ROOT / "papers").glob("*/README.md"))


@pytest.fixture(scope="module")
def cff() -> dict:
    # BaseLoader keeps every scalar a string, so the date check below sees the text as written.
    data = yaml.load(CFF.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    assert isinstance(data, dict)
    return data


def test_cff_validates_against_schema_1_2_0():
    """cffconvert's bundled CFF 1.2.0 JSON schema (offline); an invalid licence id must be rejected."""
    import jsonschema
    from cffconvert import Citation

    text = CFF.read_text(encoding="utf-8")
    citation = Citation(text)
    assert citation.cffversion == "1.2.0"
    citation.validate()  # raises on any schema violation
    bad = Citation(text.replace("license: Apache-2.0", "license: Apache 2"))
    with pytest.raises(jsonschema.ValidationError):
        bad.validate()


def test_cff_required_keys_and_values(cff):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert cff["cff-version"] == "1.2.0"
    assert "cite" in cff["message"] and "paper" in cff["message"]
    assert cff["title"] == "Reprise: reproducible reference implementations of efficient-LLM papers"
    assert cff["type"] == "software"
    assert cff["authors"] and all(a.get("name") or a.get("family-names") for a in cff["authors"])
    assert cff["license"] == "Apache-2.0" == pyproject["license"]
    assert cff["version"] == pyproject["version"]
    dt.date.fromisoformat(cff["date-released"])
    assert cff["abstract"].strip() and cff["keywords"]
    assert "repository-code" not in cff  # no URL we cannot verify


def test_license_is_apache_2_0():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.strip().splitlines()]
    assert lines[:2] == ["Apache License", "Version 2.0, January 2004"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text
    assert lines[-1] == "limitations under the License."
    assert len(lines) > 190  # the full text, not a stub
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["license"] == "Apache-2.0"


def _citation_section(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    m = re.search(r"^## Citation[ \t]*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert m, f"{readme.relative_to(ROOT)} has no '## Citation' section"
    return m.group(1)


def test_paper_readmes_cite_with_unique_bibtex_keys():
    assert PAPER_READMES, "no papers/*/README.md found"
    keys: dict[str, str] = {}
    for readme in PAPER_READMES:
        section = _citation_section(readme)
        entries = re.findall(r"@(\w+)\s*\{\s*([^,\s]+)\s*,", section)
        where = str(readme.relative_to(ROOT))
        assert entries, f"{where}: no BibTeX entry in '## Citation'"
        for _kind, key in entries:
            assert key not in keys, f"BibTeX key {key!r} in {where} duplicates {keys[key]}"
            keys[key] = where
        assert "CITATION.cff" in section, f"{where}: '## Citation' does not say how to cite the implementation"
