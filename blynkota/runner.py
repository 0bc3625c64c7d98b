"""Start and stop the listeners and the node's clocks around one Flask app.

Port 8080 (http.port) carries devices and firmware downloads, port 9443
(https.port) the admin API. A process serving devices is a node (cluster/):
it heartbeats, offers the pending devices it holds (fill), and runs the
rollout sweep while it holds the sweeper lease. On SIGTERM the listeners stop
accepting, connections get `shutdown.grace.seconds` to finish, the node
leaves the fleet, then the process exits.

Roles: `python wsgi.py` runs everything in one process (the embedded
default); `python wsgi.py devices` only the device port, `--workers N` as N
processes sharing it (SO_REUSEPORT), beside `gunicorn -k gevent wsgi:app`
for the admin API (see serving.py).
"""

import contextlib
import errno
import gc
import logging
import resource
import signal
import socket
import time
from pathlib import Path

import gevent
from flask import Flask
from gevent.event import Event
from gevent.pywsgi import WSGIServer
from sqlalchemy.exc import TimeoutError as PoolTimeout

from .cluster import Lease, LocalSession, default_node_name
from .config import ConfigError
from .hardware import (
    HTTP_IDLE_TIMEOUT,
    SHED,
    DeviceSession,
    RelayedSession,
    SharedPortServer,
    Upstream,
)
from .logsafe import DEVICE_LINES
from .metrics import DATABASE_ERRORS, SWEEPS
from .store import drain as drain_group_commits
from .store import in_background, is_outage, upgrade
from .tls import check_certificate
from .web import AdminHttpsServer, FirmwareSender

__all__ = ["BlynkotaServer", "device_listener"]

log = logging.getLogger("blynkota")

FILL_MIN_GAP = 0.05  # seconds between two fills woken by freed download slots
# Offers claimed in one transaction. In a storm of thousands of logins each
# turn of the event loop is long, and the fill runs once a turn: a batch must
# take all that came due meanwhile, or offers fall behind the logins.
FILL_BATCH = 2000
TIDY_EVERY = 600.0  # seconds between two clean-ups of old login-limit rows
RECONCILE_EVERY = 5  # heartbeats between two presence reconciliations
MAX_BACKOFF = 30.0  # seconds a clock waits at most while the database is away
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
SPARE_DESCRIPTORS = 200  # files beyond the device connections: database, admin, cache files


# Collections of the cyclic garbage collector: the youngest generation after
# this many new objects, each older one after that many of the younger's.
# Python's defaults (700, 10, 10) run a full collection so often in a login
# storm that it costs a quarter of the server's CPU: every full collection
# walks every object of tens of thousands of sessions. With these, a full
# collection comes every few ten thousand logins and cyclic garbage (an
# exception's traceback, say) is still freed (bench/login_storm.py).
GC_THRESHOLDS = (50_000, 20, 10)


def tune_garbage_collection() -> None:
    """Collect less often, and never walk what start-up built (modules, app, mappers)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _bind_error(key: str, address: str, port: int, error: OSError) -> ConfigError:
    """A listener that cannot bind, as the one-line setting error it is."""
    if error.errno == errno.EADDRINUSE:
        return ConfigError(f"{key}: {address}:{port} is in use by another process")
    if error.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"listen.address: {address} is not an address of this machine")
    if error.errno == errno.EACCES:
        return ConfigError(f"{key}: {port} needs privileges to bind (use a port above 1023)")
    return ConfigError(f"{key}: cannot listen on {address}:{port} ({error.strerror})")


def device_listener(
    address: str, port: int, *, backlog: int = 4096, reuse_port: bool = False
) -> socket.socket:
    """The device port's socket; with `reuse_port` several processes bind the same port."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((address, port))
    except OSError as error:
        sock.close()
        raise _bind_error("http.port", address, port, error) from None
    sock.listen(backlog)
    return sock


