"""What the benchmarks share: reading frames as a device, CPU seconds from /proc, ports."""

import os
import socket
import time
from pathlib import Path

from blynkota.protocol import NEED_DATA, FrameReader

__all__ = [
    "SHIPPED_TIMINGS",
    "cpu_seconds",
    "cpu_split",
    "bench_fleet",
    "child_pids",
    "database_pids",
    "free_port",
    "percentile",
    "read_frame",
    "rss_kib",
    "until_nodes",
    "wait_for_port",
]


def read_frame(sock, reader: FrameReader, timeout: float | None = None):
    """The next frame the server sent; ConnectionError when it closed."""
    if timeout is not None:
        sock.settimeout(timeout)
    while (event := reader.next_event()) is NEED_DATA:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed")
        reader.feed(data)
    return event


# The test servers (tests/servers.py) sweep, poll and beat many times a second
# so that tests finish fast; a benchmark measures the server as shipped
# (config/server.properties), or background work it never does inflates its CPU.
SHIPPED_TIMINGS = {
    "ota.sweep.interval": 5,
    "node.heartbeat.interval": 2,
    "node.poll.interval": 0.25,
    "hard.socket.idle.timeout": 10,
}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used (gone ones count 0)."""
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds the processes have used (gone ones count 0):
    system time is the kernel's share (sockets), which no server code avoids."""
    ticks = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])  # utime, stime
    return user / ticks, system / ticks


def rss_kib(pid: int) -> int:
    """The process's resident memory, KiB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child_pids(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def database_pids() -> list[int]:
    """The local MariaDB/MySQL server's processes (none where it runs elsewhere)."""
    import subprocess

    found = subprocess.run(["pgrep", "-x", "mariadbd|mysqld"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def bench_fleet(url: str, devices: int, folder: Path):
    """A migrated database holding `devices` devices of one project, inserted in
    bulk (the provisioning API would take minutes for 100,000): the app on it,
    and the tokens, the first made by the provisioning API."""
    import hashlib

    import sqlalchemy

    from blynkota import create_app
    from blynkota.store import upgrade

    upgrade(url)
    app = create_app({"db.url": url, "data.folder": folder / "bench", "log.level": "WARNING"})
    first = app.extensions["blynkota.fleet"].add_device("bench@example.com", "Bench")
    tokens = [first] + [hashlib.md5(f"d{i}".encode()).hexdigest() for i in range(1, devices)]
    insert = sqlalchemy.text(
        "INSERT INTO devices (project_id, name, token, created_at) "
        "VALUES (:p, '', :t, CURRENT_TIMESTAMP)"
    )
    with app.extensions["blynkota.db"].engine.begin() as connection:
        project = connection.execute(sqlalchemy.text("SELECT project_id FROM devices")).scalar()
        for at in range(1, devices, 10_000):
            chunk = tokens[at : at + 10_000]
            connection.execute(insert, [{"p": project, "t": token} for token in chunk])
    return app, tokens


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, seconds: float = 10.0) -> None:
    """Until a server started by the bench accepts on 127.0.0.1:`port` (or `seconds` pass)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # nothing of the bench runs while its server starts


def until_nodes(engine, count: int, seconds: float = 60.0) -> None:
    """Until `count` device processes have registered as live nodes on the bench's
    database (each binds the device port itself); SystemExit after `seconds`."""
    import sqlalchemy

    alive = sqlalchemy.text("SELECT count(*) FROM nodes WHERE stopped_at IS NULL")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            if connection.execute(alive).scalar() >= count:
                return
        time.sleep(0.1)  # gevent's under a monkey-patched bench
    raise SystemExit(f"the {count} device processes did not start within {seconds:g} s")


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]
