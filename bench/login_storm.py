"""Login storm: N devices log in and report at once; how does that compare to bare TCP?

Run by hand: `python bench/login_storm.py [--devices 2000] [--db-url URL] [--campaign]`
(`--campaign`: an all-devices rollout is active, so every login is also
offered the update: its offer recorded, then the `ota` frame written; each
device waits for its frame, and the time from the info answer to the frame
is printed as p50/p99. `--concurrency 10000`: every device at once, a
reconnect storm. `--repeat 5`: five runs, each with a fresh server and
mosquitto, and the median of their CPU ratios: a run's ratio varies by
a fifth on a shared machine). `--cycle`: the whole reconnect cycle a board
that loses WiFi goes through: connect, HW_LOGIN, info, both answered, and
close; the server's CPU is counted until it is idle again (its session ends,
presence and report written), against mosquitto's CONNECT/CONNACK/DISCONNECT).
Prints, for the same server in the same run:
- the time for N plain TCP connect/close to port 8080 (the reference),
- the time for N full logins (HW_LOGIN + info message, both answered,
  and with --campaign the `ota` frame received),
  and the ratio of the two,
- the server's CPU seconds for those logins, against mosquitto's for N MQTT
  CONNECT/CONNACK handshakes (a C server doing the same work; Debian package
  `mosquitto`, started here on a free port; skipped with a line if missing),
- pings answered per second across all connected devices,
- the server's resident memory per connected device.
Every loop is bounded by the device count and a deadline.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent
from gevent import socket

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHIPPED_TIMINGS, cpu_split, free_port, read_frame, rss_kib, wait_for_port  # noqa: E402
from blynkota import create_app  # noqa: E402
from blynkota.protocol import (  # noqa: E402
    FrameReader,
    encode_info,
    encode_login,
    encode_ping,
)
from blynkota.store import upgrade  # noqa: E402
from tests.images import esp8266_image  # noqa: E402
from tests.servers import ServerProcess  # noqa: E402

DEADLINE = 120.0


def mqtt_connect(port: int, client: int, disconnect: bool = False) -> None:
    """One MQTT 3.1.1 handshake: CONNECT (clean session), CONNACK, then with
    `disconnect` a DISCONNECT packet, and close."""
    client_id = f"bench-{client}".encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c"  # protocol, level 4, clean session, 60 s
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = variable + payload
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(bytes([0x10, len(body)]) + body)
        answer = b""
        while len(answer) < 4:
            chunk = sock.recv(4 - len(answer))
            if not chunk:
                raise ConnectionError("mosquitto closed")
            answer += chunk
        assert answer == b"\x20\x02\x00\x00", answer  # CONNACK, accepted
        if disconnect:
            sock.sendall(b"\xe0\x00")
    finally:
        sock.close()


def mosquitto_cpu(
    count: int, concurrency: int, folder: str, cycle: bool = False
) -> tuple[float, float] | None:
    """Mosquitto's (user, system) CPU seconds for `count` handshakes, or None without it."""
    if shutil.which("mosquitto") is None:
        return None
    port = free_port()
    conf = Path(folder) / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port)
        before = cpu_split([broker.pid])
        timed_storm(mqtt_connect, [(port, i, cycle) for i in range(count)], concurrency)
        if cycle:
            until_idle([broker.pid])
        return cpu_used(before, cpu_split([broker.pid]))
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def until_idle(pids: list[int], quiet: float = 0.01, step: float = 0.5) -> None:
    """Wait until the processes use less than `quiet` CPU seconds in `step` s
    (bounded by DEADLINE): the work a storm left behind is done."""
    deadline = time.monotonic() + DEADLINE
    last = sum(cpu_split(pids))
    while time.monotonic() < deadline:
        time.sleep(step)
        now = sum(cpu_split(pids))
        if now - last < quiet:
            return
        last = now


