"""A real blynkota server in a child process, and clients that talk to it.

The server runs `wsgi.py`'s own `main` with `-serverConfig FILE`, as an
operator starts it, in a process forked from one that imported the server
once (forkserver.py; `python wsgi.py` itself when a launcher is set), on
ports chosen by the kernel; the ports are read back from its "listening"
log lines.
"""

import atexit
import base64
import http.client
import json
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path

import gevent

from .forkserver import ForkedProcess, ForkServer
from .images import esp8266_image

ROOT = Path(__file__).resolve().parent.parent
ADMIN_EMAIL = "admin@blynk.cc"
ADMIN_PASS = "s3cret-test-pass"
_LISTENING = re.compile(r"listening for (devices|the admin API).* on [^:]+:(\d+)")


@dataclass
class HttpAnswer:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self):
        return json.loads(self.body)


# Where the child processes keep their compiled modules: outside the checkout,
# and kept even where the environment says not to write them
# (PYTHONDONTWRITEBYTECODE), or each of the suite's 350 servers would compile
# the project again (0.15 s a start).
PYCACHE = Path(tempfile.gettempdir()) / "blynkota-tests-pycache"


FORK_SERVER = ForkServer()
atexit.register(FORK_SERVER.close)


def clean_env(**values) -> dict[str, str]:
    """This environment without BLYNKOTA_ settings, plus `values`, for a child process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BLYNKOTA_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env.update({k: str(v) for k, v in values.items()})
    return env


def wait_for_ports(process: subprocess.Popen, log_path: Path, timeout: float = 30) -> dict:
    """The ports a server started outside ServerProcess printed, by listener."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = dict(_LISTENING.findall(log_path.read_text()))
        if len(found) == 2:
            return {kind: int(port) for kind, port in found.items()}
        assert process.poll() is None, log_path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"no listening lines:\n{log_path.read_text()}")


def sqlite_fleet(folder: Path, devices: list[tuple[str, str, str]]) -> tuple[str, list[str]]:
    """A migrated SQLite database in `folder` with `devices` (e-mail, project, name) added:
    its URL and their tokens, in order."""
    from blynkota import create_app
    from blynkota.ota import NewDevice
    from blynkota.store import upgrade

    db_url = f"sqlite:///{folder / 'fleet.db'}"
    upgrade(db_url)
    app = create_app({"db.url": db_url, "data.folder": folder / "cli"})
    try:
        tokens = app.extensions["blynkota.fleet"].add_devices(
            [NewDevice(email, project, name) for email, project, name in devices]
        )
    finally:
        app.extensions["blynkota.db"].dispose()
    return db_url, tokens


def write_properties(path: Path, values: dict[str, object]) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


