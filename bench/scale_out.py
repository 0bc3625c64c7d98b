"""Scale-out: a reconnect storm and a now=true campaign against 1, 2 and 3 device processes.

Run by hand against a MariaDB/MySQL server (each run gets a fresh database):

    python bench/scale_out.py [--devices 10000] [--processes 1,2,3]
        [--mysql mysql+pymysql://root@127.0.0.1:3306/]
    python bench/scale_out.py --sqlite [--devices 10000]   # one process, SQLite

For each process count it starts `python wsgi.py devices --workers N` (the
Procfile's `devices:` line: N processes sharing the device port with
SO_REUSEPORT), then measures:

- storm: every device connects at once and logs in with its info message;
  logins per second until the last info message is answered (devices whose
  login is refused or unanswered try again after a second, as the library does),
- campaign: an all-devices rollout with now=true (ota.max.concurrent above the
  fleet); offers per second until the last device has its `ota` frame,
- the CPU seconds the device processes spent (from /proc), for each phase,
- between the two, the time from a ?token= request (served by a process that
  holds no device) to the `ota` frame on the device, p50 and p99 of 100,

and prints each figure with its ratio to the single process measured in the
same run. Every loop is bounded by the device count and a deadline.
"""

from gevent import monkey

monkey.patch_all()  # the bench's own database calls must let the devices run

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import gevent
from gevent import socket
from gevent.pool import Pool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy

from bench.common import (
    bench_fleet,
    child_pids,
    cpu_seconds,
    database_pids,
    free_port,
    read_frame,
    until_nodes,
)
from blynkota.ota import Controls, Upload
from blynkota.protocol import (
    FrameReader,
    Internal,
    Response,
    Status,
    encode_info,
    encode_login,
    encode_ping,
)
from tests.images import esp8266_image

DEADLINE = 300.0  # seconds for each phase
TOKEN_SAMPLES = 100  # ?token= requests timed, one after the other
OLD, NEW = "Jan  1 2018 00:00:00", "Nov 29 2018 12:00:00"


