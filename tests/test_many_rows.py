"""Hot multi-row writes and reads on the driver's cursor (store/many_rows.py,
store/hot_reads.py) store and read exactly what SQLAlchemy's own executemany and
execute do, on both real databases."""

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    bindparam,
    event,
    insert,
    or_,
    select,
    text,
    update,
)

from blynkota.store import HotQuery, ManyRows, insert_many
from blynkota.store.hot_reads import padded_length
from blynkota.store.many_rows import bound_parameters

from .conftest import tables_on

metadata = MetaData()


def _table(name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("label", String(16), nullable=False),
        Column("seen_at", DateTime, nullable=True),
        Column("flag", Boolean, nullable=False),
        Column("count", Integer, nullable=False, server_default="7"),
    )


ours, theirs = _table("many_rows_ours"), _table("many_rows_theirs")
with_default = Table(
    "many_rows_defaulted",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("label", String(16), default="none"),
)

ROWS = [
    # Whole seconds and microseconds: SQLite compares the stored strings.
    {"id": 1, "label": "whole", "seen_at": datetime(2026, 11, 28, 12, 0, 0), "flag": True},
    {"id": 2, "label": "micro", "seen_at": datetime(2026, 11, 28, 12, 0, 0, 123), "flag": False},
    {"id": 3, "label": "none", "seen_at": None, "flag": True},
]


@pytest.fixture
def db(db_url):
    with tables_on(db_url, metadata) as database:
        yield database


def stored(connection, table: Table) -> list[tuple]:
    """The rows as the database holds them, read past SQLAlchemy's types."""
    return connection.exec_driver_sql(
        f"SELECT id, label, seen_at, flag, count FROM {table.name} ORDER BY id"
    ).all()


def test_an_insert_stores_what_sqlalchemy_stores(db):
    with db.engine.begin() as connection:
        assert insert_many(connection, ours, ROWS) == 3
        connection.execute(insert(theirs), ROWS)
        mine, reference = stored(connection, ours), stored(connection, theirs)

    assert mine == reference
    assert [row[4] for row in mine] == [7, 7, 7]  # the left-out column took its server default


@pytest.mark.parametrize("joined_on", [None, "key"])
def test_an_update_with_a_repeated_and_a_fixed_parameter(db, joined_on):
    """Row by row, and keyed (`joined_on`): on MySQL one statement joined to
    the rows, which must change exactly what row by row changes."""
    statements = []

    def seen(connection, cursor, statement, parameters, context, executemany):
        statements.append((statement, executemany))

    event.listen(db.engine, "before_cursor_execute", seen)
    with db.engine.begin() as connection:
        connection.execute(insert(ours), ROWS)
        connection.execute(insert(theirs), ROWS)
    # `since` appears twice; `label` is written into the statement for every row.
    statement = (
        update(ours)
        .where(
            ours.c.id == bindparam("key"),
            or_(ours.c.seen_at.is_(None), ours.c.seen_at <= bindparam("since")),
        )
        .values(seen_at=bindparam("since"), label="moved")
    )
    later = datetime(2026, 11, 28, 13, 0, 0, 5)
    earlier = datetime(2026, 11, 27, 0, 0, 0)
    changes = [
        {"key": 1, "since": later},  # moves: stored 12:00 <= 13:00
        {"key": 2, "since": earlier},  # stays: stored 12:00.000123 > yesterday
        {"key": 3, "since": later},  # moves: NULL
        {"key": 9, "since": later},  # no such row
    ]
    statements.clear()
    with db.engine.begin() as connection:
        matched = ManyRows(statement, joined_on=joined_on).execute(connection, changes)
        ours_ran = list(statements)
        reference = update(theirs).where(
            and_(
                theirs.c.id == bindparam("key"),
                or_(theirs.c.seen_at.is_(None), theirs.c.seen_at <= bindparam("since")),
            )
        )
        connection.execute(reference.values(seen_at=bindparam("since"), label="moved"), changes)
        mine, expected = stored(connection, ours), stored(connection, theirs)
        labels = connection.execute(select(ours.c.label).order_by(ours.c.id)).scalars().all()

    assert matched == 2
    assert mine == expected
    assert labels == ["moved", "micro", "moved"]
    joined = joined_on is not None and db.engine.dialect.name in ("mysql", "mariadb")
    assert len(ours_ran) == 1
    assert ("UNION ALL" in ours_ran[0][0]) is joined, ours_ran
    assert ours_ran[0][1] is not joined  # one statement, or the driver's executemany

    # Two rows for one key: row by row, in order (a joined statement would take either).
    twice = [{"key": 1, "since": later + timedelta(hours=1)}, {"key": 1, "since": later}]
    statements.clear()
    with db.engine.begin() as connection:
        ManyRows(statement, joined_on=joined_on).execute(connection, twice)
        connection.execute(reference.values(seen_at=bindparam("since"), label="moved"), twice)
        assert stored(connection, ours) == stored(connection, theirs)
    assert all("UNION ALL" not in text for text, _ in statements)
    event.remove(db.engine, "before_cursor_execute", seen)


