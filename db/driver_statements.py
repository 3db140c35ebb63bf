"""Core statements run on the driver's cursor: compiled by SQLAlchemy once per dialect, bound by its processors.

SQLAlchemy's execution of a cached Core statement still builds an execution context, processes the parameters,
and wraps the cursor in a result, per call: about 50 us of interpreter time, where the driver's own execute takes a
few. The listener runs six statements per stored image (db/ingest.py), so that machinery was a tenth of its CPU
per image. A `DriverStatement` sends the same SQL SQLAlchemy would (compiled by it for the connection's dialect,
per set of parameter names), with each value converted by the same bind processor SQLAlchemy would use and the
Python-side column defaults of an INSERT filled in as SQLAlchemy fills them, on the DBAPI cursor of the caller's
Connection, in its transaction. Driver errors are raised as SQLAlchemy's (IntegrityError, OperationalError, ...),
so callers catch the same exceptions whichever way a statement ran. Results are the driver's rows, unconverted:
for the statements here (keys, counts, flags) that is what SQLAlchemy would return too, booleans aside (SQLite
gives 0/1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.schema import ColumnDefault


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # bind names, in the order a positional driver takes them (named: each once)
    positional: bool
    fixed: dict[str, Any]  # values the statement carries itself (literals, an INSERT's scalar column defaults)
    defaults: dict[str, Callable[[], Any]]  # an INSERT's callable column defaults (per call) for columns not given
    processors: dict[str, Callable[[Any], Any]]


class DriverStatement:
    """One Core statement, executed on the driver's cursor (see the module docstring)."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, frozenset[str]], _Compiled] = {}

    def run(self, conn: Connection, params: Mapping[str, Any]) -> None:
        """Run with `params` (bind names, or an INSERT's column keys) in `conn`'s transaction."""
        self._execute(conn, params).close()

    def one(self, conn: Connection, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """Run, and return the one row it gives (a SELECT, or an INSERT ... RETURNING)."""
        cursor = self._execute(conn, params)
        try:
            row = cursor.fetchone()
        finally:
            cursor.close()  # a SQLite statement left unfinished would keep its read transaction open
        if row is None:
            raise LookupError("the statement returned no row")
        return tuple(row)

    def _execute(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        dialect = conn.dialect
        key = (dialect.name, frozenset(params))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile(dialect, params)
        values = {**compiled.fixed, **{name: make() for name, make in compiled.defaults.items()}, **params}
        for name, process in compiled.processors.items():
            values[name] = process(values[name])
        args: Sequence[Any] | Mapping[str, Any] = (
            [values[name] for name in compiled.names] if compiled.positional else values
        )
        cursor = conn.connection.cursor()
        try:
            cursor.execute(compiled.sql, args)
        except dialect.loaded_dbapi.Error as exc:
            raise DBAPIError.instance(compiled.sql, args, exc, dialect.loaded_dbapi.Error, dialect=dialect) from exc
        return cursor

    def _compile(self, dialect: Dialect, params: Mapping[str, Any]) -> _Compiled:
        column_keys = sorted(params) if isinstance(self.statement, Insert) else None
        compiled = cast(SQLCompiler, self.statement.compile(dialect=dialect, column_keys=column_keys))
        unset = dict(compiled.construct_params(_check=False) or {})  # every bind, None where not set
        fixed = {name: value for name, value in unset.items() if name not in params}
        defaults: dict[str, Callable[[], Any]] = {}
        for column in compiled.insert_prefetch:  # Python-side defaults, as SQLAlchemy fills them
            default = column.default
            if column.key in params or default is None:
                continue
            if not isinstance(default, ColumnDefault):
                raise ValueError(f"column {column.key}: a default of a kind not run here ({default!r})")
            if default.is_callable:  # made per call; SQLAlchemy wraps the callable to take a context
                defaults[column.key] = partial(default.arg, None)
                fixed.pop(column.key, None)
            else:
                fixed[column.key] = default.arg
        missing = [name for name, value in fixed.items() if value is None and not _has_value(compiled.binds, name)]
        if missing:
            raise ValueError(f"parameters not given: {', '.join(sorted(missing))}")
        processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None and name in unset:
                processors[name] = process
        positional = bool(compiled.positional)
        names = tuple(compiled.positiontup or ()) if positional else tuple(unset)
        return _Compiled(compiled.string, names, positional, fixed, defaults, processors)


def _has_value(binds: Mapping[str, Any], name: str) -> bool:
    """Whether the statement binds `name` to a value of its own (which may be NULL), not one to be given."""
    bind = binds.get(name)
    return bind is not None and not bind.required
