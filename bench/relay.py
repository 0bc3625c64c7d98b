"""Relay mode against HAProxy: N devices on each path, each writing a virtual pin once
a second and hearing it back from the upstream, through blynkota and through
HAProxy (`mode tcp`), to the same upstream, in one run.

Run by hand: `python bench/relay.py [--devices 9500] [--seconds 4] [--repeat 10]
[--workers 2] [--haproxy-processes 2]` (Debian package `haproxy`). HAProxy runs a
thread per core (two here), or `--haproxy-processes N` single-threaded processes
on one port; `--workers N` runs blynkota as `python wsgi.py devices --workers N` on
MariaDB (`--mysql URL`: the devices role refuses SQLite), one event loop per
core likewise; without it, one process on SQLite. The upstream is a Blynk
server stand-in (bench/relay_load.py, its own processes): it answers logins,
info messages and pings, and sends every HARDWARE frame straight back, as an
app writing the pin would.

Three fleets of N devices (one epoll process each, bench/relay_load.py) log in,
one storm at a time, straight to the upstream, through HAProxy and through
blynkota, and stay logged in. Then phases of `--seconds` each: one fleet at a
time sends a 20-byte `vw` frame a second per device and times its echo, the
three in turn, `--repeat` rounds. The machine's slow moments, which can double
a p99 from one minute to the next on a shared machine, so fall on every path
alike. Prints, per phase and over all of them:
- the relay's CPU seconds over the phase (from /proc: user and system, summed
  over its processes), blynkota's against HAProxy's, and the ratio (with
  workers, MariaDB's CPU over the same phase counts as blynkota's, and is
  printed apart);
- the round trip p50/p99 through each, against the direct one, and the latency
  each adds (p99 through, less p99 direct), per round and over all rounds,
  measured once each relay is idle again after its logins (`settle`);
- blynkota's resident memory per relayed device, against a standalone session's
  (the same devices logged in to a standalone server).

One relayed device holds two descriptors in the relay: with the 20,000 open
files a process may have here, 9,500 devices is as many as fit in one
process. 10,000 takes two of each: `--workers 2 --haproxy-processes 2`.
Every loop is bounded by the device count and a deadline.
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy  # noqa: E402

from bench.common import (  # noqa: E402
    SHIPPED_TIMINGS,
    child_pids,
    cpu_split,
    database_pids,
    free_port,
    percentile,
    rss_kib,
    until_nodes,
    wait_for_port,
)
from blynkota import create_app  # noqa: E402
from blynkota.store import upgrade  # noqa: E402
from tests.servers import ServerProcess  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOAD = ROOT / "bench" / "relay_load.py"
DEADLINE = 120.0
UPSTREAM_CONNECTIONS = 15_000  # per upstream process: under the 20,000 open files, unevenly spread


# --- the load (bench/relay_load.py) ---------------------------------------------------


class Fleet:
    """`count` devices logged in through one path (bench/relay_load.py), `at_once`
    under way at a time, kept logged in for every phase of the run."""

    def __init__(
        self, port: int, count: int, at_once: int, pids: list[int], database: tuple = ()
    ) -> None:
        """`pids`: the relay's processes, whose CPU a phase counts; `database`:
        those of them that are MariaDB's, whose share is given apart."""
        command = [sys.executable, str(LOAD), "devices", str(port), str(count), "0",
                   str(at_once)]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pids, self.database = pids, database
        ready = self.process.stdout.readline().split()
        if ready[:1] != ["ready"]:
            self.close()
            raise RuntimeError(f"the devices on port {port} ended before all logged in")
        self.logged_in = int(ready[1])

    def phase(self, seconds: float) -> dict:
        """`seconds` of one virtual write a second each: the round trips, and the
        relay's CPU (user, system) over them, MariaDB's share apart."""
        before, database_before = cpu_split(self.pids), sum(cpu_split(self.database))
        self.process.stdin.write(f"go {seconds}\n")
        self.process.stdin.flush()
        latencies = json.loads(self.process.stdout.readline() or "[]")
        after, database_after = cpu_split(self.pids), sum(cpu_split(self.database))
        cpu = (after[0] - before[0], after[1] - before[1])
        return {"logged_in": self.logged_in, "latencies": latencies, "cpu": cpu,
                "database_cpu": database_after - database_before}  # fmt: skip

    def close(self) -> None:
        try:
            with contextlib.suppress(BrokenPipeError):  # ended already
                self.process.stdin.close()  # the devices' end
            self.process.wait(DEADLINE)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def settle(pids: list[int], deadline: float = 30.0) -> None:
    """Until the relay is idle after the storm (what a login leaves to do, its
    presence and its info message's report, is written after its answer): the
    steady phase measures relaying, not the storm's tail. At most `deadline` s."""
    ends, last = time.monotonic() + deadline, sum(cpu_split(pids))
    while time.monotonic() < ends:
        time.sleep(0.5)
        now = sum(cpu_split(pids))
        if now - last < 0.02:  # under 4 % of a core
            return
        last = now


