"""Group commit (store/group_commit.py): many greenlets' writes share one transaction,
and one refused item fails only its own caller. On the real databases."""

import gevent
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.exc import IntegrityError

from blynkota.store import Database, GroupCommit

from .conftest import tables_on

metadata = MetaData()
notes = Table(
    "group_commit_notes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("text", String(16), nullable=False),
)


@pytest.fixture
def db(db_url):
    with tables_on(db_url, metadata) as database:
        yield database


def write_notes(connection, items):
    connection.execute(insert(notes), [{"id": n, "text": f"note {n}"} for n in items])
    return [f"written {n}" for n in items]


def test_waiting_writes_share_a_transaction_and_each_gets_its_answer(db):
    writes = GroupCommit(db, write_notes, name="notes")
    callers = [gevent.spawn(writes.submit, n) for n in range(1, 201)]
    gevent.joinall(callers, timeout=30, raise_error=True)

    assert [caller.value for caller in callers] == [f"written {n}" for n in range(1, 201)]
    with db.engine.connect() as connection:
        assert connection.scalars(select(notes.c.id).order_by(notes.c.id)).all() == list(
            range(1, 201)
        )
    # 200 callers at once: a few transactions, not one each.
    assert 1 <= writes.batches <= 5


def test_a_refused_item_fails_alone(db):
    writes = GroupCommit(db, write_notes, name="notes")
    writes.submit(7)
    callers = {n: gevent.spawn(writes.submit, n) for n in (5, 6, 7, 8)}  # 7 is there already
    gevent.joinall(list(callers.values()), timeout=30)

    assert isinstance(callers[7].exception, IntegrityError)
    assert {n: callers[n].value for n in (5, 6, 8)} == {n: f"written {n}" for n in (5, 6, 8)}
    with db.engine.connect() as connection:
        assert connection.scalars(select(notes.c.id).order_by(notes.c.id)).all() == [5, 6, 7, 8]


def test_an_outage_reaches_every_caller_of_the_batch(tmp_path):
    # A database file in a folder that does not exist: every connection fails.
    db = Database(f"sqlite:///{tmp_path}/missing/folder/db.sqlite")
    writes = GroupCommit(db, write_notes, name="notes")
    callers = [gevent.spawn(writes.submit, n) for n in range(3)]
    gevent.joinall(callers, timeout=30)

    assert all(caller.exception is not None for caller in callers)
    assert writes.batches == 1  # not retried one by one: alone, none would fare better
    assert db.health.down
    db.dispose()
