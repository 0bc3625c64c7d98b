"""A simulated Blynk device: `python -m blynkota.simulator --token T --build "..."`.

It reports its info as library 0.6.1, 1.1 or 1.3.x lays it out (`--library`),
speaks through the project's own codec, logs in, reports its info, pings
after `h-beat` seconds of silence, and on an `ota` command downloads the URL
the way the ESP8266 updater does (HTTP/1.0, `x-ESP8266-*` headers), checks the
length, `x-MD5` and the 0xE9 magic, then "reboots": it reconnects reporting the
build read from the downloaded image. Failure modes make it misbehave the way
real boards do: `refuse` never downloads, `half` drops the download halfway,
`old-build` flashes but comes back with its old build.
"""

import argparse
import hashlib
import logging
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import gevent
from gevent import socket
from gevent.event import Event
from gevent.pool import Pool

from .ota.firmware.image import IMAGE_MAGIC, read_build, read_identity
from .protocol import (
    NEED_DATA,
    Command,
    FrameReader,
    Internal,
    Response,
    Status,
    encode_frame,
    encode_info,
    encode_login,
    encode_ping,
)

__all__ = ["Download", "SimulatedDevice", "FAIL_MODES", "main"]

log = logging.getLogger("blynkota.simulator")

# refuse: takes the `ota` and never downloads; half: the download breaks off
# midway; old-build: flashes nothing, comes back on the build it had; brick:
# downloads the whole file and never comes back (a firmware that does not boot).
FAIL_MODES = ("none", "refuse", "half", "old-build", "brick")
LOGIN_ANSWER_TIMEOUT = 3.0  # what the C++ library waits for its login answer
LOGIN_RETRY = 5.0


