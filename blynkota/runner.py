"""Start and stop the two listeners around one Flask app and one OTA service.

Port 8080 (http.port) carries devices and firmware downloads, port 9443
(https.port) the admin API. On SIGTERM both stop accepting, connections get
`shutdown.grace.seconds` to finish, then the process exits.
"""

import logging
import signal

import gevent
from flask import Flask
from gevent.event import Event
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from .hardware import DeviceSession, SharedPortServer
from .store import upgrade
from .tls import ensure_certificate

__all__ = ["BlynkotaServer"]

log = logging.getLogger("blynkota")

ADMIN_CONNECTIONS = 100
SWEEP_MIN_GAP = 0.1  # seconds between two sweeps woken by freed download slots


class BlynkotaServer:
    def __init__(self, app: Flask) -> None:
        self.app = app
        self.settings = app.config["SETTINGS"]
        self.service = app.extensions["blynkota"]
        self.device_port: SharedPortServer | None = None
        self.admin_port: WSGIServer | None = None
        self._stopped = Event()
        self._wake = Event()
        self.service.on_slot_freed = self._wake.set
        self._sweeper: gevent.Greenlet | None = None

    def start(self) -> None:
        settings = self.settings
        log.info("settings from %s; data folder %s", settings.source, settings.data_folder)
        settings.data_folder.mkdir(parents=True, exist_ok=True)
        upgrade(settings.db_url)
        self.app.extensions["blynkota.admins"].seed(settings.admin_email, settings.admin_pass)
        if settings.uses_default_password:
            log.warning(
                "admin %s still has the default password: set admin.pass in your server.properties",
                settings.admin_email,
            )
        self.service.mark_all_offline()
        ensure_certificate(settings.ssl_cert, settings.ssl_key)

        self.device_port = SharedPortServer(
            (settings.listen_address, settings.http_port),
            self.app,
            self._serve_device,
            sniff_timeout=settings.login_timeout,
            max_connections=settings.max_connections,
        )
        self.device_port.start()
        log.info(
            "listening for devices and firmware downloads (HTTP) on %s:%d",
            settings.listen_address,
            self.device_port.server_port,
        )
        self.admin_port = WSGIServer(
            (settings.listen_address, settings.https_port),
            self.app,
            keyfile=str(settings.ssl_key),
            certfile=str(settings.ssl_cert),
            spawn=Pool(ADMIN_CONNECTIONS),
            log=logging.getLogger("blynkota.https"),
            error_log=logging.getLogger("blynkota.https"),
            environ={"SERVER_NAME": "blynkota"},
        )
        self.admin_port.start()
        self._sweeper = gevent.spawn(self._sweep_forever)
        log.info(
            "listening for the admin API (HTTPS) on %s:%d",
            settings.listen_address,
            self.admin_port.server_port,
        )

    def _sweep_forever(self) -> None:
        """Attempt timeouts and retries after a backoff, from the times stored in the database."""
        while not self._stopped.is_set():
            # Every interval, or at once when a download slot frees up.
            self._wake.wait(self.settings.ota_sweep_interval)
            self._wake.clear()
            try:
                timed_out, offered = self.service.sweep()
            except Exception:  # the database may be away for a moment: try again later
                log.exception("rollout sweep failed")
                continue
            # Many slots free up in a burst: one sweep serves them all.
            gevent.sleep(SWEEP_MIN_GAP)
            if timed_out or offered:
                log.info(
                    "sweep: %d attempt(s) timed out, %d retry offer(s) sent", timed_out, offered
                )

    def _serve_device(self, sock, address) -> None:
        DeviceSession(
            sock,
            address,
            self.service,
            self.service.online,
            login_timeout=self.settings.login_timeout,
            server_host=self.settings.server_host,
            public_port=self.device_port.server_port,
        ).run()

    def stop(self) -> None:
        grace = self.settings.shutdown_grace
        log.info("stopping: no new connections, %ss for open ones to finish", grace)
        if self._sweeper is not None:
            self._sweeper.kill()
        servers = [server for server in (self.device_port, self.admin_port) if server]
        gevent.joinall([gevent.spawn(server.stop, timeout=grace) for server in servers])
        self.app.extensions["blynkota.db"].dispose()
        self._stopped.set()
        log.info("stopped")

    def serve_forever(self) -> None:
        self.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, lambda: gevent.spawn(self.stop))
        self._stopped.wait()
