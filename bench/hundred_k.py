"""100,000 devices on one machine: a reconnect storm over 6 device processes, then now=true.

Run by hand against MariaDB/MySQL (a fresh database each run):

    python bench/hundred_k.py [--devices 100000] [--processes 6] [--clients 10]
        [--at-once 500] [--mysql mysql+pymysql://root@127.0.0.1:3306/]

It starts `python wsgi.py devices --workers P` (the Procfile's `devices:` line)
with the shipped settings, and `--clients` client processes of its own (this
file with `--client`), each under the 20,000 open files a process may hold.
Each client's connections leave from an address of its own (127.0.0.1,
127.0.0.2, ...), since one pair of addresses runs out of ephemeral ports
near 28,000, and connect() slows down long before. Every client starts its
devices at the same moment, `--at-once` of them logging in at a time; each
device behaves as the Blynk C++ library does: it waits 3 s for the login's
answer, and a refused, closed or unanswered login tries again 5 s after the
last try began (`SPEC.md` §1).

Printed:
- the time until every device is logged in (login and info both answered),
  the tries it took (how many devices needed 1, 2, 3... tries) and the failed
  tries by cause as the devices saw them, beside the WARNING lines in which
  the device processes told the connections they shed;
- the resident memory per device of the device processes, and the CPU seconds
  of every process (each device process, MariaDB, the clients) in the storm;
- then an all-devices rollout started with now=true (by this process, as a web
  process would): the time until the last `ota` frame reached its device.

Every loop is bounded by the device count and a deadline.
"""

import sys

if "--client" not in sys.argv:  # a client is a plain epoll loop (below)
    from gevent import monkey

    monkey.patch_all()  # the conductor's database calls and pipes must let the others run

import argparse
import contextlib
import errno
import heapq
import json
import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import gevent

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy

from bench.common import (
    SHIPPED_TIMINGS,
    bench_fleet,
    child_pids,
    cpu_seconds,
    database_pids,
    free_port,
    rss_kib,
    until_nodes,
)
from blynkota.protocol import (
    NEED_DATA,
    FrameReader,
    Internal,
    Response,
    Status,
    encode_info,
    encode_login,
    encode_ping,
)

DEADLINE = 300.0  # seconds for each phase
LOGIN_ANSWER_WAIT = 3.0  # the C++ library's BLYNK_TIMEOUT_MS
RETRY_EVERY = 5.0  # the library tries again 5 s after its last try began
INFO_ANSWER_WAIT = 10.0  # past this an unanswered info message counts as a failed try
HEARTBEAT = 10  # the devices' h-beat: they ping when silent this long
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2
# One source address per client: towards one server address and port, an
# address has ~28k ephemeral ports, and connect() searches longer for a free
# one the fuller they are (with a storm's TIME_WAITs, past half full it takes
# more CPU than the rest of the client).
SOURCES = [f"127.0.0.{i}" for i in range(1, 21)]
OLD, NEW = "Jan  1 2018 00:00:00", "Nov 29 2018 12:00:00"
SHED_LINE = re.compile(r"(\d+) device connection\(s\) closed in the last")


# ---------------------------------------------------------------- the clients
#
# A client is one epoll loop over its devices' non-blocking sockets, without
# gevent: the clients share the two cores with the server, and a greenlet and
# a timer per device cost them more than the server spends on a login.

# What a device is doing.
IDLE, CONNECTING, LOGGING_IN, REPORTING, HELD = range(5)


class Device:
    """One board: log in (retrying as the library does), report, ping, note its `ota`."""

    __slots__ = (
        "index", "token", "sock", "state", "reader", "tried_at", "due", "last_out", "message",
        "logged_in_at", "offered_at", "tries",
    )  # fmt: skip

    def __init__(self, index: int, token: str) -> None:
        self.index, self.token = index, token
        self.sock: socket.socket | None = None
        self.state = IDLE
        self.reader: FrameReader | None = None
        self.tried_at = self.due = self.last_out = 0.0
        self.message = 3
        self.logged_in_at: float | None = None
        self.offered_at: float | None = None
        self.tries = 0