@dataclass
class Download:
    url: str
    status: int = 0
    size: int = 0
    expected_size: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    build: str | None = None
    identity: dict = field(default_factory=dict)  # the image's blnkinf: fw_version, fw_type...
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class SimulatedDevice:
    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        build: str | None,
        *,
        heartbeat: int = 10,
        buff_in: int = 256,
        fw: str | None = None,
        fw_type: str | None = None,
        library: str = "0.6.1",
        hardware: str = "ESP8266",
        fail: str = "none",
        legacy_login: bool = False,
        fallback_ports: tuple[int, ...] = (),
        chatter: float | None = None,
        crash_after: float | None = None,
        rollback: bool = False,
    ) -> None:
        if fail not in FAIL_MODES:
            raise ValueError(f"fail mode {fail!r} is not one of {', '.join(FAIL_MODES)}")
        self.host, self.port, self.token = host, port, token
        # Other servers of the same fleet: when a connection is refused, the
        # device tries the next one, as it would through a load balancer.
        self._ports = (port, *fallback_ports)
        self.build = build
        self.heartbeat, self.buff_in, self.fw, self.hardware = heartbeat, buff_in, fw, hardware
        # The library generation whose info message it sends (SPEC §7): "0.6.1"
        # (ver, fw), "1.1.0" (ver, fw-type, fw) or "1.3.2" (mcu, fw-type, blynk).
        self.fw_type, self.library = fw_type, library
        self.fail = fail
        self.legacy_login = legacy_login
        # Seconds between two virtual writes (`vw 1 <n>`) while logged in, as a
        # sketch's timer sends them; None: silent apart from pings.
        self.chatter = chatter
        self.virtual_writes = 0
        # A firmware that crashes: once updated, the board reboots `crash_after`
        # seconds after each login, again and again (a crash loop). `rollback`:
        # at its first crash it comes back on the build it had (ESP32's rollback).
        self.crash_after, self.rollback = crash_after, rollback
        self.crashes = 0
        self.builds_reported: list[str | None] = []  # the build of each login, in order
        self._before_update: tuple | None = None  # (build, fw, fw_type) it rolls back to
        self.logins = 0
        self.updates = 0  # updates finished: downloaded, flashed, logged in again
        self._flashed = False
        self.login_status: int | None = None
        self.ota_urls: list[str] = []
        self.downloads: list[Download] = []
        self.frames: list[object] = []  # every event received, in order
        self.ready = Event()  # logged in and info answered
        self.offered = Event()  # an `ota` command arrived
        self._msg_id = 0
        self._stop = Event()
        self._sock: socket.socket | None = None

    # --- control ---------------------------------------------------------------

    def start(self) -> gevent.Greenlet:
        return gevent.spawn(self.run)

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()

    def run(self, *, max_sessions: int = 1000) -> None:
        """Connect, serve, reboot after updates; bounded by `max_sessions` and stop()."""
        for _ in range(max_sessions):
            if self._stop.is_set():
                return
            try:
                keep_going = self._session()
            except OSError as error:
                if self._stop.is_set():
                    return
                log.info("%s: connection failed (%s)", self.token, error)
                keep_going = True
                self.port = self._ports[(self._ports.index(self.port) + 1) % len(self._ports)]
                self._stop.wait(LOGIN_RETRY / 10)
            if not keep_going:
                return

    # --- one connection ----------------------------------------------------------

    def _next_id(self) -> int:
        self._msg_id = self._msg_id % 0xFFFF + 1  # never 0
        return self._msg_id

    def _info(self) -> dict[str, str]:
        timing = {"h-beat": str(self.heartbeat), "buff-in": str(self.buff_in), "dev": self.hardware}
        if self.library.startswith("1.3"):
            # 1.3.x on Arduino cores: no `ver` and no `fw`, the first key is `mcu`.
            fields = {"mcu": self.fw or "0.0.0"}
            if self.fw_type:
                fields["fw-type"] = self.fw_type
            if self.build:
                fields["build"] = self.build
            fields |= {"blynk": self.library, **timing}
        else:
            fields = {"ver": self.library, **timing}
            if self.fw_type:
                fields["fw-type"] = self.fw_type
            if self.fw:
                fields["fw"] = self.fw
            if self.build:
                fields["build"] = self.build
        if self.fw_type:
            fields["tmpl"] = self.fw_type
        return fields

    def _session(self) -> bool:
        """One connection; True to reconnect (after an update), False to stop."""
        self.ready.clear()
        self._msg_id = 0
        sock = socket.create_connection((self.host, self.port), timeout=LOGIN_ANSWER_TIMEOUT)
        self._sock = sock
        reader = FrameReader()
        try:
            sock.sendall(encode_login(self.token, self._next_id(), legacy=self.legacy_login))
            answer = self._read_event(sock, reader, LOGIN_ANSWER_TIMEOUT)
            self.login_status = answer.status if isinstance(answer, Response) else None
            if self.login_status is None:
                # Closed without an answer: as the library does, try again.
                self._stop.wait(LOGIN_RETRY / 10)
                return not self._stop.is_set()
            if self.login_status == Status.INVALID_TOKEN:
                log.warning("%s: login refused (%s)", self.token, answer)
                return False
            if self.login_status != Status.OK:
                # A server that is busy or without its database: try again later.
                self._stop.wait(LOGIN_RETRY / 10)
                return not self._stop.is_set()
            self.logins += 1
            self.builds_reported.append(self.build)
            if self._flashed:
                self.updates, self._flashed = self.updates + 1, False
            info_id = self._next_id()
            sock.sendall(encode_info(self._info(), info_id))
            next_ping, next_write = time.monotonic() + self.heartbeat, time.monotonic()
            crashes_at = self._crash_time()
            while not self._stop.is_set():
                if time.monotonic() >= crashes_at:
                    self._crash()
                    return True  # rebooting
                next_ping, next_write = self._keep_talking(sock, next_ping, next_write)
                wait = min(next_ping, next_write, crashes_at) - time.monotonic()
                try:
                    event = self._read_event(sock, reader, max(wait, 0.001))
                except socket.timeout:
                    continue
                if event is None:
                    return not self._stop.is_set()  # the server closed: reconnect
                self.frames.append(event)
                if isinstance(event, Response) and event.msg_id == info_id:
                    self.ready.set()
                if isinstance(event, Internal) and event.words[:1] == ("ota",):
                    url = event.words[1] if len(event.words) > 1 else ""
                    self.ota_urls.append(url)
                    self.offered.set()
                    if self.fail == "refuse":
                        continue
                    self._update(url)
                    return True  # reboot
            return False
        finally:
            self.ready.clear()
            sock.close()
            self._sock = None

    def _crash_time(self) -> float:
        """When the running firmware crashes: never, unless it came by an update
        and the board crashes after updates (`crash_after`, or `rollback`)."""
        if self.updates == 0 or (self.crash_after is None and not self.rollback):
            return float("inf")
        if self.rollback and self._before_update is None:
            return float("inf")  # rolled back: the old build runs fine
        return time.monotonic() + (self.crash_after or 0.0)

    def _crash(self) -> None:
        self.crashes += 1
        if self.rollback and self._before_update is not None:
            (self.build, self.fw, self.fw_type), self._before_update = self._before_update, None
        log.info("%s: crashed, rebooting on build %r", self.token, self.build)

    def _keep_talking(self, sock, next_ping: float, next_write: float) -> tuple[float, float]:
        """A ping every heartbeat and, with `chatter`, a virtual write every
        `chatter` seconds; returns when each is due next."""
        now = time.monotonic()
        if now >= next_ping:
            sock.sendall(encode_ping(self._next_id()))
            next_ping = now + self.heartbeat
        if self.chatter is None:
            return next_ping, next_ping
        if now >= next_write:
            self.virtual_writes += 1
            body = b"vw\x001\x00" + str(self.virtual_writes).encode()
            sock.sendall(encode_frame(Command.HARDWARE, self._next_id(), body))
            next_write = now + self.chatter
        return next_ping, next_write

    @staticmethod
    def _read_event(sock, reader: FrameReader, timeout: float):
        sock.settimeout(timeout)
        while True:
            event = reader.next_event()
            if event is not NEED_DATA:
                return event
            data = sock.recv(4096)
            if not data:
                return None
            reader.feed(data)

    # --- the updater ----------------------------------------------------------------

    def _update(self, url: str) -> None:
        download = self.download(url)
        self.downloads.append(download)
        if download.ok and self.fail == "none":
            self._before_update = (self.build, self.fw, self.fw_type)
            # Now it runs the image: it reports what the image's block says.
            self.build = download.build
            self.fw = download.identity.get("fw_version") or self.fw
            self.fw_type = download.identity.get("fw_type") or self.fw_type
            self._flashed = True
        log.info("%s: download %s: %s", self.token, url, download.error or "flashed")
        if download.ok and self.fail == "brick":
            log.info("%s: the new firmware does not boot: never back", self.token)
            self._stop.set()

    def download(self, url: str) -> Download:
        """GET the image as ESP8266httpUpdate does and check it as the updater would."""
        result = Download(url)
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {target} HTTP/1.0\r\n"
            f"Host: {parts.netloc}\r\n"
            "User-Agent: ESP8266-http-Update\r\n"
            "x-ESP8266-STA-MAC: 5C:CF:7F:00:00:01\r\n"
            "x-ESP8266-AP-MAC: 5E:CF:7F:00:00:01\r\n"
            "x-ESP8266-free-space: 2781184\r\n"
            "x-ESP8266-sketch-size: 301792\r\n"
            "x-ESP8266-sketch-md5: 00000000000000000000000000000000\r\n"
            "x-ESP8266-chip-size: 4194304\r\n"
            "x-ESP8266-sdk-version: 2.2.1(cfd48f3)\r\n"
            "x-ESP8266-mode: sketch\r\n"
            f"x-ESP8266-version: {self.build or ''}\r\n"
            "Connection: close\r\n\r\n"
        )
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # An ESP's TCP window is a few KiB: a small receive buffer makes the
            # server feel a slow or dropped download as a real board makes it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.settimeout(10)
            sock.connect((host, port))
        except OSError as error:
            result.error = f"cannot connect: {error}"
            return result
        try:
            sock.sendall(request.encode("latin-1"))
            head, body = _read_head(sock)
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            result.status = int(status_line.split()[1])
            result.headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in header_lines)
            }
            if result.status != 200:
                result.error = f"HTTP {result.status}"
                return result
            result.expected_size = int(result.headers.get("content-length", "0"))
            if result.expected_size <= 0:
                result.error = "no Content-Length"
                return result
            limit = result.expected_size // 2 if self.fail == "half" else result.expected_size
            body = body[:limit]
            while len(body) < limit:
                chunk = sock.recv(min(65536, limit - len(body)))
                if not chunk:
                    break
                body += chunk
            result.size = len(body)
            if self.fail == "half":
                result.error = f"download dropped at {result.size} of {result.expected_size}"
            elif result.size != result.expected_size:
                result.error = f"short download: {result.size} of {result.expected_size}"
            elif hashlib.md5(body).hexdigest() != result.headers.get("x-md5"):
                result.error = "x-MD5 does not match the image"
            elif body[0] != IMAGE_MAGIC:
                result.error = f"bad image magic 0x{body[0]:02X}"
            else:
                result.build = read_build(body)
                result.identity = read_identity(body)
            return result
        except (OSError, ValueError, IndexError) as error:
            result.error = f"download failed: {error}"
            return result
        finally:
            sock.close()


