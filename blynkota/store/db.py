"""Engine and session scope: one sessionmaker per engine, one transaction per unit of work."""

from contextlib import AbstractContextManager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database", "make_engine"]


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            # WAL lets the `flask` CLI read while the server writes.
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL survives a killed process (only power loss can
            # drop the newest commits) and saves an fsync per transaction.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # MySQL closes idle connections after wait_timeout: check before use.
    # Thousands of device greenlets share the pool: keep it wide enough that a
    # login storm queues for a connection briefly, not for the 30 s timeout.
    return create_engine(url, pool_pre_ping=True, pool_recycle=3600, pool_size=20, max_overflow=30)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def begin(self) -> AbstractContextManager[Session]:
        """A session inside one transaction: committed on success, rolled back on error."""
        return self._sessions.begin()

    def dispose(self) -> None:
        self.engine.dispose()
