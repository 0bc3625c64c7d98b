"""A budget of wrong passwords per client address and per admin account.

Ten wrong passwords a minute (`LIMIT` in `WINDOW`) from one address, or
against one account, and every further attempt from that address or on that
account is refused with 429 and a Retry-After until the window ends, the
right password too: a password known good counts only if it was given before
the lockout.

Failures are counted, not attempts: a check is judged against the budget,
then the password is hashed, and only a wrong one is written down. So a
right password is never refused for the wrong ones of others in flight, and
a process killed in the middle of a check has spent nothing. For the count
to stay exact while checks run side by side, checks of the same key take
turns (they queue, they are not refused): within a process on a lock per
key, and across processes, where the database can lock rows (MySQL), by
holding the keys' rows locked (`SELECT ... FOR UPDATE`) while the password
is hashed. SQLite locks the whole file instead, which would stop every
device write for the hash's 100 ms: there, processes share the count but
not the turns, so N processes checking at the same moment may let N - 1
wrong passwords past the limit.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from gevent.lock import Semaphore
from sqlalchemy import Connection, bindparam, delete, insert, select, update

from ...store import Database, LoginLimit, utcnow

__all__ = ["LoginLimits", "TooManyAttempts"]

LIMIT = 10
WINDOW = timedelta(minutes=1)
FORGOTTEN_AFTER = timedelta(days=1)  # rows of quiet keys go, at the sweep
# Password checks that hold a database connection at once, in one process:
# a hash is CPU, so more at a time would only hold more of the pool.
CONCURRENT_CHECKS = 4

_limits = LoginLimit.__table__
_ONE_MORE = (
    update(_limits)
    .where(_limits.c.key == bindparam("k"), _limits.c.window_start > bindparam("open_since"))
    .values(failures=_limits.c.failures + 1)
)
_NEW_WINDOW = (
    update(_limits)
    .where(_limits.c.key == bindparam("k"), _limits.c.window_start <= bindparam("open_since"))
    .values(window_start=bindparam("now"), failures=1)
)


class TooManyAttempts(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"Too many failed logins: try again in {retry_after} s.")
        self.retry_after = retry_after


class LoginLimits:
    def __init__(self, db: Database, *, limit: int = LIMIT, window: timedelta = WINDOW) -> None:
        self.db = db
        self.limit = limit
        self.window = window
        self._turns: dict[str, tuple[Semaphore, int]] = {}  # key -> (its lock, holders + waiters)
        self._checks = Semaphore(CONCURRENT_CHECKS)
        self._row_locks = db.engine.dialect.name != "sqlite"

    @staticmethod
    def keys(address: str, account: str) -> tuple[str, ...]:
        return tuple(sorted((f"address {address}"[:191], f"account {account.lower()}"[:191])))

    def refuse_if_spent(self, keys: tuple[str, ...]) -> None:
        """Raise TooManyAttempts if the address's or the account's budget is spent."""
        now = utcnow()
        rows = self.db.run_core(lambda connection: self._rows(connection, keys))
        self._refuse_if_spent(rows, now)

    def judge(self, keys: tuple[str, ...], check: Callable[[], bool]) -> bool:
        """`check()` (the password's hash), its failure counted on both keys.

        Raises TooManyAttempts, without calling `check`, if a budget is
        spent, also when wrong passwords counted while this one waited for
        its turn spent it.
        """
        with self._turn(keys), self._checks:
            if self._row_locks:
                return self.db.run_core(
                    lambda connection: self._judge_locked(connection, keys, check)
                )
            self.refuse_if_spent(keys)
            if check():
                return True
            self.db.run_core(lambda connection: self._count_failure(connection, keys, utcnow()))
            return False

    def forget_quiet(self) -> int:
        """Delete the rows of keys quiet for a day; how many."""
        cutoff = utcnow() - FORGOTTEN_AFTER
        return self.db.run_core(
            lambda connection: (
                connection.execute(delete(_limits).where(_limits.c.window_start < cutoff)).rowcount
            )
        )

    @contextmanager
    def _turn(self, keys: tuple[str, ...]) -> Iterator[None]:
        """This process's checks of the same key one after the other (keys in order:
        two checks that share both keys cannot each hold one and wait for the other)."""
        joined, acquired = [], []
        try:
            for key in keys:
                lock, users = self._turns.get(key) or (Semaphore(), 0)
                self._turns[key] = (lock, users + 1)
                joined.append(key)
                lock.acquire()
                acquired.append(lock)
            yield
        finally:
            for lock in acquired:
                lock.release()
            for key in joined:
                lock, users = self._turns[key]
                if users == 1:
                    del self._turns[key]
                else:
                    self._turns[key] = (lock, users - 1)

    def _judge_locked(self, connection: Connection, keys: tuple[str, ...], check) -> bool:
        now = utcnow()
        rows = self._rows(connection, keys, lock=True)
        missing = [key for key in keys if key not in {row.key for row in rows}]
        if missing:
            # Two processes inserting a key at once collide on it; the loser's
            # unit of work runs again and finds the row.
            connection.execute(
                insert(_limits),
                [{"key": key, "window_start": now, "failures": 0} for key in missing],
            )
            rows = self._rows(connection, keys, lock=True)
        self._refuse_if_spent(rows, now)
        if check():
            return True
        self._count_failure(connection, keys, now)
        return False

    def _rows(self, connection: Connection, keys: tuple[str, ...], lock: bool = False) -> list:
        query = select(_limits.c.key, _limits.c.window_start, _limits.c.failures).where(
            _limits.c.key.in_(keys)
        )
        if lock:
            query = query.order_by(_limits.c.key).with_for_update()
        return list(connection.execute(query))

    def _refuse_if_spent(self, rows: list, now: datetime) -> None:
        open_since = now - self.window
        spent_until = [
            row.window_start + self.window
            for row in rows
            if row.failures >= self.limit and row.window_start > open_since
        ]
        if spent_until:
            raise TooManyAttempts(max(1, math.ceil((max(spent_until) - now).total_seconds())))

    def _count_failure(self, connection: Connection, keys: tuple[str, ...], now: datetime) -> None:
        values = {"open_since": now - self.window, "now": now}
        for key in keys:
            if connection.execute(_ONE_MORE, {**values, "k": key}).rowcount:
                continue
            if connection.execute(_NEW_WINDOW, {**values, "k": key}).rowcount:
                continue
            # The key's first failure. Two processes inserting it at once
            # collide on the key; the loser's unit of work runs again.
            connection.execute(insert(_limits).values(key=key, window_start=now, failures=1))
