"""The OTA domain's parts, wired once (`build_service`).

Each caller takes the part it needs: a device session the device side, the
firmware downloads the download tracker, web/ and the command line the admin
part, the node's clocks the offers (fill) and the rollout clock. Each part
holds only the collaborators it uses. Everything that must survive a
restart, or hold across processes, is in the database before it counts.

Who sends an offer: the node that holds the device's connection, in its
fill (rollouts/offering.py), run every `node.poll.interval` and woken by
`fill_due` when a login finds an update due, a download slot frees or an
admin request makes devices of this process pending. A process that holds
no device (gunicorn's `web`) has nothing to fill: its requests reach devices
on other nodes through the rows they leave behind, which those nodes' fills
read at their next poll.
"""

from dataclasses import dataclass

from gevent.event import Event

from ..cluster import ClusterNode
from ..store import Database
from .admin import RolloutAdmin
from .clock import RolloutClock
from .device_side import DeviceSide
from .download_tracker import DownloadTracker
from .firmware.catalog import FirmwareCatalog
from .fleet.online import OnlineDevices
from .notifications import WebhookNotifier
from .rollouts.guards import FleetPolicy, RolloutGuards
from .rollouts.health import HealthPolicy
from .rollouts.lifecycle import RetryPolicy, UpdateLifecycle
from .rollouts.offering import Offers
from .rollouts.planner import RolloutPlanner

__all__ = ["OtaService", "build_service"]


@dataclass(frozen=True)
class OtaService:
    devices: DeviceSide
    downloads: DownloadTracker
    offers: Offers
    admin: RolloutAdmin
    clock: RolloutClock
    catalog: FirmwareCatalog
    online: OnlineDevices  # this process's connections: a cache of the presence rows
    node: ClusterNode
    # Set when pending devices connected here may be offered: the device
    # role's fill clock waits on it (runner.py).
    fill_due: Event
    # Rollout events to notify.webhook.urls, sent by the sweeping node.
    notifier: WebhookNotifier


def build_service(
    db: Database,
    catalog: FirmwareCatalog,
    online: OnlineDevices,
    node: ClusterNode,
    *,
    policy: RetryPolicy | None = None,
    fleet_policy: FleetPolicy | None = None,
    health_policy: HealthPolicy | None = None,
    notifier: WebhookNotifier | None = None,
) -> OtaService:
    fill_due = Event()
    planner = RolloutPlanner()
    lifecycle = UpdateLifecycle(policy or RetryPolicy(), health_policy or HealthPolicy(), node)
    guards = RolloutGuards(fleet_policy or FleetPolicy(), planner)
    downloads = DownloadTracker(db, guards, fill_due)
    devices = DeviceSide(db, node, lifecycle, downloads, fill_due)
    offers = Offers(db, guards, lifecycle, online, node)
    clock = RolloutClock(db, lifecycle, guards, fill_due)
    admin = RolloutAdmin(
        db, catalog, planner, lifecycle, guards, devices, offers, clock, online, fill_due
    )
    notifier = notifier or WebhookNotifier(db, (), "", 10.0)
    return OtaService(
        devices, downloads, offers, admin, clock, catalog, online, node, fill_due, notifier
    )