class Client:
    def __init__(self, tokens: list[str], port: int, source: str, at_once: int) -> None:
        self.devices = [Device(index, token) for index, token in enumerate(tokens)]
        self.port, self.source, self.at_once = port, source, at_once
        self.poller = select.epoll()
        self.by_fd: dict[int, Device] = {}
        self.logging_in = 0  # devices between their connect and their info's answer
        self.waiting: list[tuple[float, int]] = []  # (when, index): tries due, a heap
        self.causes: Counter[str] = Counter()
        self.dropped = 0  # connections lost after their login

    def run(self, started: float, deadline: float) -> None:
        self.started = started
        self.waiting = [(started, index) for index in range(len(self.devices))]
        reported = 0.0
        while (now := time.time()) < deadline:
            self._start_tries(now)
            for fd, events in self.poller.poll(0.05):
                device = self.by_fd.get(fd)
                if device is not None:
                    self._ready(device, events, time.time())
            now = time.time()
            if now - reported >= 1.0:
                self._check_deadlines(now)
                print(json.dumps(self.report()), flush=True)
                reported = now

    # --- one try ---------------------------------------------------------------

    def _start_tries(self, now: float) -> None:
        while self.waiting and self.waiting[0][0] <= now and self.logging_in < self.at_once:
            device = self.devices[heapq.heappop(self.waiting)[1]]
            device.tries += 1
            device.tried_at = now
            device.due = now + LOGIN_ANSWER_WAIT
            sock = socket.socket()
            sock.setblocking(False)
            try:
                # The port is chosen at connect, for this 4-tuple: bind() would search
                # the address's whole range for a port free towards every peer.
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.source, 0))
                if sock.connect_ex(("127.0.0.1", self.port)) != errno.EINPROGRESS:
                    raise OSError("refused")
            except OSError:
                sock.close()
                self._failed(device, "connect failed", now, opened=False)
                continue
            device.sock, device.state, device.reader = sock, CONNECTING, FrameReader()
            self.logging_in += 1
            self.by_fd[sock.fileno()] = device
            self.poller.register(sock.fileno(), select.EPOLLOUT)

    def _ready(self, device: Device, events: int, now: float) -> None:
        sock = device.sock
        if device.state == CONNECTING:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._failed(device, "connect failed", now)
                return
            self.poller.modify(sock.fileno(), select.EPOLLIN)
            device.state = LOGGING_IN
            self._send(device, encode_login(device.token, 1), now)
            return
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        if not data:
            self._failed(device, "closed unanswered" if device.state != HELD else "", now)
            return
        device.reader.feed(data)
        while (event := device.reader.next_event()) is not NEED_DATA:
            self._event(device, event, now)
            if device.sock is None:
                return

    def _event(self, device: Device, event, now: float) -> None:
        if device.state == LOGGING_IN:
            if event != Response(1, Status.OK):
                self._failed(device, f"login answered {event}", now)
                return
            info = {"ver": "0.6.1", "h-beat": str(HEARTBEAT), "buff-in": "256", "dev": "ESP8266"}
            device.state, device.due = REPORTING, now + INFO_ANSWER_WAIT
            self._send(device, encode_info({**info, "build": OLD}, 2), now)
        elif device.state == REPORTING:
            if event != Response(2, Status.OK):
                self._failed(device, f"info answered {event}", now)
                return
            device.state = HELD
            self.logging_in -= 1
            if device.logged_in_at is None:
                device.logged_in_at = now - self.started
        elif isinstance(event, Internal) and event.words[:1] == ("ota",):
            device.offered_at = device.offered_at or now - self.started

    def _send(self, device: Device, frame: bytes, now: float) -> None:
        try:
            device.sock.send(frame)  # a few bytes: the socket's buffer takes them whole
        except OSError:
            self._failed(device, "closed unanswered" if device.state != HELD else "", now)
            return
        device.last_out = now

    def _failed(self, device: Device, cause: str, now: float, *, opened: bool = True) -> None:
        """The try is over: close, count its cause, and try again 5 s after it began."""
        if opened:
            if device.state != HELD:
                self.logging_in -= 1
            else:
                self.dropped += 1
                cause = "dropped after login"
            fd = device.sock.fileno()
            self.poller.unregister(fd)
            del self.by_fd[fd]
            device.sock.close()
        self.causes[cause] += 1
        device.sock, device.state, device.reader = None, IDLE, None
        heapq.heappush(self.waiting, (max(now, device.tried_at + RETRY_EVERY), device.index))

    def _check_deadlines(self, now: float) -> None:
        """Once a second: unanswered tries end, silent held devices ping."""
        for device in list(self.by_fd.values()):
            if device.state == HELD:
                if now - device.last_out >= HEARTBEAT * 0.8:
                    self._send(device, encode_ping(device.message), now)
                    device.message = device.message % 65000 + 3
            elif now > device.due:
                self._failed(device, "unanswered", now)

    def report(self) -> dict:
        logged = [d.logged_in_at for d in self.devices if d.logged_in_at is not None]
        offered = [d.offered_at for d in self.devices if d.offered_at is not None]
        return {
            "logged_in": len(logged),
            "last_login": max(logged, default=None),
            "tries": Counter(d.tries for d in self.devices if d.logged_in_at is not None),
            "causes": self.causes,
            "dropped": self.dropped,
            "offered": len(offered),
            "last_offer": max(offered, default=None),
        }


