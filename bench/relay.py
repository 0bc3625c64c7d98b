"""Relay mode against HAProxy: N devices, each writing a virtual pin once a second and
hearing it back from the upstream, through blynkota and through HAProxy (`mode tcp`),
to the same upstream, in one run.

Run by hand: `python bench/relay.py [--devices 9500] [--seconds 20]` (Debian package
`haproxy`). The upstream is a Blynk server stand-in (bench/relay_load.py, its own
process): it answers logins, info messages and pings, and sends every HARDWARE
frame straight back, as an app writing the pin would. Each device (one process
of epoll for all, bench/relay_load.py) sends a 20-byte `vw` frame a second and
waits for its echo. Prints, per path:
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
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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
from blynkota.store import upgrade  # noqa: E402
from tests.servers import ServerProcess  # noqa: E402

LOAD = Path(__file__).resolve().parent / "relay_load.py"
DEADLINE = 120.0


# --- the load (bench/relay_load.py) ---------------------------------------------------


def run_devices(port: int, count: int, seconds: float, pids: list[int], at_once: int) -> dict:
    """Log every device in, `at_once` under way at a time, then `seconds` of one
    virtual write a second each; the relay's CPU (user, system) over that steady
    phase and the round trips."""
    command = [sys.executable, str(LOAD), "devices", str(port), str(count), str(seconds),
               str(at_once)]  # fmt: skip
    devices = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = devices.stdout.readline().split()
        logged_in = int(ready[1]) if ready[:1] == ["ready"] else 0
        rss = [rss_kib(pid) for pid in pids]
        before = [cpu_split([pid]) for pid in pids]
        devices.stdin.write("go\n")
        devices.stdin.flush()
        latencies = json.loads(devices.stdout.readline() or "[]")
        after = [cpu_split([pid]) for pid in pids]
        devices.wait(DEADLINE)
    finally:
        if devices.poll() is None:
            devices.kill()
            devices.wait()
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
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the three paths")
    parser.add_argument(
        "--logins-at-once", type=int, default=0, help="logins under way at once (0: all)"
    )
    arguments = parser.parse_args()
    if shutil.which("haproxy") is None:
        print("haproxy missing (apt-get install haproxy): nothing to compare with")
        return 0
    count, seconds = arguments.devices, arguments.seconds
    # All at once by default: a reconnect storm.
    load = functools.partial(run_devices, at_once=arguments.logins_at_once or count)
    tokens = [f"{number:032x}" for number in range(count)]
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(LOAD), "upstream", str(upstream_port)])
    rounds, memory = [], {}
    try:
        wait_for_port(upstream_port)
        with tempfile.TemporaryDirectory() as folder:
            proxy_port = free_port()
            proxy = haproxy(Path(folder), proxy_port, upstream_port, count)
            address = f"127.0.0.1:{upstream_port}"
            # Known here, as after `import-blynk` (a token new here is a row to write).
            relay = blynkota(Path(folder), count, tokens, **{"relay.upstream": address})
            try:
                memory["relayed_idle"] = rss_kib(relay.process.pid)
                # The paths one after the other, round after round: the machine's
                # slow moments fall on each path alike.
                for _ in range(arguments.repeat):
                    rounds.append({
                        "direct": load(upstream_port, count, seconds, []),
                        "haproxy": load(proxy_port, count, seconds, [proxy.pid]),
                        "blynkota": load(
                            relay.http_port, count, seconds, [relay.process.pid]
                        ),
                    })  # fmt: skip
            finally:
                proxy.terminate()
                proxy.wait(10)
                relay.stop(timeout=60)
        memory["relayed"] = rounds[0]["blynkota"]["rss"][0]
        with tempfile.TemporaryDirectory() as folder:
            alone = blynkota(Path(folder), count, tokens)
            try:
                memory["standalone_idle"] = rss_kib(alone.process.pid)
                held = load(alone.http_port, count, 0, [alone.process.pid])
                memory["standalone"] = held["rss"][0]
            finally:
                alone.stop(timeout=60)
    finally:
        upstream.terminate()
        upstream.wait(10)
    report(rounds, memory, count, seconds)
    return 0


def report(rounds: list[dict], memory: dict, count: int, seconds: float) -> None:
    print(f"devices {count}, {seconds:g} s of one 20-byte virtual write a second each, echoed;"
          f" {len(rounds)} round(s) of the three paths")  # fmt: skip
    print(f"{'round':<6}{'path':<10}{'logged in':>10}{'round trips':>12}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'added p99':>10}{'CPU s (user/sys)':>22}")  # fmt: skip
    added, ratios = {"haproxy": [], "blynkota": []}, []
    for number, paths in enumerate(rounds, 1):
        direct_p99 = percentile(paths["direct"]["latencies"], 0.99)
        for name, found in paths.items():
            latencies = found["latencies"]
            cpu = found["cpu"][0] if found["cpu"] else (0.0, 0.0)
            through = percentile(latencies, 0.99)
            extra = ""
            if name != "direct":
                added[name].append(1000 * (through - direct_p99))
                extra = f"{added[name][-1]:+.2f}"
            cpu_text = "" if name == "direct" else f"{sum(cpu):.2f} ({cpu[0]:.2f}/{cpu[1]:.2f})"
            print(f"{number:<6}{name:<10}{found['logged_in']:>10}{len(latencies):>12}"
                  f"{1000 * percentile(latencies, 0.5):>8.2f}{1000 * through:>8.2f}"
                  f"{extra:>10}{cpu_text:>22}")  # fmt: skip
        ratios.append(sum(paths["blynkota"]["cpu"][0]) / max(sum(paths["haproxy"]["cpu"][0]), 1e-9))
    print(f"CPU blynkota / HAProxy: median {statistics.median(ratios):.1f}x "
          f"({', '.join(f'{r:.1f}' for r in ratios)})")  # fmt: skip
    for name, values in added.items():
        print(f"added p99 through {name}: median {statistics.median(values):+.2f} ms "
              f"({', '.join(f'{v:+.2f}' for v in values)})")  # fmt: skip
    relayed = (memory["relayed"] - memory["relayed_idle"]) / count
    alone = (memory["standalone"] - memory["standalone_idle"]) / count
    print(f"memory per device: relayed {relayed:.1f} KiB, standalone {alone:.1f} KiB, "
          f"ratio {relayed / alone if alone else float('nan'):.1f}x")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
