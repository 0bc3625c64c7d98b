"""Pending devices connected to this node, offered in batches.

What `fill` finds: retries whose backoff ended, devices that waited for a
download slot, devices entered by now=true, expand, resume or a ?token=
request served by another process. One transaction claims as many of them
as the slots allow, by the same rules as one device's offer at login
(service.py), then the frames are written: a campaign to ten thousand
connected devices is a few dozen transactions, not forty thousand.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Integer, bindparam, select
from sqlalchemy.orm import Session

from .. import metrics
from ..cluster import ClusterNode, lock_offer_slots
from ..logs import PER_TURN
from ..logsafe import DEVICE_LINES
from ..store import (
    Database,
    Device,
    DeviceState,
    HotQuery,
    OtaCommand,
    Project,
    Rollout,
    RolloutDevice,
    RolloutState,
    insert_many,
    utcnow,
)
from .device_states import devices_in_flight, move, offer_all, run_tracks_query, tracks_query
from .guards import RolloutGuards
from .offers import DeviceIdentity, Offer, new_offer
from .online import DeviceLink, FrameTooLarge, OfferFailed, OnlineDevices
from .rollouts import RunningRollouts

__all__ = ["BatchOffers"]

log = logging.getLogger(__name__)

HEALTH_EVERY = 0.5  # seconds between two judgements of a rollout's failure ratio here

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
# A claim's rows, locked while they are judged, and its devices' reported builds.
_PENDING_ROWS = tracks_query(
    RolloutDevice.id.in_(bindparam("rows", expanding=True)),
    RolloutDevice.state == DeviceState.PENDING,
    for_update=True,
)
_BUILDS = HotQuery(
    select(Device.id, Device.build).where(Device.id.in_(bindparam("devices", expanding=True)))
)


@dataclass(frozen=True)
class _Waiting:
    """A pending device connected here, as `fill` found it."""

    row_id: int
    rollout_id: int
    device: DeviceIdentity
    link: DeviceLink  # its session: builds the frame and takes it


class BatchOffers:
    def __init__(
        self,
        db: Database,
        guards: RolloutGuards,
        online: OnlineDevices,
        node: ClusterNode,
        undelivered: Callable[[Offer, str], None],
    ) -> None:
        self.db, self.guards, self.online, self.node = db, guards, online, node
        self._undelivered = undelivered  # an offer whose frame could not be written
        # When each rollout was last judged healthy here: a campaign's fills
        # come many a second, and judging reads every row of the rollout.
        self._judged_at: dict[int, float] = {}
        # Slots free server-wide after the last claim here, or None: while it is
        # positive, `due` takes it as its budget instead of counting the rows in
        # flight again (thousands, in a large campaign). Only a hint: the claim
        # counts under the offer-slots lock, whatever it says.
        self._free_hint: int | None = None

    def fill(self, limit: int) -> int:
        """Offer the pending devices connected to this node, while slots are free;
        the number of offers sent."""
        node_id = self.node.id

        def due(session: Session) -> list:
            budget = self._free_hint or self.guards.free_slots(session)
            if budget <= 0:
                return []
            return _DUE.rows(session, now=utcnow(), node=node_id, limit=min(limit, 2 * budget + 10))

        def find_and_claim(session: Session) -> list:
            # One transaction: the due rows are read before the offer-slots
            # lock (taken by the claim), as one offer judges before it.
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
            return self._claim_batch(session, ready)

        claimed = self.db.run(find_and_claim)
        sent = 0
        for waiting, offer, frame in claimed:
            try:
                waiting.link.write_frame(frame)
            except OfferFailed as error:
                self._undelivered(offer, str(error))
                log.warning("device %s: not offered: %s", waiting.link.tag, error)
                continue
            metrics.OFFERS.inc()
            tag = waiting.link.tag
            if DEVICE_LINES.take(tag):
                log.info(
                    "device %s: sent ota %s",
                    tag,
                    offer.url_path,
                    extra={"device": tag, "rollout": offer.rollout_id, **PER_TURN},
                )
            sent += 1
        return sent

    def _healthy(self, session: Session, rollout: Rollout) -> bool:
        """Not past its failure threshold (pausing it if it is), judged at most
        every HEALTH_EVERY seconds here. A pause is a row change, read by every
        fill; the sweeper judges too, so a threshold passed meanwhile pauses
        the rollout within a fraction of a second."""
        now = time.monotonic()
        if now - self._judged_at.get(rollout.id, -HEALTH_EVERY) < HEALTH_EVERY:
            return True
        if self.guards.check_health(session, rollout):
            return False
        self._judged_at[rollout.id] = now
        return True

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
            if rollout.state == RolloutState.ACTIVE and self._healthy(session, rollout)
        }
        lock_offer_slots(session)
        running = RunningRollouts(session)
        server_free, free = self.guards.slot_counts(session, healthy)
        # One `ota` in flight per device, whatever rollouts name it.
        busy = devices_in_flight(session, [w.device.id for w in waiting])
        rows = sorted(w.row_id for w in waiting)
        tracks = {
            track.id: track for track in run_tracks_query(session, _PENDING_ROWS, {"rows": rows})
        }
        builds = dict(_BUILDS.rows(session, devices=sorted({w.device.id for w in waiting})))
        chosen, offers = [], []
        for item in waiting:
            track = tracks.get(item.row_id)
            if track is None or item.rollout_id not in healthy:
                continue
            if track.next_attempt_at is not None and track.next_attempt_at > now:
                continue
            device = item.device
            if device.id in busy:
                continue
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
            except FrameTooLarge as error:
                # Its receive buffer is too small for the URL: no retry can help.
                move(session, track, DeviceState.FAILED, now, f"not offered: {error}")
                continue
            except OfferFailed:
                continue  # the connection closed meanwhile: offered at its next login
            free[item.rollout_id] -= 1
            server_free -= 1
            busy.add(device.id)
            chosen.append((item, offer, frame))
            offers.append((track, url))
        self._free_hint = server_free
        offer_all(session, offers, now, (self.node.id, self.node.run_number))
        if offers:
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
                    for (_, offer, _), (_, url) in zip(chosen, offers, strict=True)
                ],
            )
        return chosen
