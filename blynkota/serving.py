"""Serving: the whole server, the device role with its workers, and the app for gunicorn.

- `main(argv)`: `python wsgi.py [all|devices] [-serverConfig FILE] [-dataFolder
  DIR] [--workers N]` and `blynkota serve ...`: the whole server in one process
  (devices, downloads, admin API), or the device port only as N processes
  sharing it (SO_REUSEPORT).
- `app`: the WSGI app for `gunicorn -k gevent wsgi:app` (admin API and
  firmware downloads; TLS from gunicorn's --certfile or a proxy in
  `trusted.proxies`).

Several processes share one fleet only through a server database: the
multi-process modes refuse SQLite. gevent's monkey patching comes first, in
the entry point (wsgi.py, `blynkota`), or below when a worker runs this module.
"""

if __name__ == "__main__":
    # Before anything imports socket: PyMySQL's queries must yield to the hub.
    from blynkota.patching import patch_for_gevent

    patch_for_gevent()

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from .app import create_app
from .config import ConfigError
from .logs import configure_logging
from .store import connection_problem

__all__ = ["app", "create_app", "load_for_gunicorn", "main"]

log = logging.getLogger("blynkota")

PACKAGE_PARENT = Path(__file__).resolve().parent.parent

WORKER_RESTART_DELAY = 1.0  # seconds before a crashed worker is started again
# gunicorn's exit code for "the app cannot load": it then stops instead of
# booting the worker again and again.
GUNICORN_APP_LOAD_ERROR = 4


def _configure_logging(app) -> None:
    settings = app.config["SETTINGS"]
    configure_logging(settings.log_level, settings.log_format)


def _refuse_sqlite(app, mode: str) -> None:
    if app.config["SETTINGS"].is_sqlite:
        raise ConfigError(
            f"db.url: {mode} shares one fleet between processes, which SQLite cannot; "
            "set db.url to a MySQL/MariaDB URL (mysql+pymysql://user:pass@host/blynkota)"
        )


class WebApp:
    """`wsgi:app` for gunicorn: the Flask app, built in each worker on first use."""

    def __init__(self) -> None:
        self._app = None

    def load(self):
        if self._app is None:
            built = create_app()
            _refuse_sqlite(built, "gunicorn")
            _configure_logging(built)
            settings = built.config["SETTINGS"]
            built.extensions["blynkota.admins"].seed(settings.admin_email, settings.admin_pass)
            self._app = built
        return self._app

    def __call__(self, environ, start_response):
        return self.load()(environ, start_response)


app = WebApp()


def load_for_gunicorn() -> None:
    """Loaded by gunicorn: a bad setting stops the worker at boot, in one line."""
    try:
        app.load()
    except ConfigError as error:
        print(f"blynkota: {error}", file=sys.stderr)
        sys.exit(GUNICORN_APP_LOAD_ERROR)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="blynkota OTA server")
    parser.add_argument(
        "role",
        nargs="?",
        choices=("all", "devices"),
        default="all",
        help="all: the whole server in one process (default); devices: the device port only",
    )
    # Blynk's own flags, spelled as the Blynk server spells them.
    parser.add_argument("-serverConfig", help="server.properties file (as BLYNKOTA_CONFIG)")
    parser.add_argument("-dataFolder", help="data folder (as data.folder)")
    parser.add_argument("--workers", type=int, default=1, help="device processes (devices role)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if not 1 <= arguments.workers <= 64:
        parser.error("--workers must be from 1 to 64")
    if arguments.role == "all" and arguments.workers != 1:
        parser.error("--workers goes with the devices role: python wsgi.py devices --workers N")
    return arguments


def _supervise(argv: list[str], workers: int) -> int:
    """Run `workers` device processes; forward SIGTERM; start a crashed one again."""
    stopping = False
    children: dict[int, subprocess.Popen] = {}
    # The workers import this package as this process does, from any working directory.
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, (str(PACKAGE_PARENT), environment.get("PYTHONPATH")))
    )

    def spawn(index: int) -> None:
        command = [sys.executable, "-m", "blynkota.serving", *argv, "--worker", str(index)]
        children[index] = subprocess.Popen(command, env=environment)

    def stop(_signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for index in range(workers):
        spawn(index)
    while True:
        for index, child in list(children.items()):
            code = child.poll()
            if code is None:
                continue
            if stopping:
                children.pop(index)
            else:
                log.warning("device worker %d exited with %s: starting it again", index, code)
                time.sleep(WORKER_RESTART_DELAY)
                spawn(index)
        if stopping and not children:
            return 0
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    arguments = _arguments(argv)
    if arguments.serverConfig:
        os.environ["BLYNKOTA_CONFIG"] = arguments.serverConfig
    overrides = {"data.folder": arguments.dataFolder} if arguments.dataFolder else None
    try:
        application = create_app(overrides)
        if arguments.role == "devices":
            _refuse_sqlite(application, "the devices role")
    except ConfigError as error:
        print(f"blynkota: {error}", file=sys.stderr)
        return 2
    _configure_logging(application)
    try:
        return _serve(application, arguments, argv)
    except DBAPIError as error:
        problem = connection_problem(application.config["SETTINGS"].db_url, error)
        if problem is None:
            raise
        print(f"blynkota: {problem}", file=sys.stderr)
        return 2


def _serve(application, arguments, argv: list[str]) -> int:
    from blynkota.runner import BlynkotaServer
    from blynkota.store import upgrade

    if arguments.role == "devices" and arguments.worker is None and arguments.workers > 1:
        upgrade(application.config["SETTINGS"].db_url)  # once, before the workers start
        application.extensions["blynkota.db"].dispose()
        return _supervise(argv, arguments.workers)
    try:
        BlynkotaServer(
            application,
            serve_admin=arguments.role == "all",
            serve_devices=True,
            migrate=arguments.worker is None,
            worker=arguments.worker,
            reuse_port=arguments.role == "devices",
        ).serve_forever()
    except ConfigError as error:
        print(f"blynkota: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # a device worker started by _supervise
    sys.exit(main())
