"""What admins do to rollouts: upload and aim firmware, dry runs, pause, resume,
expand, retry, stop, delete, look at progress (the admin part of the service).

Any process may serve these requests: each is a unit of work in the database
(run again when it lost a race), and connected devices are reached through
the rows they leave behind (pending devices that their node offers).
"""

import hashlib
import logging
from collections.abc import Callable
from dataclasses import replace

from gevent.event import Event
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ..logsafe import token_tag
from ..store import (
    Database,
    Device,
    DeviceState,
    DeviceTag,
    Firmware,
    OtaCommand,
    Rollout,
    RolloutDevice,
    RolloutEvent,
    RolloutScope,
    RolloutState,
    utcnow,
)
from .answers import Started, firmware_answer
from .clock import RolloutClock
from .device_side import DeviceSide
from .errors import Conflict, NotFound, Refused
from .firmware.catalog import FirmwareCatalog, Upload, iso, served_path
from .firmware.image import FirmwareRejected, ImageReport
from .fleet.identities import DeviceIdentity
from .fleet.online import FrameTooLarge, OfferDeferred, OfferFailed, OnlineDevices
from .notifications import delivery_report
from .rollouts.candidates import Candidate
from .rollouts.cohorts import Controls
from .rollouts.compatibility import BoardReport, ImageIdentity, incompatibility
from .rollouts.device_states import devices_in_flight, load_tracks, move_all, start_tracking
from .rollouts.device_story import device_story
from .rollouts.guards import RolloutGuards
from .rollouts.lifecycle import UpdateLifecycle
from .rollouts.offering import Offers, replace_unstarted_offers
from .rollouts.planner import RolloutPlanner
from .rollouts.status import (
    fleet_overview,
    rollout_detail,
    rollout_devices_page,
    rollout_summaries,
    with_outlook,
)
from .rollouts.targeting import campaign_target, devices_in_scope, devices_taken_in

__all__ = ["RolloutAdmin"]

log = logging.getLogger(__name__)


