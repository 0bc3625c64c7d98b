"""The device side of the OTA domain, as a device session sees it.

Who a token is, where a login's presence goes, what an info message reports
and whether it makes an update due. A login storm's lookups and reports
share transactions (group commit): each unit of work is one transaction run
by `Database.run`, which runs it again when it lost a race to another
process. Offers are not sent from here: a report that makes one due sets
`fill_due`, and this node's fill claims it with whatever else is due
(rollouts/offering.py).
"""

import logging
from collections.abc import Sequence

from gevent.event import AsyncResult, Event
from sqlalchemy import Connection, bindparam, select, update

from ..cluster import ClusterNode
from ..logsafe import CUT_VALUES, token_tag
from ..protocol import IDENTITY_KEYS, info_number
from ..store import Database, Device, GroupCommit, HotQuery, ManyRows, Project, utcnow
from .download_tracker import DownloadTracker
from .fleet.identities import DeviceIdentity, IdentityCache
from .fleet.registry import adopt_device
from .fleet.tags import tags_of
from .rollouts.candidates import RunningRollouts
from .rollouts.lifecycle import ReportedBuild, UpdateLifecycle

__all__ = ["DeviceSide"]

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
    ),
    joined_on="device",
)


class DeviceSide:
    def __init__(
        self,
        db: Database,
        node: ClusterNode,
        lifecycle: UpdateLifecycle,
        downloads: DownloadTracker,
        fill_due: Event,
    ) -> None:
        self.db, self.node, self.lifecycle = db, node, lifecycle
        self.downloads = downloads  # what the downloads in progress here have written
        self.fill_due = fill_due
        self.identities = IdentityCache()
        # A login storm's lookups and reports share transactions (group commit).
        self._lookups = GroupCommit(db, self._find_all, name="token lookups")
        self._reports = GroupCommit(db, self._record_reports, name="info reports")

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

    def new_session_id(self) -> int:
        return self.node.new_session_id()

    def adopt(self, token: str) -> DeviceIdentity:
        """The device of a token the upstream Blynk server accepted (relay mode):
        known, or a new row under the unknown owner until `import-blynk` places it."""
        found = self.find_device(token)
        if found is not None:
            return found
        row = self.db.run(lambda session: adopt_device(session, token))
        identity = DeviceIdentity(row[0], token, row[1], row[2])
        self.identities.put(identity)
        log.info("device %s: accepted by the upstream, new here: owner unknown", token_tag(token))
        return identity

    def device_online(self, device: DeviceIdentity, session_id: int, address: str, since):
        """The login's presence write, queued (cluster/nodes.py): an AsyncResult of bool."""
        return self.node.device_online(device.id, session_id, address, since)

    def login_superseded(self, device: DeviceIdentity) -> None:
        """A newer login holds the device, or the device is gone: look it up afresh."""
        self.identities.forget(device.token)

    def device_offline(self, device_id: int, session_id: int) -> None:
        """Queue the disconnect (cluster/nodes.py); never waits."""
        self.node.device_offline(device_id, session_id)

    def device_reported(self, device: DeviceIdentity, info: dict[str, str]) -> bool:
        """Record an info message (a full report: missing keys are stored as NULL).

        Ends the device's open attempts (updated, or failed with the reason)
        and enters the device in its rollout. True if an offer is due: the
        device's row is pending, and this node's fill claims it with whatever
        else is due (rollouts/offering.py), so a login storm's offers share a few
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
            self.fill_due.set()  # an attempt ended (a slot freed), or an offer is due

    def _record_reports(
        self, connection: Connection, reports: Sequence[tuple[DeviceIdentity, dict]]
    ) -> list[tuple[bool, bool]]:
        """Many devices' info messages in one transaction: (settled, due) for each."""
        now = utcnow()
        bytes_written = self.downloads.bytes_written()
        in_flight = self.lifecycle.in_flight_by_device(
            connection, [device.id for device, _ in reports]
        )
        running = RunningRollouts(connection)
        tags = tags_of(connection, [device.id for device, _ in reports]) if running.tagged else {}
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
                device_id=device.id,
                project_id=device.project_id,
                user_id=device.user_id,
                tags=tags.get(device.id, frozenset()),
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
