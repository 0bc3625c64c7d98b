"""Engine and units of work: one sessionmaker per engine, one transaction per unit of work.

Many processes write the same rows, so a unit of work that loses a race on
MySQL (a deadlock, a lock wait that ran out, a duplicate key another process
inserted first) is run again from the start, a bounded number of times, with
a short random pause: `Database.run`. Such work must have no effect outside
the database until it returns.

On SQLite another process (the CLI, an operator's shell) may hold the write
lock for a while. SQLite's own busy wait sleeps inside the driver, which
under gevent is the whole event loop: every device would go unanswered until
the lock is free. So in a gevent process the driver waits only a moment, and
`Database.run` waits out the rest in short sleeps that yield (`LOCK_WAIT`).

An unreachable database is logged once per outage, not once per device
(`DatabaseHealth`); callers turn the error into a clean refusal.
"""

import logging
import random
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

import gevent
from gevent import monkey
from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from ..metrics import DATABASE_ERRORS
from .giving_way import give_way_before_statements

__all__ = [
    "Database",
    "DatabaseHealth",
    "connection_problem",
    "is_locked",
    "is_outage",
    "is_transient",
    "is_unavailable",
    "make_engine",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# MySQL/MariaDB error codes worth a second try: deadlock, lock wait timeout,
# and the "record has changed since last read" of MariaDB's snapshot checks.
_TRANSIENT_MYSQL = {1213, 1205, 1020}
# The server is away: connection refused, gone away, lost during a query,
# shutting down, too many connections.
_OUTAGE_MYSQL = {2002, 2003, 2006, 2013, 1053, 1040, 2014}
# Of those, the ones on a connection that SQLAlchemy does not take for a
# disconnect: "server shutdown in progress". Left as it is, the pool would
# roll the dead connection back on its return, and log that failure with a
# traceback, once per pooled connection.
_DEAD_CONNECTION_MYSQL = {1053}
# What the driver raises on a connection that is gone (0: PyMySQL's closed socket).
_DEAD_POOLED_CONNECTION = _OUTAGE_MYSQL | {0}
RETRIES = 8
PING_AFTER_IDLE = 5.0  # seconds a pooled connection may sit unused before it is checked
# SQLite's write lock held by another process: how long a unit of work waits for
# it in all, how long the driver may block the event loop at a time in a gevent
# process, and the longest pause between two tries (each pause yields).
LOCK_WAIT = 30.0
LOOP_BUSY_WAIT = 0.01
LOCK_PAUSE = 0.05


def make_engine(url: str, *, pool_size: int = 20, pool_timeout: float = 30.0) -> Engine:
    if url.startswith("sqlite"):
        # A NULL parameter goes through the sqlite3 module's adapter lookup,
        # which for None has none and fails its way through an AttributeError
        # (formatted, then dropped) for each: the info reports bind several
        # per device. An adapter that answers None binds the same NULL.
        sqlite3.register_adapter(type(None), {}.get)
        busy_wait = LOOP_BUSY_WAIT if monkey.is_module_patched("time") else LOCK_WAIT
        engine = create_engine(url, connect_args={"timeout": busy_wait})

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
    # Thousands of device greenlets share the pool (db.pool.size): a login
    # storm queues for a connection briefly. No overflow: a connection opened
    # for a burst and closed after it costs far more than the wait (PyMySQL
    # builds an SSL context for each, ~50 ms of CPU). Every process has its own
    # pool, and all count against the server's max_connections.
    # READ COMMITTED: a conditional UPDATE that lost a race re-reads the row as
    # it is now, not as the transaction's snapshot saw it, and no gap locks
    # (the main source of InnoDB deadlocks between inserts) are taken.
    # utf8mb4 on the wire whatever the URL says: a build or a file name with
    # an emoji must reach the utf8mb4 columns (migration 0006) intact.
    url = make_url(url)
    if url.get_backend_name() == "mysql":
        url = url.update_query_dict({"charset": "utf8mb4"})
    engine = create_engine(
        url,
        pool_recycle=3600,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=pool_timeout,
        isolation_level="READ COMMITTED",
    )
    _ping_idle_connections(engine)
    # Not on SQLite: a write transaction would hold the file's lock while the
    # loop ran other greenlets, whose writes would then wait for it, blocking.
    give_way_before_statements(engine)

    @event.listens_for(engine, "handle_error")
    def _dead_connection(context) -> None:
        if _code_of(context.original_exception) in _DEAD_CONNECTION_MYSQL:
            context.is_disconnect = True

    pool_log = logging.getLogger(f"sqlalchemy.pool.impl.{type(engine.pool).__name__}")
    if not any(isinstance(f, _QuietDeadConnections) for f in pool_log.filters):
        pool_log.addFilter(_QuietDeadConnections())
    return engine


class _QuietDeadConnections(logging.Filter):
    """The pool's "Exception during reset or similar" (a traceback) for a
    connection an outage killed, or whose rollback a deadline cut: the
    outage is logged once by DatabaseHealth, and the pool drops the
    connection anyway. Any other error stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not (
            isinstance(error, OSError | EOFError | gevent.Timeout)
            or _code_of(error) in _DEAD_POOLED_CONNECTION
        ):
            return True
        log.debug("dropped a pooled connection the database had closed (%s)", error)
        return False


def _ping_idle_connections(engine: Engine) -> None:
    """Check a pooled connection before use only if it sat idle a while.

    MySQL drops connections idle past wait_timeout, and a restarted server
    drops them all. `pool_pre_ping` would check at every checkout: a round
    trip before each of a login's transactions. Connections in steady use
    skip it; a failed check makes the pool open a fresh connection.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection, record):
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, _proxy):
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE:
            return
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
        except Exception as error:
            raise DisconnectionError(f"pooled connection is gone ({error})") from error


