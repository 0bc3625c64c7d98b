"""The OTA domain as the hardware server and the admin API see it.

Devices: who a token is, what it reported, which firmware to offer it, what
its downloads did. Admins: upload firmware, aim it at a device / project /
user / everyone, stop, look at progress. Everything that must survive a
restart is in the database before it counts.
"""

import hashlib
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from ..store import (
    Database,
    Device,
    DeviceState,
    Firmware,
    OtaCommand,
    Project,
    Rollout,
    RolloutDevice,
    RolloutScope,
    RolloutState,
    utcnow,
)
from .catalog import FirmwareCatalog, FirmwareFile, Upload, served_path
from .cohorts import Controls
from .device_states import move, start_tracking
from .errors import OtaRequestError
from .firmware import FirmwareRejected, ImageReport
from .guards import FleetPolicy, RolloutGuards
from .lifecycle import RetryPolicy, UpdateLifecycle
from .online import OfferDeferred, OfferFailed, OnlineDevices
from .rollouts import Candidate, RolloutPlanner
from .status import rollout_detail, rollout_summaries
from .targeting import campaign_target, devices_taken_in

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


@dataclass(frozen=True)
class DeviceIdentity:
    id: int
    token: str
    project_id: int
    user_id: int


@dataclass(frozen=True)
class Offer:
    rollout_id: int
    device_id: int
    token: str
    firmware_id: int
    path: str  # /static/ota/<name>.bin, what the admin API answers
    key: str  # ties the download to this offer

    @property
    def url_path(self) -> str:
        return f"{self.path}?o={self.key}"


@dataclass
class DownloadTicket:
    """One tracked download: which rollout row it moves, and how far it got."""

    row_id: int
    size: int
    start: int
    written_until: int = field(default=0)


def _new_offer(candidate: Candidate, device: DeviceIdentity) -> Offer:
    # 48 random bits, URL-safe: short enough for a 256-byte device buffer.
    return Offer(
        rollout_id=candidate.rollout_id,
        device_id=device.id,
        token=device.token,
        firmware_id=candidate.firmware_id,
        path=served_path(candidate.firmware_name),
        key=secrets.token_urlsafe(6),
    )


def _candidate(rollout: Rollout) -> Candidate:
    firmware = rollout.firmware
    return Candidate(rollout.id, rollout.scope, firmware.id, firmware.name, firmware.build)


