"""Admin accounts: hashed in the database, seeded from admin.email / admin.pass.

A password check costs ~100 ms of CPU (scrypt). It runs in gevent's thread
pool (hashlib releases the GIL), so devices keep being served meanwhile; an
unknown e-mail is checked against a dummy hash, so it takes as long as a
known one and the answer's time does not tell which accounts exist; and
every check, one known good too, is refused while the client's or the
account's budget of wrong passwords is spent (login_limits.py), and a wrong
one spends it.
"""

import hashlib
import hmac
import logging
import secrets

import gevent
from sqlalchemy import func, select
from werkzeug.security import check_password_hash, generate_password_hash

from ...store import Admin, AdminRole, Database
from ..errors import ProvisioningError
from .login_limits import LoginLimits

__all__ = ["AdminDirectory"]

log = logging.getLogger(__name__)


class AdminDirectory:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.limits = LoginLimits(db)
        # Checked when the e-mail is unknown: the same work as a real check
        # (scrypt with werkzeug's default cost, as generate_password_hash
        # stores), matching no password. Written out, not hashed: a hash is
        # ~100 ms of CPU, and every process, each device worker too, starts here.
        self._dummy_hash = f"scrypt${secrets.token_hex(8)}${'0' * 128}"
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

    def role_of(self, email: str) -> str | None:
        with self._db.begin() as session:
            return session.scalar(select(Admin.role).where(Admin.email == email))

    def accounts(self) -> list[tuple[str, str]]:
        """(e-mail, role) of every account, by e-mail."""
        with self._db.begin() as session:
            return [tuple(row) for row in session.execute(
                select(Admin.email, Admin.role).order_by(Admin.email))]  # fmt: skip

    def add(self, email: str, password: str, role: str) -> None:
        """A new account; ProvisioningError if the e-mail has one, or a value is wrong."""
        _check_role(role)
        if not email or "@" not in email or len(email) > 255:
            raise ProvisioningError(f"{email!r} is not an e-mail address.")
        if len(password) < 8:
            raise ProvisioningError("A password is at least 8 characters.")

        def work(session) -> None:
            if session.scalar(select(Admin.id).where(Admin.email == email)) is not None:
                raise ProvisioningError(f"{email} has an account already.")
            hashed = generate_password_hash(password)
            session.add(Admin(email=email, password_hash=hashed, role=role))

        self._db.run(work)

    def set_role(self, email: str, role: str) -> None:
        _check_role(role)

        def work(session) -> None:
            admin = session.scalar(select(Admin).where(Admin.email == email))
            if admin is None:
                raise ProvisioningError(f"No account {email}.")
            if admin.role == AdminRole.ADMIN and role != AdminRole.ADMIN:
                _keep_an_admin(session, email)
            admin.role = role

        self._db.run(work)

    def remove(self, email: str) -> None:
        def work(session) -> None:
            admin = session.scalar(select(Admin).where(Admin.email == email))
            if admin is None:
                raise ProvisioningError(f"No account {email}.")
            if admin.role == AdminRole.ADMIN:
                _keep_an_admin(session, email)
            session.delete(admin)

        self._db.run(work)
        self._verified.clear()

    def csrf_token(self, email: str) -> str | None:
        """A token for the dashboard's forms: an HMAC keyed by the admin's stored
        hash, so every process computes the same one, and a new password voids it."""
        with self._db.begin() as session:
            stored = session.scalar(select(Admin.password_hash).where(Admin.email == email))
        if stored is None:
            return None
        return hmac.new(stored.encode(), b"blynkota-csrf:" + email.encode(), "sha256").hexdigest()

    def check(self, email: str, password: str, address: str) -> bool:
        """Raises TooManyAttempts while the address or the account is over its budget
        of wrong passwords, whatever the password: a right one counts only before."""
        keys = self.limits.keys(address, email)
        self.limits.refuse_if_spent(keys)
        key = (email, hashlib.sha256(password.encode()).digest())

        with self._db.begin() as session:
            stored = session.scalar(select(Admin.password_hash).where(Admin.email == email))

        def matches() -> bool:
            # Asked again in its turn: a check of the same password that went
            # first may have found it right meanwhile, and saved the hash.
            if stored is not None and self._verified.get(key) == stored:
                return True
            pool = gevent.get_hub().threadpool
            right = pool.apply(check_password_hash, (stored or self._dummy_hash, password))
            if stored is None or not right:
                return False
            self._verified[key] = stored
            return True

        if stored is not None and self._verified.get(key) == stored:
            return True  # known good, and the budget is not spent: no hash, no turn
        return self.limits.judge(keys, matches)


def _check_role(role: str) -> None:
    if role not in AdminRole.ALL:
        raise ProvisioningError(f"A role is one of {', '.join(AdminRole.ALL)}, not {role!r}.")


def _keep_an_admin(session, leaving: str) -> None:
    """Refuse to leave the fleet without an account that may manage accounts."""
    others = session.scalar(
        select(func.count(Admin.id)).where(Admin.role == AdminRole.ADMIN, Admin.email != leaving)
    )
    if not others:
        raise ProvisioningError(
            f"{leaving} is the last admin: give another account that role first."
        )