def run_client(arguments: argparse.Namespace) -> int:
    tokens = Path(arguments.tokens).read_text().split()
    client = Client(tokens, arguments.port, arguments.source, arguments.at_once)
    client.run(arguments.start_at, arguments.start_at + 3 * DEADLINE)
    return 0


# ---------------------------------------------------------------- the conductor


class Reports:
    """The clients' latest lines, read from their pipes."""

    def __init__(self, clients: list[subprocess.Popen]) -> None:
        self.latest: list[dict] = [{} for _ in clients]
        for index, client in enumerate(clients):
            gevent.spawn(self._read, index, client)

    def _read(self, index: int, client: subprocess.Popen) -> None:
        for line in client.stdout:
            with contextlib.suppress(ValueError):
                self.latest[index] = json.loads(line)

    def total(self, key: str) -> int:
        return sum(report.get(key, 0) for report in self.latest)

    def last(self, key: str) -> float | None:
        values = [r[key] for r in self.latest if r.get(key) is not None]
        return max(values, default=None)

    def counter(self, key: str) -> Counter:
        total: Counter = Counter()
        for report in self.latest:
            total.update({k: int(v) for k, v in report.get(key, {}).items()})
        return total


def _wait(reports: Reports, key: str, goal: int, deadline: float) -> None:
    while time.time() < deadline and reports.total(key) < goal:
        gevent.sleep(0.5)
    gevent.sleep(1.5)  # the clients' next lines carry their last figures


def _cpu(pids: list[int]) -> list[float]:
    return [cpu_seconds([pid]) for pid in pids]


