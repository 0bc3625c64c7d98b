"""The OTA domain as the hardware server and the admin API see it.

This half is the device side: who a token is, what it reported, which
firmware to offer it, what its downloads did, and the clocks that keep
rollouts moving. The admin side (admin_ops.py) is mixed in. Everything that
must survive a restart, or hold across processes, is in the database before
it counts: each unit of work is one transaction run by `Database.run`, which
runs it again when it lost a race to another process.

Who sends an offer: the node that holds the device's connection, in its
`fill` (batch_offers.py), run every `node.poll.interval` and woken when a
login finds an update due or a download slot frees: it claims the pending
devices recorded on it, as many as the slots allow, in one transaction. So
an admin request served by any process reaches a device on any node through
the database alone, and a login storm's offers share a few transactions.
"""

import logging
from collections.abc import Callable, Sequence

import gevent
from gevent.event import AsyncResult
from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.orm import Session

from .. import metrics
from ..cluster import ClusterNode, lock_offer_slots
from ..logsafe import CUT_VALUES, token_tag
from ..protocol import IDENTITY_KEYS, info_number
from ..store import (
    Database,
    Device,
    DeviceState,
    GroupCommit,
    HotQuery,
    ManyRows,
    OtaCommand,
    Project,
    Rollout,
    RolloutDevice,
    RolloutState,
    utcnow,
)
from .admin_ops import AdminOperations
from .batch_offers import BatchOffers
from .catalog import FirmwareCatalog, FirmwareFile
from .device_states import devices_in_flight, load_tracks, move
from .enrolment import OnlineEnrolment
from .errors import OtaRequestError
from .guards import SLOT_STATES, FleetPolicy, RolloutGuards
from .identities import IdentityCache
from .lifecycle import ReportedBuild, RetryPolicy, UpdateLifecycle
from .offers import DeviceIdentity, DownloadTicket, Offer
from .online import NoDownloadSlot, OfferDeferred, OfferFailed, OnlineDevices
from .rollouts import RolloutPlanner, RunningRollouts

__all__ = ["DeviceIdentity", "DownloadTicket", "Offer", "OtaRequestError", "OtaService"]

log = logging.getLogger(__name__)

# Info-message keys and the Device columns they land in: each column from
# the first key of its list the info message has (the library generations
# name the same things differently, SPEC §7).
_INFO_COLUMNS = {
    **IDENTITY_KEYS,
    "build": ("build",),
    "hardware": ("dev",),
    "template_id": ("tmpl",),
}
_INFO_NUMBERS = {"h-beat": "heartbeat", "buff-in": "buff_in"}

