"""LICENSE, CITATION.cff and README's "Citing" section say the same thing (issue 21).

CITATION.cff was validated against the CFF 1.2.0 schema with `cffconvert --validate` (cffconvert 2.0.0, in a
separate environment: it pins jsonschema < 4, so it is not a dependency of this project)."""

from ruamel.yaml import YAML

from tests.helpers import REPO


def citation() -> dict:
    return YAML(typ="safe", pure=True).load((REPO / "CITATION.cff").read_text())


def bibtex(paper: dict) -> str:
    """The BibTeX entry of a CFF `conference-paper` reference with an arXiv identifier."""
    first = paper["authors"][0]["family-names"].lower()
    (arxiv,) = [i["value"].removeprefix("arXiv:") for i in paper["identifiers"] if i["value"].startswith("arXiv:")]
    fields = {
        "title": paper["title"],
        "author": " and ".join(f"{a['family-names']}, {a['given-names']}" for a in paper["authors"]),
        "booktitle": paper["collection-title"],
        "year": paper["year"],
        "eprint": arxiv,
        "archivePrefix": "arXiv",
        "url": paper["url"],
    }
    lines = [f"  {name} = {{{value}}}," for name, value in fields.items()]
    return "\n".join([f"@inproceedings{{{first}{paper['year']}{paper['title'].split()[0].lower()},", *lines, "}"])


def test_readme_cites_the_preferred_citation():
    expected = f"```bibtex\n{bibtex(citation()['preferred-citation'])}\n```"
    assert expected in (REPO / "README.md").read_text(), f"README's Citing section should hold:\n{expected}"


def test_the_paper_has_its_five_authors_and_venue():
    paper = citation()["preferred-citation"]
    names = [f"{a['given-names']} {a['family-names']}" for a in paper["authors"]]
    assert names == ["Zhuo Ouyang", "Kaiwen Hu", "Qi Zhang", "Yifei Wang", "Yisen Wang"]  # arXiv 2503.00507's order
    assert paper["type"] == "conference-paper" and paper["year"] == 2025 and "ICLR 2025" in paper["conference"]["name"]


def test_licence_is_mit_in_both_files():
    text = (REPO / "LICENSE").read_text()
    assert citation()["license"] == "MIT" and text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the projector-ib contributors" in text
