"""Every table of docs/reproduction.md and docs/optim_race.md that names its records is
rebuilt from them exactly.

A table is tied to its source by an HTML comment on the line before it,
``<!-- curvlab summary [--per-source] docs/records/NAME.jsonl.gz [--at-train-loss X | --at-test-acc A | --loss-change K] [--at-step N] -->``
(a source may be ``A#OPT,OPT`` and, with ``--per-source``, ``A+B``); this test runs the same
summary on the committed archives and compares the Markdown, row for row.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from curvlab.cli import loss_change_table, per_source_table, summary_table
from curvlab.experiments.optim_race import time_to_accuracy_table
from curvlab.experiments.plots import JOIN, split_source
from tests.experiments.sourced_tables import sourced_tables

ROOT = Path(__file__).resolve().parents[2]
PAGES = (ROOT / "docs" / "reproduction.md", ROOT / "docs" / "optim_race.md")
OPTIONS = ("--at-train-loss", "--at-test-acc", "--loss-change", "--at-step")
SOURCE = re.compile(r"^<!-- curvlab summary (.+?) -->$")


def _tables(page: Path) -> list[tuple[list[str], str]]:
    """``(command arguments, table text)`` of every sourced table of the page."""
    return [(shlex.split(command), table) for command, table in sourced_tables(page, SOURCE)]


def _paths(arguments: list[str]) -> list[str]:
    """The sources: the arguments before the first option, ``--per-source`` aside."""
    arguments = [a for a in arguments if a != "--per-source"]
    ends = [arguments.index(option) for option in OPTIONS if option in arguments]
    return arguments[: min(ends, default=len(arguments))]


def _value(arguments: list[str], option: str, kind: type) -> float | int | None:
    return kind(arguments[arguments.index(option) + 1]) if option in arguments else None


def _summary(arguments: list[str]) -> str:
    # every part of an A+B source relative to the repository
    paths = [Path(JOIN.join(str(ROOT / p) for p in s.split(JOIN))) for s in _paths(arguments)]
    at_step = _value(arguments, "--at-step", int)
    if "--loss-change" in arguments:
        return loss_change_table(paths, _value(arguments, "--loss-change", int), at_step)
    if "--at-test-acc" in arguments:
        return time_to_accuracy_table(paths, _value(arguments, "--at-test-acc", float))
    at = _value(arguments, "--at-train-loss", float)
    if "--per-source" in arguments:
        return per_source_table(paths, at)
    return summary_table(paths, at, at_step)


TABLES = [table for page in PAGES for table in _tables(page)]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_page_ties_its_result_tables_to_committed_records(page):
    tables = _tables(page)
    assert tables, f"{page} has no table sourced from docs/records"
    for arguments, _ in tables:
        for source in _paths(arguments):
            for part in source.split(JOIN):
                path, _ = split_source(ROOT / part)
                assert path.is_file(), f"{part} is not committed"
                assert path.stat().st_size < 2_000_000


@pytest.mark.parametrize(
    ("arguments", "table"), TABLES, ids=[" ".join(a) for a, _ in TABLES] or None
)
def test_a_table_equals_the_summary_of_its_records(arguments, table):
    assert table == _summary(arguments)
