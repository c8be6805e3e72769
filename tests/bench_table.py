"""Reading back the ``--bench`` table (rlbus.bench) the way a user's script would: columns split on
runs of two or more spaces."""

from __future__ import annotations

import re
from dataclasses import dataclass

COLUMNS = re.compile(r"\s{2,}")


@dataclass
class ParsedTable:
    title: str
    headers: list[str]
    steps: dict[int, dict[str, str]]
    """Step -> header -> cell."""
    mean: dict[str, tuple[float, float] | None]
    """Header -> (mean, std); None for a column without figures ("-")."""
    notes: list[str]


def parse_bench_table(text: str) -> ParsedTable:
    """The table in ``text`` (a command's whole output): it starts at the line with `` bench: ``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if " bench: " in line)
    title, header, *rest = lines[start:]
    headers = COLUMNS.split(header.strip())
    assert headers[0] == "step", header
    steps, mean, notes = {}, {}, []
    for line in rest:
        cells = COLUMNS.split(line.strip())
        if cells[0] == "mean":
            mean = {h: _mean_std(c) for h, c in zip(headers[1:], cells[1:], strict=True)}
        elif cells[0].isdigit() and not mean:
            steps[int(cells[0])] = dict(zip(headers[1:], cells[1:], strict=True))
        elif line.strip():
            notes.append(line.strip())
    return ParsedTable(title, headers[1:], steps, mean, notes)


def _mean_std(cell: str) -> tuple[float, float] | None:
    if cell == "-":
        return None
    mean, std = cell.split(" ± ")
    return float(mean), float(std)
