"""The OTA domain as the hardware server and the admin API see it.

This half is the device side: who a token is, what it reported, which
firmware to offer it, what its downloads did, and the sweep that keeps
rollouts moving. The admin side (admin_ops.py) is mixed in. Everything that
must survive a restart is in the database before it counts.
"""

import logging
import threading
from collections.abc import Callable

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from ..store import (
    Database,
    Device,
    DeviceState,
    OtaCommand,
    Project,
    Rollout,
    RolloutDevice,
    RolloutState,
    utcnow,
)
from .admin_ops import AdminOperations
from .catalog import FirmwareCatalog, FirmwareFile
from .device_states import move
from .errors import OtaRequestError
from .guards import FleetPolicy, RolloutGuards
from .lifecycle import RetryPolicy, UpdateLifecycle
from .offers import DeviceIdentity, DownloadTicket, Offer, new_offer
from .online import OfferDeferred, OfferFailed, OnlineDevices
from .rollouts import RolloutPlanner

__all__ = ["DeviceIdentity", "DownloadTicket", "Offer", "OtaRequestError", "OtaService"]

log = logging.getLogger(__name__)

# Info-message keys and the Device columns they land in.
_INFO_COLUMNS = {
    "ver": "lib_version",
    "fw": "fw_version",
    "build": "build",
    "dev": "hardware",
    "tmpl": "template_id",
}
_INFO_NUMBERS = {"h-beat": "heartbeat", "buff-in": "buff_in"}

# Built once: these run at every device login.
_DEVICE_BY_TOKEN = (
    select(Device.id, Device.token, Device.project_id, Project.user_id)
    .join(Project, Project.id == Device.project_id)
    .where(Device.token == bindparam("token"))
)
_MARK_ONLINE = (
    update(Device)
    .where(Device.id == bindparam("device"))
    .values(
        online_since=bindparam("now"),
        last_seen_at=bindparam("now"),
        last_address=bindparam("address"),
    )
)


