"""Admin accounts: hashed in the database, seeded from admin.email / admin.pass."""

import hashlib
import logging

from sqlalchemy import select
from werkzeug.security import check_password_hash, generate_password_hash

from ..store import Admin, Database

__all__ = ["AdminDirectory"]

log = logging.getLogger(__name__)


class AdminDirectory:
    def __init__(self, db: Database) -> None:
        self._db = db
        # A password hash takes tens of milliseconds of CPU, during which the
        # gevent hub serves no device. Remember credentials already checked
        # against the current hash, keyed by a digest (never the password).
        self._verified: dict[tuple[str, bytes], str] = {}

    def seed(self, email: str, password: str) -> None:
        """Create the configured admin, or give it the configured password.

        Every process seeds at start; two creating the admin at once collide
        on its unique email, and the second run finds it.
        """

        def work(session) -> None:
            admin = session.scalar(select(Admin).where(Admin.email == email))
            if admin is None:
                session.add(Admin(email=email, password_hash=generate_password_hash(password)))
                session.flush()
                log.info("created admin %s", email)
            elif not check_password_hash(admin.password_hash, password):
                admin.password_hash = generate_password_hash(password)
                log.info("updated the password of admin %s from the configuration", email)

        self._db.run(work)
        self._verified.clear()

    def check(self, email: str, password: str) -> bool:
        with self._db.begin() as session:
            stored = session.scalar(select(Admin.password_hash).where(Admin.email == email))
        if stored is None:
            return False
        key = (email, hashlib.sha256(password.encode()).digest())
        if self._verified.get(key) == stored:
            return True
        if check_password_hash(stored, password):
            self._verified[key] = stored
            return True
        return False
