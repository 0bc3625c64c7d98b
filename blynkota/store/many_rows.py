"""The hot multi-row writes, run on the driver's cursor.

For a statement run with many rows, SQLAlchemy builds each row's parameters
in Python (the compiled statement's parameter map, then each type's bind
processor, row by row). For the few writes a login storm makes for every
device (presence, info reports, rollout entries and their events, offers)
that costs more than the database's own work. Here such a statement is
compiled once per dialect; each row's values go through the same bind
processors SQLAlchemy would apply, and the rows go to the driver's
`executemany` through `Connection.exec_driver_sql`, inside the caller's
transaction. PyMySQL turns an INSERT's rows into one multi-row statement.
An UPDATE it runs row by row, a round trip each: one keyed by a row's value
(`joined_on`) runs on MySQL as one statement instead, joined to a derived
table of the rows (`_joined`).

Only for statements whose parameters are all named rows' values: no
expanding IN, no column defaults computed in Python (a column left out of
an INSERT must have a server default or be nullable).
"""

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, DateTime, Table, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

__all__ = ["GIVEN", "ManyRows", "bound_parameters", "insert_many"]

GIVEN = object()  # the parameter's value is passed at each run (a row's, by its name)


class ManyRows:
    """One statement run with many rows of named values."""

    def __init__(
        self,
        statement: ClauseElement,
        column_keys: Sequence[str] | None = None,
        *,
        joined_on: str | None = None,
    ) -> None:
        """`joined_on`: for an UPDATE whose WHERE names its target row by this
        parameter (`devices.id = :device`): on MySQL, rows with distinct values
        of it run as one statement (`_joined`)."""
        self.statement = statement
        self.column_keys = list(column_keys) if column_keys is not None else None
        self.joined_on = joined_on
        self._joined: dict[str, _JoinedUpdate] = {}  # dialect name -> its joined form
        # dialect name -> (SQL text, positional?, for each parameter: its name,
        # its fixed value or GIVEN, the type's bind processor or None)
        self._compiled: dict[str, tuple[str, bool, list[tuple[str, Any, Any]]]] = {}

    def execute(self, target: Connection | Session, rows: Sequence[Mapping[str, Any]]) -> int:
        """Run the statement once per row, in one round of the driver; rows matched."""
        if not rows:
            return 0
        connection = target.connection() if isinstance(target, Session) else target
        sql, positional, plan = self._for(connection.dialect)
        # Column by column: a value every row shares (a batch's `now`) is
        # converted once, and no generator runs per row; a name that comes
        # twice (SQLite's `?`) is converted once.
        converted: dict[str, list] = {}
        columns = []
        for name, fixed, convert in plan:
            column = converted.get(name)
            if column is None:
                column = converted[name] = _converted(rows, name, fixed, convert)
            columns.append(column)
        if self.joined_on is not None and connection.dialect.name in _JOINED_DIALECTS:
            keys = converted[self.joined_on]
            if len(rows) > 1 and len(set(keys)) == len(keys):
                return self._joined_for(connection.dialect).execute(connection, columns)
        if positional:  # SQLite's `?` markers: a tuple, a name may come twice
            values: list = list(zip(*columns, strict=True))
        else:  # PyMySQL's %(name)s markers: a dict
            names = [name for name, _, _ in plan]
            values = [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]
        return connection.exec_driver_sql(sql, values).rowcount

    def _joined_for(self, dialect: Dialect) -> "_JoinedUpdate":
        known = self._joined.get(dialect.name)
        if known is None:
            sql, _, plan = self._for(dialect)
            compiled = self.statement.compile(dialect=dialect, column_keys=self.column_keys)
            temporal = {
                name for name, bind in compiled.binds.items() if isinstance(bind.type, DateTime)
            }
            names = [name for name, _, _ in plan]
            known = self._joined[dialect.name] = _JoinedUpdate(sql, names, temporal)
        return known

    def _for(self, dialect: Dialect) -> tuple[str, bool, list[tuple[str, Any, Any]]]:
        known = self._compiled.get(dialect.name)
        if known is None:
            compiled = self.statement.compile(dialect=dialect, column_keys=self.column_keys)
            positional, parameters = bound_parameters(compiled, dialect, self.column_keys or ())
            plan = [(name, fixed, convert) for name, fixed, convert, _ in parameters]
            known = self._compiled[dialect.name] = (compiled.string, positional, plan)
        return known


# Where an UPDATE may join a derived table of its rows (the multi-table UPDATE).
_JOINED_DIALECTS = ("mysql", "mariadb")
_UPDATE_HEAD = re.compile(r"^UPDATE (\S+) SET ")
_MARKER = re.compile(r"%\((\w+)\)s")