class OtaService:
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
            return None if row is None else _new_offer(candidate, device)

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
            return None if row is None else _new_offer(candidate, device)

    # --- admin -----------------------------------------------------------------

    def start_for_device(self, token: str, upload: Upload, admin: str, *, queue: bool) -> str:
        """Upload and send to one device now (Blynk's ?token=), or at its next login."""
        device = self._device_for_admin(token, queue=queue)
        report = self._inspect(upload)
        return self._device_rollout(
            device, admin, lambda session: self.catalog.add(session, upload, report, admin)
        )

    def resend(self, file_name: str, token: str, admin: str, *, queue: bool) -> str:
        """Send an already uploaded file to one device (GET ?fileName=&token=)."""
        name = file_name.rsplit("/", 1)[-1].removesuffix(".bin")
        device = self._device_for_admin(token, queue=queue)

        def uploaded(session: Session) -> Firmware:
            firmware = self.catalog.by_name(session, name)
            if firmware is None:
                raise OtaRequestError("Requested file not found.")
            return firmware

        return self._device_rollout(device, admin, uploaded)

    def start_campaign(
        self,
        upload: Upload,
        admin: str,
        *,
        user: str | None = None,
        project: str | None = None,
        controls: Controls | None = None,
    ) -> str:
        """Upload for every device (of a user, of a project) whose build differs.

        Offered at each device's next login, or at once to connected devices
        with now=true; to a share of them with percent= or waves=.
        """
        controls = controls or Controls()
        with self.db.begin() as session:
            scope, target_id = campaign_target(session, user, project)
        report = self._campaign_report(upload)
        if controls.push_online is None:
            controls = replace(controls, push_online=self.guards.policy.push_online)
        with self.db.begin() as session:
            firmware = self.catalog.add(session, upload, report, admin)
            rollout = self.planner.start(
                session,
                scope=scope,
                firmware=firmware,
                started_by=admin,
                target_id=target_id,
                controls=controls,
            )
        log.info(
            "rollout %d of %s (build %s) to %s started by %s",
            rollout.id,
            firmware.name,
            report.build,
            scope,
            admin,
        )
        if rollout.push_online:
            self._enrol_online(rollout.id)
        return served_path(firmware.name)

    def _campaign_report(self, upload: Upload) -> ImageReport:
        report = self._inspect(upload)
        if report.build is None:
            raise OtaRequestError(
                "The firmware has no build date (no \\0build\\0 tag from the Blynk "
                "library), so updated devices could never be told from old ones: a "
                "campaign needs it. Send it to one device with ?token= instead."
            )
        return report

    def dry_run(
        self, upload: Upload, *, user: str | None, project: str | None, controls: Controls
    ) -> dict:
        """The devices a campaign would take in now; nothing is stored or started."""
        with self.db.begin() as session:
            scope, target_id = campaign_target(session, user, project)
        report = self._campaign_report(upload)
        candidate = Candidate(
            rollout_id=0,
            scope=scope,
            firmware_id=0,
            firmware_name="",
            build=report.build,
            percent=controls.start_percent,
            cohort_seed=hashlib.sha256(upload.data).hexdigest()[:16],
            waves=",".join(map(str, controls.waves)) or None,
        )
        with self.db.begin() as session:
            devices = devices_taken_in(session, self.planner, candidate, target_id)
        for device in devices:
            device["online"] = self.online.get(device["token"]) is not None
        return {
            "dry_run": True,
            "scope": scope,
            "build": report.build,
            "chip": report.chip,
            "percent": candidate.percent,
            "devices": devices,
        }

    def pause(self, rollout_id: int, admin: str) -> dict:
        return self._change(rollout_id, lambda s, r: self.planner.pause(s, r, f"by {admin}"))

    def resume(self, rollout_id: int, admin: str) -> dict:
        summary = self._change(rollout_id, lambda s, r: self.planner.resume(s, r, admin))
        self.on_slot_freed()  # pending devices may be offered again
        return summary

    def expand(self, rollout_id: int, percent: int, admin: str) -> dict:
        def widen(session: Session, rollout: Rollout) -> bool:
            if not rollout.percent < percent <= 100:
                raise OtaRequestError(
                    f"percent must be above the rollout's {rollout.percent} and at most 100."
                )
            self.planner.widen(session, rollout, percent, f"expanded by {admin}")
            return True

        summary = self._change(rollout_id, widen)
        if summary["push_online"]:
            self._enrol_online(rollout_id)
        return summary

    def _change(self, rollout_id: int, change: Callable[[Session, Rollout], bool]) -> dict:
        with self.db.begin() as session:
            rollout = session.get(Rollout, rollout_id)
            if rollout is None:
                raise OtaRequestError(f"No rollout {rollout_id}.", 404)
            if rollout.state not in RolloutState.RUNNING:
                raise OtaRequestError(f"Rollout {rollout_id} is {rollout.state}.", 409)
            if not change(session, rollout):
                raise OtaRequestError(f"Rollout {rollout_id} is already {rollout.state}.", 409)
        return self.status(rollout_id)[0]

    def stop(self, admin: str, rollout_id: int | None = None) -> int:
        with self.db.begin() as session:
            if rollout_id is not None and session.get(Rollout, rollout_id) is None:
                raise OtaRequestError(f"No rollout {rollout_id}.", 404)
            stopped = self.planner.stop(session, admin, rollout_id)
        log.info("%d rollout(s) stopped by %s", stopped, admin)
        return stopped

    def status(self, rollout_id: int | None = None) -> list[dict]:
        with self.db.begin() as session:
            return rollout_summaries(session, rollout_id)

    def detail(self, rollout_id: int) -> dict:
        with self.db.begin() as session:
            found = rollout_detail(session, rollout_id)
        if found is None:
            raise OtaRequestError(f"No rollout {rollout_id}.", 404)
        return found

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

    def _device_for_admin(self, token: str, *, queue: bool) -> DeviceIdentity:
        device = self.find_device(token)
        if device is None:
            raise OtaRequestError("Invalid token.")
        if not queue and self.online.get(token) is None:
            raise OtaRequestError("No device in session.")
        return device

    def _inspect(self, upload: Upload):
        try:
            return self.catalog.inspect(upload)
        except FirmwareRejected as error:
            raise OtaRequestError(str(error)) from None

    def _device_rollout(
        self, device: DeviceIdentity, admin: str, firmware_of: Callable[[Session], Firmware]
    ) -> str:
        """A device rollout for the firmware `firmware_of` gives, offered now if online."""
        now = utcnow()
        with self.db.begin() as session:
            rollout = self.planner.start(
                session,
                scope=RolloutScope.DEVICE,
                firmware=firmware_of(session),
                started_by=admin,
                target_id=device.id,
            )
            # Asked for by name: sent whatever build the device reports.
            start_tracking(
                session,
                rollout_id=rollout.id,
                device_id=device.id,
                state=DeviceState.PENDING,
                at=now,
                detail=f"targeted by {admin}",
            )
            offer = _new_offer(_candidate(rollout), device)
        if self.online.get_ready(device.token) is not None:
            try:
                self.send_offer(offer)
            except OfferDeferred as reason:
                log.info("device %s: update waits: %s", device.token, reason)
            except OfferFailed as error:
                raise OtaRequestError(
                    f"The update could not be sent: {error}. It stays pending for the next login."
                ) from None
        # Not yet reported (or queued while offline): offered after its next info message.
        return offer.path