def cpu_used(before: tuple[float, float], after: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


def cpu_line(split: tuple[float, float]) -> str:
    return f"{sum(split):.2f} s (user {split[0]:.2f}, system {split[1]:.2f})"


def bare_connect(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.close()


def log_in_and_leave(port: int, token: str) -> None:
    """The whole reconnect cycle: connect, log in, report, both answered, close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        reader = FrameReader()
        sock.sendall(encode_login(token, 1))
        assert read_frame(sock, reader).status == 200
        sock.sendall(encode_info({"ver": "0.6.1", "h-beat": "60", "build": "Jan  1 2018"}, 2))
        assert read_frame(sock, reader).status == 200
    finally:
        sock.close()


def log_in(port: int, token: str, sockets: list, offers: list | None) -> None:
    """Log in and report; with `offers`, also wait for the `ota` frame and note how long."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    reader = FrameReader()
    sock.sendall(encode_login(token, 1))
    assert read_frame(sock, reader).status == 200
    sock.sendall(encode_info({"ver": "0.6.1", "h-beat": "60", "build": "Jan  1 2018"}, 2))
    assert read_frame(sock, reader).status == 200
    if offers is not None:
        answered = time.perf_counter()
        frame = read_frame(sock, reader, timeout=DEADLINE)
        assert frame.words[0] == "ota", frame
        offers.append(time.perf_counter() - answered)
    sockets.append((sock, reader))


def ping_all(sockets: list, rounds: int) -> None:
    def one(sock, reader):
        for msg_id in range(3, 3 + rounds):
            sock.sendall(encode_ping(msg_id))
            read_frame(sock, reader)

    gevent.joinall([gevent.spawn(one, s, r) for s, r in sockets], timeout=DEADLINE)


def timed_storm(function, arguments: list[tuple], concurrency: int) -> float:
    from gevent.pool import Pool

    pool = Pool(concurrency)
    started = time.perf_counter()
    for args in arguments:
        pool.spawn(function, *args)
    pool.join(timeout=DEADLINE, raise_error=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--db-url", default=None)
    parser.add_argument("--campaign", action="store_true", help="offer every device an update")
    parser.add_argument(
        "--cycle", action="store_true", help="the whole cycle: log in, report, close; until idle"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs, each with a fresh server and mosquitto"
    )
    arguments = parser.parse_args()
    ratios = []
    for run in range(1, arguments.repeat + 1):
        if arguments.repeat > 1:
            print(f"--- run {run} of {arguments.repeat}")
        ratio = one_run(arguments)
        if ratio is not None:
            ratios.append(ratio)
    if len(ratios) > 1:
        each = ", ".join(f"{ratio:.1f}x" for ratio in ratios)
        print(f"ratio CPU / mosquitto, median of {len(ratios)} runs: "
              f"{statistics.median(ratios):.1f}x ({each})")  # fmt: skip
    return 0


def one_run(arguments: argparse.Namespace) -> float | None:
    """One storm against a fresh server, and one against mosquitto: the figures
    printed, and the CPU ratio (None without mosquitto)."""
    count = arguments.devices
    ratio = None
    with tempfile.TemporaryDirectory() as folder:
        db_url = arguments.db_url or f"sqlite:///{folder}/bench.db"
        upgrade(db_url)
        app = create_app({"db.url": db_url, "data.folder": folder})
        fleet = app.extensions["blynkota.fleet"]
        tokens = [fleet.add_device("bench@example.com", "Bench") for _ in range(count)]
        server = ServerProcess(
            Path(folder), db_url, **SHIPPED_TIMINGS, **{"ota.max.concurrent": count}
        ).start()
        try:
            if arguments.campaign:
                server.upload("/admin/ota/start?queue=true", esp8266_image("Mar  3 2019 03:03:03"))
            port = server.http_port
            if arguments.cycle:
                return whole_cycle(arguments, server, tokens, folder)
            baseline_rss = rss_kib(server.process.pid)
            reference = timed_storm(bare_connect, [(port,)] * count, arguments.concurrency)
            sockets: list = []
            offers: list[float] | None = [] if arguments.campaign else None
            cpu_before = cpu_split([server.process.pid])
            logins = timed_storm(
                log_in, [(port, token, sockets, offers) for token in tokens], arguments.concurrency
            )
            login_cpu = cpu_used(cpu_before, cpu_split([server.process.pid]))
            connected_rss = rss_kib(server.process.pid)
            rounds = 5
            started = time.perf_counter()
            ping_all(sockets, rounds)
            ping_time = time.perf_counter() - started
            print(f"devices                     {count}")
            print(f"bare TCP connect+close      {reference:.3f} s (reference)")
            print(f"login + info, answered      {logins:.3f} s")
            print(f"ratio login / bare connect  {logins / reference:.1f}x")
            print(f"logins per second           {count / logins:.0f}")
            if offers:
                offers.sort()
                p50, p99 = offers[len(offers) // 2], offers[int(len(offers) * 0.99)]
                print(
                    f"info -> ota frame           p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
                )
            print(f"server CPU for the logins   {cpu_line(login_cpu)}")
            anchor = mosquitto_cpu(count, arguments.concurrency, folder)
            if anchor is None:
                print("mosquitto missing (apt-get install mosquitto): no CPU ratio")
            else:
                print(f"mosquitto CPU, N handshakes {cpu_line(anchor)}")
                ratio = sum(login_cpu) / max(sum(anchor), 0.01)
                print(f"ratio CPU / mosquitto       {ratio:.1f}x")
            print(f"pings answered per second   {count * rounds / ping_time:.0f}")
            per_device = (connected_rss - baseline_rss) / count
            print(f"server memory per device    {per_device:.1f} KiB (RSS delta)")
            for sock, _ in sockets:
                sock.close()
        finally:
            server.stop()
            app.extensions["blynkota.db"].dispose()
    return ratio


def whole_cycle(arguments, server: ServerProcess, tokens: list[str], folder: str) -> float | None:
    """Every device through the whole reconnect cycle; the server's CPU until idle
    again, against mosquitto's CONNECT/CONNACK/DISCONNECT: the ratio (or None)."""
    count, pids = len(tokens), [server.process.pid]
    until_idle(pids)
    before = cpu_split(pids)
    took = timed_storm(
        log_in_and_leave, [(server.http_port, token) for token in tokens], arguments.concurrency
    )
    until_idle(pids)
    used = cpu_used(before, cpu_split(pids))
    print(f"devices                     {count} ({arguments.concurrency} at once)")
    print(f"whole cycles                {took:.3f} s, {count / took:.0f} a second")
    print(f"server CPU until idle       {cpu_line(used)}")
    anchor = mosquitto_cpu(count, arguments.concurrency, folder, cycle=True)
    if anchor is None:
        print("mosquitto missing (apt-get install mosquitto): no CPU ratio")
        return None
    ratio = sum(used) / max(sum(anchor), 0.01)
    print(f"mosquitto CPU, N cycles     {cpu_line(anchor)}")
    print(f"ratio CPU / mosquitto       {ratio:.1f}x")
    return ratio


if __name__ == "__main__":
    sys.exit(main())