def test_a_column_with_a_python_default_must_be_named(db):
    with db.engine.begin() as connection:
        with pytest.raises(ValueError, match="many_rows_defaulted.label has a Python default"):
            insert_many(connection, with_default, [{"id": 1}])
        assert insert_many(connection, with_default, [{"id": 1, "label": "given"}]) == 1
        assert connection.execute(text("SELECT label FROM many_rows_defaulted")).scalar() == "given"


def test_no_rows_is_no_statement(db):
    with db.engine.begin() as connection:
        assert insert_many(connection, ours, []) == 0
        assert ManyRows(update(ours).values(label="x")).execute(connection, []) == 0


def test_a_hot_read_answers_what_sqlalchemy_answers(db):
    with db.engine.begin() as connection:
        connection.execute(insert(ours), ROWS)
    # An IN list given at each call, a fixed IN list, a plain parameter and a
    # datetime result (text on SQLite: its result processor makes it a datetime).
    statement = (
        select(ours.c.id, ours.c.label, ours.c.seen_at, ours.c.flag)
        .where(
            ours.c.id.in_(bindparam("ids", expanding=True)),
            ours.c.label.in_(["whole", "micro", "none"]),
            ours.c.count == bindparam("count"),
        )
        .order_by(ours.c.id)
    )
    query = HotQuery(statement)
    with db.engine.begin() as connection:
        # Lengths repeat (the cached text); past 16 a list is padded with its
        # last value (17 -> 20 markers), which changes nothing it matches.
        for ids in ([1, 2, 3], [2], [3, 1, 9], [1, 2], list(range(17, 0, -1)), [9] * 18 + [2]):
            expected = [
                tuple(row) for row in connection.execute(statement, {"ids": ids, "count": 7})
            ]
            assert query.rows(connection, ids=ids, count=7) == expected
        assert query.rows(connection, ids=[1, 2], count=8) == []
        assert query.rows(connection, ids=[], count=7) == []  # IN (): nothing matches

    with db.engine.connect() as connection:
        whole, micro = query.rows(connection, ids=[1, 2], count=7)
    assert whole == (1, "whole", datetime(2026, 11, 28, 12, 0, 0), True)
    assert isinstance(micro[2], datetime)  # MySQL's DATETIME keeps whole seconds


def test_a_padded_in_list_has_at_most_a_quarter_more_markers_and_few_lengths():
    lengths = {padded_length(n) for n in range(1, 513)}
    assert len(lengths) == 36
    for n in range(1, 5000):
        assert n <= padded_length(n) <= max(16, n * 1.25)
        assert padded_length(padded_length(n)) == padded_length(n)  # a padded length stays


def test_the_sqlite_datetime_text_is_the_one_sqlalchemy_writes():
    """The hot writes' faster datetime text (isoformat) is SQLAlchemy's, value for value."""
    from sqlalchemy.dialects import sqlite

    dialect = sqlite.dialect()
    compiled = update(ours).values(seen_at=bindparam("at")).compile(dialect=dialect)
    _, parameters = bound_parameters(compiled, dialect)
    ((name, _, faster, _),) = parameters
    theirs_ = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert name == "at"
    for value in (
        datetime(2026, 11, 28, 12, 0, 0),
        datetime(2026, 11, 28, 12, 0, 0, 123),
        datetime(1, 1, 1),
        datetime(2026, 11, 28, 12, 0, 0, 5, tzinfo=UTC),  # SQLAlchemy drops the zone
        date(2026, 11, 28),
        None,
    ):
        assert faster(value) == theirs_(value), value
