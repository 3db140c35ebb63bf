"""Row output for the read-side commands: an aligned table for people, CSV and JSON for scripts.

CSV and JSON carry every field under its stable name; the table shows the columns a person scans.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable, Sequence
from typing import Any, TextIO

FORMATS = ("table", "csv", "json")
MAX_ROWS = 1_000_000
MAX_ID = 2**63 - 1  # SQLite's largest integer


def _bounded(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
    return value


def row_limit(text: str) -> int:
    """argparse type for --limit: 0 (all) up to MAX_ROWS; anything else is a usage error (exit 2)."""
    return _bounded(text, 0, MAX_ROWS)


def row_id(text: str) -> int:
    """argparse type for a database id."""
    return _bounded(text, 1, MAX_ID)


def query_rows(database_url: str, query: Callable[[Any, Any], list[dict[str, Any]]], flt: Any) -> list[dict[str, Any]]:
    """Run one read query (db.queries) against the node's database and close it again."""
    from db.session import open_existing

    db = open_existing(database_url)
    try:
        with db.session() as session:
            return query(session, flt)
    finally:
        db.dispose()


# Cells a spreadsheet would read as a formula (OWASP "CSV injection"): = + - @, and tab or carriage return,
# which some tools strip before looking for those. A leading single quote makes them text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text, never runs: strings that start like a formula get a leading
    single quote; numbers (a negative score is a number, not a formula) and None (empty) pass as they are."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def write_csv(rows: Sequence[dict[str, Any]], fields: Sequence[str], out: TextIO) -> None:
    """CSV with the field names as header, every text cell neutralised (csv_cell)."""
    writer = csv.DictWriter(out, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({f: csv_cell(row.get(f)) for f in fields})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_rows(
    rows: Sequence[dict[str, Any]],
    fields: Sequence[str],
    fmt: str,
    out: TextIO,
    table_fields: Sequence[str] | None = None,
    max_width: int = 40,
) -> None:
    """Write rows as table, csv (header = field names) or json (a list of objects)."""
    if fmt == "json":
        json.dump([{f: row.get(f) for f in fields} for row in rows], out, indent=2)
        out.write("\n")
        return
    if fmt == "csv":
        write_csv(rows, fields, out)
        return
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    cols = list(table_fields or fields)
    cells = [[_cell(row.get(c)) for c in cols] for row in rows]
    cells = [[v if len(v) <= max_width else v[: max_width - 1] + "~" for v in r] for r in cells]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    out.write("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip() + "\n")
    for r in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")
