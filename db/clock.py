"""The database's clock as a SQL expression, for leases that several nodes compare.

A lease written by one node and judged expired by another must be measured on one clock: the database server's.
`db_utcnow(seconds)` renders as the server's current UTC time plus an offset, as a naive UTC timestamp like the
ones UTCDateTime stores (PostgreSQL: `now() AT TIME ZONE 'utc'`, the transaction's start; SQLite: its 'now').
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from db.models import UTCDateTime


class db_utcnow(FunctionElement[Any]):  # noqa: N801 - named like the SQL function it stands for
    """The database server's UTC time plus `seconds` (may be negative)."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(literal(float(seconds), Float()))


@compiles(db_utcnow)
def _generic(element: db_utcnow, compiler: Any, **kw: Any) -> str:
    # SQLite (and the default): strftime keeps the text layout SQLAlchemy stores, with milliseconds.
    seconds = compiler.process(element.clauses, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.6f seconds', {seconds}))"


@compiles(db_utcnow, "postgresql")
def _postgresql(element: db_utcnow, compiler: Any, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"((now() AT TIME ZONE 'utc') + make_interval(secs => {seconds}))"