class ServerProcess:
    def __init__(self, folder: Path, db_url: str, **extra: object) -> None:
        self.folder = folder
        self.data_folder = folder / "data"
        self.properties = {
            "http.port": 0,
            "https.port": 0,
            "listen.address": "127.0.0.1",
            "data.folder": self.data_folder,
            "db.url": db_url,
            "admin.email": ADMIN_EMAIL,
            "admin.pass": ADMIN_PASS,
            "hard.socket.idle.timeout": 3,
            "shutdown.grace.seconds": 1,
            "ota.sweep.interval": 0.2,
            "node.heartbeat.interval": 0.5,
            "node.poll.interval": 0.1,
            # An update counts at the first login on the new build, as before
            # the health window: the window's own tests set one (test_health.py).
            "ota.health.window": 0,
            **extra,
        }
        self.config_file = folder / f"server-{uuid.uuid4().hex[:6]}.properties"
        self.log_file = folder / "server.log"
        self.process: subprocess.Popen | ForkedProcess | None = None
        # Put before the command: a bench runs the server under a profiler
        # (`python wsgi.py` then, not a fork of the fork server).
        self.launcher: list[str] = []
        self.http_port = self.https_port = 0
        self.open_files: int | None = None  # the process's RLIMIT_NOFILE, when set

    # --- life cycle ---------------------------------------------------------------

    def start(self, timeout: float = 30) -> "ServerProcess":
        write_properties(self.config_file, self.properties)
        env = clean_env()
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        command = ["wsgi.py", "-serverConfig", str(self.config_file)]
        if not self.launcher:
            self.process = FORK_SERVER.spawn(
                command, cwd=ROOT, env=env, output=self.log_file, open_files=self.open_files
            )
        else:
            with open(self.log_file, "ab") as log:
                self.process = subprocess.Popen(
                    [*self.launcher, sys.executable, *command],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    preexec_fn=None if self.open_files is None else self._limit_open_files,
                )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = dict(_LISTENING.findall(self.log_file.read_text()[offset:]))
            if len(ports) == 2:
                self.http_port = int(ports["devices"])
                self.https_port = int(ports["the admin API"])
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log()}")
            gevent.sleep(0.02)
        raise RuntimeError(f"server did not start in {timeout}s:\n{self.log()}")

    def _limit_open_files(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            gevent.sleep(0.02)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGKILL) -> "ServerProcess":
        """Stop (kill -9 by default) and start again on the same ports, as devices expect."""
        self.stop(sig)
        self.properties["http.port"] = self.http_port
        self.properties["https.port"] = self.https_port
        return self.start()

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    # --- clients --------------------------------------------------------------------

    def admin(
        self,
        method: str,
        path: str,
        *,
        files: dict[str, tuple[str, bytes]] | None = None,
        form: dict[str, str] | None = None,
        auth: tuple[str, str] | None = (ADMIN_EMAIL, ADMIN_PASS),
        secure: bool = True,
        headers: dict[str, str] | None = None,
    ) -> HttpAnswer:
        """One request on the admin port (HTTPS, certificate not checked: it is self-signed)."""
        headers = dict(headers or {})
        body = None
        if auth is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{auth[0]}:{auth[1]}".encode()
            ).decode("ascii")
        if files:
            boundary = uuid.uuid4().hex
            parts = []
            for field, (filename, data) in files.items():
                head = (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                    f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                )
                parts.append(head.encode() + data + b"\r\n")
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        if form is not None:  # as a plain HTML form posts (no browser headers: no CSRF asked)
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if secure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            connection = http.client.HTTPSConnection(
                "127.0.0.1", self.https_port, context=context, timeout=30
            )
        else:
            connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return HttpAnswer(
                response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
            )
        finally:
            connection.close()

    def upload(self, path: str, image: bytes, filename: str = "fw.bin") -> HttpAnswer:
        return self.admin("POST", path, files={"file": (filename, image)})

    def curl(self, *arguments: str) -> subprocess.CompletedProcess:
        """The real curl binary, as the Blynk docs use it."""
        return subprocess.run(
            ["curl", "-sS", *arguments], capture_output=True, text=True, timeout=60
        )

    def curl_upload(self, query: str, firmware: Path) -> tuple[int, str]:
        """The Blynk docs' upload command, verbatim but for host, port and credentials."""
        answer = self.curl(
            "-w", "\n%{http_code}", "-F", f"file=@{firmware}", "--insecure",
            "-u", self.credentials, f"{self.admin_url}/admin/ota/start{query}",
        )  # fmt: skip
        body, _, status = answer.stdout.rpartition("\n")
        return int(status), body

    @property
    def admin_url(self) -> str:
        return f"https://localhost:{self.https_port}"

    @property
    def credentials(self) -> str:
        return f"{ADMIN_EMAIL}:{ADMIN_PASS}"


def wait_until(predicate, timeout: float = 15, message: str = "condition") -> None:
    """Poll `predicate` cooperatively (simulated devices keep running) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        gevent.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def upload_at_once(servers: list[ServerProcess], path: str) -> list[int]:
    """One upload per server in the list, all at the same moment (threads); the statuses."""
    statuses: list[int] = []

    def upload(i: int, server: ServerProcess) -> None:
        image = esp8266_image(f"Jan {i + 10} 2020 00:00:00")
        statuses.append(server.upload(path, image).status)

    threads = [threading.Thread(target=upload, args=pair) for pair in enumerate(servers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses


def trickled_head(port: int, request_line: str) -> tuple[bytes, float]:
    """Send `request_line`, then a header one byte a second (slowloris): the
    server's first answer (b"" if it closed the connection, or reset it) and
    the seconds from the request line to it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request_line.encode() + b"\r\n")
        started = time.monotonic()
        answer = b""
        for byte in b"X-Slow: " + b"a" * 40:
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(1)
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:  # reset: closed with the head unread
                answer = b""
            break
        return answer, time.monotonic() - started
