"""Background work gives way to the devices (store/giving_way.py): before each
statement of a greenlet marked `in_background`, the event loop handles the
sockets that are ready. On the real databases: MariaDB's engine gives way;
SQLite's does not (a write transaction would hold the file's lock meanwhile)."""

import gevent
from gevent import socket
from sqlalchemy import event, text

from blynkota.store import Database, in_background


def handled_before_the_statement(db_url: str, *, background: bool) -> list[bytes]:
    """What a device's socket, made ready just before a statement, had delivered
    to its reader when the statement went to the database."""
    database = Database(db_url)
    ours, theirs = socket.socketpair()
    heard: list[bytes] = []
    reader = gevent.spawn(lambda: heard.append(ours.recv(16)))
    seen: list[list[bytes]] = []

    # Registered after the engine's own listeners: it runs after any giving way.
    @event.listens_for(database.engine, "before_cursor_execute")
    def _statement(*_arguments) -> None:
        seen.append(list(heard))

    def work() -> None:
        if background:
            in_background()
        with database.engine.connect() as connection:  # warm: no wait from here on
            theirs.send(b"frame")
            connection.execute(text("SELECT 1"))

    try:
        with database.engine.connect() as connection:  # the pool's first connection
            connection.execute(text("SELECT 1"))
        gevent.sleep(0)  # the reader waits on its socket
        gevent.spawn(work).get(timeout=10)
        return seen[-1]
    finally:
        reader.kill()
        ours.close()
        theirs.close()
        database.dispose()


def test_a_background_statement_waits_for_the_ready_sockets_on_mysql(db_url):
    handled = handled_before_the_statement(db_url, background=True)
    if db_url.startswith("sqlite"):
        assert handled == []  # SQLite: the statement runs at once
    else:
        assert handled == [b"frame"]


def test_any_other_statement_runs_at_once(db_url):
    assert handled_before_the_statement(db_url, background=False) == []
