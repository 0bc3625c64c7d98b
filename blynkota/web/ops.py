"""What monitoring asks: /healthz, /readyz and /metrics, on both ports.

/healthz says the process answers; /readyz that it can do its work (the
database answers, its listeners are up), for a load balancer's check.
/metrics is for Prometheus: without a password only from
`allowed.metrics.ips` (loopback by default); from elsewhere, on the HTTPS
port, with an admin's basic auth.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent
from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from ..metrics import PROCESS
from ..ota.rollouts.status import online_per_node
from ..store import Database, Device, DeviceState, Rollout, RolloutDevice, RolloutState
from .addresses import address_in
from .auth import auth, guard_admin_request

__all__ = ["Readiness", "ops"]

log = logging.getLogger("blynkota.http")

ops = Blueprint("ops", __name__)

READY_DEADLINE = 2.0  # seconds the database gets to answer a readiness check


@dataclass
class Readiness:
    """Which of this process's listeners are up; set by the runner as they start and stop.

    A process without listeners of its own (a gunicorn worker) is ready when
    its database answers.
    """

    listeners: dict[str, bool] = field(default_factory=dict)
    # In relay mode, what is known of the upstream Blynk server (hardware/relay.py):
    # reported, never a reason to be unready (devices retry, the fleet runs on).
    upstream: Callable[[], dict] | None = None


class FleetCollector:
    """The fleet's numbers, read from the database at each scrape."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self):
        up = GaugeMetricFamily("blynkota_database_up", "1 if the database answered this scrape.")
        try:
            online, states, health, rollouts, builds = self.db.run(self._read)
        except SQLAlchemyError as error:
            log.info("metrics: the database did not answer (%s)", type(error).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        connected = GaugeMetricFamily(
            "blynkota_devices_connected",
            "Devices logged in, by the node (process) holding each connection.",
            labels=["node"],
        )
        for node, count in online:
            connected.add_metric([node], count)
        yield connected
        by_state = GaugeMetricFamily(
            "blynkota_rollout_devices",
            "Devices of each running (active or paused) rollout, by state.",
            labels=["rollout", "state"],
        )
        for rollout_id, state, count in states:
            by_state.add_metric([str(rollout_id), state], count)
        yield by_state
        by_health = GaugeMetricFamily(
            "blynkota_rollout_device_health",
            "Devices of each running rollout by how their health window went: verifying "
            "(in it now), passed, crash_loop, rollback, silence.",
            labels=["rollout", "outcome"],
        )
        for rollout_id, state, count in states:
            if state == DeviceState.VERIFYING:
                by_health.add_metric([str(rollout_id), state], count)
        for rollout_id, outcome, count in health:
            by_health.add_metric([str(rollout_id), outcome], count)
        yield by_health
        by_rollout_state = GaugeMetricFamily(
            "blynkota_rollouts", "Rollouts by state.", labels=["state"]
        )
        for state, count in rollouts:
            by_rollout_state.add_metric([state], count)
        yield by_rollout_state
        by_build = GaugeMetricFamily(
            "blynkota_devices_by_build",
            f"Devices by the build and firmware version they report: the {TOP_BUILDS} "
            'commonest, the rest as build="other".',
            labels=["build", "fw_version"],
        )
        for build, fw_version, count in builds:
            by_build.add_metric([build, fw_version], count)
        yield by_build

    @staticmethod
    def _read(session):
        online = online_per_node(session)
        states = session.execute(
            select(RolloutDevice.rollout_id, RolloutDevice.state, func.count())
            .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
            .where(Rollout.state.in_(RolloutState.RUNNING))
            .group_by(RolloutDevice.rollout_id, RolloutDevice.state)
        ).all()
        health = session.execute(
            select(RolloutDevice.rollout_id, RolloutDevice.health, func.count())
            .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
            .where(Rollout.state.in_(RolloutState.RUNNING), RolloutDevice.health.is_not(None))
            .group_by(RolloutDevice.rollout_id, RolloutDevice.health)
        ).all()
        rollouts = session.execute(
            select(Rollout.state, func.count()).group_by(Rollout.state).order_by(Rollout.state)
        ).all()
        return online, states, health, rollouts, _builds(session)


TOP_BUILDS = 20  # labelled builds: a fleet's every build would make a series each


def _builds(session) -> list[tuple[str, str, int]]:
    """(build, fw_version, devices): the TOP_BUILDS commonest, then ("other", "", rest)."""
    rows = session.execute(
        select(Device.build, Device.fw_version, func.count())
        .group_by(Device.build, Device.fw_version)
        .order_by(func.count().desc(), Device.build)
    ).all()
    top = [(build or "none", version or "", count) for build, version, count in rows[:TOP_BUILDS]]
    rest = sum(count for _, _, count in rows[TOP_BUILDS:])
    return top + ([("other", "", rest)] if rest else [])


def _text(body: str, status: int) -> Response:
    return Response(body, status, mimetype="text/plain")


@ops.get("/healthz")
def healthz() -> Response:
    return _text("ok\n", 200)


@ops.get("/readyz")
def readyz() -> Response:
    db: Database = current_app.extensions["blynkota.db"]
    readiness: Readiness = current_app.extensions["blynkota.readiness"]
    connection = None
    try:
        with gevent.Timeout(READY_DEADLINE):
            connection = db.engine.connect()
            connection.execute(text("SELECT 1"))
        database = "ok"
    except (SQLAlchemyError, gevent.Timeout) as error:
        if connection is not None and isinstance(error, gevent.Timeout):
            # Cut off mid-query: its answer may still come, so the connection
            # is dropped, never rolled back and pooled again.
            connection.invalidate()
        database = f"unreachable ({type(error).__name__})"
    finally:
        if connection is not None:
            connection.close()
    ready = database == "ok" and all(readiness.listeners.values())
    answer = {"ready": ready, "database": database, "listeners": readiness.listeners}
    if readiness.upstream is not None:
        answer["upstream"] = readiness.upstream()
    return jsonify(answer), (200 if ready else 503)


@ops.get("/metrics")
def metrics() -> Response:
    if not address_in(request.remote_addr, current_app.config["SETTINGS"].allowed_metrics_networks):
        if not request.is_secure:
            return _text(
                f"Address {request.remote_addr} is not in allowed.metrics.ips "
                "(or scrape the HTTPS port with an admin's basic auth).\n",
                403,
            )
        refused = guard_admin_request() or auth.login_required(lambda: None)()
        if refused is not None:
            return refused
    fleet = CollectorRegistry(auto_describe=False)
    fleet.register(FleetCollector(current_app.extensions["blynkota.db"]))
    body = generate_latest(PROCESS) + generate_latest(fleet)
    return Response(body, 200, content_type=CONTENT_TYPE_LATEST)
