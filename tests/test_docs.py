"""The documentation's links and paths resolve, and the README stays short.

For README.md, benchmarks/README.md and every docs/**/*.md: each relative markdown link
`[text](path)` or `[text](path#anchor)` (images too) names a file or folder of the repo,
and its anchor a heading of the target page (GitHub's slugs); each repo path the text
names (`distillflow/...`, `stages/...`, `tests/...`, in prose or code) exists, unless it
holds a placeholder (`<name>`, `*`, `{...}`). A page that cites a moved module fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import ROOT

README_MAX_LINES = 250
# Top-level folders whose paths the docs name and a checkout has (outputs such as data/,
# metrics/ or reports/quality/ are made by a run, so they are not checked).
REPO_DIRS = ("distillflow", "stages", "flows", "tests", "benchmarks", "profiles", "docs", "constraints", "comparison")

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(REPO_DIRS) + r")/[\w./<>*{}$-]*)")
PLACEHOLDER = re.compile(r"[<>*{}$]")
NOT_PATHS = {"distillflow/nightly"}  # the Prefect deployment (flow name/deployment name) in prefect.yaml


def doc_pages(root: Path = ROOT) -> list[Path]:
    pages = [root / "README.md", root / "benchmarks" / "README.md"]
    return pages + sorted((root / "docs").rglob("*.md"))


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lowercased, with everything but
    letters, digits, `_`, `-` and spaces removed, and spaces turned into `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes for a page: one per heading (a repeated slug gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(page.read_text()):
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        n = seen.get(s, 0)
        seen[s] = n + 1
        found.add(s if n == 0 else f"{s}-{n}")
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of a page whose file, folder or anchor does not exist."""
    problems = []
    for number, line in prose_lines(page.read_text()):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            where = f"{page.relative_to(root)}:{number}: [{target}]"
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{where}: no such file or folder")
            elif root.resolve() not in (dest, *dest.parents):
                problems.append(f"{where}: outside the repository")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root.resolve())}")
    return problems


def missing_paths(page: Path, root: Path = ROOT) -> list[str]:
    """Each repo path a page names, in prose or in code, that does not exist (link
    targets are broken_links' to check: they are relative to the page)."""
    problems = []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        for token in PATH.findall(LINK_TARGET.sub("]", line)):
            token = token.rstrip(".")
            if PLACEHOLDER.search(token) or token in NOT_PATHS:
                continue
            if not (root / token).exists():
                problems.append(f"{page.relative_to(root)}:{number}: `{token}` does not exist")
    return problems


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_repo_path_exists(page: Path) -> None:
    assert missing_paths(page) == []


def test_the_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_the_checker_finds_a_broken_link_a_wrong_anchor_and_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "seed.py").write_text("")
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Data quality: gates, `curate`\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n"
        "[fine](docs/other.md#data-quality-gates-curate) and [here](#title), `stages/seed.py`, `stages/<name>.py`\n"
        "[gone](docs/missing.md)\n"
        "[wrong anchor](docs/other.md#no-such-heading)\n"
        "[web](https://example.com/x) `[not a link](nowhere.md)`\n"
        "```\n[in a code block](nowhere.md)\n```\n"
        "the stage module `stages/lib/seed.py` moved\n"
    )
    assert broken_links(page, tmp_path) == [
        "README.md:3: [docs/missing.md]: no such file or folder",
        "README.md:4: [docs/other.md#no-such-heading]: no heading with anchor #no-such-heading in docs/other.md",
    ]
    assert missing_paths(page, tmp_path) == ["README.md:9: `stages/lib/seed.py` does not exist"]


def test_slugs_follow_github() -> None:
    assert slug("Installing for GPUs (vLLM)") == "installing-for-gpus-vllm"
    assert slug("What happens in `dvc repro`") == "what-happens-in-dvc-repro"
    assert slug("Data quality: gates, curation, synthesis, scale") == "data-quality-gates-curation-synthesis-scale"
    assert slug("train.rounds and E") == "trainrounds-and-e"
