"""The docs cannot go stale silently: the module map matches the package, and every relative
link in the README and docs/ points at a file that exists. No Ray, well under a second."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

DOCS = sorted((REPO / "docs").glob("*.md"))
MODULE = re.compile(r"`(raycls/[\w/]+\.py)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def module_map() -> str:
    """The "## Module map" section of docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("\n## Module map\n", 1)
    assert len(section) == 2, "docs/architecture.md has no '## Module map' section"
    return section[1].split("\n## ", 1)[0]


def test_the_module_map_lists_every_module_and_only_modules_that_exist():
    listed = [m for line in module_map().splitlines() if line.startswith("| `raycls/") for m in MODULE.findall(line)[:1]]
    actual = {p.relative_to(REPO).as_posix() for p in (REPO / "raycls").rglob("*.py")}
    assert len(listed) == len(set(listed)), f"listed twice: {sorted({m for m in listed if listed.count(m) > 1})}"
    missing, gone = actual - set(listed), set(listed) - actual
    assert not missing, f"modules missing from the module map in docs/architecture.md: {sorted(missing)}"
    assert not gone, f"the module map in docs/architecture.md lists modules that do not exist: {sorted(gone)}"


def test_every_module_in_the_map_says_what_it_owns():
    for line in module_map().splitlines():
        if line.startswith("| `raycls/"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert len(cells) >= 2 and cells[1], f"no description: {line}"


def relative_links(path: Path) -> list[str]:
    """Link targets in a Markdown file that are neither URLs nor anchors, outside code blocks."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_every_relative_link_in_the_readme_and_docs_points_at_a_file():
    assert DOCS, "no docs/*.md"
    broken = []
    for path in [REPO / "README.md", *DOCS]:
        for target in relative_links(path):
            if not (path.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_the_readme_links_every_docs_page_and_stays_short():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = {t.split("#", 1)[0] for t in relative_links(REPO / "README.md")}
    assert not [f"docs/{p.name}" for p in DOCS if f"docs/{p.name}" not in linked], "a docs page the README never links"
    assert len(readme.splitlines()) <= 250, "the README is a front page: depth goes in docs/"
