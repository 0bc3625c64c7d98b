"""The hot reads, run on the driver's cursor: the queries of every login batch.

Each login batch asks a few questions with an IN list of its devices (who
are these tokens, whose session holds these devices, which attempts are in
flight). SQLAlchemy builds such a query's cache key, expands its IN list
and wraps every row, per call; for a batch of a few dozen devices that costs
more than the database's own work. Here a query is compiled once per
dialect, its IN lists are rendered with as many markers as they have values,
rounded up to a few lengths by repeating the last value (the text cached per
length; on SQLite the driver's prepared statement is reused too), and its
rows come back as tuples, through the result types' own processors where a
type has one (SQLite's datetimes are text). Errors are SQLAlchemy's (the
statement runs through `Connection.exec_driver_sql`), so `Database.run`
still retries a lost race.
"""

from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from .many_rows import GIVEN, bound_parameters

__all__ = ["HotQuery"]

_TEXTS_KEPT = 1024  # SQL texts kept per query and dialect, one per combination of lengths


class _Compiled:
    """A query compiled for one dialect."""

    def __init__(self, statement: Select, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.positional, self.parameters = bound_parameters(compiled, dialect)
        self.text = compiled.string
        self.paramstyle = dialect.paramstyle
        self._texts: dict[tuple[int, ...], str] = {}
        self.processors = [
            column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in statement.selected_columns
        ]
        self.processed = any(self.processors)

    def text_for(self, lengths: tuple[int, ...]) -> str:
        """The SQL with each IN list given `lengths` markers (in parameter order)."""
        text = self._texts.get(lengths)
        if text is None:
            text = self.text
            expanding = [name for name, _, _, is_list in self.parameters if is_list]
            for name, length in zip(expanding, lengths, strict=True):
                markers = ", ".join(self._marker(name, index) for index in range(length))
                text = text.replace(f"(__[POSTCOMPILE_{name}])", f"({markers})")
            if len(self._texts) >= _TEXTS_KEPT:
                self._texts.clear()  # two lists of any length: bounded, not every pair kept
            self._texts[lengths] = text
        return text

    def _marker(self, name: str, index: int) -> str:
        """The driver's marker for the `index`-th value of IN list `name`."""
        style = self.paramstyle
        if style == "qmark":
            return "?"
        if style == "format":
            return "%s"
        if style == "pyformat":
            return f"%({name}_{index})s"
        if style == "named":
            return f":{name}_{index}"
        raise ValueError(f"HotQuery: paramstyle {style!r} is not supported")


class HotQuery:
    """A SELECT run on the driver's cursor, its IN lists of any length.

    For IN lists (`column.in_(bindparam(name, expanding=True))` or a fixed
    list): an empty one answers no rows without asking. Not for NOT IN.
    """

    def __init__(self, statement: Select) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def rows(self, target: Connection | Session, **values: Any) -> list[tuple]:
        connection = target.connection() if isinstance(target, Session) else target
        compiled = self._compiled.get(connection.dialect.name)
        if compiled is None:
            compiled = self._compiled[connection.dialect.name] = _Compiled(
                self.statement, connection.dialect
            )
        lengths: list[int] = []
        positional: list = []
        named: dict[str, Any] = {}
        for name, fixed, convert, is_list in compiled.parameters:
            value = values[name] if fixed is GIVEN else fixed
            if is_list:
                value = list(value)
                if not value:
                    return []  # `IN ()`: nothing matches (only IN lists are supported, no NOT IN)
                # Its last value repeated up to a few lengths: a handful of
                # texts (which SQLite's driver keeps prepared) serve every batch.
                value.extend(value[-1:] * (padded_length(len(value)) - len(value)))
                lengths.append(len(value))
                if convert is not None:
                    value = [convert(item) for item in value]
                if compiled.positional:
                    positional.extend(value)
                else:
                    named.update((f"{name}_{index}", item) for index, item in enumerate(value))
                continue
            if convert is not None:
                value = convert(value)
            if compiled.positional:
                positional.append(value)
            else:
                named[name] = value
        text = compiled.text_for(tuple(lengths))
        found = connection.exec_driver_sql(
            text, tuple(positional) if compiled.positional else named
        ).fetchall()
        if not compiled.processed:
            return [tuple(row) for row in found]
        return [_processed(row, compiled.processors) for row in found]


def padded_length(length: int) -> int:
    """`length` rounded up to 1..16, then four steps per doubling (20, 24, 28,
    32, 40, ...): at most a quarter more markers, about 40 lengths up to 500."""
    if length <= 16:
        return length
    step = 1 << (length.bit_length() - 3)
    return -(-length // step) * step


def _processed(row, processors: list) -> tuple:
    return tuple(
        value if convert is None else convert(value)
        for value, convert in zip(row, processors, strict=True)
    )