def _read_head(sock) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ValueError("connection closed before the response headers ended")
        data += chunk
        if len(data) > 65536:
            raise ValueError("response headers too long")
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def _tokens(arguments) -> list[str]:
    tokens = [token for item in arguments.token or [] for token in item.split(",") if token]
    if arguments.tokens_file:
        with open(arguments.tokens_file, encoding="utf-8") as handle:
            tokens += [line.split()[0] for line in handle if line.strip()]
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token", action="append", help="device token (repeat or comma-separate)")
    parser.add_argument("--tokens-file", help="file with one token per line (first column)")
    parser.add_argument("--devices", type=int, default=None, help="run this many devices")
    parser.add_argument("--build", default=None, help='reported build, e.g. "Nov 29 2018 12:00:00"')
    parser.add_argument("--fw", default=None, help="reported firmware version (fw, or mcu)")
    parser.add_argument("--fw-type", default=None, help="reported firmware type (fw-type)")
    parser.add_argument("--dev", default="ESP8266", help="reported board name (dev), e.g. NodeMCU")
    parser.add_argument(
        "--library",
        default="0.6.1",
        help="the Blynk library whose info message it sends: 0.6.1 (ver, fw), "
        "1.1.0 (ver, fw-type, fw) or 1.3.2 (mcu, fw-type, blynk)",
    )
    parser.add_argument("--heartbeat", type=int, default=10)
    parser.add_argument("--buff-in", type=int, default=256)
    parser.add_argument("--fail", choices=FAIL_MODES, default="none")
    parser.add_argument(
        "--chatter", type=float, default=None, help="a virtual write every N seconds (relay mode)"
    )
    parser.add_argument(
        "--crash-after",
        type=float,
        default=None,
        help="once updated, reboot N seconds after every login (a crash loop)",
    )
    parser.add_argument(
        "--rollback",
        action="store_true",
        help="once updated, crash and come back on the old build (ESP32's rollback)",
    )
    parser.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    parser.add_argument("--updates", type=int, default=None, help="stop after N updates each")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    tokens = _tokens(arguments)
    count = arguments.devices or len(tokens)
    if not tokens or count > len(tokens):
        parser.error(f"{count or 1} device(s) need as many tokens; {len(tokens)} given")
    devices = [
        SimulatedDevice(
            arguments.server,
            arguments.port,
            token,
            arguments.build,
            heartbeat=arguments.heartbeat,
            buff_in=arguments.buff_in,
            fw=arguments.fw,
            fw_type=arguments.fw_type,
            library=arguments.library,
            hardware=arguments.dev,
            fail=arguments.fail,
            chatter=arguments.chatter,
            crash_after=arguments.crash_after,
            rollback=arguments.rollback,
        )
        for token in tokens[:count]
    ]
    pool = Pool(len(devices))
    for device in devices:
        pool.spawn(device.run)
    started = time.monotonic()
    while len(pool):
        if arguments.duration and time.monotonic() - started >= arguments.duration:
            break
        if arguments.updates and all(device.updates >= arguments.updates for device in devices):
            break
        gevent.sleep(0.2)
    for device in devices:
        device.stop()
    pool.join(timeout=5)
    updated = sum(device.updates > 0 for device in devices)
    print(f"{len(devices)} device(s), {updated} updated")
    for device in devices:
        print(f"{device.token} build={device.build!r} logins={device.logins}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
