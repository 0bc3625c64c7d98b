"""Relay mode against HAProxy: N devices, each writing a virtual pin once a second and
hearing it back from the upstream, through blynkota and through HAProxy (`mode tcp`),
to the same upstream, in one run.

Run by hand: `python bench/relay.py [--devices 9500] [--seconds 20]` (Debian package
`haproxy`). The upstream is a Blynk server stand-in written here (gevent, its own
process): it answers logins, info messages and pings, and sends every HARDWARE
frame straight back, as an app writing the pin would. Each device sends a 20-byte
`vw` frame a second and waits for its echo. Prints, per path:
- the relay's CPU seconds over the steady phase (from /proc: user and system),
  blynkota's against HAProxy's, and the ratio;
- the round trip p50/p99 through each, against the direct one, and the latency
  each adds (p99 through, less p99 direct);
- blynkota's resident memory per relayed device, against a standalone session's
  (the same devices logged in to a standalone server).

One relayed device holds two descriptors in the relay: with the 20,000 open
files a process may have here, 9,500 devices is as many as fit.
Every loop is bounded by the device count and a deadline.
"""

import argparse
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent
import gevent.event
from gevent import socket
from gevent.lock import BoundedSemaphore
from gevent.server import StreamServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SHIPPED_TIMINGS,
    cpu_split,
    free_port,
    percentile,
    rss_kib,
    wait_for_port,
)
from blynkota import create_app  # noqa: E402
from blynkota.protocol import encode_info, encode_login  # noqa: E402
from blynkota.store import upgrade  # noqa: E402
from tests.servers import ServerProcess  # noqa: E402

HEADER = struct.Struct("!BHH")
RESPONSE, PING, INTERNAL, HARDWARE = 0, 6, 17, 20
DEADLINE = 120.0
# Logins under way at once (--logins-at-once): all of them, a reconnect storm, by default.
LOGINS = BoundedSemaphore(1 << 30)
INFO = {"ver": "0.6.1", "h-beat": "60", "buff-in": "1024", "dev": "ESP8266",
        "build": "Jan  1 2018 00:00:00"}  # fmt: skip


# --- the upstream: a Blynk server stand-in that echoes virtual writes -------------


def serve_upstream(port: int) -> None:
    def handle(sock, _address):
        buffer = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            replies = []
            while len(buffer) >= 5:
                command, msg_id, length = HEADER.unpack_from(buffer)
                size = 5 if command == RESPONSE else 5 + length
                if len(buffer) < size:
                    break
                frame, buffer = buffer[:size], buffer[size:]
                if command == HARDWARE:
                    replies.append(frame)  # the app writes the pin back
                elif command != RESPONSE:
                    replies.append(HEADER.pack(RESPONSE, msg_id, 200))
            if replies:
                try:
                    sock.sendall(b"".join(replies))
                except OSError:
                    return

    StreamServer(("127.0.0.1", port), handle, backlog=8192).serve_forever()


# --- the devices ----------------------------------------------------------------------


def _read_frame(sock, state: dict) -> tuple[int, int, bytes]:
    buffer = state["buffer"]
    while True:
        if len(buffer) >= 5:
            command, msg_id, length = HEADER.unpack_from(buffer)
            size = 5 if command == RESPONSE else 5 + length
            if len(buffer) >= size:
                state["buffer"] = buffer[size:]
                return command, msg_id, buffer[5:size]
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed")
        buffer += data


def device(port: int, token: str, seconds: float, latencies: list, ready: list, start_at) -> None:
    LOGINS.acquire()
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    state = {"buffer": b""}
    try:
        sock.sendall(encode_login(token, 1))
        command, _, _ = _read_frame(sock, state)
        if command != RESPONSE:
            raise ConnectionError("no answer to the login")
        sock.sendall(encode_info(INFO, 2))
        _read_frame(sock, state)
        LOGINS.release()
        ready.append(sock)
        start_at.wait(DEADLINE)
        gevent.sleep(random.random())  # spread over the second
        ends = time.monotonic() + seconds
        msg_id = 3
        while time.monotonic() < ends:
            began = time.perf_counter()
            body = b"vw\x005\x00" + b"%010d" % msg_id  # a 20-byte frame
            sock.sendall(HEADER.pack(HARDWARE, msg_id, len(body)) + body)
            while True:
                command, answered, _ = _read_frame(sock, state)
                if command == HARDWARE and answered == msg_id:
                    break
            latencies.append(time.perf_counter() - began)
            msg_id += 1
            gevent.sleep(max(0.0, 1.0 - (time.perf_counter() - began)))
    finally:
        ready.append(None)
        sock.close()


def run_devices(port: int, tokens: list[str], seconds: float, pids: list[int]) -> dict:
    """Log every device in, then `seconds` of one virtual write a second each; the
    relay's CPU (user, system) over that steady phase and the round trips."""
    latencies, ready = [], []
    start_at = gevent.event.Event()
    group = [gevent.spawn(device, port, t, seconds, latencies, ready, start_at) for t in tokens]
    deadline = time.monotonic() + DEADLINE
    while len(ready) < len(tokens) and time.monotonic() < deadline:
        gevent.sleep(0.1)
    logged_in = sum(1 for sock in ready if sock is not None)
    rss = [rss_kib(pid) for pid in pids]
    before = [cpu_split([pid]) for pid in pids]
    start_at.set()
    gevent.joinall(group, timeout=seconds + DEADLINE)
    after = [cpu_split([pid]) for pid in pids]
    cpu = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]
    return {"logged_in": logged_in, "latencies": latencies, "cpu": cpu, "rss": rss}


