"""This process's Prometheus counters: logins, offers, downloads, sweeps, database errors.

Each process counts what it did and exposes its own, as Prometheus expects
of a scrape target. What spans processes (devices online per node, rollout
devices by state) is read from the database at each scrape (web/ops.py).
This module imports nothing of the project, so every layer may count.

The counters a login, an offer or a download bumps are `Tally`s: a plain
int each, turned into a Prometheus counter when scraped. prometheus_client's
own Counter takes a lock and checks its labels at every `inc`, some six
Python calls; a download counts three times, a login once.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily

__all__ = [
    "DATABASE_ERRORS",
    "DEVICE_LINES_DROPPED",
    "DOWNLOAD_BYTES",
    "DOWNLOADS_COMPLETED",
    "DOWNLOADS_INTERRUPTED",
    "DOWNLOADS_STARTED",
    "LOGIN_FAILURES",
    "LOGINS",
    "OFFERS",
    "PROCESS",
    "RELAY_BYTES_FROM_DEVICES",
    "RELAY_BYTES_FROM_UPSTREAM",
    "RELAY_CONNECT_FAILURES",
    "RELAY_CONNECT_SECONDS",
    "RELAY_FRAMES_FROM_DEVICES",
    "RELAY_FRAMES_FROM_UPSTREAM",
    "RELAYED_SESSIONS",
    "SESSIONS_SHED",
    "SWEEPS",
    "VALUES_CUT",
    "Tally",
    "count_download",
]

PROCESS = CollectorRegistry(auto_describe=True)


class Tally:
    """An unlabelled counter for the hot paths, exposed as `<name>_total` and
    `<name>_created` like prometheus_client's Counter.

    No lock: the process is one thread of greenlets, and a greenlet is never
    switched out in the middle of `+=` (the password checks, the one thing
    run on other threads, count nothing). The relay's per-frame path adds
    to `value` itself: a method call per frame is a measurable share there.
    """

    __slots__ = ("name", "documentation", "value", "created")

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.value = 0
        self.created = time.time()
        registry.register(self)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation)
        family.add_metric([], self.value, created=self.created)
        return [family]

    def describe(self):
        return [CounterMetricFamily(self.name, self.documentation)]


LOGINS = Tally("blynkota_logins", "Device logins accepted.", registry=PROCESS)
LOGIN_FAILURES = Counter(
    "blynkota_login_failures",
    "Device logins refused or abandoned, by reason.",
    ["reason"],
    registry=PROCESS,
)
OFFERS = Tally("blynkota_offers", "ota commands written to devices.", registry=PROCESS)
DOWNLOADS_STARTED = Tally(
    "blynkota_downloads_started", "Firmware bodies (GET 200/206) begun.", registry=PROCESS
)
DOWNLOADS_COMPLETED = Tally(
    "blynkota_downloads_completed", "Firmware bodies sent to their last byte.", registry=PROCESS
)
DOWNLOADS_INTERRUPTED = Tally(
    "blynkota_downloads_interrupted", "Firmware bodies cut short.", registry=PROCESS
)
DOWNLOAD_BYTES = Tally(
    "blynkota_download_bytes",
    "Firmware bytes handed to the kernel (what sendfile reported).",
    registry=PROCESS,
)
DEVICE_LINES_DROPPED = Tally(
    "blynkota_device_log_lines_dropped",
    "Log lines about one device left out: it was over its budget (logsafe.DeviceLines).",
    registry=PROCESS,
)
SWEEPS = Histogram(
    "blynkota_sweep_seconds",
    "Rollout sweeps run by this process (while it holds the sweeper lease), and their durations.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=PROCESS,
)
DATABASE_ERRORS = Counter(
    "blynkota_database_errors",
    "Database operations that failed: the database away, or no pooled connection free.",
    ["kind"],
    registry=PROCESS,
)

SESSIONS_SHED = Counter(
    "blynkota_sessions_shed",
    "Device connections closed because the database could not serve them, by cause.",
    ["cause"],
    registry=PROCESS,
)
VALUES_CUT = Counter(
    "blynkota_values_cut",
    "Values from outside cut to the length of their column, by key (ver, build, file name...).",
    ["key"],
    registry=PROCESS,
)

for reason in ("invalid_token", "no_login", "database", "newer_connection"):
    LOGIN_FAILURES.labels(reason)  # present at 0 from the start, as rates need
for kind in ("unreachable", "pool_timeout"):
    DATABASE_ERRORS.labels(kind)
for cause in ("pool_timeout", "unreachable", "locked", "error"):
    SESSIONS_SHED.labels(cause)


def count_download(sent: int, *, complete: bool) -> None:
    """A firmware body ended: `sent` bytes went to the kernel, all of them or not."""
    DOWNLOAD_BYTES.inc(sent)
    (DOWNLOADS_COMPLETED if complete else DOWNLOADS_INTERRUPTED).inc()


# Relay mode (hardware/relay.py): the sessions passed through to the upstream Blynk server.
RELAYED_SESSIONS = Gauge(
    "blynkota_relayed_sessions", "Device sessions relayed to the upstream now.", registry=PROCESS
)
RELAY_FRAMES_FROM_DEVICES = Tally(
    "blynkota_relay_frames_from_devices", "Frames relayed from devices upstream.", PROCESS
)
RELAY_FRAMES_FROM_UPSTREAM = Tally(
    "blynkota_relay_frames_from_upstream", "Frames relayed from the upstream to devices.", PROCESS
)
RELAY_BYTES_FROM_DEVICES = Tally(
    "blynkota_relay_bytes_from_devices", "Bytes relayed from devices upstream.", PROCESS
)
RELAY_BYTES_FROM_UPSTREAM = Tally(
    "blynkota_relay_bytes_from_upstream", "Bytes relayed from the upstream to devices.", PROCESS
)
RELAY_CONNECT_FAILURES = Counter(
    "blynkota_relay_connect_failures",
    "Device logins whose upstream connection could not be made, by cause.",
    ["cause"],
    registry=PROCESS,
)
RELAY_CONNECT_SECONDS = Histogram(
    "blynkota_relay_connect_seconds",
    "Time to open the upstream connection of a device's login (TLS included).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=PROCESS,
)
