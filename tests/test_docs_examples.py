"""Every Python code block of README.md and docs/*.md runs, and every relative link points somewhere real.

Each file's blocks fenced as ```python run in order in one namespace of their own, so a block may use what
the blocks before it in the same file defined (the README's third quickstart continues the second). They
run in a fresh temporary working directory, so files a block writes land there. A block that raises fails
the test of its file, naming the block's first line.

A block preceded by an HTML comment ``<!-- not run: <reason> -->`` (on its own line, right before the
fence; blank lines between are allowed) is skipped: ``NOT_RUN`` below lists every such block by file and
count, so adding one is a visible change to this test. Shell blocks (```bash) are never executed.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Blocks marked not run, per page: (page, how many). Each carries its reason in the page itself.
NOT_RUN = {
    "docs/scaling_out.md": 2,   # DDP and FSDP2: need a process group started by torchrun
}

FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN_MARK = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->\s*$")


def blocks(page: Path):
    """``(line, code, reason)`` for every ```python block of ``page``; ``reason`` is None for blocks that run."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").splitlines()
        mark = NOT_RUN_MARK.search(before[-1]) if before else None
        line = text.count("\n", 0, match.start()) + 2
        found.append((line, match.group(1), mark.group(1) if mark else None))
    return found


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


PAGES_WITH_CODE = [p for p in PAGES if blocks(p)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_name)
def test_the_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_example__"}
    for line, code, reason in blocks(page):
        if reason is not None:
            continue
        # Line numbers in a traceback are the page's own: the block is compiled at its place in the file.
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)


def test_the_not_run_blocks_are_few_and_listed(capsys):
    skipped = {_name(p): [(line, reason) for line, _, reason in blocks(p) if reason] for p in PAGES}
    skipped = {page: found for page, found in skipped.items() if found}
    with capsys.disabled():
        for page, found in skipped.items():
            for line, reason in found:
                print(f"\nnot run: {page}:{line}: {reason}", end="")
    assert {page: len(found) for page, found in skipped.items()} == NOT_RUN
    total = sum(len(blocks(p)) for p in PAGES)
    assert sum(NOT_RUN.values()) * 10 <= total, "blocks marked not run must stay rare"


def _anchors(page: Path) -> set:
    """GitHub's anchor for each heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    headings = re.findall(r"^#+\s+(.*)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"{_name(page)}: links to nothing: {broken}"
