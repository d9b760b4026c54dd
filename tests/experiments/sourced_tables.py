"""The Markdown tables of a docs page that name their records on the line before them."""

from __future__ import annotations

import re
from pathlib import Path


def sourced_tables(page: Path, source: re.Pattern[str]) -> list[tuple[str, str]]:
    """``(source's first group, table text)`` of every table that follows a ``source`` line.

    The table is the run of lines starting with ``|`` right after the matching line.
    """
    lines = page.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        match = source.match(line.strip())
        if match:
            table = []
            for row in lines[i + 1 :]:
                if not row.startswith("|"):
                    break
                table.append(row)
            found.append((match.group(1), "\n".join(table)))
    return found
