"""Every relative link in README.md and docs/*.md leads somewhere: the file exists, and a
#fragment names a heading of that file, as GitHub writes a heading's anchor."""
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(page: Path) -> str:
    """A page's text without its code blocks (a `# comment` there is no heading, a `[x](y)` no link)."""
    return re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped,
    each space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(page: Path) -> set:
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page), re.M):
        anchor = github_anchor(heading)
        n = seen.get(anchor, 0)
        seen[anchor] = n + 1
        found.add(anchor if n == 0 else f"{anchor}-{n}")   # a repeated heading gets -1, -2, ...
    return found


def test_github_anchor_matches_githubs_own():
    # Anchors GitHub gives these headings (as its rendered pages link them).
    assert github_anchor("Tuned fairly: LNSR at a recipe tuned for MiniLM-L6 (in progress)") == \
        "tuned-fairly-lnsr-at-a-recipe-tuned-for-minilm-l6-in-progress"
    assert github_anchor("Which reading: LNSR's readings side by side, paired by seed") == \
        "which-reading-lnsrs-readings-side-by-side-paired-by-seed"
    assert github_anchor("On a GPU") == "on-a-gpu"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file_and_heading(page):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):                  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)