def _mysql_code(error: DBAPIError) -> int | None:
    return _code_of(error.orig)


def _code_of(driver_error: BaseException | None) -> int | None:
    args = getattr(driver_error, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def is_transient(error: BaseException) -> bool:
    """A lost race worth running the unit of work again for."""
    if not isinstance(error, DBAPIError):
        return False
    if isinstance(error, IntegrityError):
        # A duplicate of a row another process inserted a moment ago: the
        # second run finds it and takes the other branch.
        code = _mysql_code(error)
        return code == 1062 or "UNIQUE constraint failed" in str(error.orig)
    return _mysql_code(error) in _TRANSIENT_MYSQL


def is_locked(error: BaseException) -> bool:
    """SQLite's write lock is held by another connection (another process)."""
    return isinstance(error, DBAPIError) and "database is locked" in str(error.orig)


def is_outage(error: BaseException) -> bool:
    """The database cannot be reached at all (as opposed to refusing one statement)."""
    if isinstance(error, DBAPIError):
        return (
            error.connection_invalidated
            or _mysql_code(error) in _OUTAGE_MYSQL
            or "unable to open database" in str(error.orig)
        )
    return False


# Refusals when connecting: the settings are wrong, not the moment.
_REFUSED_MYSQL = {1044, 1045, 1049, 1698, 2005}


def connection_problem(url: str, error: BaseException) -> str | None:
    """One line for an error that stops every use of the database at `url`
    (unreachable, the login refused, no such database), naming the database,
    its host and the cause; None for any other error. A password is never in it."""
    if not isinstance(error, DBAPIError):
        return None
    if not (_mysql_code(error) in _REFUSED_MYSQL or is_outage(error)):
        return None
    args = getattr(error.orig, "args", ())
    cause = str(args[1] if len(args) > 1 else error.orig).strip().splitlines()[0]
    where = make_url(url)
    if where.get_backend_name() == "sqlite":
        return f"cannot open the SQLite database {where.database}: {cause} (db.url)"
    host = f"{where.host or 'localhost'}:{where.port or 3306}"
    return f"cannot use the database {where.database!r} on {host}: {cause} (db.url)"


def is_unavailable(error: BaseException) -> bool:
    """The database cannot take any work now: it is away, SQLite's lock was held
    elsewhere past its wait, or no pooled connection came free in time. Not a
    fault of the work itself: another item or request would fare no better."""
    return isinstance(error, PoolTimeout) or is_outage(error) or is_locked(error)


class DatabaseHealth:
    """Logs an outage once when it starts and once when it ends."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.recovered: Callable[[], None] = lambda: None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, error: BaseException) -> None:
        DATABASE_ERRORS.labels("unreachable").inc()
        if self.down_since is None:
            self.down_since = time.monotonic()
            reason = getattr(error, "orig", None) or error
            log.error("database unreachable (%s): devices are refused until it returns", reason)

    def succeeded(self, started: float) -> None:
        """A unit of work that began at `started` (monotonic) went through.

        Only one that began after the outage was noticed proves the database
        is back: one already under way before the cut may still finish on a
        connection that was open, and would announce a recovery that is not.
        """
        if self.down_since is not None and started > self.down_since:
            seconds = time.monotonic() - self.down_since
            self.down_since = None
            log.warning("database reachable again after %.1f s", seconds)
            self.recovered()


class Database:
    def __init__(self, url: str, *, pool_size: int = 20, pool_timeout: float = 30.0) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size=pool_size, pool_timeout=pool_timeout)
        self.health = DatabaseHealth()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def begin(self) -> AbstractContextManager[Session]:
        """A session inside one transaction: committed on success, rolled back on error."""
        return self._sessions.begin()

    def run(self, work: Callable[[Session], T], *, retries: int = RETRIES) -> T:
        """`work(session)` in one transaction, run again when it lost a race."""
        return self._retried(self.begin, work, retries)

    def run_core(self, work: Callable[[Connection], T], *, retries: int = RETRIES) -> T:
        """`work(connection)` in one transaction, as `run`, without an ORM session.

        For the statements every login runs: built once, on tables, they
        skip the ORM's per-statement compile and the session's bookkeeping.
        """
        return self._retried(self.engine.begin, work, retries)

    def _retried(self, transaction: Callable[[], AbstractContextManager], work, retries: int):
        attempt = 0
        locked_until = None  # set when the first try met SQLite's lock held elsewhere
        while True:
            started = time.monotonic()
            try:
                with transaction() as handle:
                    result = work(handle)
            except DBAPIError as error:
                if is_outage(error):
                    self.health.failed(error)
                    raise
                if is_locked(error):
                    if locked_until is None:
                        locked_until = started + LOCK_WAIT
                        log.debug("the database is locked by another process; waiting")
                    if time.monotonic() >= locked_until:
                        raise
                    # Yields under gevent: the devices are served meanwhile.
                    time.sleep(random.uniform(LOCK_PAUSE / 2, LOCK_PAUSE))
                    continue
                attempt += 1
                if attempt >= retries or not is_transient(error):
                    raise
                log.debug("retrying a unit of work after %s", error.orig)
                time.sleep(random.uniform(0, 0.005 * 2 ** (attempt - 1)))  # yields under gevent
                continue
            if self.health.down:
                self.health.succeeded(started)
            return result

    def dispose(self) -> None:
        self.engine.dispose()
