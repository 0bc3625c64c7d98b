"""Connected devices entering a rollout at once (now=true, expand, a grown wave).

Without a login to look at, the devices are found in the database: those
online on any node, in the rollout's scope, for which it is the most specific
running rollout, inside its percentage and with a build it may replace. They
get pending rows in bulk; each node offers its own as download slots allow.

The request that asks for it (a now=true start, an expand) answers first:
the rollout row records that the work is owed (`enrol_due_at`), the process
that answered does it in the background, and the sweeper does it if that
process stopped first.
"""

import logging
from datetime import timedelta

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from ...store import (
    Database,
    Device,
    DeviceState,
    Project,
    Rollout,
    RolloutDevice,
    RolloutState,
    utcnow,
)
from ..fleet.tags import tags_of
from .candidates import RunningRollouts, candidate_of, target_of
from .compatibility import BoardReport
from .device_states import enter_all
from .lifecycle import rollout_entry
from .targeting import in_scope

__all__ = ["OnlineEnrolment"]

log = logging.getLogger(__name__)

ENROL_CHUNK = 1000  # devices entered into a rollout per transaction


class OnlineEnrolment:
    def __init__(self, db: Database) -> None:
        self.db = db

    def enter_connected(self, rollout_id: int) -> int:
        """Enter the devices online on any node that the rollout targets and may offer.

        They become pending rows; the node holding each offers it in its next
        fill. In chunks, each its own transaction, so a login entering the same
        device at the same moment costs one chunk a retry, not the whole fleet.
        Then the rollout's `enrol_due_at` is cleared, unless a later request
        set it again meanwhile. Returns how many devices became pending.
        """
        began = utcnow()
        ids = self.db.run(lambda session: self._online_targets(session, rollout_id))
        entered = 0
        for start in range(0, len(ids), ENROL_CHUNK):
            chunk = ids[start : start + ENROL_CHUNK]
            entered += self.db.run(lambda session, c=chunk: self._enrol(session, rollout_id, c))
        self.db.run(
            lambda session: session.execute(
                update(Rollout)
                .where(Rollout.id == rollout_id, Rollout.enrol_due_at <= began)
                .values(enrol_due_at=None)
            )
        )
        if entered:
            log.info("rollout %d: %d connected device(s) entered", rollout_id, entered)
        return entered

    def overdue(self, grace: float) -> list[int]:
        """Rollouts whose connected devices should have been entered `grace` seconds ago.

        The process that answered the request enters them at once; one that
        stopped before it finished leaves the mark, and the sweeper does it.
        """
        cutoff = utcnow() - timedelta(seconds=grace)
        return self.db.run(
            lambda session: list(
                session.scalars(
                    select(Rollout.id).where(
                        Rollout.enrol_due_at < cutoff, Rollout.state.in_(RolloutState.RUNNING)
                    )
                ).all()
            )
        )

    @staticmethod
    def _online_targets(session: Session, rollout_id: int) -> list[int]:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None or rollout.state not in RolloutState.RUNNING:
            return []
        query = (
            in_scope(select(Device.id), rollout.scope, target_of(rollout), rollout.tag)
            .where(
                Device.node_id.is_not(None),
                ~exists().where(
                    RolloutDevice.rollout_id == rollout_id, RolloutDevice.device_id == Device.id
                ),
            )
            .order_by(Device.id)
        )
        return list(session.scalars(query).all())

    def _enrol(self, session: Session, rollout_id: int, device_ids: list[int]) -> int:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None or rollout.state not in RolloutState.RUNNING:
            return 0
        candidate = candidate_of(rollout)
        devices = session.execute(
            select(
                Device.id,
                Device.token,
                Device.build,
                Device.hardware,
                Device.fw_type,
                Device.fw_version,
                Device.project_id,
                Project.user_id,
            )
            .join(Project, Project.id == Device.project_id)
            .where(
                Device.id.in_(device_ids),
                ~exists().where(
                    RolloutDevice.rollout_id == rollout_id, RolloutDevice.device_id == Device.id
                ),
            )
        ).all()
        # Precedence judged in memory: one read of the running rollouts per
        # chunk, not a query per device.
        running = RunningRollouts(session)
        tags = tags_of(session, [row[0] for row in devices]) if running.tagged else {}
        entries = []
        for device_id, token, build, hardware, fw_type, fw_version, project_id, user_id in devices:
            owner = running.rollout_for(
                device_id=device_id,
                project_id=project_id,
                user_id=user_id,
                tags=tags.get(device_id, frozenset()),
            )
            if owner is None or owner.rollout_id != rollout_id:
                continue  # a more specific rollout keeps this device
            board = BoardReport(hardware, fw_type, fw_version, build)
            entry = rollout_entry(candidate, device_id, token, board, online=True)
            if entry is not None:
                entries.append(entry)
        enter_all(session, entries, utcnow())
        return sum(entry["state"] == DeviceState.PENDING for entry in entries)
