"""The audit trail: who changed what, from where, and what the answer was.

One append-only row per state-changing request (the admin API, the
dashboard) or command (the command line on the database). A row names a
device by its token's tag, never the token, and keeps no password, no
secret and no query string as sent.
"""

import logging

from sqlalchemy import func, insert, select

from ...store import AuditEntry, Database, utcnow

__all__ = ["AuditTrail"]

log = logging.getLogger(__name__)

_LIMITS = {
    column.key: column.type.length
    for column in AuditEntry.__table__.columns
    if getattr(column.type, "length", None)
}


class AuditTrail:
    def __init__(self, db: Database) -> None:
        self._db = db

    def record(self, **fields) -> None:
        """Append one entry; every string cut to its column. A failure to write
        (the database away) is logged, never raised: the change itself stands."""
        row = {"at": utcnow(), **fields}
        for key, limit in _LIMITS.items():
            if isinstance(row.get(key), str):
                row[key] = row[key][:limit]
        try:
            self._db.run(lambda session: session.execute(insert(AuditEntry).values(**row)))
        except Exception as error:
            log.warning("audit: entry not written (%s): %s", type(error).__name__, row["action"])

    def page(self, offset: int, limit: int) -> tuple[list[dict], int]:
        """Newest first: `limit` entries from `offset`, and how many there are."""

        def read(session) -> tuple[list[dict], int]:
            total = session.scalar(select(func.count(AuditEntry.id)))
            rows = session.scalars(
                select(AuditEntry).order_by(AuditEntry.id.desc()).offset(offset).limit(limit)
            ).all()
            return [_entry(row) for row in rows], total

        return self._db.run(read)


def _entry(row: AuditEntry) -> dict:
    return {
        "id": row.id,
        "at": row.at.isoformat() + "Z",
        "admin": row.admin,
        "address": row.address,
        "action": row.action,
        "rollout": row.rollout_id,
        "device": row.device,
        "firmware": row.firmware,
        "status": row.status,
        "detail": row.detail,
    }
