"""Row output for the read-side commands: an aligned table for people, CSV and JSON for scripts.

CSV and JSON carry every field under its stable name; the table shows the columns a person scans.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from typing import Any, TextIO

FORMATS = ("table", "csv", "json")


def query_rows(database_url: str, query: Callable[[Any, Any], list[dict[str, Any]]], flt: Any) -> list[dict[str, Any]]:
    """Run one read query (db.queries) against the node's database and close it again."""
    from db.session import Database

    db = Database(database_url)
    try:
        with db.session() as session:
            return query(session, flt)
    finally:
        db.dispose()


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
        writer = csv.DictWriter(out, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({f: "" if row.get(f) is None else row.get(f) for f in fields})
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
