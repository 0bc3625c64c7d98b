"""Offers: which pending devices get an `ota` frame now, journaled, then written.

Two ways in, one rule set. `fill` takes the pending devices connected to
this node (retries whose backoff ended, devices that waited for a download
slot, devices entered by now=true, expand, resume, a login that found an
update due, a ?token= request served by another process); `send_now` takes
the one device of a ?token= request connected to this process, at once.
Both claim in `_claim`, by `_refusal`: the rollout active and healthy, still
the device's most specific one, inside its offer window (window=), the device
not on the target already and able to run the image, its row pending and due,
no other `ota` in flight to it, a download slot free in the server and in the
rollout. The offer-slots row is locked for the claim, so no two processes both
take the last slot; rows are locked while they are judged. Ten thousand
connected devices are a few dozen transactions, not forty thousand.

Recorded first, written after: the device may ask for the file at once.
"""

import logging
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from ... import metrics
from ...cluster import ClusterNode, lock_offer_slots
from ...logs import PER_TURN
from ...logsafe import DEVICE_LINES
from ...store import (
    Database,
    Device,
    DeviceState,
    HotQuery,
    OtaCommand,
    Rollout,
    RolloutDevice,
    RolloutScope,
    RolloutState,
    insert_many,
    utcnow,
)
from ..firmware.catalog import served_path
from ..fleet.identities import DeviceIdentity
from ..fleet.online import (
    DeviceLink,
    FrameTooLarge,
    NoDownloadSlot,
    OfferDeferred,
    OfferFailed,
    OnlineDevices,
)
from ..fleet.tags import tags_of
from .candidates import Candidate, RunningRollouts
from .compatibility import BoardReport
from .device_states import (
    devices_in_flight,
    load_tracks,
    move,
    offer_all,
    run_tracks_query,
    tracks_query,
)
from .due_rows import DUE, pending_here
from .guards import RolloutGuards
from .health import reached_target
from .lifecycle import UpdateLifecycle
from .schedule import closed_rollouts

__all__ = ["IN_FLIGHT", "NO_SLOT", "Offer", "Offers", "new_offer", "replace_unstarted_offers"]

log = logging.getLogger(__name__)

HEALTH_EVERY = 0.5  # seconds between two judgements of a rollout's failure ratio by `fill`
NO_SLOT = "no download slot free (ota.max.concurrent)"
IN_FLIGHT = "an update is in flight already: this one follows when it ends"
NOT_PENDING = "already offered"
ON_TARGET = "the device runs this firmware already"
TAKEN_OVER = "a more specific rollout took over"
BACKING_OFF = "backing off after a failed attempt"
NOT_IN_SESSION = "the device is not in session"

# A claim's rows, locked while they are judged, and what its devices last reported.
_PENDING_ROWS = tracks_query(
    RolloutDevice.id.in_(bindparam("rows", expanding=True)),
    RolloutDevice.state == DeviceState.PENDING,
    for_update=True,
)
_BOARDS = HotQuery(
    select(Device.id, Device.hardware, Device.fw_type, Device.fw_version, Device.build).where(
        Device.id.in_(bindparam("devices", expanding=True))
    )
)


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


def new_offer(candidate: Candidate, device: DeviceIdentity) -> Offer:
    # 48 random bits, URL-safe: short enough for a 256-byte device buffer.
    return Offer(
        rollout_id=candidate.rollout_id,
        device_id=device.id,
        token=device.token,
        firmware_id=candidate.firmware_id,
        path=served_path(candidate.firmware_name),
        key=secrets.token_urlsafe(6),
    )


@dataclass(frozen=True)
class _Waiting:
    """A pending device connected here, to be judged for an offer."""

    row_id: int
    rollout_id: int
    device: DeviceIdentity
    link: DeviceLink  # its session: builds the frame and takes it


# A claimed offer: (the waiting device, its Offer, the frame to write).
_Claimed = tuple[_Waiting, Offer, bytes]
_NOTHING_REPORTED = (None, None, None, None)


class _Verdicts(dict):
    """What the rules say of each board report against each rollout, judged once
    per claim: a campaign's devices report a handful of different boards."""

    def of(self, candidate: Candidate, reported: tuple) -> tuple[str, str] | None:
        key = (candidate.rollout_id, reported)
        if key not in self:
            self[key] = _unfit(candidate, BoardReport(*reported))
        return self[key]


