"""Every ``python`` code block of README.md and docs/*.md runs, and asserts something about its result.

The blocks of one file run in order and share one namespace, as a reader would paste them into one
session; each block is its own test (``README.md::block2@38``, the number and the Markdown line of
its fence), and a block run alone first runs the blocks above it. A block that cannot run here is
marked in the Markdown, on the line right before its fence, with an HTML comment that states why::

    <!-- snippet: skip (needs full Fashion-MNIST) -->

and is reported as skipped with that reason, never dropped silently. Blocks run in a temporary
working directory, so nothing they write lands in the repository. Tracebacks point at the Markdown
file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARKER = re.compile(r"^\s*<!--\s*snippet:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->\s*$")
OPENING_FENCE = re.compile(r"^```python\s*$")


@dataclass
class Block:
    """One ``python`` code block of a Markdown file."""

    path: Path
    index: int  # 1-based among the file's python blocks
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}::block{self.index}@{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """The ``python`` blocks of ``path`` in order, with their skip markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    number = 0
    while number < len(lines):
        if not OPENING_FENCE.match(lines[number]):
            number += 1
            continue
        start = number
        end = start + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{start + 1}: python block without a closing fence")
        previous = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = SKIP_MARKER.match(previous)
        code = "\n" * (start + 1) + "\n".join(lines[start + 1 : end]) + "\n"
        blocks.append(
            Block(path, len(blocks) + 1, start + 1, code, marker["reason"] if marker else None)
        )
        number = end + 1
    return blocks


BLOCKS = [block for path in FILES for block in extract_blocks(path)]


class _Session:
    """The shared namespace of one Markdown file and how far its blocks have run."""

    def __init__(self) -> None:
        self.namespace: dict = {"__name__": "__snippets__"}
        self.done = 0  # blocks run (or skipped) so far, in order
        self.failed: str | None = None


@pytest.fixture(scope="module")
def sessions() -> dict[Path, _Session]:
    return {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("snippets")


def test_extract_blocks_finds_python_blocks_and_their_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n\n"
        "<!-- snippet: skip (needs a GPU) -->\n\n```python\ny = 2\n```\n"
    )
    found = [(b.line, b.code.strip(), b.skip_reason) for b in extract_blocks(page)]
    assert found == [(3, "x = 1", None), (13, "y = 2", "needs a GPU")]


def test_markers_are_well_formed():
    """A comment that mentions ``snippet:`` but does not parse would silently run its block."""
    for path in FILES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "<!-- snippet" in line:
                assert SKIP_MARKER.match(line), f"{path}:{number}: malformed marker {line!r}"


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_snippet(block: Block, sessions, workdir, monkeypatch) -> None:
    monkeypatch.chdir(workdir)
    session = sessions.setdefault(block.path, _Session())
    blocks = [b for b in BLOCKS if b.path == block.path]
    for earlier in blocks[session.done : block.index]:
        if session.failed is not None:
            pytest.fail(f"not run: {session.failed} failed, and the blocks of a file run in order")
        session.done = earlier.index
        if earlier.skip_reason is not None:
            continue
        try:
            exec(compile(earlier.code, str(earlier.path), "exec"), session.namespace)  # noqa: S102
        except BaseException:
            session.failed = earlier.name
            raise
    if block.skip_reason is not None:
        pytest.skip(f"{block.name}: {block.skip_reason}")
    if session.failed is not None and session.failed != block.name:
        pytest.fail(f"not run: {session.failed} failed, and the blocks of a file run in order")
