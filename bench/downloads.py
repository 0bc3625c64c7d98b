"""Firmware downloads: blynkota's port 8080 against nginx, and devices while files flow.

Run by hand (needs the Debian packages `nginx-light` and `wrk`):

    apt-get install nginx-light wrk
    python bench/downloads.py [--size 300000] [--seconds 10]

For the same 300 KB file, in the same run:

- `wrk -c32` and `wrk -c256` against nginx (one worker, sendfile on) and
  against blynkota's plain HTTP port: requests and bytes per second, the
  ratio blynkota / nginx, and each server's CPU seconds (from /proc);
- devices while `wrk -c256` downloads run, against the same devices idle:
  p99 of a login (connect, login, info, both answered) and of a PING round
  trip, and the ratio loaded / idle.

Where nginx or wrk is missing, the script says how to install it and prints
what it can measure without it. Every loop is bounded by a deadline.
"""

from gevent import monkey

monkey.patch_all()

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent
from gevent import socket

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (
    SHIPPED_TIMINGS,
    child_pids,
    cpu_seconds,
    free_port,
    percentile,
    read_frame,
    wait_for_port,
)
from blynkota import create_app
from blynkota.protocol import FrameReader, encode_info, encode_login, encode_ping
from blynkota.store import upgrade
from tests.images import esp8266_image
from tests.servers import ServerProcess

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    sendfile on;
    tcp_nopush on;
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        root {folder}/www;
        default_type application/octet-stream;
    }}
}}
"""
BUILD = "Mar  3 2019 03:03:03"
PROBE_GAP = 0.05  # seconds between two probe logins / pings


# --- wrk ------------------------------------------------------------------------------


def wrk(url: str, connections: int, seconds: int, cpu_pid: int) -> dict:
    before = cpu_seconds([cpu_pid])
    output = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    cpu = cpu_seconds([cpu_pid]) - before
    requests = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", output)
    scale = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[transfer.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", output)
    return {
        "requests": requests,
        "bytes": float(transfer.group(1)) * scale,
        "cpu": cpu,
        "errors": errors.group(0) if errors else "",
    }


def start_nginx(folder: Path, path: str, image: bytes) -> tuple[subprocess.Popen, int]:
    target = folder / "www" / path.lstrip("/")
    target.parent.mkdir(parents=True)
    target.write_bytes(image)
    # nginx's worker runs as another user: the folders must let it in.
    for part in (folder, *target.relative_to(folder).parents):
        (folder / part).chmod(0o755)
    target.chmod(0o644)
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(folder=folder, port=port))
    process = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return process, port


# --- devices beside the downloads ----------------------------------------------------


def log_in(port: int, token: str) -> tuple:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    reader = FrameReader()
    sock.sendall(encode_login(token, 1))
    read_frame(sock, reader)
    # On the build being served: the devices log in without being offered it.
    sock.sendall(encode_info({"ver": "0.6.1", "h-beat": "60", "build": BUILD}, 2))
    read_frame(sock, reader)
    return sock, reader


def probe_devices(port: int, tokens: list[str], seconds: float) -> tuple[list, list]:
    """Log devices in, one after the other, and ping one connected device; the times."""
    logins, pings = [], []
    pinger, reader = log_in(port, tokens[0])
    deadline = time.monotonic() + seconds

    def keep_logging_in() -> None:
        for token in tokens[1:]:
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            sock, _ = log_in(port, token)
            logins.append(time.perf_counter() - started)
            sock.close()
            gevent.sleep(PROBE_GAP)

    def keep_pinging() -> None:
        for msg_id in range(3, 60_000):
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            pinger.sendall(encode_ping(msg_id))
            read_frame(pinger, reader)
            pings.append(time.perf_counter() - started)
            gevent.sleep(PROBE_GAP)

    gevent.joinall([gevent.spawn(keep_logging_in), gevent.spawn(keep_pinging)])
    pinger.close()
    return logins, pings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=300_000)
    parser.add_argument("--seconds", type=int, default=10)
    arguments = parser.parse_args()
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if "wrk" in missing:
        print("wrk is missing: apt-get install wrk (and nginx-light for the reference)")
        return 1

    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        db_url = f"sqlite:///{folder}/bench.db"
        upgrade(db_url)
        app = create_app({"db.url": db_url, "data.folder": folder / "data"})
        fleet = app.extensions["blynkota.fleet"]
        probes = int(arguments.seconds / PROBE_GAP) * 2 + 10
        tokens = [fleet.add_device("bench@example.com", "Bench") for _ in range(2 * probes)]
        image = esp8266_image(BUILD, size=arguments.size)
        server = ServerProcess(folder, db_url, **SHIPPED_TIMINGS).start()
        nginx = None
        try:
            path = server.upload("/admin/ota/start?queue=true", image).text.strip()
            blynkota_url = f"http://127.0.0.1:{server.http_port}{path}"
            results = {}
            for connections in (32, 256):
                results["blynkota", connections] = wrk(
                    blynkota_url, connections, arguments.seconds, server.process.pid
                )
            if "nginx" not in missing:
                nginx, nginx_port = start_nginx(folder, path, image)
                (worker,) = child_pids(nginx.pid) or [nginx.pid]
                for connections in (32, 256):
                    results["nginx", connections] = wrk(
                        f"http://127.0.0.1:{nginx_port}{path}",
                        connections,
                        arguments.seconds,
                        worker,
                    )

            print(f"file: {len(image)} bytes, wrk -t2, {arguments.seconds} s per run")
            print(f"{'run':<18}{'req/s':>10}{'MB/s':>10}{'CPU s':>8}{'vs nginx':>10}")
            for connections in (32, 256):
                ours = results["blynkota", connections]
                ref = results.get(("nginx", connections))
                for label, figures in (("nginx", ref), ("blynkota", ours)):
                    if figures is None:
                        continue
                    ratio = (
                        f"{figures['requests'] / ref['requests']:.2f}x"
                        if ref and label == "blynkota"
                        else ""
                    )
                    print(
                        f"{label + f' -c{connections}':<18}{figures['requests']:>10.0f}"
                        f"{figures['bytes'] / 1e6:>10.1f}{figures['cpu']:>8.1f}{ratio:>10}"
                        + (f"  ({figures['errors']})" if figures["errors"] else "")
                    )
            if "nginx" in missing:
                print("nginx is missing: apt-get install nginx-light for the reference ratio")

            idle_logins, idle_pings = probe_devices(
                server.http_port, tokens[:probes], arguments.seconds
            )
            load = gevent.spawn(wrk, blynkota_url, 256, arguments.seconds + 2, server.process.pid)
            gevent.sleep(1)  # the downloads are under way
            busy_logins, busy_pings = probe_devices(
                server.http_port, tokens[probes:], arguments.seconds
            )
            load.join(timeout=arguments.seconds + 90)
            print("devices during wrk -c256 downloads (p99, and p50 in brackets, ms):")
            for label, idle, busy in (
                ("login + info", idle_logins, busy_logins),
                ("ping round trip", idle_pings, busy_pings),
            ):
                quiet, loaded = percentile(idle, 0.99) * 1e3, percentile(busy, 0.99) * 1e3
                medians = f"({percentile(idle, 0.5) * 1e3:.1f} / {percentile(busy, 0.5) * 1e3:.1f})"
                print(
                    f"  {label:<16} idle {quiet:7.1f}  loaded {loaded:7.1f}  "
                    f"ratio {loaded / quiet:.1f}x {medians}  ({len(idle)}/{len(busy)} samples)"
                )
        finally:
            if nginx is not None:
                nginx.terminate()
                nginx.wait(timeout=10)
            server.stop()
            app.extensions["blynkota.db"].dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