def _unfit(candidate: Candidate, board: BoardReport) -> tuple[str, str] | None:
    """The board runs the rollout's image already (its row is updated), or cannot
    run it (incompatible, with the reason); None if it may be given it."""
    if candidate.runs_on(board):
        return ON_TARGET, DeviceState.UPDATED
    unfit = candidate.unfit_for(board)
    return None if unfit is None else (unfit, DeviceState.INCOMPATIBLE)


def _refusal(
    item: _Waiting,
    track,
    rollout_state: str | None,
    candidate: Candidate | None,
    reported: tuple,
    verdicts: _Verdicts,
    busy: set[int],
    now,
) -> tuple[str, str | None] | None:
    """Why `item` may not be offered its rollout now, and the state its row
    takes for it (None: it stays pending, for a later claim); None if it may.
    The one rule set of every offer: the slots are counted by the caller, last.
    `reported`: what the device last reported (compatibility.BoardReport's fields)."""
    if rollout_state != RolloutState.ACTIVE:
        return f"rollout {item.rollout_id} is {rollout_state}", None
    if track is None:
        return NOT_PENDING, None
    if track.next_attempt_at is not None and track.next_attempt_at > now:
        return BACKING_OFF, None
    if item.device.id in busy:
        return IN_FLIGHT, None  # one `ota` in flight per device, whatever rollouts name it
    if candidate is None or candidate.rollout_id != item.rollout_id:
        return TAKEN_OVER, None
    if candidate.window is not None and not candidate.window.contains(now):
        return candidate.window.outlook(now), None  # pending until the window opens
    return verdicts.of(candidate, reported)