# --- the relays ---------------------------------------------------------------------------


def haproxy(folder: Path, port: int, upstream: int, devices: int) -> subprocess.Popen:
    config = folder / "haproxy.cfg"
    config.write_text(
        f"global\n  maxconn {devices + 200}\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n"
        "  timeout server 120s\n"
        f"frontend devices\n  bind 127.0.0.1:{port}\n  default_backend blynk\n"
        f"backend blynk\n  server upstream 127.0.0.1:{upstream}\n"
    )
    process = subprocess.Popen(["haproxy", "-f", str(config)], stdout=subprocess.DEVNULL)
    wait_for_port(port)
    return process


def blynkota(folder: Path, devices: int, tokens: list[str], **extra) -> ServerProcess:
    db_url = f"sqlite:///{folder}/bench.db"
    upgrade(db_url)
    if tokens:  # a standalone server must know its devices
        app = create_app({"db.url": db_url, "data.folder": str(folder / "data")})
        from blynkota.ota import NewDevice

        app.extensions["blynkota.fleet"].add_devices(
            [NewDevice("bench@example.com", "Bench", token=token) for token in tokens]
        )
        app.extensions["blynkota.db"].dispose()
    settings = {**SHIPPED_TIMINGS, "hardware.max.connections": devices + 100, **extra}
    server = ServerProcess(folder, db_url, **settings)
    return server.start(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=9500)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument(
        "--logins-at-once", type=int, default=0, help="logins under way at once (0: all)"
    )
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.upstream_port:
        serve_upstream(arguments.upstream_port)
        return 0
    if shutil.which("haproxy") is None:
        print("haproxy missing (apt-get install haproxy): nothing to compare with")
        return 0
    count, seconds = arguments.devices, arguments.seconds
    if arguments.logins_at_once:
        global LOGINS
        LOGINS = BoundedSemaphore(arguments.logins_at_once)
    tokens = [f"{number:032x}" for number in range(count)]
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--upstream-port", str(upstream_port)])
    results = {}
    try:
        wait_for_port(upstream_port)
        results["direct"] = run_devices(upstream_port, tokens, seconds, [])
        with tempfile.TemporaryDirectory() as folder:
            proxy_port = free_port()
            proxy = haproxy(Path(folder), proxy_port, upstream_port, count)
            try:
                results["haproxy"] = run_devices(proxy_port, tokens, seconds, [proxy.pid])
            finally:
                proxy.terminate()
                proxy.wait(10)
        with tempfile.TemporaryDirectory() as folder:
            address = f"127.0.0.1:{upstream_port}"
            # Known here, as after `import-blynk` (a token new here is a row to write).
            relay = blynkota(Path(folder), count, tokens, **{"relay.upstream": address})
            try:
                idle = rss_kib(relay.process.pid)
                pids = [relay.process.pid]
                results["blynkota"] = run_devices(relay.http_port, tokens, seconds, pids)
                results["blynkota"]["idle_rss"] = idle
            finally:
                relay.stop(timeout=60)
        with tempfile.TemporaryDirectory() as folder:
            alone = blynkota(Path(folder), count, tokens)
            try:
                idle = rss_kib(alone.process.pid)
                results["standalone"] = run_devices(alone.http_port, tokens, 0, [alone.process.pid])
                results["standalone"]["idle_rss"] = idle
            finally:
                alone.stop(timeout=60)
    finally:
        upstream.terminate()
        upstream.wait(10)
    report(results, count, seconds)
    return 0


def report(results: dict, count: int, seconds: float) -> None:
    print(f"devices {count}, {seconds:g} s of one 20-byte virtual write a second each, echoed")
    direct = results["direct"]["latencies"]
    direct_p99 = percentile(direct, 0.99)
    print(f"{'path':<12}{'logged in':>10}{'round trips':>12}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'added p99':>10}{'CPU s (user/sys)':>22}")  # fmt: skip
    for name in ("direct", "haproxy", "blynkota"):
        found = results[name]
        latencies = found["latencies"]
        cpu = found["cpu"][0] if found["cpu"] else (0.0, 0.0)
        through = percentile(latencies, 0.99)
        added = "" if name == "direct" else f"{1000 * (through - direct_p99):+.2f}"
        cpu_text = "" if name == "direct" else f"{sum(cpu):.2f} ({cpu[0]:.2f}/{cpu[1]:.2f})"
        print(f"{name:<12}{found['logged_in']:>10}{len(latencies):>12}"
              f"{1000 * percentile(latencies, 0.5):>8.2f}{1000 * percentile(latencies, 0.99):>8.2f}"
              f"{added:>10}{cpu_text:>22}")  # fmt: skip
    ratio = sum(results["blynkota"]["cpu"][0]) / max(sum(results["haproxy"]["cpu"][0]), 1e-9)
    print(f"CPU blynkota / HAProxy: {ratio:.1f}x")
    relayed = (results["blynkota"]["rss"][0] - results["blynkota"]["idle_rss"]) / count
    alone = (results["standalone"]["rss"][0] - results["standalone"]["idle_rss"]) / count
    print(f"memory per device: relayed {relayed:.1f} KiB, standalone {alone:.1f} KiB, "
          f"ratio {relayed / alone if alone else float('nan'):.1f}x")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
