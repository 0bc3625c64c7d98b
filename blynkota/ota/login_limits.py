"""A budget of password attempts per client address and per admin account.

Ten wrong passwords a minute (`LIMIT` in `WINDOW`) from one address, or
against one account, and further attempts are refused with 429 and a
Retry-After until the window ends. Every attempt whose password is not
already known good is counted *before* it is checked, with a conditional
UPDATE on the key's row, so concurrent attempts on any process cannot all
take the last one; a correct password gives its attempt back.
"""

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, delete, insert, select, update

from ..store import Database, LoginLimit, utcnow

__all__ = ["LoginLimits", "TooManyAttempts"]

LIMIT = 10
WINDOW = timedelta(minutes=1)
FORGOTTEN_AFTER = timedelta(days=1)  # rows of quiet keys go, at the sweep
_RECOUNTS = 3  # a row another process keeps changing under us is treated as spent

_limits = LoginLimit.__table__
_COUNT_ONE = (
    update(_limits)
    .where(
        _limits.c.key == bindparam("k"),
        _limits.c.window_start > bindparam("window_open_since"),
        _limits.c.failures < bindparam("limit"),
    )
    .values(failures=_limits.c.failures + 1)
)
_NEW_WINDOW = (
    update(_limits)
    .where(
        _limits.c.key == bindparam("k"),
        _limits.c.window_start <= bindparam("window_open_since"),
    )
    .values(window_start=bindparam("now"), failures=1)
)
_GIVE_BACK = (
    update(_limits)
    .where(_limits.c.key == bindparam("k"), _limits.c.failures > 0)
    .values(failures=_limits.c.failures - 1)
)


class TooManyAttempts(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"Too many failed logins: try again in {retry_after} s.")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Attempt:
    keys: tuple[str, ...]


class LoginLimits:
    def __init__(self, db: Database, *, limit: int = LIMIT, window: timedelta = WINDOW) -> None:
        self.db = db
        self.limit = limit
        self.window = window

    def take(self, address: str, account: str) -> Attempt:
        """Count one attempt against both budgets; raises TooManyAttempts if either is spent."""
        keys = (f"address {address}"[:191], f"account {account.lower()}"[:191])
        refused = self.db.run_core(lambda connection: self._take(connection, keys, utcnow()))
        if refused is not None:
            raise TooManyAttempts(refused)
        return Attempt(keys)

    def give_back(self, attempt: Attempt) -> None:
        """The password was right: its attempt does not count."""
        self.db.run_core(
            lambda connection: connection.execute(_GIVE_BACK, [{"k": key} for key in attempt.keys])
        )

    def forget_quiet(self) -> int:
        """Delete the rows of keys quiet for a day; how many."""
        cutoff = utcnow() - FORGOTTEN_AFTER
        return self.db.run_core(
            lambda connection: (
                connection.execute(delete(_limits).where(_limits.c.window_start < cutoff)).rowcount
            )
        )

    def _take(self, connection: Connection, keys: tuple[str, ...], now: datetime) -> int | None:
        """Seconds to wait if a budget is spent (nothing counted then), else None."""
        values = {"window_open_since": now - self.window, "limit": self.limit, "now": now}
        for index, key in enumerate(keys):
            spent_until = self._count(connection, key, values)
            if spent_until is not None:
                # The whole attempt is refused, and the keys counted so far
                # are given back, so a refused attempt costs no budget.
                for counted in keys[:index]:
                    connection.execute(_GIVE_BACK, {"k": counted})
                return max(1, math.ceil((spent_until - now).total_seconds()))
        return None

    def _count(self, connection: Connection, key: str, values: dict) -> datetime | None:
        """Count one attempt on `key`; when its window ends if it is spent instead."""
        for _ in range(_RECOUNTS):
            if connection.execute(_COUNT_ONE, {**values, "k": key}).rowcount:
                return None
            if connection.execute(_NEW_WINDOW, {**values, "k": key}).rowcount:
                return None
            row = connection.execute(
                select(_limits.c.window_start, _limits.c.failures).where(_limits.c.key == key)
            ).first()
            if row is None:
                # The key's first attempt. Two processes inserting it at once
                # collide on the key; the loser's unit of work runs again.
                connection.execute(
                    insert(_limits).values(key=key, window_start=values["now"], failures=1)
                )
                return None
            if row.failures >= self.limit and row.window_start > values["window_open_since"]:
                return row.window_start + self.window
            # The row was made or changed by another process between the
            # UPDATEs above and this read: count again on it as it is now.
        return values["now"] + self.window
