"""README and docs/: every link resolves (a file that exists, a heading that is there), README stays short
and points at every doc, and the test command it shows is the one CI runs."""

import re
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set:
    """GitHub's anchor for each heading: lowercase, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"(?m)^#{1,6} (.+)$", page.read_text())
    return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}


def links(page: Path):
    text = re.sub(r"(?s)```.*?```", "", page.read_text())  # code blocks hold no links
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
            yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_names_a_file_and_heading_that_exist(page):
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target}: no such file"
        if anchor:
            assert anchor in anchors(file), f"{page.name}: {target}: no such heading in {file.name}"


def test_the_readme_is_short_and_reaches_every_doc_in_one_click():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    reached = {(ROOT / t.partition("#")[0]).resolve() for t in links(readme)}
    assert set(PAGES[1:]) <= reached, set(PAGES[1:]) - reached


def test_the_readme_test_command_is_the_one_ci_runs():
    assert "bash tests/run.sh\n" in (ROOT / "README.md").read_text()
    assert "bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()
