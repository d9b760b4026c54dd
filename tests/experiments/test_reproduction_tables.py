"""Every table of docs/reproduction.md and docs/optim_race.md that names its records is
rebuilt from them exactly.

A table is tied to its source by an HTML comment on the line before it,
``<!-- curvlab summary [--per-source] docs/records/NAME.jsonl.gz [--at-train-loss X | --at-test-acc A | --loss-change K] -->``;
this test runs the same summary on the committed archive and compares the Markdown, row for row.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from curvlab.cli import loss_change_table, per_source_table, summary_table
from curvlab.experiments.optim_race import time_to_accuracy_table
from curvlab.experiments.plots import split_source
from tests.experiments.sourced_tables import sourced_tables

ROOT = Path(__file__).resolve().parents[2]
PAGES = (ROOT / "docs" / "reproduction.md", ROOT / "docs" / "optim_race.md")
OPTIONS = ("--at-train-loss", "--at-test-acc", "--loss-change")
SOURCE = re.compile(r"^<!-- curvlab summary (.+?) -->$")


def _tables(page: Path) -> list[tuple[list[str], str]]:
    """``(command arguments, table text)`` of every sourced table of the page."""
    return [(shlex.split(command), table) for command, table in sourced_tables(page, SOURCE)]


def _paths(arguments: list[str]) -> list[str]:
    arguments = [a for a in arguments if a != "--per-source"]
    for option in OPTIONS:
        if option in arguments:
            return arguments[: arguments.index(option)]
    return arguments


def _summary(arguments: list[str]) -> str:
    paths = [ROOT / p for p in _paths(arguments)]
    if "--loss-change" in arguments:
        return loss_change_table(paths, int(arguments[arguments.index("--loss-change") + 1]))
    if "--at-test-acc" in arguments:
        return time_to_accuracy_table(paths, float(arguments[arguments.index("--at-test-acc") + 1]))
    at = None
    if "--at-train-loss" in arguments:
        at = float(arguments[arguments.index("--at-train-loss") + 1])
    if "--per-source" in arguments:
        return per_source_table(paths, at)
    return summary_table(paths, at)


TABLES = [table for page in PAGES for table in _tables(page)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_page_ties_its_result_tables_to_committed_records(page):
    tables = _tables(page)
    assert tables, f"{page} has no table sourced from docs/records"
    for arguments, _ in tables:
        for source in _paths(arguments):
            path, _ = split_source(ROOT / source)
            assert path.is_file(), f"{source} is not committed"
            assert path.stat().st_size < 2_000_000


@pytest.mark.parametrize(
    ("arguments", "table"), TABLES, ids=[" ".join(a) for a, _ in TABLES] or None
)
def test_a_table_equals_the_summary_of_its_records(arguments, table):
    assert table == _summary(arguments)