class Offers:
    def __init__(
        self,
        db: Database,
        guards: RolloutGuards,
        lifecycle: UpdateLifecycle,
        online: OnlineDevices,
        node: ClusterNode,
    ) -> None:
        self.db, self.guards, self.lifecycle = db, guards, lifecycle
        self.online, self.node = online, node
        # When each rollout was last judged healthy by `fill`: a campaign's
        # fills come many a second, and judging reads every row of the rollout.
        self._judged_at: dict[int, float] = {}
        # Slots free server-wide after the last claim here, or None: while it is
        # positive, `fill` takes it as its budget instead of counting the rows in
        # flight again (thousands, in a large campaign). Only a hint: the claim
        # counts under the offer-slots lock, whatever it says.
        self._free_hint: int | None = None
        self._idle = False  # the last fill claimed nothing: the next asks first (due_rows.py)

    # --- the two ways in --------------------------------------------------------

    def fill(self, limit: int) -> int:
        """Offer this node's connected pending devices while slots are free; how many went."""
        node_id = self.node.id
        if self._idle and not pending_here(self.db, node_id):
            return 0  # the last fill found nothing either: one read (due_rows.py)

        def due(session: Session) -> list:
            budget = self._free_hint or self.guards.free_slots(session)
            if budget <= 0:
                return []
            now, most = utcnow(), min(limit, 2 * budget + 10)
            # Outside their offer window ([0]: none; an empty hot IN list matches nothing).
            closed = closed_rollouts(session, now) or [0]
            return DUE.rows(session, now=now, node=node_id, closed=closed, limit=most)

        def find_and_claim(session: Session) -> list[_Claimed]:
            # One transaction: the due rows are read before the offer-slots
            # lock (taken by the claim), as `send_now` judges before it.
            ready = []
            for row_id, rollout_id, device_id, token, project_id, user_id in due(session):
                link = self.online.get_ready(token)
                if link is None:
                    continue  # not yet answered its info message: offered at login
                device = DeviceIdentity(device_id, token, project_id, user_id)
                ready.append(_Waiting(row_id, rollout_id, device, link))
            if not ready:
                return []
            self._free_hint = None  # until this claim has counted
            return self._claim(session, ready)[0]

        claimed = self.db.run(find_and_claim)
        self._idle = not claimed
        return sum(self._deliver(offer) is None for offer in claimed)

    def send_now(self, device: DeviceIdentity, rollout_id: int) -> None:
        """Offer `rollout_id` to `device`, connected to this process, now (?token=).

        OfferDeferred when it may not be offered now (paused, no download slot,
        another update in flight): it stays pending. OfferFailed when the frame
        cannot be built or written (the attempt fails with that reason). This
        node's fill may have offered it a moment before: that is the offer sent."""
        link = self.online.get_ready(device.token)
        if link is None:
            raise OfferFailed(NOT_IN_SESSION)

        def claim(session: Session) -> _Claimed | OfferFailed | None:
            found = load_tracks(
                session,
                RolloutDevice.rollout_id == rollout_id,
                RolloutDevice.device_id == device.id,
            )
            if not found:
                return OfferDeferred(NOT_PENDING)
            claimed, refused = self._claim(
                session, [_Waiting(found[0].id, rollout_id, device, link)], judge_health=True
            )
            if claimed:
                return claimed[0]
            state, offered_here, error = self._row_now(session, found[0].id)
            if state == DeviceState.FAILED:  # here, or by a fill just before (a frame too
                return FrameTooLarge(error)  # large, say; which may pause the rollout): why
            if offered_here:
                return None  # this node's fill offered it a moment before
            if state == DeviceState.UPDATED:
                return OfferDeferred(ON_TARGET)  # its info message, a moment before
            return refused

        outcome = self.db.run(claim)
        if isinstance(outcome, OfferFailed):
            raise outcome
        if outcome is not None:
            error = self._deliver(outcome)
            if error is not None:
                raise OfferFailed(error)

    def _row_now(self, session: Session, row_id: int) -> tuple[str | None, bool, str | None]:
        """(state, in flight on an offer of this node's run, last error), as now (locking)."""
        row = session.execute(
            select(
                RolloutDevice.state,
                RolloutDevice.offer_node_id,
                RolloutDevice.offer_node_run,
                RolloutDevice.last_error,
            )
            .where(RolloutDevice.id == row_id)
            .with_for_update()
        ).first()
        if row is None:
            return None, False, None
        here = (row.offer_node_id, row.offer_node_run) == (self.node.id, self.node.run_number)
        return row.state, row.state in DeviceState.IN_FLIGHT and here, row.last_error

    # --- one claim --------------------------------------------------------------

    def _claim(
        self, session: Session, waiting: list[_Waiting], *, judge_health: bool = False
    ) -> tuple[list[_Claimed], OfferFailed | None]:
        """Offers for as many of `waiting` as the rules and the slots allow,
        recorded; and why the last one refused was refused (OfferDeferred: it
        may be offered later)."""
        now = utcnow()
        rollout_ids = {w.rollout_id for w in waiting}
        # Judged before the lock: it reads every finished device of the rollout,
        # and the lock serialises every offer of every process.
        states = {}
        for rollout in session.scalars(select(Rollout).where(Rollout.id.in_(rollout_ids))):
            paused = self._judge_health(session, rollout, now=judge_health)
            states[rollout.id] = RolloutState.PAUSED if paused else rollout.state
        lock_offer_slots(session)
        running = RunningRollouts(session)
        active = {
            rollout_id for rollout_id, state in states.items() if state == RolloutState.ACTIVE
        }
        server_free, free = self.guards.slot_counts(session, active)
        busy = devices_in_flight(session, [w.device.id for w in waiting])
        rows = sorted(w.row_id for w in waiting)
        tracks = {
            track.id: track for track in run_tracks_query(session, _PENDING_ROWS, {"rows": rows})
        }
        ids = sorted({w.device.id for w in waiting})
        boards = {row[0]: tuple(row[1:]) for row in _BOARDS.rows(session, devices=ids)}
        tags = tags_of(session, ids) if running.tagged else {}
        verdicts = _Verdicts()
        claimed, journal, refused = [], [], None
        for item in waiting:
            device, track = item.device, tracks.get(item.row_id)
            candidate = running.rollout_for(
                device_id=device.id, project_id=device.project_id, user_id=device.user_id,
                tags=tags.get(device.id, frozenset()),
            )  # fmt: skip
            reported = boards.get(device.id, _NOTHING_REPORTED)
            state = states.get(item.rollout_id)
            judged = _refusal(item, track, state, candidate, reported, verdicts, busy, now)
            if judged is not None:
                reason, settled = judged
                refused = OfferDeferred(reason)
                if settled == DeviceState.UPDATED:
                    window = self.lifecycle.health.window_for(candidate.health_window)
                    reached_target(session, track, window, now, here=self.lifecycle.here)
                elif settled is not None:  # it cannot run the image: the reason is its error
                    move(session, track, settled, now, reason, last_error=reason)
                continue
            if server_free <= 0 or free[item.rollout_id] <= 0:
                refused = NoDownloadSlot(NO_SLOT)
                if server_free <= 0:
                    break
                continue
            offer = new_offer(candidate, device)
            try:
                url, frame = item.link.ota_frame(offer.url_path)
            except FrameTooLarge as error:  # a buffer too small for the URL: no retry helps
                refused = error
                move(session, track, DeviceState.FAILED, now, f"not offered: {error}",
                     last_error=str(error))  # fmt: skip
                continue
            except OfferFailed:
                # The connection closed meanwhile: offered at its next login.
                refused = OfferDeferred(NOT_IN_SESSION)
                continue
            free[item.rollout_id] -= 1
            server_free -= 1
            busy.add(device.id)
            claimed.append((item, offer, frame))
            journal.append((track, url))
        self._free_hint = server_free
        self._journal(session, claimed, journal, now)
        return claimed, refused

    def _judge_health(self, session: Session, rollout: Rollout, *, now: bool) -> bool:
        """Pause the rollout if it is past its failure threshold; True if this did.
        `fill` judges one at most every HEALTH_EVERY seconds here: a pause is a
        row change, read by every claim, and the sweeper judges too, so a
        threshold passed meanwhile pauses the rollout within a fraction of a second."""
        clock = time.monotonic()
        if not now and clock - self._judged_at.get(rollout.id, -HEALTH_EVERY) < HEALTH_EVERY:
            return False
        if self.guards.check_health(session, rollout):
            return True
        self._judged_at[rollout.id] = clock
        return False

    def _journal(self, session: Session, claimed: list[_Claimed], journal: list, now) -> None:
        offer_all(session, journal, now, (self.node.id, self.node.run_number))
        if claimed:
            insert_many(
                session,
                OtaCommand.__table__,
                [
                    {
                        "device_id": offer.device_id,
                        "firmware_id": offer.firmware_id,
                        "rollout_id": offer.rollout_id,
                        "url": url[:255],
                        "sent_at": now,
                        "offer_key": offer.key,
                    }
                    for (_, offer, _), (_, url) in zip(claimed, journal, strict=True)
                ],
            )

    # --- writing -----------------------------------------------------------------

    def _deliver(self, claimed: _Claimed) -> str | None:
        """Write a claimed offer's frame; why it failed (the attempt fails too), or None."""
        waiting, offer, frame = claimed
        link = waiting.link
        try:
            link.write_frame(frame)
        except OfferFailed as error:
            self.undelivered(offer, str(error))
            log.warning("device %s: not offered: %s", link.tag, error)
            return str(error)
        metrics.OFFERS.inc()
        tag = link.tag
        if DEVICE_LINES.take(tag):
            log.info(
                "device %s: sent ota %s",
                tag,
                offer.url_path,
                extra={"device": tag, "rollout": offer.rollout_id, **PER_TURN},
            )
        return None

    def undelivered(self, offer: Offer, reason: str) -> None:
        """The offer's frame never reached the device: its attempt fails."""

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


def replace_unstarted_offers(session: Session, device_id: int, rollout_id: int, admin: str) -> None:
    """An explicit single-device start re-sends: an `ota` the device holds and
    has not begun to download (offered, no request yet) stops counting as in
    flight, so the new one goes out at once (the Blynk server re-sends too).
    Another single-device rollout's offer is superseded with it; a campaign's
    row goes back to pending with its attempt given back, for when the
    single-device rollout lets the device go. A download under way is left:
    the new offer waits for it to end."""
    now = utcnow()
    reason = f"replaced by a single-device update from {admin} before any download"
    for track, scope in load_tracks(
        session,
        Rollout.id == RolloutDevice.rollout_id,
        RolloutDevice.device_id == device_id,
        RolloutDevice.rollout_id != rollout_id,
        RolloutDevice.state == DeviceState.OFFERED,
        extra=(Rollout.scope,),
        for_update=True,
    ):
        if scope == RolloutScope.DEVICE:
            move(session, track, DeviceState.SUPERSEDED, now, reason)
        else:
            move(
                session,
                track,
                DeviceState.PENDING,
                now,
                reason,
                attempts=max(track.attempts - 1, 0),
            )