class OtaService(AdminOperations):
    def __init__(
        self,
        db: Database,
        catalog: FirmwareCatalog,
        online: OnlineDevices,
        *,
        policy: RetryPolicy | None = None,
        fleet_policy: FleetPolicy | None = None,
    ) -> None:
        self.db = db
        self.catalog = catalog
        self.online = online
        self.planner = RolloutPlanner()
        self.lifecycle = UpdateLifecycle(policy or RetryPolicy())
        self.guards = RolloutGuards(fleet_policy or FleetPolicy(), self.planner)
        self._downloads: dict[int, DownloadTicket] = {}  # tracked downloads in progress
        # Under gevent's monkey patching this lock makes greenlets take turns.
        self._offer_lock = threading.Lock()
        # Called when a download slot may have freed up; the server wakes its sweeper.
        self.on_slot_freed: Callable[[], None] = lambda: None

    # --- devices -------------------------------------------------------------

    def find_device(self, token: str) -> DeviceIdentity | None:
        with self.db.begin() as session:
            row = session.execute(_DEVICE_BY_TOKEN, {"token": token}).first()
        return None if row is None else DeviceIdentity(*row)

    def device_online(self, device_id: int, address: str) -> None:
        with self.db.begin() as session:
            session.execute(
                _MARK_ONLINE, {"device": device_id, "now": utcnow(), "address": address[:64]}
            )

    def device_online_again(self, device_id: int) -> None:
        with self.db.begin() as session:
            session.execute(
                update(Device).where(Device.id == device_id).values(online_since=utcnow())
            )

    def device_offline(self, device_id: int) -> None:
        with self.db.begin() as session:
            session.execute(
                update(Device)
                .where(Device.id == device_id)
                .values(online_since=None, last_seen_at=utcnow())
            )

    def mark_all_offline(self) -> None:
        """At start-up: connections of a previous process are gone, however it ended."""
        with self.db.begin() as session:
            session.execute(
                update(Device).where(Device.online_since.is_not(None)).values(online_since=None)
            )

    def device_reported(self, device: DeviceIdentity, info: dict[str, str]) -> Offer | None:
        """Record an info message (a full report: missing keys are stored as NULL).

        Ends the device's open attempts (updated, or failed with the reason) and
        returns the offer now due, if any.
        """
        report = {column: (info.get(key) or None) for key, column in _INFO_COLUMNS.items()}
        report = {column: value and value[:64] for column, value in report.items()}
        for key, column in _INFO_NUMBERS.items():
            value = info.get(key, "")
            report[column] = int(value) if value.isdigit() and len(value) < 10 else None
        build = report["build"]
        now = utcnow()
        with self.db.begin() as session:
            session.execute(
                update(Device).where(Device.id == device.id).values(last_seen_at=now, **report)
            )
            if self.lifecycle.resolve_in_flight(
                session, device.id, build, now, self._bytes_written()
            ):
                self.on_slot_freed()
            candidate = self.planner.rollout_for(
                session, device_id=device.id, project_id=device.project_id, user_id=device.user_id
            )
            if candidate is None:
                return None
            row = self.lifecycle.row_to_offer(
                session, device.id, device.token, build, candidate, now
            )
            return None if row is None else new_offer(candidate, device)

    def _claim_offer(self, offer: Offer, url: str) -> str | None:
        """Journal the offer and count the attempt, if the rollout may offer now.

        Returns why not (paused, no download slot, already offered), or None.
        Callers hold the offer lock, so two greenlets never both take the
        last download slot.
        """
        now = utcnow()
        with self.db.begin() as session:
            rollout = session.get(Rollout, offer.rollout_id)
            self.guards.check_health(session, rollout)
            if rollout.state != RolloutState.ACTIVE:
                return f"rollout {rollout.id} is {rollout.state}"
            row = self._row(session, offer.rollout_id, offer.device_id)
            if row is None or row.state != DeviceState.PENDING:
                return "already offered"
            if self.guards.free_slots(session, rollout.id) <= 0:
                return "no download slot free (ota.max.concurrent)"
            session.add(
                OtaCommand(
                    device_id=offer.device_id,
                    firmware_id=offer.firmware_id,
                    rollout_id=offer.rollout_id,
                    url=url[:255],
                    sent_at=now,
                    offer_key=offer.key,
                )
            )
            self.lifecycle.offer_made(session, row, now, url)
        return None

    def send_offer(self, offer: Offer) -> str:
        """Record `offer`, then write it to the device's connection; the URL sent.

        Recorded first: the device may ask for the file before this greenlet
        runs again. Raises OfferDeferred when the rollout may not offer now
        (paused, every download slot taken): the device stays pending. Raises
        OfferFailed when the frame cannot be built (nothing is counted) or the
        write fails (the attempt fails with that reason).
        """
        link = self.online.get_ready(offer.token)
        if link is None:
            raise OfferFailed("the device is not in session")
        url, frame = link.ota_frame(offer.url_path)
        with self._offer_lock:
            refused = self._claim_offer(offer, url)
        if refused is not None:
            raise OfferDeferred(refused)
        try:
            link.write_frame(frame)
        except OfferFailed as error:
            self._offer_undelivered(offer, str(error))
            raise
        log.info("device %s: sent ota %s", offer.token, url)
        return url

    def _offer_undelivered(self, offer: Offer, reason: str) -> None:
        now = utcnow()
        with self.db.begin() as session:
            row = self._row(session, offer.rollout_id, offer.device_id)
            if row is not None and row.state == DeviceState.OFFERED:
                rollout_state = session.get(Rollout, offer.rollout_id).state
                self.lifecycle.fail_attempt(
                    session, row, rollout_state, f"ota command not delivered: {reason}", now
                )

    # --- downloads -------------------------------------------------------------

    def download_started(
        self, firmware: FirmwareFile, key: str | None, start: int
    ) -> DownloadTicket | None:
        """A device asks for a file: if the URL carries a live offer key, track it."""
        if not key:
            return None
        now = utcnow()
        with self.db.begin() as session:
            command = session.scalar(select(OtaCommand).where(OtaCommand.offer_key == key[:16]))
            if command is None or command.firmware_id != firmware.id:
                return None
            row = self._row(session, command.rollout_id, command.device_id)
            if row is None or row.state not in DeviceState.IN_FLIGHT:
                return None
            row.bytes_sent = start
            detail = f"downloading from byte {start}" if start else None
            move(session, row, DeviceState.DOWNLOADING, now, detail)
            ticket = DownloadTicket(row.id, firmware.size, start, start)
        self._downloads[ticket.row_id] = ticket
        return ticket

    def download_finished(self, ticket: DownloadTicket, complete: bool) -> None:
        """The response ended: every byte written, or cut short at `written_until`."""
        self._downloads.pop(ticket.row_id, None)
        now = utcnow()
        with self.db.begin() as session:
            row = session.get(RolloutDevice, ticket.row_id)
            if row is None or row.state != DeviceState.DOWNLOADING:
                return  # the device came back already, and its login settled the attempt
            row.bytes_sent = ticket.written_until
            if complete and ticket.written_until >= ticket.size:
                move(session, row, DeviceState.DOWNLOADED, now)
                self.on_slot_freed()
            else:
                detail = f"download interrupted at {ticket.written_until} of {ticket.size} bytes"
                move(session, row, DeviceState.DOWNLOADING, now, detail)

    def _bytes_written(self) -> dict[int, int]:
        return {row_id: ticket.written_until for row_id, ticket in self._downloads.items()}

    # --- timers ----------------------------------------------------------------

    def sweep(self) -> tuple[int, int]:
        """The rollouts' clock, run every few seconds and whenever a slot frees up.

        Times out stale attempts, pauses rollouts past the failure threshold,
        grows waves, and offers pending devices that are connected (retries
        whose backoff ended, devices that waited for a download slot) while
        slots are free. Returns (attempts timed out, offers sent).
        """
        now = utcnow()
        grown = []
        with self.db.begin() as session:
            timed_out = self.lifecycle.time_out_attempts(session, now)
            for rollout in session.scalars(
                select(Rollout).where(Rollout.state == RolloutState.ACTIVE)
            ).all():
                self.guards.check_health(session, rollout)
                if self.guards.advance_wave(session, rollout) and rollout.push_online:
                    grown.append(rollout.id)
            budget = self.guards.free_slots(session)
            # Connected devices only (the sweep runs often: it must stay cheap),
            # oldest first, a few more than there are slots.
            due = session.execute(
                select(RolloutDevice.rollout_id, Device.token)
                .join(Device, Device.id == RolloutDevice.device_id)
                .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
                .where(
                    RolloutDevice.state == DeviceState.PENDING,
                    (RolloutDevice.next_attempt_at.is_(None))
                    | (RolloutDevice.next_attempt_at <= now),
                    Rollout.state == RolloutState.ACTIVE,
                    Device.online_since.is_not(None),
                )
                .order_by(RolloutDevice.pending_at, RolloutDevice.id)
                .limit(2 * budget + 10)
            ).all()
        for rollout_id in grown:
            self._enrol_online(rollout_id)
        sent = 0
        for rollout_id, token in due:
            if budget <= 0:
                break
            if self.online.get_ready(token) is None:
                continue  # offered at its next login
            offer = self._due_offer(token, rollout_id)
            if offer is None:
                continue
            try:
                self.send_offer(offer)
            except OfferDeferred:
                continue
            except OfferFailed as error:
                log.warning("device %s: not offered: %s", token, error)
                continue
            sent += 1
            budget -= 1
        return timed_out, sent

    def _enrol_online(self, rollout_id: int) -> int:
        """now=true: the connected devices this rollout targets join it without a login."""
        enrolled = 0
        for token in self.online.tokens():
            if self.online.get_ready(token) is not None and self._due_offer(token, rollout_id):
                enrolled += 1
        if enrolled:
            self.on_slot_freed()  # the sweeper offers them as slots allow
        return enrolled

    def _due_offer(self, token: str, rollout_id: int) -> Offer | None:
        device = self.find_device(token)
        if device is None:
            return None
        now = utcnow()
        with self.db.begin() as session:
            candidate = self.planner.rollout_for(
                session, device_id=device.id, project_id=device.project_id, user_id=device.user_id
            )
            if candidate is None or candidate.rollout_id != rollout_id:
                return None  # a more specific rollout took over
            build = session.scalar(select(Device.build).where(Device.id == device.id))
            row = self.lifecycle.row_to_offer(
                session, device.id, device.token, build, candidate, now
            )
            return None if row is None else new_offer(candidate, device)

    # --- helpers ---------------------------------------------------------------

    @staticmethod
    def _row(session: Session, rollout_id: int | None, device_id: int) -> RolloutDevice | None:
        if rollout_id is None:
            return None
        return session.scalar(
            select(RolloutDevice).where(
                RolloutDevice.rollout_id == rollout_id, RolloutDevice.device_id == device_id
            )
        )