def check_connection_limits(max_connections: int, backlog: int, *, relayed: bool = False) -> None:
    """Warn where the kernel would refuse what the settings promise (a reconnect storm).

    The open-files limit is raised to its hard limit first, as servers do. A
    relayed device holds two descriptors: its own connection and the upstream's.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections * (2 if relayed else 1) + SPARE_DESCRIPTORS
    if soft < wanted and soft != hard:
        raised = hard if hard == resource.RLIM_INFINITY else min(hard, max(wanted, soft))
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open-files limit %d is below %shardware.max.connections %d + %d: raise it "
            "(ulimit -n, LimitNOFILE=) or lower hardware.max.connections",
            soft,
            "2 (relayed: two connections each) x " if relayed else "",
            max_connections,
            SPARE_DESCRIPTORS,
        )
    with contextlib.suppress(OSError, ValueError):
        somaxconn = int(SOMAXCONN.read_text().strip())
        if somaxconn < backlog:
            log.warning(
                "net.core.somaxconn is %d, below hardware.listen.backlog %d: the kernel "
                "queues only %d connections in a reconnect storm (sysctl -w net.core.somaxconn=%d)",
                somaxconn,
                backlog,
                somaxconn,
                backlog,
            )


class BlynkotaServer:
    def __init__(
        self,
        app: Flask,
        *,
        serve_admin: bool = True,
        serve_devices: bool = True,
        migrate: bool = True,
        worker: int | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.app = app
        self.settings = app.config["SETTINGS"]
        self.service = app.extensions["blynkota"]
        self.db = app.extensions["blynkota.db"]
        self.node = self.service.node
        self.serve_admin, self.serve_devices = serve_admin, serve_devices
        self.migrate, self.worker, self.reuse_port = migrate, worker, reuse_port
        self.device_port: SharedPortServer | None = None
        self._public_port = 0  # the port in the download URLs, once listening
        self.admin_port: WSGIServer | None = None
        self._stopped = Event()
        # Set at stop: a clock asleep between ticks ends at once, not after its interval.
        self._stopping = Event()
        self._wake_presence = Event()
        self.db.health.recovered = self._wake_presence.set
        self._clocks: list[gevent.Greenlet] = []
        self._readiness = app.extensions["blynkota.readiness"]
        # Relay mode: every device session goes through the operator's Blynk server.
        self.upstream: Upstream | None = None
        if self.settings.relay_upstream is not None:
            host, port = self.settings.relay_upstream
            self.upstream = Upstream(
                host, port, self.settings.relay_ssl, self.settings.relay_connect_timeout
            )
        # Not ready until each listener this process runs is up (GET /readyz).
        if serve_devices:
            self._readiness.listeners["devices"] = False
        if serve_admin:
            self._readiness.listeners["admin"] = False

    def start(self) -> None:
        settings = self.settings
        log.info("settings from %s; data folder %s", settings.source, settings.data_folder)
        settings.data_folder.mkdir(parents=True, exist_ok=True)
        if self.serve_admin:  # a broken pair stops the start before anything listens
            check_certificate(
                settings.ssl_cert, settings.ssl_key, configured=settings.ssl_configured
            )
        if self.migrate:
            upgrade(settings.db_url)
        self.service.catalog.start_up()
        if self.serve_devices:
            self._start_devices()
        if self.serve_admin:
            self._start_admin()

    def _start_devices(self) -> None:
        settings = self.settings
        check_connection_limits(
            settings.max_connections, settings.listen_backlog, relayed=self.upstream is not None
        )
        if self.upstream is not None:
            self._readiness.upstream = self.upstream.state
            log.info(
                "relay mode: every device session goes through the Blynk server at %s%s",
                self.upstream.address,
                "" if settings.relay_ssl == "false" else " over TLS",
            )
            if settings.relay_ssl == "insecure":
                log.warning(
                    "relay.upstream.ssl=insecure: the upstream's certificate is not checked"
                )
        listener = device_listener(
            settings.listen_address,
            settings.http_port,
            backlog=settings.listen_backlog,
            reuse_port=self.reuse_port,
        )
        self.device_port = SharedPortServer(
            listener,
            self.app,
            self._serve_device,
            sniff_timeout=settings.login_timeout,
            max_connections=settings.max_connections,
            max_http_connections=settings.max_http_connections,
            file_sender=FirmwareSender(
                self.service.catalog, self.service.downloads, idle_timeout=HTTP_IDLE_TIMEOUT
            ).serve,
            # A relayed login waits for the upstream: it always takes a greenlet.
            device_starter=self._start_device_here if self.upstream is None else None,
        )
        port = listener.getsockname()[1]
        # The port in the download URLs: asked of the listener once, not at
        # every login (`server_port` is a system call).
        self._public_port = settings.server_http_port or port
        self.node.register(settings.node_name or default_node_name(port, self.worker))
        self.device_port.start()
        self._readiness.listeners["devices"] = True
        log.info(
            "listening for devices and firmware downloads (HTTP) on %s:%d",
            settings.listen_address,
            port,
        )
        sweeper = Lease(self.db, "sweeper", max(3 * settings.ota_sweep_interval, 10.0))
        self._clocks = [
            gevent.spawn(self._heartbeat_forever),
            gevent.spawn(self._presence_forever),
            gevent.spawn(self._fill_forever),
            gevent.spawn(self._sweep_forever, sweeper),
        ]

    def _start_admin(self) -> None:
        settings = self.settings
        self.app.extensions["blynkota.admins"].seed(settings.admin_email, settings.admin_pass)
        if settings.uses_default_password:
            log.warning(
                "admin %s still has the default password: set admin.pass in your server.properties",
                settings.admin_email,
            )
        self.admin_port = AdminHttpsServer(
            (settings.listen_address, settings.https_port),
            self.app,
            keyfile=str(settings.ssl_key),
            certfile=str(settings.ssl_cert),
            log=logging.getLogger("blynkota.https"),
            error_log=logging.getLogger("blynkota.https"),
            environ={"SERVER_NAME": "blynkota"},
            # Devices over TLS share the port, as on the Blynk server (SPEC §8).
            device_handler=self._serve_tls_device if self.device_port is not None else None,
            sniff_timeout=settings.login_timeout,
        )
        try:
            self.admin_port.start()
        except OSError as error:
            raise _bind_error(
                "https.port", settings.listen_address, settings.https_port, error
            ) from None
        self._readiness.listeners["admin"] = True
        log.info(
            "listening for the admin API (HTTPS) on %s:%d",
            settings.listen_address,
            self.admin_port.server_port,
        )

    # --- the node's clocks --------------------------------------------------------

    def _run_clock(self, name: str, interval: float, wake: Event | None, tick) -> None:
        """Call `tick` every `interval` (or when woken); back off while the database is away.
        The devices come first: before each statement, the loop handles the
        sockets that are ready (store/giving_way.py)."""
        in_background()
        failures = 0
        while not self._stopping.is_set():
            delay = interval if not failures else min(interval * 2**failures, MAX_BACKOFF)
            if wake is not None:
                wake.wait(delay)
                wake.clear()
            else:
                self._stopping.wait(delay)
            if self._stopping.is_set():
                return
            try:
                tick()
                failures = 0
            except Exception as error:
                failures += 1
                if is_outage(error) or self.db.health.down:
                    self.db.health.failed(error)
                elif isinstance(error, PoolTimeout):
                    DATABASE_ERRORS.labels("pool_timeout").inc()
                    log.warning("%s: no database connection free (db.pool.size); later", name)
                else:
                    log.exception("%s failed", name)

    def _heartbeat_forever(self) -> None:
        """Beat and reap, on the control pool only: nothing may hold up a heartbeat."""

        def tick() -> None:
            if not self.node.beat():
                self._wake_presence.set()  # declared dead meanwhile: record the sessions again
            self.node.reap()

        self._run_clock("heartbeat", self.settings.node_heartbeat, None, tick)

    def _presence_forever(self) -> None:
        """Write disconnects the database missed, and match the rows to the sockets."""

        def tick() -> None:
            self.node.flush_offline()
            self.node.reconcile(self._local_sessions)

        interval = self.settings.node_heartbeat * RECONCILE_EVERY
        self._run_clock("presence", interval, self._wake_presence, tick)

    def _local_sessions(self) -> dict[int, LocalSession]:
        return {
            link.device_id: link
            for link in self.service.online.links()
            if link.session_id is not None
        }

    def _fill_forever(self) -> None:
        def tick() -> None:
            sent = self.service.offers.fill(FILL_BATCH)
            if sent >= FILL_BATCH:
                self.service.fill_due.set()  # a full batch: more are waiting (now=true), go on
                gevent.sleep(0)
            elif sent:
                gevent.sleep(FILL_MIN_GAP)  # slots free up in bursts: one fill serves them

        self._run_clock("offer fill", self.settings.node_poll_interval, self.service.fill_due, tick)

    def _sweep_forever(self, lease: Lease) -> None:
        next_tidy = time.monotonic()

        def tick() -> None:
            nonlocal next_tidy
            if not lease.acquire(self.node.id):
                return  # another node sweeps
            if time.monotonic() >= next_tidy:
                next_tidy = time.monotonic() + TIDY_EVERY
                self.app.extensions["blynkota.admins"].limits.forget_quiet()
            with SWEEPS.time():
                timed_out, entered = self.service.clock.sweep()
            self.service.notifier.kick()  # webhooks: in a greenlet of their own
            if timed_out or entered:
                log.info(
                    "sweep: %d attempt(s) timed out, %d device(s) entered a grown wave",
                    timed_out,
                    entered,
                )

        self._run_clock("rollout sweep", self.settings.ota_sweep_interval, None, tick)
        try:
            lease.release(self.node.id)
        except Exception:
            log.debug("sweeper lease not released; it expires by itself")

    # --- devices --------------------------------------------------------------------

    def _serve_tls_device(self, secure, address, first: bytes) -> None:
        """A device over TLS on the HTTPS port: a session as on the device port,
        with its limits; closed here unless it went on in the event loop."""
        if not self.device_port.serve_device(secure, address, first):
            secure.close()

    def _serve_device(self, sock, address, ended, first: bytes = b"") -> bool:
        if self.upstream is not None:
            return RelayedSession(
                sock,
                address,
                self.service.devices,
                self.service.online,
                self.upstream,
                login_timeout=self.settings.login_timeout,
                max_messages_per_sec=self.settings.max_messages_per_sec,
                server_host=self.settings.server_host,
                public_port=self._public_port,
                ended=ended,
                first=first,
            ).run()
        return self._device_session(sock, address, ended, first).run()

    def _start_device_here(self, sock, address, ended) -> None:
        self._device_session(sock, address, ended).start_here()

    def _device_session(self, sock, address, ended, first: bytes = b"") -> DeviceSession:
        return DeviceSession(
            sock,
            address,
            self.service.devices,
            self.service.online,
            login_timeout=self.settings.login_timeout,
            max_messages_per_sec=self.settings.max_messages_per_sec,
            server_host=self.settings.server_host,
            public_port=self._public_port,
            ended=ended,
            first=first,
        )

    # --- stopping -------------------------------------------------------------------

    def stop(self) -> None:
        grace = self.settings.shutdown_grace
        log.info("stopping: no new connections, %ss for open ones to finish", grace)
        # Sessions still in a query when the grace ends are killed; the pool's
        # report of each connection it then throws away is expected, not news.
        logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
        self._stopping.set()
        for name in self._readiness.listeners:  # a load balancer stops sending new work
            self._readiness.listeners[name] = False
        self.service.fill_due.set()
        self._wake_presence.set()
        gevent.joinall(self._clocks, timeout=grace + 1)
        gevent.killall(self._clocks, block=False)
        servers = [server for server in (self.device_port, self.admin_port) if server]
        gevent.joinall([gevent.spawn(server.stop, timeout=grace) for server in servers])
        # Reports and presence queued behind their answers are written before
        # the node leaves (which marks its devices offline) and the process ends,
        # within one grace in all (shutdown.grace.seconds promises no more).
        writes_until = time.monotonic() + grace
        busy = drain_group_commits(grace)
        if self.serve_devices:
            # Parked sessions hold no greenlet the servers' stop waited for:
            # close them now that what they had queued is written.
            self._close_device_sessions()
            if not busy:
                busy = drain_group_commits(max(0.0, writes_until - time.monotonic()))
        if busy:
            log.warning(
                "stopping: %d group commit(s) still writing after %ss: left unwritten", busy, grace
            )
        if self.serve_devices:
            try:
                self.node.stop()
            except Exception as error:
                log.warning(
                    "could not mark this node stopped (%s): peers will, within its lease", error
                )
        self.db.dispose()
        self.node.control.dispose()
        self._stopped.set()
        # What the budgets held back, before the last line.
        DEVICE_LINES.summarise()
        SHED.summarise()
        log.info("stopped")

    def _close_device_sessions(self) -> None:
        """Close every device connection of this process before the node leaves:
        none stays open on a node the database says is gone, and a process that
        runs on (a test, an embedding) keeps no socket of a device."""
        links = self.service.online.links()
        for link in links:
            link.close("the server is stopping", quiet=True)
        if links:
            log.info("stopping: closed %d device connection(s)", len(links))
        gevent.sleep(0)  # the sessions' clean-ups queue their disconnects for the drain

    def serve_forever(self) -> None:
        tune_garbage_collection()
        try:
            self.start()
        except ConfigError:
            if self.device_port is not None:  # the admin port failed: leave the fleet cleanly
                self.stop()
            raise
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, lambda: gevent.spawn(self.stop))
        self._stopped.wait()
