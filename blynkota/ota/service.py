"""The OTA domain as the hardware server and the admin API see it.

This half is the device side: who a token is, what it reported, which
firmware to offer it, what its downloads did, and the clocks that keep
rollouts moving. The admin side (admin_ops.py) is mixed in. Everything that
must survive a restart, or hold across processes, is in the database before
it counts: each unit of work is one transaction run by `Database.run`, which
runs it again when it lost a race to another process.

Who sends an offer: the node that holds the device's connection. At login it
offers at once; otherwise its `fill` (run every `node.poll.interval`) finds
the pending devices recorded on it and offers them as download slots allow.
So an admin request served by any process reaches a device on any node
through the database alone.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.orm import Session

from ..cluster import ClusterNode, lock_offer_slots
from ..protocol import info_number
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
from .device_states import load_tracks, move, offer_all
from .enrolment import OnlineEnrolment
from .errors import OtaRequestError
from .guards import SLOT_STATES, FleetPolicy, RolloutGuards
from .identities import IdentityCache
from .lifecycle import RetryPolicy, UpdateLifecycle
from .offers import DeviceIdentity, DownloadTicket, Offer, new_offer
from .online import NoDownloadSlot, OfferDeferred, OfferFailed, OnlineDevices
from .rollouts import RolloutPlanner, RunningRollouts

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

# Built once: this runs at every device login.
_DEVICE_BY_TOKEN = (
    select(Device.id, Device.token, Device.project_id, Project.user_id)
    .join(Project, Project.id == Device.project_id)
    .where(Device.token == bindparam("token"))
)
_devices = Device.__table__
# What an info message writes: every reported column, and when (built once, on the table).
_REPORTED = (
    update(_devices)
    .where(_devices.c.id == bindparam("device"))
    .values(
        last_seen_at=bindparam("now"),
        **{
            column: bindparam(column)
            for column in (*_INFO_COLUMNS.values(), *_INFO_NUMBERS.values())
        },
    )
)
NO_SLOT = "no download slot free (ota.max.concurrent)"


@dataclass(frozen=True)
class _Waiting:
    """A pending device connected here, as `fill` found it."""

    row_id: int
    rollout_id: int
    device: DeviceIdentity
    link: object  # its session (a DeviceLink): builds and takes the frame


class OtaService(AdminOperations):
    def __init__(
        self,
        db: Database,
        catalog: FirmwareCatalog,
        online: OnlineDevices,
        node: ClusterNode,
        *,
        policy: RetryPolicy | None = None,
        fleet_policy: FleetPolicy | None = None,
    ) -> None:
        self.db = db
        self.catalog = catalog
        self.online = online  # this process's connections: a cache of the presence rows
        self.node = node
        self.planner = RolloutPlanner()
        self.lifecycle = UpdateLifecycle(policy or RetryPolicy())
        self.guards = RolloutGuards(fleet_policy or FleetPolicy(), self.planner)
        self.enrolment = OnlineEnrolment(db, self.planner)
        self.identities = IdentityCache()
        self._downloads: dict[int, DownloadTicket] = {}  # tracked downloads in progress here
        # Called when a download slot may have freed up; the server wakes its fill.
        self.on_slot_freed: Callable[[], None] = lambda: None

    # --- devices -------------------------------------------------------------

    def find_device(self, token: str) -> DeviceIdentity | None:
        known = self.identities.get(token)
        if known is not None:
            return known
        row = self.db.run_core(
            lambda connection: connection.execute(_DEVICE_BY_TOKEN, {"token": token}).first()
        )
        if row is None:
            return None
        identity = DeviceIdentity(*row)
        self.identities.put(identity)
        return identity

    def device_online(self, device: DeviceIdentity, session_id: int, address: str, since) -> bool:
        recorded = self.node.device_online(device.id, session_id, address, since)
        if not recorded:
            self.identities.forget(device.token)  # a newer login, or the device is gone
        return recorded

    def device_offline(self, device_id: int, session_id: int) -> None:
        self.node.device_offline(device_id, session_id)

    def device_reported(self, device: DeviceIdentity, info: dict[str, str]) -> Offer | None:
        """Record an info message (a full report: missing keys are stored as NULL).

        Ends the device's open attempts (updated, or failed with the reason) and
        returns the offer now due, if any.
        """
        report = {column: (info.get(key) or None) for key, column in _INFO_COLUMNS.items()}
        limits = {column: Device.__table__.c[column].type.length for column in report}
        report = {column: value and value[: limits[column]] for column, value in report.items()}
        for key, column in _INFO_NUMBERS.items():
            report[column] = info_number(info.get(key))
        build = report["build"]
        bytes_written = self._bytes_written()

        # On a plain connection (no ORM session): the lifecycle and the planner
        # only execute statements, and this runs at every device login.
        def work(session: Connection) -> tuple[bool, Offer | None]:
            now = utcnow()
            # Attempts first, the device row last: every writer locks the
            # rollout row before the device's, so they queue instead of deadlocking.
            settled = self.lifecycle.resolve_in_flight(
                session, device.id, build, now, bytes_written
            )
            offer = None
            candidate = self.planner.rollout_for(
                session, device_id=device.id, project_id=device.project_id, user_id=device.user_id
            )
            if candidate is not None:
                track = self.lifecycle.row_to_offer(
                    session, device.id, device.token, build, candidate, now
                )
                offer = None if track is None else new_offer(candidate, device)
            session.execute(_REPORTED, {"device": device.id, "now": now, **report})
            return settled, offer

        settled, offer = self.db.run_core(work)
        if settled:
            self.on_slot_freed()
        return offer

    def _claim_offer(self, offer: Offer, url: str) -> str | None:
        """Journal the offer and count the attempt, if the rollout may offer now.

        Returns why not (paused, no download slot, already offered), or None.
        The offer-slots row is locked for the transaction, so no two processes
        both take the last download slot.
        """

        def work(session: Session) -> str | None:
            now = utcnow()
            # Judged before the lock: it reads every finished device of the
            # rollout, and the lock serialises every offer of every process.
            self.guards.check_health(session, session.get(Rollout, offer.rollout_id))
            lock_offer_slots(session)
            state = session.scalar(select(Rollout.state).where(Rollout.id == offer.rollout_id))
            if state != RolloutState.ACTIVE:
                return f"rollout {offer.rollout_id} is {state}"
            found = load_tracks(
                session,
                RolloutDevice.rollout_id == offer.rollout_id,
                RolloutDevice.device_id == offer.device_id,
            )
            if not found or found[0].state != DeviceState.PENDING:
                return "already offered"
            if self.guards.free_slots(session, offer.rollout_id) <= 0:
                return NO_SLOT
            if not self.lifecycle.offer_made(session, found[0], now, url):
                return "already offered"
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
            return None

        return self.db.run(work)

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
        refused = self._claim_offer(offer, url)
        if refused is not None:
            raise NoDownloadSlot(refused) if refused == NO_SLOT else OfferDeferred(refused)
        try:
            link.write_frame(frame)
        except OfferFailed as error:
            self._offer_undelivered(offer, str(error))
            raise
        log.info("device %s: sent ota %s", offer.token, url)
        return url

    def _offer_undelivered(self, offer: Offer, reason: str) -> None:
        def work(session: Session) -> None:
            rows = load_tracks(
                session,
                Rollout.id == RolloutDevice.rollout_id,
                RolloutDevice.rollout_id == offer.rollout_id,
                RolloutDevice.device_id == offer.device_id,
                RolloutDevice.state == DeviceState.OFFERED,
                extra=(Rollout.state,),
            )
            for track, rollout_state in rows:
                self.lifecycle.fail_attempt(
                    session, track, rollout_state, f"ota command not delivered: {reason}", utcnow()
                )

        self.db.run(work)

    # --- downloads -------------------------------------------------------------

    def download_started(
        self, firmware: FirmwareFile, key: str | None, start: int
    ) -> DownloadTicket | None:
        """A device asks for a file: if the URL carries a live offer key, track it."""
        if not key:
            return None

        def work(session: Session) -> DownloadTicket | None:
            now = utcnow()
            command = session.execute(
                select(OtaCommand.rollout_id, OtaCommand.device_id, OtaCommand.firmware_id).where(
                    OtaCommand.offer_key == key[:16]
                )
            ).first()
            if command is None or command.firmware_id != firmware.id:
                return None
            if command.rollout_id is None:
                return None
            found = load_tracks(
                session,
                RolloutDevice.rollout_id == command.rollout_id,
                RolloutDevice.device_id == command.device_id,
                RolloutDevice.state.in_(DeviceState.IN_FLIGHT),
            )
            if not found:
                return None
            track = found[0]
            if track.state not in SLOT_STATES:
                # Downloading again after a complete download takes a slot back.
                lock_offer_slots(session)
                if self.guards.free_slots(session, track.rollout_id) <= 0:
                    return None  # served, not tracked: the limit holds
            detail = f"downloading from byte {start}" if start else None
            if not move(session, track, DeviceState.DOWNLOADING, now, detail, bytes_sent=start):
                return None
            return DownloadTicket(track.id, firmware.size, start, start)

        ticket = self.db.run(work)
        if ticket is not None:
            self._downloads[ticket.row_id] = ticket
        return ticket

    def download_finished(self, ticket: DownloadTicket, complete: bool) -> None:
        """The response ended: every byte written, or cut short at `written_until`."""
        self._downloads.pop(ticket.row_id, None)

        def work(session: Session) -> bool:
            now = utcnow()
            found = load_tracks(
                session,
                RolloutDevice.id == ticket.row_id,
                RolloutDevice.state == DeviceState.DOWNLOADING,
            )
            if not found:
                return False  # the device came back already, and its login settled the attempt
            if complete and ticket.written_until >= ticket.size:
                return move(
                    session, found[0], DeviceState.DOWNLOADED, now, bytes_sent=ticket.written_until
                )
            detail = f"download interrupted at {ticket.written_until} of {ticket.size} bytes"
            move(
                session, found[0], DeviceState.DOWNLOADING, now, detail,
                bytes_sent=ticket.written_until,
            )  # fmt: skip
            return False

        if self.db.run(work):
            self.on_slot_freed()

    def _bytes_written(self) -> dict[int, int]:
        return {row_id: ticket.written_until for row_id, ticket in self._downloads.items()}

    # --- clocks ----------------------------------------------------------------

    def sweep(self) -> tuple[int, int]:
        """The rollouts' clock, run by the node holding the sweeper lease.

        Times out stale attempts, pauses rollouts past the failure threshold
        and grows waves (entering connected devices for now=true rollouts).
        Returns (attempts timed out, devices entered into grown waves).
        """

        def work(session: Session) -> tuple[int, list[int]]:
            now = utcnow()
            timed_out = self.lifecycle.time_out_attempts(session, now)
            grown = []
            for rollout in session.scalars(
                select(Rollout).where(Rollout.state == RolloutState.ACTIVE)
            ).all():
                if self.guards.check_health(session, rollout):
                    continue
                if self.guards.advance_wave(session, rollout) and rollout.push_online:
                    grown.append(rollout.id)
            return timed_out, grown

        timed_out, grown = self.db.run(work)
        if timed_out:
            self.on_slot_freed()
        entered = sum(self.enrol_online(rollout_id) for rollout_id in grown)
        return timed_out, entered

    def fill(self, limit: int = 500) -> int:
        """Offer the pending devices connected to this node, while slots are free.

        Retries whose backoff ended, devices that waited for a slot, devices
        entered by now=true, expand, resume or a ?token= request served by
        another process. The batch is claimed in one transaction (offers.py's
        rules, for many devices at once), then the frames are written.
        Returns the number of offers sent.
        """
        node_id = self.node.id

        def due(session: Session) -> list:
            budget = self.guards.free_slots(session)
            if budget <= 0:
                return []
            now = utcnow()
            return session.execute(
                select(
                    RolloutDevice.id,
                    RolloutDevice.rollout_id,
                    Device.id,
                    Device.token,
                    Device.project_id,
                    Project.user_id,
                )
                .join(Device, Device.id == RolloutDevice.device_id)
                .join(Project, Project.id == Device.project_id)
                .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
                .where(
                    RolloutDevice.state == DeviceState.PENDING,
                    (RolloutDevice.next_attempt_at.is_(None))
                    | (RolloutDevice.next_attempt_at <= now),
                    Rollout.state == RolloutState.ACTIVE,
                    Device.node_id == node_id,
                )
                .order_by(RolloutDevice.pending_at, RolloutDevice.id)
                .limit(min(limit, 2 * budget + 10))
            ).all()

        ready = []
        for row_id, rollout_id, device_id, token, project_id, user_id in self.db.run(due):
            link = self.online.get_ready(token)
            if link is None:
                continue  # not yet answered its info message: offered at login
            device = DeviceIdentity(device_id, token, project_id, user_id)
            ready.append(_Waiting(row_id, rollout_id, device, link))
        if not ready:
            return 0
        claimed = self.db.run(lambda session: self._claim_batch(session, ready))
        sent = 0
        for waiting, offer, frame in claimed:
            try:
                waiting.link.write_frame(frame)
            except OfferFailed as error:
                self._offer_undelivered(offer, str(error))
                log.warning("device %s: not offered: %s", offer.token, error)
                continue
            log.info("device %s: sent ota %s", offer.token, offer.url_path)
            sent += 1
        return sent

    def _claim_batch(self, session: Session, waiting: list["_Waiting"]) -> list:
        """Offers for as many of `waiting` as the download slots allow, recorded.

        The same rules as one device's offer: the rollout must be active and
        healthy, still the device's most specific one, the device not on the
        target already, its row pending and due. Rows are locked while they
        are judged; the offer-slots lock makes the slot count hold across
        processes.
        """
        now = utcnow()
        rollouts = {
            rollout.id: rollout
            for rollout in session.scalars(
                select(Rollout).where(Rollout.id.in_({w.rollout_id for w in waiting}))
            )
        }
        # Judged before the lock, as for one offer: it reads every finished device.
        healthy = {
            rollout_id
            for rollout_id, rollout in rollouts.items()
            if rollout.state == RolloutState.ACTIVE
            and not self.guards.check_health(session, rollout)
        }
        lock_offer_slots(session)
        running = RunningRollouts(session)
        free = {rollout_id: self.guards.free_slots(session, rollout_id) for rollout_id in healthy}
        server_free = self.guards.free_slots(session)
        tracks = {
            track.id: track
            for track in load_tracks(
                session,
                RolloutDevice.id.in_([w.row_id for w in waiting]),
                RolloutDevice.state == DeviceState.PENDING,
                for_update=True,
            )
        }
        builds = dict(
            session.execute(
                select(Device.id, Device.build).where(Device.id.in_([w.device.id for w in waiting]))
            ).all()
        )
        chosen, offers = [], []
        for item in waiting:
            track = tracks.get(item.row_id)
            if track is None or item.rollout_id not in healthy:
                continue
            if track.next_attempt_at is not None and track.next_attempt_at > now:
                continue
            device = item.device
            candidate = running.rollout_for(
                device_id=device.id, project_id=device.project_id, user_id=device.user_id
            )
            if candidate is None or candidate.rollout_id != item.rollout_id:
                continue  # a more specific rollout took over
            if candidate.build is not None and builds.get(device.id) == candidate.build:
                move(session, track, DeviceState.UPDATED, now)
                continue
            if server_free <= 0:
                break
            if free[item.rollout_id] <= 0:
                continue
            offer = new_offer(candidate, device)
            try:
                url, frame = item.link.ota_frame(offer.url_path)
            except OfferFailed:
                continue  # the connection closed meanwhile: offered at its next login
            free[item.rollout_id] -= 1
            server_free -= 1
            chosen.append((item, offer, frame))
            offers.append((track, url))
        offer_all(session, offers, now)
        if offers:
            session.execute(
                insert(OtaCommand),
                [
                    {
                        "device_id": offer.device_id,
                        "firmware_id": offer.firmware_id,
                        "rollout_id": offer.rollout_id,
                        "url": url[:255],
                        "sent_at": now,
                        "offer_key": offer.key,
                    }
                    for (_, offer, _), (_, url) in zip(chosen, offers, strict=True)
                ],
            )
        return chosen

    def enrol_online(self, rollout_id: int) -> int:
        """now=true, expand, a grown wave: connected devices enter (enrolment.py)."""
        entered = self.enrolment.enter_connected(rollout_id)
        if entered:
            self.on_slot_freed()
        return entered