class RolloutAdmin:
    def __init__(
        self,
        db: Database,
        catalog: FirmwareCatalog,
        planner: RolloutPlanner,
        lifecycle: UpdateLifecycle,
        guards: RolloutGuards,
        devices: DeviceSide,
        offers: Offers,
        clock: RolloutClock,
        online: OnlineDevices,
        fill_due: Event,
    ) -> None:
        self.db, self.catalog, self.planner = db, catalog, planner
        self.lifecycle, self.guards = lifecycle, guards
        self.devices, self.offers, self.clock = devices, offers, clock
        self.online, self.fill_due = online, fill_due

    def start_for_device(
        self,
        token: str,
        upload: Upload,
        admin: str,
        *,
        queue: bool,
        allow_downgrade: bool = False,
    ) -> Started:
        """Upload and send to one device now (Blynk's ?token=), or at its next login."""
        device = self._device_for_admin(token, queue=queue)
        report = self._inspect(upload)
        self._refuse_incompatible(device, ImageIdentity.of(report), allow_downgrade)
        return self._device_rollout(
            device,
            admin,
            lambda session: self.catalog.add(session, upload, report, admin),
            allow_downgrade,
        )

    def resend(
        self, file_name: str, token: str, admin: str, *, queue: bool, allow_downgrade: bool = False
    ) -> Started:
        """Send an already uploaded file to one device (GET ?fileName=&token=)."""
        name = file_name.rsplit("/", 1)[-1].removesuffix(".bin")
        device = self._device_for_admin(token, queue=queue)

        def uploaded(session: Session) -> Firmware:
            firmware = self.catalog.by_name(session, name)
            if firmware is None:
                raise Refused("Requested file not found.")
            self._refuse_incompatible(device, ImageIdentity.of(firmware), allow_downgrade, session)
            return firmware

        return self._device_rollout(device, admin, uploaded, allow_downgrade)

    def start_campaign(
        self,
        upload: Upload,
        admin: str,
        *,
        user: str | None = None,
        project: str | None = None,
        controls: Controls | None = None,
    ) -> Started:
        """Upload for every device (of a user, of a project) whose build differs.

        Offered at each device's next login, or at once to connected devices
        with now=true; to a share of them with percent= or waves=.
        """
        controls = controls or Controls()
        scope, target_id = self.db.run(
            lambda session: campaign_target(session, user, project, controls.tag)
        )
        report = self._campaign_report(upload)
        if controls.push_online is None:
            controls = replace(controls, push_online=self.guards.policy.push_online)

        def start(session: Session) -> tuple[Firmware, Rollout]:
            firmware = self.catalog.add(session, upload, report, admin)
            rollout = self.planner.start(
                session,
                scope=scope,
                firmware=firmware,
                started_by=admin,
                target_id=target_id,
                controls=controls,
            )
            return firmware, rollout

        firmware, rollout = self.db.run(start)
        log.info(
            "rollout %d of %s (build %s) to %s %s by %s",
            rollout.id,
            firmware.name,
            report.build,
            scope,
            rollout.state if rollout.state == RolloutState.SCHEDULED else "started",
            admin,
        )
        if rollout.push_online and rollout.state == RolloutState.ACTIVE:
            self.clock.enrol_in_background(rollout.id)  # answered first: under a second at 10k
        devices = self.db.run(
            lambda session: devices_in_scope(session, scope, target_id, controls.tag)
        )
        return Started(
            served_path(firmware.name),
            rollout.id,
            scope,
            devices,
            report.build,
            firmware_answer(firmware),
            state=rollout.state,
            start_at=iso(rollout.start_at),
        )

    def _campaign_report(self, upload: Upload) -> ImageReport:
        report = self._inspect(upload)
        if report.build is None:
            raise Refused(
                "The firmware has no build date (no \\0build\\0 tag from the Blynk "
                "library), so updated devices could never be told from old ones: a "
                "campaign needs it. Send it to one device with ?token= instead."
            )
        return report

    def dry_run(
        self, upload: Upload, *, user: str | None, project: str | None, controls: Controls
    ) -> dict:
        """The devices a campaign would take in now; nothing is stored or started."""
        scope, target_id = self.db.run(
            lambda session: campaign_target(session, user, project, controls.tag)
        )
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
            chip=report.chip,
            fw_type=report.fw_type,
            fw_version=report.fw_version,
            allow_downgrade=controls.allow_downgrade,
            tag=controls.tag,
        )
        devices, incompatible = self.db.run(
            lambda session: devices_taken_in(session, candidate, target_id)
        )
        return {
            "dry_run": True,
            "scope": scope,
            "build": report.build,
            "chip": report.chip,
            "fw_version": report.fw_version,
            "fw_type": report.fw_type,
            "percent": candidate.percent,
            "devices": devices,
            "incompatible": incompatible,
        }

    def pause(self, rollout_id: int, admin: str) -> dict:
        return self._change(rollout_id, lambda s, r: self.planner.pause(s, r, f"by {admin}"))

    def resume(self, rollout_id: int, admin: str) -> dict:
        summary = self._change(rollout_id, lambda s, r: self.planner.resume(s, r, admin))
        self.fill_due.set()  # pending devices may be offered again
        return summary

    def expand(self, rollout_id: int, percent: int, admin: str) -> dict:
        def widen(session: Session, rollout: Rollout) -> bool:
            if not rollout.percent < percent <= 100:
                raise Refused(
                    f"percent must be above the rollout's {rollout.percent} and at most 100."
                )
            return self.planner.widen(session, rollout, percent, f"expanded by {admin}")

        summary = self._change(rollout_id, widen)
        if summary["push_online"]:
            self.clock.enrol_in_background(rollout_id)
        return summary

    def retry(self, rollout_id: int, admin: str) -> dict:
        """The rollout's failed devices get a fresh set of attempts (hawkBit's retry)."""

        def work(session: Session) -> int:
            _running(session, rollout_id)
            failed = load_tracks(
                session,
                RolloutDevice.rollout_id == rollout_id,
                RolloutDevice.state == DeviceState.FAILED,
                for_update=True,
            )
            return move_all(
                session,
                failed,
                DeviceState.PENDING,
                utcnow(),
                f"retried by {admin}",
                attempts=0,
                next_attempt_at=None,
            )

        retried = self.db.run(work)
        log.info("rollout %d: %d failed device(s) retried by %s", rollout_id, retried, admin)
        if retried:
            self.fill_due.set()
        return {**self.status(rollout_id)[0], "retried": retried}

    def delete_firmware(self, name: str, admin: str) -> dict:
        """Stop serving an uploaded file (409 while a running rollout sends it)."""
        firmware = self.db.run(lambda session: self.catalog.delete(session, name))
        log.info("firmware %s (%s) deleted by %s", name, firmware.original_name, admin)
        return {"deleted": name, "original_name": firmware.original_name}

    def delete_device(self, token: str, admin: str) -> dict:
        """Remove a device and its rows in every rollout (409 while an update is in flight).

        Its single-device rollouts go with it; the rollouts of other devices
        and their events stay.
        """

        def work(session: Session) -> int:
            device_id = session.scalar(select(Device.id).where(Device.token == token))
            if device_id is None:
                raise NotFound("No device with that token.")
            if devices_in_flight(session, [device_id]):
                raise Conflict(
                    "An update is in flight to this device: wait for it to end, or stop "
                    "its rollout."
                )
            own = list(
                session.scalars(select(Rollout.id).where(Rollout.device_id == device_id)).all()
            )
            if own:
                session.execute(
                    update(Rollout).where(Rollout.id.in_(own)).values(superseded_by_id=None)
                )
            for table, column in (
                (RolloutEvent, RolloutEvent.device_id),
                (OtaCommand, OtaCommand.device_id),
                (RolloutDevice, RolloutDevice.device_id),
            ):
                session.execute(delete(table).where(column == device_id))
                if own:
                    session.execute(delete(table).where(table.rollout_id.in_(own)))
            if own:
                session.execute(delete(Rollout).where(Rollout.id.in_(own)))
            session.execute(delete(DeviceTag).where(DeviceTag.device_id == device_id))
            session.execute(delete(Device).where(Device.id == device_id))
            return device_id

        device_id = self.db.run(work)
        self.devices.identities.forget(token)
        link = self.online.get(token)
        if link is not None:
            link.close("device deleted by an operator")
        log.info("device %s (id %d) deleted by %s", token_tag(token), device_id, admin)
        return {"deleted": token_tag(token)}

    def _change(self, rollout_id: int, change: Callable[[Session, Rollout], bool]) -> dict:
        def work(session: Session) -> None:
            rollout = _running(session, rollout_id)
            if not change(session, rollout):
                # Changed a moment ago, by another request or the sweeper.
                state = session.scalar(select(Rollout.state).where(Rollout.id == rollout_id))
                raise Conflict(f"Rollout {rollout_id} is already {state}.")

        self.db.run(work)
        return self.status(rollout_id)[0]

    def stop(self, admin: str, rollout_id: int | None = None) -> int:
        def work(session: Session) -> int:
            if rollout_id is not None and session.get(Rollout, rollout_id) is None:
                raise NotFound(f"No rollout {rollout_id}.")
            return self.planner.stop(session, admin, rollout_id)

        stopped = self.db.run(work)
        log.info("%d rollout(s) stopped by %s", stopped, admin)
        return stopped

    def status(self, rollout_id: int | None = None, *, limit: int | None = None) -> list[dict]:
        def work(session: Session) -> list[dict]:
            summaries = rollout_summaries(session, rollout_id, limit)
            return with_outlook(session, self.guards, self.lifecycle, summaries)

        return self.db.run(work)

    def devices_page(
        self, rollout_id: int, state: str | None, offset: int, limit: int
    ) -> tuple[list[dict], int]:
        return self.db.run(
            lambda session: rollout_devices_page(session, rollout_id, state, offset, limit)
        )

    def fleet_overview(self) -> dict:
        return self.db.run(fleet_overview)

    def webhooks(self) -> list[dict]:
        return self.db.run(delivery_report)

    def device(self, device_id: int) -> dict:
        found = self.db.run(lambda session: device_story(session, device_id))
        if found is None:
            raise NotFound(f"No device {device_id}.")
        return found

    def detail(self, rollout_id: int) -> dict:
        def work(session: Session) -> dict | None:
            found = rollout_detail(session, rollout_id)
            return found and with_outlook(session, self.guards, self.lifecycle, [found])[0]

        found = self.db.run(work)
        if found is None:
            raise NotFound(f"No rollout {rollout_id}.")
        return found

    def _device_for_admin(self, token: str, *, queue: bool) -> DeviceIdentity:
        device = self.devices.find_device(token)
        if device is None:
            raise Refused("Invalid token.")
        if not queue and not self._in_session(device.id):
            raise Refused("No device in session.")
        return device

    def _refuse_incompatible(
        self,
        device: DeviceIdentity,
        image: ImageIdentity,
        allow_downgrade: bool,
        session: Session | None = None,
    ) -> None:
        """A 400 naming both when the device may not be given the image: another
        firmware type, a chip that cannot run it, a downgrade not asked for."""

        def check(session: Session) -> None:
            reported = session.execute(
                select(Device.hardware, Device.fw_type, Device.fw_version, Device.build).where(
                    Device.id == device.id
                )
            ).first()
            board = BoardReport(*reported) if reported is not None else BoardReport()
            unfit = incompatibility(board, image, allow_downgrade=allow_downgrade)
            if unfit is not None:
                hint = (
                    "" if allow_downgrade or "downgrade" not in unfit else " (allowDowngrade=true)"
                )
                raise Refused(f"Not sent: {unfit}{hint}.")

        if session is not None:
            check(session)
        else:
            self.db.run(check)

    def _in_session(self, device_id: int) -> bool:
        """Connected to any node (its presence row), not only to this process."""
        node = self.db.run(
            lambda session: session.scalar(select(Device.node_id).where(Device.id == device_id))
        )
        return node is not None

    def _inspect(self, upload: Upload):
        try:
            return self.catalog.inspect(upload)
        except FirmwareRejected as error:
            raise Refused(str(error)) from None

    def _device_rollout(
        self,
        device: DeviceIdentity,
        admin: str,
        firmware_of: Callable[[Session], Firmware],
        allow_downgrade: bool = False,
    ) -> Started:
        """A device rollout for the firmware `firmware_of` gives, offered now if online."""

        def start(session: Session):
            firmware = firmware_of(session)
            rollout = self.planner.start(
                session,
                scope=RolloutScope.DEVICE,
                firmware=firmware,
                started_by=admin,
                target_id=device.id,
                controls=Controls(allow_downgrade=allow_downgrade),
            )
            # Asked for by name: sent whatever build the device reports.
            start_tracking(
                session,
                rollout_id=rollout.id,
                device_id=device.id,
                state=DeviceState.PENDING,
                at=utcnow(),
                detail=f"targeted by {admin}",
            )
            replace_unstarted_offers(session, device.id, rollout.id, admin)
            return rollout.id, firmware

        rollout_id, firmware = self.db.run(start)
        # Connected here: sent now. Connected to another node: that node sends
        # it in its next fill. Offline: offered after its next info message.
        waiting = None
        if self.online.get_ready(device.token) is not None:
            try:
                self.offers.send_now(device, rollout_id)
            except OfferDeferred as reason:
                waiting = str(reason)
                log.info("device %s: update waits: %s", token_tag(device.token), reason)
            except FrameTooLarge as error:  # its attempt failed: no retry can help
                raise Refused(f"The update could not be sent: {error}.") from None
            except OfferFailed as error:
                raise Refused(
                    f"The update could not be sent: {error}. It stays pending for the next login."
                ) from None
        return Started(
            served_path(firmware.name),
            rollout_id,
            RolloutScope.DEVICE,
            1,
            firmware.build,
            firmware_answer(firmware),
            waiting,
        )


def _running(session: Session, rollout_id: int) -> Rollout:
    """The rollout, if it is active or paused; a 404 or a 409 otherwise."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"No rollout {rollout_id}.")
    if rollout.state not in RolloutState.RUNNING:
        raise Conflict(f"Rollout {rollout_id} is {rollout.state}.")
    return rollout
