"""Device sessions the database could not serve: closed, counted, told once per interval.

While the database is away, or every pooled connection is busy past the
pool's wait, a device gets SERVER_ERROR to its login or info message and is
closed; its library comes back later. One line per SHED_EVERY says how many
and why, however many there were (the outage itself is logged once, by
store.DatabaseHealth).
"""

import logging

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ..logsafe import CountsPerInterval
from ..store import is_locked, is_outage

__all__ = ["DATABASE_ERRORS", "SHED", "shed_cause"]

log = logging.getLogger("blynkota.hardware.session")

# What a query raises while the database is away, or busy past the pool's wait.
DATABASE_ERRORS = (DBAPIError, PoolTimeout)
SHED_EVERY = 10.0  # seconds between two lines about sessions the database could not serve
_SHED_CAUSES = {
    "pool_timeout": "no pooled database connection free in time (db.pool.size)",
    "unreachable": "the database unreachable",
    "locked": "SQLite locked by another process",
    "error": "a database error",
}


def _tell_shed(counts: dict[str, int]) -> None:
    causes = ", ".join(f"{_SHED_CAUSES[cause]}: {count}" for cause, count in counts.items())
    log.warning(
        "%d device connection(s) closed in the last %g s, the database could not serve them (%s)",
        sum(counts.values()),
        SHED_EVERY,
        causes,
    )


# Sessions closed for the database: one line per SHED_EVERY, whatever their number.
SHED = CountsPerInterval(SHED_EVERY, _tell_shed)


def shed_cause(error: BaseException) -> str:
    if isinstance(error, PoolTimeout):
        return "pool_timeout"
    if is_outage(error):
        return "unreachable"
    return "locked" if is_locked(error) else "error"
