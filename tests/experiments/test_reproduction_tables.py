"""Every table of docs/reproduction.md that names its records is rebuilt from them exactly.

A table is tied to its source by an HTML comment on the line before it,
``<!-- curvlab summary docs/records/NAME.jsonl.gz [--at-train-loss X] -->``; this test runs the
same summary on the committed archive and compares the Markdown, row for row.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from curvlab.cli import summary_table

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reproduction.md"
SOURCE = re.compile(r"^<!-- curvlab summary (.+?) -->$")


def _tables() -> list[tuple[list[str], str]]:
    """``(command arguments, table text)`` of every sourced table of the page."""
    lines = PAGE.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        match = SOURCE.match(line.strip())
        if match:
            table = []
            for row in lines[i + 1 :]:
                if not row.startswith("|"):
                    break
                table.append(row)
            found.append((shlex.split(match.group(1)), "\n".join(table)))
    return found


def _paths(arguments: list[str]) -> list[str]:
    return (
        arguments[: arguments.index("--at-train-loss")]
        if "--at-train-loss" in arguments
        else arguments
    )


def _summary(arguments: list[str]) -> str:
    at = None
    if "--at-train-loss" in arguments:
        at = float(arguments[arguments.index("--at-train-loss") + 1])
    return summary_table([ROOT / p for p in _paths(arguments)], at)


TABLES = _tables()


def test_the_page_ties_its_result_tables_to_committed_records():
    assert TABLES, f"{PAGE} has no table sourced from docs/records"
    for arguments, _ in TABLES:
        for path in _paths(arguments):
            assert (ROOT / path).is_file(), f"{path} is not committed"
            assert (ROOT / path).stat().st_size < 2_000_000


@pytest.mark.parametrize(
    ("arguments", "table"), TABLES, ids=[" ".join(a) for a, _ in TABLES] or None
)
def test_a_table_equals_the_summary_of_its_records(arguments, table):
    assert table == _summary(arguments)
