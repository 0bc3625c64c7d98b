"""What the downloads of offered firmware did: begun, cut short, complete, or not needed.

A download URL from an `ota` frame carries the offer's key (`?o=`); both
download paths (web/file_sender.py, web/downloads.py) report here through
the one set of download rules (web/download_rules.py). A row moves only by
a conditional write, so a download ending after the device's login (which
settles the attempt) never overwrites what the login decided.
"""

from dataclasses import dataclass, field

from gevent.event import Event
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..cluster import lock_offer_slots
from ..store import Database, DeviceState, OtaCommand, RolloutDevice, utcnow
from .firmware.catalog import FirmwareFile
from .rollouts.device_states import load_tracks, move
from .rollouts.guards import SLOT_STATES, RolloutGuards

__all__ = ["DownloadTicket", "DownloadTracker"]


@dataclass
class DownloadTicket:
    """One tracked download: which rollout row it moves, and how far it got."""

    row_id: int
    size: int
    start: int
    written_until: int = field(default=0)


class DownloadTracker:
    def __init__(self, db: Database, guards: RolloutGuards, fill_due: Event) -> None:
        self.db, self.guards, self.fill_due = db, guards, fill_due
        self._downloads: dict[int, DownloadTicket] = {}  # tracked downloads in progress here

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
            self.fill_due.set()  # a download slot freed

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
        # (`bytes_written`) until the row holds them: a device that cut the
        # download and logged in again at once is judged on what it got.
        try:
            finished = self.db.run(work)
        finally:
            if self._downloads.get(ticket.row_id) is ticket:  # not a newer download's
                del self._downloads[ticket.row_id]
        if finished:
            self.fill_due.set()

    def bytes_written(self) -> dict[int, int]:
        return {row_id: ticket.written_until for row_id, ticket in self._downloads.items()}


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