# Built once: this runs for every batch of device logins.
_DEVICES_BY_TOKEN = HotQuery(
    select(Device.id, Device.token, Device.project_id, Project.user_id)
    .join(Project, Project.id == Device.project_id)
    .where(Device.token.in_(bindparam("tokens", expanding=True)))
)
_devices = Device.__table__
# Reported strings are cut to their columns: a long `ver` must not fail the login.
_LIMITS = {column: _devices.c[column].type.length for column in _INFO_COLUMNS}
# What an info message writes: every reported column, and when (built once, on the table).
_REPORTED = ManyRows(
    update(_devices)
    .where(_devices.c.id == bindparam("device"))
    .values(
        last_seen_at=bindparam("now"),
        **{column: bindparam(column) for column in (*_INFO_COLUMNS, *_INFO_NUMBERS.values())},
    )
)
# Seconds an owed enrolment is left to the process that answered the request
# before the sweeper does it (that process may have stopped).
ENROLMENT_GRACE = 15.0
NO_SLOT = "no download slot free (ota.max.concurrent)"
IN_FLIGHT = "an update is in flight already: this one follows when it ends"


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
        self.enrolment = OnlineEnrolment(db)
        self.batches = BatchOffers(db, self.guards, online, node, self._offer_undelivered)
        self.identities = IdentityCache()
        # A login storm's lookups and reports share transactions (group commit).
        self._lookups = GroupCommit(db, self._find_all, name="token lookups")
        self._reports = GroupCommit(db, self._record_reports, name="info reports")
        self._downloads: dict[int, DownloadTicket] = {}  # tracked downloads in progress here
        # Called when pending devices here may be offered (a download slot
        # freed, a device became due at login): the server wakes its fill.
        self.wake_fill: Callable[[], None] = lambda: None

    # --- devices -------------------------------------------------------------

    def find_device(self, token: str) -> DeviceIdentity | None:
        return self.find_device_later(token).get()

    def find_device_later(self, token: str) -> AsyncResult:
        """`find_device` without waiting: an AsyncResult of the identity (None
        for an unknown token) or of the database's error, set at once when
        the process remembers the token. For a login answered from the event loop."""
        known = self.identities.get(token)
        if known is not None:
            found = AsyncResult()
            found.set(known)
            return found
        pending = self._lookups.submit_later(token)
        pending.rawlink(self._remember)  # linked first: remembered before the login goes on
        return pending

    def _remember(self, pending: AsyncResult) -> None:
        if pending.successful() and pending.value is not None:
            self.identities.put(pending.value)

    def _find_all(self, connection: Connection, tokens: Sequence[str]) -> list:
        rows = _DEVICES_BY_TOKEN.rows(connection, tokens=sorted(set(tokens)))
        found = {row[1]: DeviceIdentity(*row) for row in rows}
        return [found.get(token) for token in tokens]

    def device_online(self, device: DeviceIdentity, session_id: int, address: str, since):
        """The login's presence write, queued (cluster/nodes.py): an AsyncResult of bool."""
        return self.node.device_online(device.id, session_id, address, since)

    def login_superseded(self, device: DeviceIdentity) -> None:
        """A newer login holds the device, or the device is gone: look it up afresh."""
        self.identities.forget(device.token)

    def device_offline(self, device_id: int, session_id: int) -> None:
        self.node.device_offline(device_id, session_id)

    def device_reported(self, device: DeviceIdentity, info: dict[str, str]) -> bool:
        """Record an info message (a full report: missing keys are stored as NULL).

        Ends the device's open attempts (updated, or failed with the reason)
        and enters the device in its rollout. True if an offer is due: the
        device's row is pending, and this node's fill claims it with whatever
        else is due (batch_offers.py), so a login storm's offers share a few
        transactions instead of taking the offer lock one by one.
        """
        settled, due = self.report_later(device, info).get()
        return due

    def report_later(self, device: DeviceIdentity, info: dict[str, str]) -> AsyncResult:
        """`device_reported` without waiting: an AsyncResult of (settled, due),
        or of the database's error. A device session goes idle at once and
        hears the outcome from the event loop (`AsyncResult.rawlink`)."""
        report = {}
        get = info.get
        for column, keys in _INFO_COLUMNS.items():
            for key in keys:  # plain loops: this runs for every login
                value = get(key) or None
                if value is not None:
                    break
            if value is not None and len(value) > _LIMITS[column]:
                value = CUT_VALUES.cut(
                    value, _LIMITS[column], key=key, holder=f"device {token_tag(device.token)}"
                )
            report[column] = value
        for key, column in _INFO_NUMBERS.items():
            report[column] = info_number(info.get(key))
        pending = self._reports.submit_later((device, report))
        pending.rawlink(self._after_report)
        return pending

    def _after_report(self, pending: AsyncResult) -> None:
        # Linked first, so the fill is woken before the session hears the outcome.
        if pending.successful() and any(pending.value):
            self.wake_fill()  # an attempt ended (a slot freed), or an offer is due

    def _record_reports(
        self, connection: Connection, reports: Sequence[tuple[DeviceIdentity, dict]]
    ) -> list[tuple[bool, bool]]:
        """Many devices' info messages in one transaction: (settled, due) for each."""
        now = utcnow()
        bytes_written = self._bytes_written()
        in_flight = self.lifecycle.in_flight_by_device(
            connection, [device.id for device, _ in reports]
        )
        running = RunningRollouts(connection)
        settled, due = [False] * len(reports), [False] * len(reports)
        judged: list[tuple[int, ReportedBuild]] = []
        # Attempts first, the device rows last: every writer locks the
        # rollout row before the device's, so they queue instead of deadlocking.
        for index, (device, report) in enumerate(reports):
            # Popped: a second report of the device in this batch finds it settled.
            attempts = in_flight.pop(device.id, None)
            if attempts:
                settled[index] = self.lifecycle.resolve_in_flight(
                    connection, attempts, report["build"], now, bytes_written
                )
            candidate = running.rollout_for(
                device_id=device.id, project_id=device.project_id, user_id=device.user_id
            )
            if candidate is not None:
                judged.append(
                    (
                        index,
                        ReportedBuild(
                            device.id,
                            device.token,
                            report["build"],
                            candidate,
                            report["hardware"],
                            report["fw_type"],
                            report["fw_version"],
                        ),
                    )
                )
        if judged:
            offers = self.lifecycle.rows_to_offer(connection, [entry for _, entry in judged], now)
            for (index, _), is_due in zip(judged, offers, strict=True):
                due[index] = is_due
        rows = [{"device": device.id, "now": now, **report} for device, report in reports]
        _REPORTED.execute(connection, sorted(rows, key=lambda row: row["device"]))
        return list(zip(settled, due, strict=True))

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
            if devices_in_flight(session, [offer.device_id]):
                return IN_FLIGHT
            found = load_tracks(
                session,
                RolloutDevice.rollout_id == offer.rollout_id,
                RolloutDevice.device_id == offer.device_id,
            )
            if not found or found[0].state != DeviceState.PENDING:
                return "already offered"
            if self.guards.free_slots(session, offer.rollout_id) <= 0:
                return NO_SLOT
            by = (self.node.id, self.node.run_number)
            if not self.lifecycle.offer_made(session, found[0], now, url, by):
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
        metrics.OFFERS.inc()
        log.info(
            "device %s: sent ota %s",
            token_tag(offer.token),
            url,
            extra={"device": token_tag(offer.token), "rollout": offer.rollout_id},
        )
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
            track = _attempt_of_offer(session, firmware, key)
            if track is None:
                return None
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

    def already_running(self, firmware: FirmwareFile, key: str | None) -> None:
        """The updater's request says it runs this very file (its sketch MD5 is
        the file's): answered 304, nothing downloaded. The offer's attempt ends
        with the device counted as already on the firmware."""
        if not key:
            return

        def work(session: Session) -> bool:
            track = _attempt_of_offer(session, firmware, key)
            return track is not None and move(
                session,
                track,
                DeviceState.UPDATED,
                utcnow(),
                "the updater runs this firmware already (its sketch MD5 is the file's): 304",
                already_current=True,
            )

        if self.db.run(work):
            self.wake_fill()  # a download slot freed

    def download_finished(self, ticket: DownloadTicket, complete: bool) -> None:
        """The response ended: every byte written, or cut short at `written_until`."""

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

        # The ticket stays where a login's report reads the bytes sent
        # (`_bytes_written`) until the row holds them: a device that cut the
        # download and logged in again at once is judged on what it got.
        try:
            finished = self.db.run(work)
        finally:
            if self._downloads.get(ticket.row_id) is ticket:  # not a newer download's
                del self._downloads[ticket.row_id]
        if finished:
            self.wake_fill()

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
            self.wake_fill()
        owed = set(grown) | set(self.enrolment.overdue(ENROLMENT_GRACE))
        entered = sum(self.enrol_online(rollout_id) for rollout_id in sorted(owed))
        return timed_out, entered

    def fill(self, limit: int = 500) -> int:
        """Offer the pending devices connected to this node, in batches (batch_offers.py)."""
        return self.batches.fill(limit)

    def enrol_online(self, rollout_id: int) -> int:
        """now=true, expand, a grown wave: connected devices enter (enrolment.py)."""
        entered = self.enrolment.enter_connected(rollout_id)
        if entered:
            self.wake_fill()
        return entered

    def enrol_in_background(self, rollout_id: int) -> None:
        """Enter the connected devices after the request has its answer.

        The rollout row says the work is owed (`enrol_due_at`): if this fails,
        or the process stops, the sweeper does it after ENROLMENT_GRACE.
        """

        def work() -> None:
            try:
                self.enrol_online(rollout_id)
            except Exception as error:
                log.warning(
                    "rollout %d: entering connected devices failed (%s); the sweeper retries",
                    rollout_id,
                    error,
                )

        gevent.spawn(work)


def _attempt_of_offer(session: Session, firmware: FirmwareFile, key: str):
    """The attempt in flight that the offer key of a download URL names, if any."""
    command = session.execute(
        select(OtaCommand.rollout_id, OtaCommand.device_id, OtaCommand.firmware_id).where(
            OtaCommand.offer_key == key[:16]
        )
    ).first()
    if command is None or command.firmware_id != firmware.id or command.rollout_id is None:
        return None
    found = load_tracks(
        session,
        RolloutDevice.rollout_id == command.rollout_id,
        RolloutDevice.device_id == command.device_id,
        RolloutDevice.state.in_(DeviceState.IN_FLIGHT),
    )
    return found[0] if found else None
