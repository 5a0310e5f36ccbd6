"""Every table of a Markdown report as a CSV file, so results go into a paper or a spreadsheet without copying.

gnlm's reports (``report.md``, ``compare.md``) write each table as a GitHub Markdown table under a heading;
:func:`write_tables` finds them all and writes ``tables/NN-<heading>.csv`` (one per table, numbered in report
order, named after the nearest heading above it). The cells are the report's own text: the Markdown is the one
source, the CSV files never disagree with it.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from gnlm.checkpoint import atomic_write_bytes


@dataclass
class Table:
    """One Markdown table: the heading above it, its header cells and its rows of cells."""

    title: str
    header: list[str]
    rows: list[list[str]]


def _cells(line: str) -> list[str]:
    """The cells of a Markdown table line ``| a | b |``, stripped, with code marks (backticks) removed."""
    return [c.strip().replace("`", "") for c in line.strip().strip("|").split("|")]


def _is_rule(line: str) -> bool:
    return bool(re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", line.strip()))


def markdown_tables(text: str) -> list[Table]:
    """Every table of a Markdown document (a header line, a ``|---|`` rule, then rows), in order."""
    lines, tables, title, i = text.splitlines(), [], "table", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        elif line.startswith("|") and i + 1 < len(lines) and _is_rule(lines[i + 1]):
            header, rows, i = _cells(line), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append(Table(title, header, rows))
            continue
        i += 1
    return tables


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60] or "table"


def write_tables(text: str, out_dir: str | Path) -> list[Path]:
    """Write every table of the Markdown ``text`` as ``out_dir/NN-<heading>.csv`` (the folder is replaced, so no
    table of an earlier report stays behind); returns the paths."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    paths = []
    for k, table in enumerate(markdown_tables(text), 1):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(table.header)
        writer.writerows(table.rows)
        path = out_dir / f"{k:02d}-{_slug(table.title)}.csv"
        atomic_write_bytes(path, buf.getvalue().encode())
        paths.append(path)
    return paths
