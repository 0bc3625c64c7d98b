"""Named lock rows: a mutex for offers, a lease for the sweeper.

`offer-slots` is locked with SELECT ... FOR UPDATE inside every offer's
transaction, so two processes never both take the last download slot. On
SQLite (one process, one writer at a time) the lock is a no-op.

`sweeper` is a lease: one conditional UPDATE takes it when it is free,
expired or already ours, so one node at a time times out attempts, grows
waves and pauses rollouts. A node that dies loses it when it expires.
"""

from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from ..store import Database, HotQuery, Lock, utcnow

__all__ = ["Lease", "lock_offer_slots"]

OFFER_SLOTS = "offer-slots"


_LOCK_OFFER_SLOTS = HotQuery(select(Lock.name).where(Lock.name == OFFER_SLOTS).with_for_update())


def lock_offer_slots(session: Session) -> None:
    """Hold the offer mutex until the transaction ends."""
    _LOCK_OFFER_SLOTS.rows(session)


class Lease:
    def __init__(self, db: Database, name: str, seconds: float) -> None:
        self.db = db
        self.name = name
        self.seconds = seconds

    def acquire(self, holder: int, now: datetime | None = None) -> bool:
        """Take or renew the lease for `holder`; True if it holds it now."""
        now = now or utcnow()

        def take(session: Session) -> bool:
            result = session.execute(
                update(Lock)
                .where(
                    Lock.name == self.name,
                    or_(Lock.holder.is_(None), Lock.holder == holder, Lock.expires_at < now),
                )
                .values(holder=holder, expires_at=now + timedelta(seconds=self.seconds))
            )
            return result.rowcount == 1

        return self.db.run(take)

    def release(self, holder: int) -> None:
        self.db.run(
            lambda session: session.execute(
                update(Lock)
                .where(Lock.name == self.name, Lock.holder == holder)
                .values(holder=None, expires_at=None)
            )
        )
