"""The documentation holds together: every relative Markdown link points to an existing file, and the README
stays a page a newcomer scans in a minute."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_CHARS = 13_000
# Generated from the argparse parser by its own tool; may be linked before it is (re)generated.
GENERATED = {Path("docs/cli.md")}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
# [text](target "title") and ![alt](target); the target may be <wrapped in angle brackets>.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]+(?:\([^\s()]*\)[^\s()]*)*)")
# [label]: target   (a reference definition)
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files() -> list[Path]:
    names = ["README.md", "CONTRIBUTING.md", "MODEL_CARD.md"]
    return [ROOT / n for n in names] + sorted((ROOT / "docs").glob("*.md"))


def link_targets(markdown: str) -> list[str]:
    """Every link target in the text, outside fenced code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", markdown))
    targets = [m.group(1) for m in INLINE_LINK.finditer(text)] + [m.group(1) for m in REFERENCE.finditer(text)]
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in targets]


def link_problems(doc: Path, root: Path = ROOT) -> list[str]:
    """'doc: target (why)' for each relative link that has an anchor, leaves the repository or names no file."""
    problems = []
    for target in link_targets(doc.read_text(encoding="utf-8")):
        if SCHEME.match(target) or target.startswith("//") or target.startswith("#"):
            continue  # a URL (https:, mailto:, ...) or an anchor within the page
        where = doc.relative_to(root)
        if "#" in target:
            problems.append(f"{where}: {target} (a link to another file carries no anchor: headings get renamed)")
            continue
        resolved = (doc.parent / target.split("?")[0]).resolve()
        if not resolved.is_relative_to(root):
            problems.append(f"{where}: {target} (points outside the repository)")
        elif not resolved.is_file() and resolved.relative_to(root) not in GENERATED:
            problems.append(f"{where}: {target} (no such file)")
    return problems


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_name_existing_files(doc):
    if not doc.is_file():
        pytest.fail(f"{doc.relative_to(ROOT)} is missing")
    assert link_problems(doc) == []


def test_readme_is_short():
    size = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert size < README_MAX_CHARS, f"README.md has {size:,} characters; keep it under {README_MAX_CHARS:,}"


def test_link_check_catches_bad_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# There\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](docs/there.md) ![img](<docs/there.md>) [web](https://example.com/x.md) [here](#section)\n"
        "[gone](docs/missing.md) and [anchored](docs/there.md#there) and [out](../outside.md)\n"
        "[ref]: docs/also-missing.md\n"
        "`[code](docs/not-a-link.md)`\n"
        "```\n[fenced](docs/not-a-link-either.md)\n```\n",
        encoding="utf-8")
    problems = link_problems(doc, root=tmp_path)
    assert [p.split(" (")[0] for p in problems] == [
        "README.md: docs/missing.md", "README.md: docs/there.md#there", "README.md: ../outside.md",
        "README.md: docs/also-missing.md"]