# --- the relays ---------------------------------------------------------------------------


def haproxy(
    folder: Path, port: int, upstream: str, devices: int, processes: int = 1
) -> list[subprocess.Popen]:
    """HAProxy relaying `port` to `upstream`: one process with a thread per core,
    or `processes` single-threaded ones bound to the same port (HAProxy binds with
    SO_REUSEPORT: the kernel spreads the devices over them), each holding its
    share of the devices: one process cannot hold 10,000 within 20,000 descriptors."""
    share = devices if processes == 1 else devices // processes * 5 // 4  # the kernel's spread
    threads = "" if processes == 1 else "  nbthread 1\n"
    config = folder / "haproxy.cfg"
    config.write_text(
        f"global\n  maxconn {share + 200}\n{threads}"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n"
        "  timeout server 120s\n"
        f"frontend devices\n  bind 127.0.0.1:{port}\n  default_backend blynk\n"
        f"backend blynk\n  server upstream {upstream}\n"
    )
    started = [
        subprocess.Popen(["haproxy", "-f", str(config)], stdout=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    wait_for_port(port)
    return started


class Relay:
    """blynkota as the bench runs it: `pids` (the processes that serve the devices,
    MariaDB's counted with them where it is the store), `port` and `stop`."""

    def __init__(self, folder: Path, devices: int, tokens: list[str], options, **extra) -> None:
        self.workers = options.workers
        if self.workers == 1:
            self.db_url = f"sqlite:///{folder}/bench.db"
        else:  # a database of its own on the MariaDB server
            admin = sqlalchemy.create_engine(options.mysql)
            name = f"blynkota_relay_{uuid.uuid4().hex[:8]}"
            with admin.connect() as connection:
                connection.execute(sqlalchemy.text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
            admin.dispose()
            url = sqlalchemy.engine.make_url(options.mysql).set(database=name)
            self.db_url, self.database = url.render_as_string(False), name
        upgrade(self.db_url)
        if tokens:  # a standalone server must know its devices
            app = create_app({"db.url": self.db_url, "data.folder": str(folder / "data")})
            from blynkota.ota import NewDevice

            app.extensions["blynkota.fleet"].add_devices(
                [NewDevice("bench@example.com", "Bench", token=token) for token in tokens]
            )
            app.extensions["blynkota.db"].dispose()
        settings = {**SHIPPED_TIMINGS, "hardware.max.connections": devices + 100, **extra}
        self.options = options
        if self.workers == 1:
            self.server = ServerProcess(folder, self.db_url, **settings).start(timeout=60)
            self.port, self.pids = self.server.http_port, [self.server.process.pid]
            self.database_pids = ()
            return
        self.port = free_port()
        settings.update({"http.port": self.port, "https.port": free_port(),
                         "listen.address": "127.0.0.1", "db.url": self.db_url,
                         "data.folder": folder / "data", "log.level": "WARNING"})  # fmt: skip
        properties = folder / "relay.properties"
        properties.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        self.server = subprocess.Popen(
            [sys.executable, "wsgi.py", "-serverConfig", str(properties), "devices",
             "--workers", str(self.workers)],
            cwd=ROOT, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        engine = sqlalchemy.create_engine(self.db_url)
        until_nodes(engine, self.workers)  # each binds the port itself (SO_REUSEPORT)
        engine.dispose()
        wait_for_port(self.port, 60)
        self.database_pids = tuple(database_pids())
        self.pids = child_pids(self.server.pid) + list(self.database_pids)

    def stop(self) -> None:
        if self.workers == 1:
            self.server.stop(timeout=60)
            return
        self.server.terminate()
        self.server.wait(60)
        admin = sqlalchemy.create_engine(self.options.mysql)
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"DROP DATABASE {self.database}"))
        admin.dispose()

    def rss_kib(self) -> int:
        return (
            sum(rss_kib(pid) for pid in child_pids(self.server.pid))
            if self.workers > 1
            else rss_kib(self.pids[0])
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=9500)
    parser.add_argument("--seconds", type=float, default=4, help="of each phase")
    parser.add_argument("--repeat", type=int, default=10, help="rounds of the three phases")
    parser.add_argument(
        "--logins-at-once", type=int, default=0, help="logins under way at once (0: all)"
    )
    parser.add_argument("--workers", type=int, default=1, help="device processes (MariaDB)")
    parser.add_argument("--mysql", default="mysql+pymysql://root@127.0.0.1:3306/")
    parser.add_argument(
        "--haproxy-processes", type=int, default=1,
        help="HAProxy processes of one thread each on the same port (1: one, a thread a core)",
    )  # fmt: skip
    arguments = parser.parse_args()
    if shutil.which("haproxy") is None:
        print("haproxy missing (apt-get install haproxy): nothing to compare with")
        return 0
    count, seconds = arguments.devices, arguments.seconds
    at_once = arguments.logins_at_once or count  # all at once by default: a reconnect storm
    tokens = [f"{number:032x}" for number in range(count)]
    upstream_port = free_port()
    # The three paths' devices all reach it, each at an address of its own: 30,000
    # connections to one would outnumber the local ports. 20,000 a process at most.
    hosts = {"direct": "127.0.0.1", "haproxy": "127.0.0.2", "blynkota": "127.0.0.3"}
    upstreams = [
        subprocess.Popen(
            [sys.executable, str(LOAD), "upstream", str(upstream_port), *hosts.values()]
        )  # fmt: skip
        for _ in range(-(-3 * count // UPSTREAM_CONNECTIONS))
    ]
    rounds, memory, fleets = [], {}, {}
    try:
        wait_for_port(upstream_port)
        with tempfile.TemporaryDirectory() as folder:
            proxy_port = free_port()
            proxies = haproxy(
                Path(folder), proxy_port, f"{hosts['haproxy']}:{upstream_port}", count,
                arguments.haproxy_processes,
            )  # fmt: skip
            proxy_pids = [proxy.pid for proxy in proxies]
            address = f"{hosts['blynkota']}:{upstream_port}"
            # Known here, as after `import-blynk` (a token new here is a row to write).
            relay = Relay(Path(folder), count, tokens, arguments, **{"relay.upstream": address})
            try:
                memory["relayed_idle"] = relay.rss_kib()
                paths = (("direct", upstream_port, [], ()), ("haproxy", proxy_port, proxy_pids, ()),
                         ("blynkota", relay.port, relay.pids, relay.database_pids))  # fmt: skip
                for name, port, pids, database in paths:  # one storm at a time
                    fleets[name] = Fleet(port, count, at_once, pids, database)
                    if name == "blynkota":
                        memory["relayed"] = relay.rss_kib()
                    settle(pids)
                # Short phases of each path in turn, round after round: the
                # machine's slow moments fall on each path alike.
                for _ in range(arguments.repeat):
                    rounds.append({name: fleet.phase(seconds) for name, fleet in fleets.items()})
            finally:
                for fleet in fleets.values():
                    fleet.close()
                for proxy in proxies:
                    proxy.terminate()
                    proxy.wait(10)
                relay.stop()
        with tempfile.TemporaryDirectory() as folder:
            alone = Relay(Path(folder), count, tokens, arguments)
            try:
                memory["standalone_idle"] = alone.rss_kib()
                held = Fleet(alone.port, count, at_once, alone.pids)
                memory["standalone"] = alone.rss_kib()
                held.close()
            finally:
                alone.stop()
    finally:
        for upstream in upstreams:
            upstream.terminate()
            upstream.wait(10)
    report(rounds, memory, count, seconds, arguments.workers, arguments.haproxy_processes)
    return 0


def report(
    rounds: list[dict], memory: dict, count: int, seconds: float, workers: int, proxies: int
) -> None:
    print(f"devices {count} on each path, logged in throughout; phases of {seconds:g} s of one"
          f" 20-byte virtual write a second each, echoed, each path in turn, {len(rounds)}"
          f" round(s)")  # fmt: skip
    print(
        "blynkota: one process on SQLite"
        if workers == 1
        else f"blynkota: {workers} device processes on MariaDB (its CPU counted as blynkota's)"
    )
    print(
        "HAProxy: one process, a thread per core"
        if proxies == 1
        else f"HAProxy: {proxies} processes of one thread each, on the same port"
    )
    print(f"{'round':<6}{'path':<10}{'logged in':>10}{'round trips':>12}{'p50 ms':>8}"
          f"{'p99 ms':>8}{'added p99':>10}{'CPU s (user/sys)':>22}{'MariaDB s':>11}")  # fmt: skip
    added, ratios = {"haproxy": [], "blynkota": []}, []
    for number, paths in enumerate(rounds, 1):
        direct_p99 = percentile(paths["direct"]["latencies"], 0.99)
        for name, found in paths.items():
            latencies = found["latencies"]
            cpu = found["cpu"]
            through = percentile(latencies, 0.99)
            extra = ""
            if name != "direct":
                added[name].append(1000 * (through - direct_p99))
                extra = f"{added[name][-1]:+.2f}"
            cpu_text = "" if name == "direct" else f"{sum(cpu):.2f} ({cpu[0]:.2f}/{cpu[1]:.2f})"
            # Of blynkota's CPU, MariaDB's share (with --workers).
            database_text = f"{found['database_cpu']:.2f}" if found["database_cpu"] else ""
            print(f"{number:<6}{name:<10}{found['logged_in']:>10}{len(latencies):>12}"
                  f"{1000 * percentile(latencies, 0.5):>8.2f}{1000 * through:>8.2f}"
                  f"{extra:>10}{cpu_text:>22}{database_text:>11}")  # fmt: skip
        ratios.append(sum(paths["blynkota"]["cpu"]) / max(sum(paths["haproxy"]["cpu"]), 1e-9))
    print(f"CPU blynkota / HAProxy: median {statistics.median(ratios):.1f}x "
          f"({', '.join(f'{r:.1f}' for r in ratios)})")  # fmt: skip
    # Every round trip of every round together, against every direct one.
    pooled = {name: [x for paths in rounds for x in paths[name]["latencies"]] for name in rounds[0]}
    direct = {q: percentile(pooled["direct"], q) for q in (0.5, 0.99)}
    print(f"all rounds: direct p50 {1000 * direct[0.5]:.2f} ms, p99 {1000 * direct[0.99]:.2f} ms")
    for name, values in added.items():
        through = {q: percentile(pooled[name], q) for q in (0.5, 0.99)}
        by_round = ", ".join(f"{value:+.2f}" for value in values)
        print(f"added through {name}: all rounds p50 "
              f"{1000 * (through[0.5] - direct[0.5]):+.2f} ms, p99 "
              f"{1000 * (through[0.99] - direct[0.99]):+.2f} ms; p99 by round: median "
              f"{statistics.median(values):+.2f} ms ({by_round})")  # fmt: skip
    relayed = (memory["relayed"] - memory["relayed_idle"]) / count
    alone = (memory["standalone"] - memory["standalone_idle"]) / count
    print(f"memory per device: relayed {relayed:.1f} KiB, standalone {alone:.1f} KiB, "
          f"ratio {relayed / alone if alone else float('nan'):.1f}x")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