class Device:
    """A bare device: log in, report, ping, wait for its `ota` frame."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.logged_in_at: float | None = None
        self.offered_at: float | None = None
        self.stop = False

    def run(self, deadline: float) -> None:
        while not self.stop and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ConnectionError):
                self._session(deadline)
            if not self.stop:
                gevent.sleep(1.0)

    def _session(self, deadline: float) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        reader = FrameReader()
        try:
            sock.sendall(encode_login(self.token, 1))
            if read_frame(sock, reader, 10) != Response(1, Status.OK):
                return
            info = {"ver": "0.6.1", "h-beat": "10", "buff-in": "256", "dev": "ESP8266"}
            sock.sendall(encode_info({**info, "build": OLD}, 2))
            if read_frame(sock, reader, 10) != Response(2, Status.OK):
                return
            self.logged_in_at = self.logged_in_at or time.monotonic()
            message = 3
            while not self.stop and time.monotonic() < deadline:
                try:
                    event = read_frame(sock, reader, 8)
                except TimeoutError:
                    sock.sendall(encode_ping(message))
                    message += 1
                    continue
                if isinstance(event, Internal) and event.words[:1] == ("ota",):
                    self.offered_at = self.offered_at or time.monotonic()
        finally:
            sock.close()


def _other_cpu() -> tuple[float, float]:
    """CPU seconds so far of the database server (mariadbd/mysqld) and of this client."""
    times = os.times()
    return cpu_seconds(database_pids()), times.user + times.system


def measure(processes: int, devices: int, server_url: str, folder: Path) -> dict:
    """One run; `server_url` "sqlite" runs the embedded default, one process, on SQLite."""
    sqlite = server_url == "sqlite"
    name = f"blynkota_bench_{uuid.uuid4().hex[:8]}"
    if sqlite:
        admin_engine = None
        url = f"sqlite:///{folder / name}.db"
    else:
        admin_engine = sqlalchemy.create_engine(server_url)
        with admin_engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
        url = sqlalchemy.engine.make_url(server_url).set(database=name).render_as_string(False)
    process = None
    try:
        app, tokens = bench_fleet(url, devices, folder)
        engine = app.extensions["blynkota.db"].engine
        port = free_port()
        properties = folder / f"bench-{processes}.properties"
        properties.write_text(
            f"http.port={port}\nlisten.address=127.0.0.1\ndata.folder={folder / 'data'}\n"
            f"db.url={url}\nhardware.max.connections=30000\nota.max.concurrent=1000000\n"
            f"db.pool.size={max(10, 90 // processes)}\nlog.level=WARNING\n"
            "hard.socket.idle.timeout=30\n"
            f"https.port={free_port()}\n"
        )
        # SQLite: `python wsgi.py`, everything in one process; else the devices role.
        role = [] if sqlite else ["devices", "--workers", str(processes)]
        process = subprocess.Popen(
            [sys.executable, "wsgi.py", "-serverConfig", str(properties), *role], cwd=ROOT
        )
        until_nodes(engine, processes)
        pids = child_pids(process.pid) if processes > 1 else [process.pid]

        fleet_devices = [Device(port, token) for token in tokens]
        pool = Pool(len(fleet_devices))
        others_before = _other_cpu()
        cpu_before, started = cpu_seconds(pids), time.monotonic()
        phase_deadline = started + DEADLINE
        for device in fleet_devices:
            pool.spawn(device.run, started + 3 * DEADLINE)
        while time.monotonic() < phase_deadline:
            if all(d.logged_in_at for d in fleet_devices):
                break
            gevent.sleep(0.1)
        logged_in = [d.logged_in_at for d in fleet_devices if d.logged_in_at]
        storm_seconds = max(logged_in) - started if logged_in else float("nan")
        storm_cpu = cpu_seconds(pids) - cpu_before
        database_cpu, client_cpu = (a - b for a, b in zip(_other_cpu(), others_before, strict=True))
        print(
            f"  storm: {len(logged_in)} logged in, {storm_seconds:.1f} s; CPU s: device "
            f"processes {storm_cpu:.1f}, database server {database_cpu:.1f}, this client "
            f"{client_cpu:.1f} (of {2 * storm_seconds:.0f} on 2 cores)",
            flush=True,
        )

        # ?token= served by a process that holds no device (this one, as a
        # gunicorn web process would): the holding node sends the ota.
        service = app.extensions["blynkota"]
        latencies = []
        image = esp8266_image("Mar  3 2019 03:03:03")
        # Only devices in session can take a ?token= update (the others answer 400).
        in_session = [d for d in fleet_devices if d.logged_in_at]
        sampled = in_session[:: max(1, len(in_session) // TOKEN_SAMPLES)][:TOKEN_SAMPLES]
        for device in sampled:
            asked = time.monotonic()
            service.admin.start_for_device(
                device.token, Upload(image, "one.bin"), "bench", queue=False
            )
            while device.offered_at is None and time.monotonic() - asked < 10:
                gevent.sleep(0.005)
            if device.offered_at is not None:
                latencies.append(device.offered_at - asked)
        latencies.sort()
        # Those now have device rollouts, which outrank the campaign below.
        targeted = set(sampled)
        campaign_devices = [d for d in fleet_devices if d not in targeted]
        print(f"  ?token=: {len(latencies)} of {TOKEN_SAMPLES} offered", flush=True)

        cpu_before, started = cpu_seconds(pids), time.monotonic()
        service.admin.start_campaign(
            Upload(esp8266_image(NEW), "bench.bin"), "bench", controls=Controls(push_online=True)
        )
        answered = time.monotonic() - started  # what the admin request waits for
        phase_deadline = started + DEADLINE
        while time.monotonic() < phase_deadline:
            if all(d.offered_at for d in campaign_devices):
                break
            gevent.sleep(0.1)
        offered = [d.offered_at for d in campaign_devices if d.offered_at]
        campaign_seconds = max(offered) - started if offered else float("nan")
        campaign_cpu = cpu_seconds(pids) - cpu_before
        print(
            f"  campaign: {len(offered)} offered, {campaign_seconds:.1f} s "
            f"(the start itself answered in {answered:.2f} s)",
            flush=True,
        )
        for device in fleet_devices:
            device.stop = True
        pool.kill(timeout=5)
        app.extensions["blynkota.db"].dispose()
        return {
            "processes": processes,
            "logged_in": len(logged_in),
            "logins_per_s": len(logged_in) / storm_seconds,
            "storm_cpu": storm_cpu,
            "offered": len(offered),
            "campaign_devices": len(campaign_devices),
            "offers_per_s": len(offered) / campaign_seconds,
            "campaign_seconds": campaign_seconds,
            "campaign_cpu": campaign_cpu,
            "token_p50": latencies[len(latencies) // 2] if latencies else float("nan"),
            "token_p99": latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
            "token_sent": len(latencies),
        }
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        if admin_engine is not None:
            with admin_engine.connect() as connection:
                connection.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name}"))
            admin_engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--processes", default="1,2,3")
    parser.add_argument("--mysql", default="mysql+pymysql://root@127.0.0.1:3306/")
    parser.add_argument(
        "--sqlite", action="store_true", help="one process on SQLite (the embedded default)"
    )
    arguments = parser.parse_args()
    counts = [1] if arguments.sqlite else [int(part) for part in arguments.processes.split(",")]
    server_url = "sqlite" if arguments.sqlite else arguments.mysql
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for processes in counts:
            print(f"measuring {processes} device process(es), {arguments.devices} devices...")
            results.append(measure(processes, arguments.devices, server_url, Path(folder)))
    base = results[0]
    print()
    print(f"{'processes':>9} {'logins/s':>9} {'x':>5} {'storm CPU s':>11} "
          f"{'offers/s':>9} {'x':>5} {'last ota s':>10} {'campaign CPU s':>14}")  # fmt: skip
    for row in results:
        print(
            f"{row['processes']:>9} {row['logins_per_s']:>9.0f} "
            f"{row['logins_per_s'] / base['logins_per_s']:>5.2f} {row['storm_cpu']:>11.1f} "
            f"{row['offers_per_s']:>9.0f} {row['offers_per_s'] / base['offers_per_s']:>5.2f} "
            f"{row['campaign_seconds']:>10.1f} {row['campaign_cpu']:>14.1f}"
        )
        if row["logged_in"] < arguments.devices or row["offered"] < row["campaign_devices"]:
            print(f"          ({row['logged_in']} logged in, {row['offered']} offered in time)")
    print()
    for row in results:
        print(
            f"{row['processes']} process(es): ?token= to the ota frame on the holding node, "
            f"p50 {row['token_p50'] * 1000:.0f} ms, p99 {row['token_p99'] * 1000:.0f} ms "
            f"({row['token_sent']} of {TOKEN_SAMPLES} sent)"
        )
    print(f"\n{os.cpu_count()} CPU(s); the client shares them with the server processes.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
