"""Offers: which pending devices get an `ota` frame now, journaled, then written.

Two ways in, one rule set. `fill` takes the pending devices connected to
this node (retries whose backoff ended, devices that waited for a download
slot, devices entered by now=true, expand, resume, a login that found an
update due, a ?token= request served by another process); `send_now` takes
the one device of a ?token= request connected to this process, at once.
Both claim in `_claim`, by `_refusal`: the rollout active and healthy, still
the device's most specific one, the device not on the target already and
able to run the image, its row pending and due, no other `ota` in flight to
it, a download slot free in the server and in the rollout. The offer-slots
row is locked for the claim, so no two processes both take the last slot;
rows are locked while they are judged. A campaign to ten thousand connected
devices is a few dozen transactions, not forty thousand.

Recorded first, written after: the device may ask for the file before the
writing greenlet runs again.
"""

import logging
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Integer, bindparam, select
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
    Project,
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
from .guards import RolloutGuards
from .lifecycle import UpdateLifecycle

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

# The pending devices due on a node, oldest first (built once: a campaign fills many a second).
_DUE = HotQuery(
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
        | (RolloutDevice.next_attempt_at <= bindparam("now")),
        Rollout.state == RolloutState.ACTIVE,
        Device.node_id == bindparam("node"),
    )
    .order_by(RolloutDevice.pending_at, RolloutDevice.id)
    .limit(bindparam("limit", type_=Integer))
)
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
_STATES = HotQuery(
    select(Rollout.id, Rollout.state).where(Rollout.id.in_(bindparam("rollouts", expanding=True)))
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


@dataclass(frozen=True)
class _Claimed:
    waiting: _Waiting
    offer: Offer
    frame: bytes


class _Slots:
    """Download slots free in the server and in each rollout of a claim, as it spends them."""

    __slots__ = ("server", "per_rollout")

    def __init__(self, server: int, per_rollout: dict[int, int]) -> None:
        self.server, self.per_rollout = server, per_rollout

    def take(self, rollout_id: int) -> bool:
        if self.server <= 0 or self.per_rollout[rollout_id] <= 0:
            return False
        self.server -= 1
        self.per_rollout[rollout_id] -= 1
        return True


def _refusal(
    item: _Waiting,
    track,
    rollout_state: str | None,
    candidate: Candidate | None,
    board: BoardReport,
    busy: set[int],
    now,
) -> tuple[str, str | None] | None:
    """Why `item` may not be offered its rollout now, and the state its row
    takes for it (None: it stays pending, for a later claim); None if it may.
    The one rule set of every offer: the slots are counted by the caller, last."""
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
    if candidate.runs_on(board):
        return ON_TARGET, DeviceState.UPDATED
    unfit = candidate.unfit_for(board)
    return None if unfit is None else (unfit, DeviceState.INCOMPATIBLE)


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

    # --- the two ways in --------------------------------------------------------

    def fill(self, limit: int) -> int:
        """Offer the pending devices connected to this node, while slots are free;
        the number of offers sent."""
        node_id = self.node.id

        def due(session: Session) -> list:
            budget = self._free_hint or self.guards.free_slots(session)
            if budget <= 0:
                return []
            return _DUE.rows(session, now=utcnow(), node=node_id, limit=min(limit, 2 * budget + 10))

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

        return sum(self._deliver(claimed) is None for claimed in self.db.run(find_and_claim))

    def send_now(self, device: DeviceIdentity, rollout_id: int) -> str:
        """Offer `rollout_id` to `device`, connected to this process, now (?token=);
        the URL path sent.

        Raises OfferDeferred when it may not be offered now (paused, every
        download slot taken, another update in flight): the device stays
        pending. Raises OfferFailed when the frame cannot be built or written
        (the attempt fails with that reason).
        """
        link = self.online.get_ready(device.token)
        if link is None:
            raise OfferFailed(NOT_IN_SESSION)

        def claim(session: Session) -> _Claimed | OfferFailed:
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
            return claimed[0] if claimed else refused

        outcome = self.db.run(claim)
        if isinstance(outcome, OfferFailed):
            raise outcome
        error = self._deliver(outcome)
        if error is not None:
            raise OfferFailed(error)
        return outcome.offer.url_path

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
        for rollout in session.scalars(select(Rollout).where(Rollout.id.in_(rollout_ids))):
            self._judge_health(session, rollout, now=judge_health)
        lock_offer_slots(session)
        states = dict(_STATES.rows(session, rollouts=sorted(rollout_ids)))
        running = RunningRollouts(session)
        active = {
            rollout_id for rollout_id, state in states.items() if state == RolloutState.ACTIVE
        }
        slots = _Slots(*self.guards.slot_counts(session, active))
        busy = devices_in_flight(session, [w.device.id for w in waiting])
        rows = sorted(w.row_id for w in waiting)
        tracks = {
            track.id: track for track in run_tracks_query(session, _PENDING_ROWS, {"rows": rows})
        }
        boards = {
            row[0]: BoardReport(*row[1:])
            for row in _BOARDS.rows(session, devices=sorted({w.device.id for w in waiting}))
        }
        claimed, journal, refused = [], [], None
        for item in waiting:
            device, track = item.device, tracks.get(item.row_id)
            candidate = running.rollout_for(
                device_id=device.id, project_id=device.project_id, user_id=device.user_id
            )
            board = boards.get(device.id, BoardReport())
            judged = _refusal(item, track, states.get(item.rollout_id), candidate, board, busy, now)
            if judged is not None:
                reason, settled = judged
                refused = OfferDeferred(reason)
                if settled == DeviceState.UPDATED:
                    move(session, track, settled, now)
                elif settled is not None:  # it cannot run the image: the reason is its error
                    move(session, track, settled, now, reason, last_error=reason)
                continue
            if not slots.take(item.rollout_id):
                refused = NoDownloadSlot(NO_SLOT)
                if slots.server <= 0:
                    break
                continue
            offer = new_offer(candidate, device)
            try:
                url, frame = item.link.ota_frame(offer.url_path)
            except FrameTooLarge as error:
                # Its receive buffer is too small for the URL: no retry can help.
                refused = error
                move(session, track, DeviceState.FAILED, now, f"not offered: {error}")
                continue
            except OfferFailed:
                # The connection closed meanwhile: offered at its next login.
                refused = OfferDeferred(NOT_IN_SESSION)
                continue
            busy.add(device.id)
            claimed.append(_Claimed(item, offer, frame))
            journal.append((track, url))
        self._free_hint = slots.server
        self._journal(session, claimed, journal, now)
        return claimed, refused

    def _judge_health(self, session: Session, rollout: Rollout, *, now: bool) -> None:
        """Pause the rollout if it is past its failure threshold. `fill` judges one
        at most every HEALTH_EVERY seconds here: a pause is a row change, read by
        every claim, and the sweeper judges too, so a threshold passed meanwhile
        pauses the rollout within a fraction of a second."""
        clock = time.monotonic()
        if not now and clock - self._judged_at.get(rollout.id, -HEALTH_EVERY) < HEALTH_EVERY:
            return
        if not self.guards.check_health(session, rollout):
            self._judged_at[rollout.id] = clock

    def _journal(self, session: Session, claimed: list[_Claimed], journal: list, now) -> None:
        offer_all(session, journal, now, (self.node.id, self.node.run_number))
        if claimed:
            insert_many(
                session,
                OtaCommand.__table__,
                [
                    {
                        "device_id": item.offer.device_id,
                        "firmware_id": item.offer.firmware_id,
                        "rollout_id": item.offer.rollout_id,
                        "url": url[:255],
                        "sent_at": now,
                        "offer_key": item.offer.key,
                    }
                    for item, (_, url) in zip(claimed, journal, strict=True)
                ],
            )

    # --- writing -----------------------------------------------------------------

    def _deliver(self, claimed: _Claimed) -> str | None:
        """Write a claimed offer's frame; why it failed (the attempt fails too), or None."""
        link, offer = claimed.waiting.link, claimed.offer
        try:
            link.write_frame(claimed.frame)
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