def measure(arguments: argparse.Namespace, folder: Path) -> None:
    from blynkota.ota import Controls, Upload
    from tests.images import esp8266_image

    name = f"blynkota_100k_{uuid.uuid4().hex[:8]}"
    admin_engine = sqlalchemy.create_engine(arguments.mysql)
    with admin_engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
    url = sqlalchemy.engine.make_url(arguments.mysql).set(database=name)
    url = url.render_as_string(False)
    server = None
    clients: list[subprocess.Popen] = []
    try:
        print(f"creating {arguments.devices} devices...", flush=True)
        app, tokens = bench_fleet(url, arguments.devices, folder)
        port = free_port()
        timings = "".join(f"{key}={value}\n" for key, value in SHIPPED_TIMINGS.items())
        properties = folder / "bench.properties"
        properties.write_text(
            f"http.port={port}\nlisten.address=127.0.0.1\nhttps.port={free_port()}\n"
            f"data.folder={folder / 'data'}\ndb.url={url}\nlog.level=WARNING\n"
            f"hardware.max.connections=19000\nota.max.concurrent={arguments.devices}\n"
            f"{timings}"
        )
        server_log = folder / "devices.log"
        with server_log.open("w") as log_file:
            server = subprocess.Popen(
                [sys.executable, "wsgi.py", "-serverConfig", str(properties), "devices",
                 "--workers", str(arguments.processes)],
                cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
        engine = app.extensions["blynkota.db"].engine
        until_nodes(engine, arguments.processes)
        device_pids = child_pids(server.pid)
        idle_rss = sum(rss_kib(pid) for pid in device_pids)

        share = -(-len(tokens) // arguments.clients)
        start_at = time.time() + 3.0
        for index in range(arguments.clients):
            token_file = folder / f"tokens-{index}.txt"
            token_file.write_text("\n".join(tokens[index * share : (index + 1) * share]))
            clients.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--client",
                        "--tokens",
                        str(token_file),
                        "--port",
                        str(port),
                        "--source",
                        SOURCES[index % len(SOURCES)],
                        "--at-once",
                        str(arguments.at_once),
                        "--start-at",
                        repr(start_at),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        reports = Reports(clients)
        client_pids = [client.pid for client in clients]
        gevent.sleep(max(0.0, start_at - time.time()))
        before = _cpu(device_pids), _cpu(database_pids()), _cpu(client_pids)
        print(f"storm: {arguments.devices} devices, {arguments.clients} client processes, "
              f"{arguments.at_once} logging in at once in each...", flush=True)  # fmt: skip
        _wait(reports, "logged_in", arguments.devices, start_at + DEADLINE)
        after = _cpu(device_pids), _cpu(database_pids()), _cpu(client_pids)
        _print_storm(arguments, reports, server_log)
        rss = sum(rss_kib(pid) for pid in device_pids)
        logged_in = reports.total("logged_in")
        print(f"  memory: {(rss - idle_rss) / max(1, logged_in):.2f} KiB per device "
              f"({rss // 1024} MiB over {len(device_pids)} device processes)")  # fmt: skip
        devices_cpu = [b - a for a, b in zip(before[0], after[0], strict=True)]
        database_cpu, clients_cpu = (sum(after[i]) - sum(before[i]) for i in (1, 2))
        each = ", ".join(f"{c:.1f}" for c in devices_cpu)
        print(f"  CPU s in the storm: device processes {sum(devices_cpu):.1f} ({each}), "
              f"MariaDB {database_cpu:.1f}, clients {clients_cpu:.1f}")  # fmt: skip

        print("now=true to every device...", flush=True)
        service = app.extensions["blynkota"]
        before = _cpu(device_pids), _cpu(database_pids()), _cpu([os.getpid()])
        database_before = _database_work(admin_engine)
        started = time.time()
        service.admin.start_campaign(
            Upload(esp8266_image(NEW), "bench.bin"), "bench", controls=Controls(push_online=True)
        )
        answered = time.time() - started
        entered = gevent.spawn(_until_entered, engine, logged_in, started + DEADLINE)
        _wait(reports, "offered", logged_in, started + DEADLINE)
        last = reports.last("last_offer")
        took = (last + start_at - started) if last else float("nan")
        print(f"  {reports.total('offered')} of {logged_in} offered; the start answered in "
              f"{answered:.2f} s; the last `ota` {took:.1f} s after the start")  # fmt: skip
        after = _cpu(device_pids), _cpu(database_pids()), _cpu([os.getpid()])
        entered_at = entered.get(timeout=DEADLINE)
        print(f"  (every device entered the rollout {entered_at - started:.1f} s after the start)")
        devices_cpu, database_cpu, own_cpu = (sum(after[i]) - sum(before[i]) for i in range(3))
        print(f"  CPU s: device processes {devices_cpu:.1f}, MariaDB {database_cpu:.1f}, "
              f"this process (the start, the enrolment) {own_cpu:.1f}")  # fmt: skip
        database_after = _database_work(admin_engine)
        work = ", ".join(
            f"{name} {database_after[name] - database_before[name]:,}" for name in DATABASE_WORK
        )
        print(f"  MariaDB's work: {work}")
        app.extensions["blynkota.db"].dispose()
    finally:
        for client in clients:
            client.kill()
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        with admin_engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
        admin_engine.dispose()


def _print_storm(arguments: argparse.Namespace, reports: Reports, server_log: Path) -> None:
    logged_in, last = reports.total("logged_in"), reports.last("last_login")
    print(f"  {logged_in} of {arguments.devices} logged in; the last "
          f"{last if last is not None else float('nan'):.1f} s after the start")  # fmt: skip
    tries = reports.counter("tries")
    print("  tries it took: " + ", ".join(f"{n}: {tries[n]}" for n in sorted(tries, key=int)))
    causes = reports.counter("causes")
    causes_seen = ", ".join(f"{cause}: {n}" for cause, n in causes.most_common())
    print(f"  failed tries as the devices saw them: {causes_seen or 'none'}")
    told = [line for line in server_log.read_text().splitlines() if SHED_LINE.search(line)]
    shed = sum(int(SHED_LINE.search(line).group(1)) for line in told)
    print(
        f"  told by the device processes: {shed} connection(s) shed, in {len(told)} WARNING line(s)"
    )
    for line in told[:5]:
        print(f"    {line[:200]}")
    print(f"  connections lost after their login: {reports.total('dropped')}")


# MariaDB's counters of statements and of rows read and written (SHOW GLOBAL STATUS).
DATABASE_WORK = (
    "Com_commit", "Com_select", "Com_insert", "Com_update", "Handler_read_next",
    "Handler_read_key", "Handler_write", "Handler_update",
)  # fmt: skip


def _database_work(engine) -> dict[str, int]:
    with engine.connect() as connection:
        rows = connection.execute(sqlalchemy.text("SHOW GLOBAL STATUS")).all()
    status = dict(rows)
    return {name: int(status.get(name, 0)) for name in DATABASE_WORK}


def _until_entered(engine, devices: int, deadline: float) -> float:
    """When the rollout's rows (pending, then offered) reached `devices`."""
    while time.time() < deadline:
        with engine.connect() as connection:
            rows = connection.execute(sqlalchemy.text("SELECT count(*) FROM rollout_devices"))
            if rows.scalar() >= devices:
                return time.time()
        gevent.sleep(0.25)
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--at-once", type=int, default=500)
    parser.add_argument("--mysql", default="mysql+pymysql://root@127.0.0.1:3306/")
    # A client process (started by the conductor above).
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.client:
        return run_client(arguments)
    if arguments.devices / arguments.clients > 19_000:
        parser.error("each client process holds at most 19,000 devices (20,000 open files)")
    if arguments.clients > len(SOURCES):
        parser.error(f"at most {len(SOURCES)} client processes (one source address each)")
    with tempfile.TemporaryDirectory() as folder:
        measure(arguments, Path(folder))
    print(f"\n{os.cpu_count()} CPU(s), shared by the device processes, MariaDB and the clients.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