class _JoinedUpdate:
    """An UPDATE with %(name)s markers (MySQL's), for many rows in one statement:
    UPDATE t, (SELECT the first row's values AS _p_name, ... UNION ALL SELECT
    the next row's ...) AS _rows SET ... WHERE ..., each marker read from
    `_rows`. The same rows change as row by row, provided no two rows name the
    same target row (the caller's check): a target row joined to two rows
    would take either one's values. Built once per dialect; a run only
    repeats the row markers."""

    def __init__(self, sql: str, names: list[str], temporal: Collection[str]) -> None:
        head = _UPDATE_HEAD.match(sql)
        if head is None:
            raise ValueError(f"ManyRows: not a single-table UPDATE: {sql[:60]!r}")
        used = set(_MARKER.findall(sql))  # a parameter the text does not name is not sent
        self.kept = [index for index, name in enumerate(names) if name in used]
        # A derived table's columns would otherwise be strings: DATETIMEs are cast.
        markers = [
            "CAST(%s AS DATETIME(6))" if names[index] in temporal else "%s" for index in self.kept
        ]
        aliases = (f"`_p_{names[index]}`" for index in self.kept)
        self.first = "SELECT " + ", ".join(
            f"{marker} AS {alias}" for marker, alias in zip(markers, aliases, strict=True)
        )
        self.others = " UNION ALL SELECT " + ", ".join(markers)
        self.table = head.group(1)
        self.body = _MARKER.sub(lambda m: f"`_rows`.`_p_{m.group(1)}`", sql[head.end() :])

    def execute(self, connection: Connection, columns: list[list]) -> int:
        """Every row (`columns`: each parameter's values, in the plan's order); rows matched."""
        kept = [columns[index] for index in self.kept]
        derived = self.first + self.others * (len(kept[0]) - 1)
        statement = f"UPDATE {self.table}, ({derived}) AS `_rows` SET {self.body}"
        arguments = tuple(value for row in zip(*kept, strict=True) for value in row)
        return connection.exec_driver_sql(statement, arguments).rowcount


def bound_parameters(
    compiled: SQLCompiler, dialect: Dialect, given: Collection[str] = ()
) -> tuple[bool, list[tuple[str, Any, Any, bool]]]:
    """How to bind a compiled statement's parameters on the driver's cursor.

    Returns (positional?, and in the markers' order, for each parameter: its
    name, its value fixed in the statement or GIVEN when each run passes it
    (a bindparam without a value, or one named in `given`), its type's bind
    processor or None, and whether it is an expanding IN list).
    """
    positional = compiled.positiontup is not None
    names = compiled.positiontup if positional else list(compiled.binds)
    parameters = []
    for name in names:
        bind = compiled.binds[name]
        # A value written into the statement (.values(x=None), a fixed IN list)
        # is the same at every run.
        fixed = GIVEN if bind.required or name in given else bind.effective_value
        impl = bind.type.dialect_impl(dialect)
        convert = impl.bind_processor(dialect)
        if dialect.name == "sqlite" and isinstance(impl, DateTime) and convert is not None:
            convert = _sqlite_datetime(convert)
        parameters.append((name, fixed, convert, bool(bind.expanding)))
    return positional, parameters


def _sqlite_datetime(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """SQLite's datetime text, written by `datetime.isoformat` (a third of the
    time of SQLAlchemy's `%`-format with a dict of seven fields, which was a
    noticeable part of a login storm's writes) where the two agree: checked
    here on samples, so a different storage format keeps SQLAlchemy's."""
    samples = (datetime(2001, 2, 3, 4, 5, 6, 7), datetime(987, 6, 5, 4, 3, 2))
    if any(convert(value) != value.isoformat(" ", "microseconds") for value in samples):
        return convert

    def to_text(value: Any) -> Any:
        if value.__class__ is datetime and value.tzinfo is None:
            return value.isoformat(" ", "microseconds")
        return convert(value)  # None, a date, an aware datetime: as SQLAlchemy writes them

    return to_text


def _converted(rows: Sequence[Mapping[str, Any]], name: str, fixed: Any, convert: Any) -> list:
    """One parameter's value for every row, through its bind processor."""
    if fixed is not GIVEN:
        return [fixed if convert is None else convert(fixed)] * len(rows)
    values = [row[name] for row in rows]
    if convert is None:
        return values
    out, last, last_out = [], GIVEN, None  # GIVEN: no row holds it, so none is `last`
    for value in values:
        if value is not last:  # the same object as the row before: converted already
            last, last_out = value, convert(value)
        out.append(last_out)
    return out


_INSERTS: dict[tuple[Table, tuple[str, ...]], ManyRows] = {}


def insert_many(
    target: Connection | Session, table: Table, rows: Sequence[Mapping[str, Any]]
) -> int:
    """INSERT `rows` (dicts with the same keys) into `table` on the driver's cursor."""
    if not rows:
        return 0
    keys = tuple(rows[0])
    statement = _INSERTS.get((table, keys))
    if statement is None:
        _check_defaults(table, keys)
        statement = _INSERTS[(table, keys)] = ManyRows(insert(table), keys)
    return statement.execute(target, rows)


def _check_defaults(table: Table, keys: tuple[str, ...]) -> None:
    """A column left out whose default is computed in Python would be left NULL here."""
    for column in table.columns:
        if column.key not in keys and column.default is not None and not column.primary_key:
            raise ValueError(f"{table.name}.{column.key} has a Python default: name it in the rows")
