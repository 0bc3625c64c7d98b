"""Instructions per login: a figure that repeats to about 1 % from run to run.

Run by hand: `python bench/instructions.py [--devices 1000] [--campaign]`.

CPU seconds on a shared machine vary by ±20 % between identical runs, too
much to see a change of a few per cent. This runs the server under
valgrind's callgrind (Debian package `valgrind`), which counts the
instructions the server process executes in user space: the same for the
same code and load whatever else the machine does. The kernel's share
(system time: the sockets, the disk) is not in it; `login_storm.py` has
both, against mosquitto. The count starts after a warm-up of 50 logins and
stops once the writes behind the last login are done; the background clocks
(heartbeat, sweep, fill poll) are set to 30 s so that they stay out of it.
The server runs some 50 times slower under valgrind, so a batch of the
group commit holds more devices than at full speed: compare this figure
between two commits (in two checkouts), not with the CPU seconds.

Prints the instructions per login (with --campaign: per login offered an
update, its `ota` frame received; with --cycle: per whole reconnect cycle,
login, info, answers and close, as `login_storm.py --cycle` runs it).
`--relayed SECONDS`: instead of logins, the devices are relayed to an upstream
(bench/relay_load.py, as bench/relay.py runs it) and each writes a virtual pin
once a second for SECONDS and hears it back; prints the instructions per round
trip, a frame each way through the relay (bench/relay.py has the CPU and the
latency against HAProxy). `--downloads N`: instead of logins, N downloads of a 300 KB firmware file
over keep-alive connections on the plain HTTP port, as `wrk` asks for it
(bench/downloads.py has the ratio to nginx); prints the instructions per
download. Every wait is bounded.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gevent import socket  # noqa: E402

from bench.common import SHIPPED_TIMINGS, free_port, wait_for_port  # noqa: E402
from bench.login_storm import log_in, log_in_and_leave, timed_storm  # noqa: E402
from blynkota import create_app  # noqa: E402
from blynkota.store import upgrade  # noqa: E402
from tests.images import esp8266_image  # noqa: E402
from tests.servers import ServerProcess  # noqa: E402

LOAD = Path(__file__).resolve().parent / "relay_load.py"  # the relay's upstream
WARM_UP = 50
SLOW = 300.0  # seconds for its start, stop and idle timeout: the server runs 50 times slower
QUIET = 30  # seconds between the background clocks' ticks
DOWNLOAD_CONNECTIONS = 8
DOWNLOAD_WARM_UP = -(-WARM_UP // DOWNLOAD_CONNECTIONS)  # per connection: WARM_UP or a few more
BUILD = "Mar  3 2019 03:03:03"
IMAGE = esp8266_image(BUILD, size=300_000)  # bench/downloads.py's size
_LENGTH = re.compile(rb"\r\ncontent-length: *([0-9]+)\r\n", re.IGNORECASE)


def callgrind(pid: int, switch: str) -> None:
    subprocess.run(["callgrind_control", "-i", switch, str(pid)], check=True, capture_output=True)


def counted(out: Path) -> int:
    """The instructions callgrind counted, from its output's totals line."""
    totals = [line for line in out.read_text().splitlines() if line.startswith("totals:")]
    return int(totals[-1].split()[1])


def count_logins(server: ServerProcess, tokens: list[str], arguments, sockets: list) -> float:
    if arguments.campaign:
        server.upload("/admin/ota/start?queue=true", esp8266_image(BUILD))
    port = server.http_port
    # With a campaign each device waits for its `ota` frame (login_storm.py).
    offers: list[float] | None = [] if arguments.campaign else None
    if arguments.cycle:  # each device leaves once answered
        function, extra = log_in_and_leave, ()
    else:
        function, extra = log_in, (sockets, offers)
    warm = [(port, token, *extra) for token in tokens[:WARM_UP]]
    timed_storm(function, warm, WARM_UP)
    time.sleep(2)
    callgrind(server.process.pid, "on")
    measured = [(port, token, *extra) for token in tokens[WARM_UP:]]
    took = timed_storm(function, measured, arguments.concurrency)
    time.sleep(2)  # the writes behind the last logins
    callgrind(server.process.pid, "off")
    return took


def count_round_trips(server: ServerProcess, count: int, seconds: float) -> tuple[float, int]:
    """`count` relayed devices, each a virtual write a second for `seconds`, echoed by
    the upstream (bench/relay.py's fleet): the time it took and the round trips made."""
    from bench.relay import Fleet

    fleet = Fleet(server.http_port, count, min(count, 100), pids=[])
    try:
        if fleet.logged_in != count:
            raise RuntimeError(f"{fleet.logged_in} of {count} devices logged in")
        time.sleep(2)  # the writes behind the logins
        callgrind(server.process.pid, "on")
        started = time.monotonic()
        round_trips = len(fleet.phase(seconds)["latencies"])
        took = time.monotonic() - started
        callgrind(server.process.pid, "off")
    finally:
        fleet.close()
    return took, round_trips


def count_downloads(server: ServerProcess, count: int) -> float:
    """`count` downloads (a multiple of DOWNLOAD_CONNECTIONS), DOWNLOAD_CONNECTIONS at once."""
    path = server.upload("/admin/ota/start?queue=true", IMAGE).text.strip()
    port = server.http_port
    warm = [(port, path, DOWNLOAD_WARM_UP)] * DOWNLOAD_CONNECTIONS
    timed_storm(download, warm, DOWNLOAD_CONNECTIONS)
    callgrind(server.process.pid, "on")
    each = count // DOWNLOAD_CONNECTIONS
    took = timed_storm(download, [(port, path, each)] * DOWNLOAD_CONNECTIONS, DOWNLOAD_CONNECTIONS)
    callgrind(server.process.pid, "off")
    return took


def download(port: int, path: str, count: int) -> None:
    """`count` GETs of `path` on one keep-alive connection, each body read whole."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=SLOW) as sock:
        buffer = b""
        for _ in range(count):
            sock.sendall(request)
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                buffer += _received(sock)
            head, buffer = buffer[: end + 4], buffer[end + 4 :]
            assert head.startswith(b"HTTP/1.1 200 "), head
            left = int(_LENGTH.search(head).group(1)) - len(buffer)
            buffer = b""
            while left > 0:
                left -= len(_received(sock, min(left, 1 << 20)))
            assert left == 0, "the server sent more than its Content-Length"


def _received(sock, size: int = 65536) -> bytes:
    data = sock.recv(size)
    if not data:
        raise ConnectionError("closed")
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--campaign", action="store_true", help="offer every device an update")
    parser.add_argument("--cycle", action="store_true", help="whole cycles: log in, report, close")
    parser.add_argument(
        "--relayed", type=float, default=0,
        help="relay the devices, each a virtual write a second for SECONDS, instead",
    )  # fmt: skip
    parser.add_argument(
        "--downloads", type=int, default=0, help="count N downloads of a 300 KB file instead"
    )
    arguments = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind missing (apt-get install valgrind): no instruction count")
        return 0
    count = arguments.devices
    with tempfile.TemporaryDirectory() as folder:
        db_url = f"sqlite:///{folder}/bench.db"
        upgrade(db_url)
        app = create_app({"db.url": db_url, "data.folder": folder})
        fleet = app.extensions["blynkota.fleet"]
        devices = 0 if arguments.downloads else WARM_UP + count  # downloads need none
        if arguments.relayed:  # the tokens bench/relay_load.py's devices log in with
            from blynkota.ota import NewDevice

            tokens = [f"{number:032x}" for number in range(count)]
            fleet.add_devices([NewDevice("bench@example.com", "Bench", token=t) for t in tokens])
        else:
            tokens = [fleet.add_device("bench@example.com", "Bench") for _ in range(devices)]
        app.extensions["blynkota.db"].dispose()
        timings = {
            **SHIPPED_TIMINGS,
            "ota.sweep.interval": QUIET,
            "node.heartbeat.interval": QUIET,
            "node.poll.interval": QUIET,
            "hard.socket.idle.timeout": int(SLOW),
        }
        slots = {"ota.max.concurrent": WARM_UP + count}  # every device offered at once
        if arguments.relayed:
            upstream_port = free_port()
            upstream = subprocess.Popen([sys.executable, str(LOAD), "upstream", str(upstream_port)])
            wait_for_port(upstream_port)
            slots["relay.upstream"] = f"127.0.0.1:{upstream_port}"
        server = ServerProcess(Path(folder), db_url, **timings, **slots)
        out = Path(folder) / "callgrind.out"
        server.launcher = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
        ]
        server.start(timeout=SLOW)
        sockets: list = []
        try:
            if arguments.downloads:
                count = arguments.downloads - arguments.downloads % DOWNLOAD_CONNECTIONS
                took = count_downloads(server, count)
            elif arguments.relayed:
                took, count = count_round_trips(server, len(tokens), arguments.relayed)
            else:
                took = count_logins(server, tokens, arguments, sockets)
        finally:
            for sock, _ in sockets:
                sock.close()
            server.stop(timeout=SLOW)
            if arguments.relayed:
                upstream.terminate()
                upstream.wait(SLOW)
        instructions = counted(out)
    if arguments.downloads:
        what, label = "download", f"downloads of {len(IMAGE)} bytes"
        warm_up = DOWNLOAD_WARM_UP * DOWNLOAD_CONNECTIONS
    elif arguments.relayed:
        what, label, warm_up = "round trip", "relayed round trips", 0
    else:
        what = "login offered an update" if arguments.campaign else "login"
        what = "whole cycle" if arguments.cycle else what
        label, warm_up = "devices", WARM_UP
    print(f"{label:<31}{count} (after {warm_up} not counted)")
    print(f"{'run under valgrind':<31}{took:.1f} s")
    print(f"instructions, server process   {instructions / 1e6:.1f} M")
    print(f"instructions per {what:<13} {instructions / count / 1e3:.0f} k")
    return 0


if __name__ == "__main__":
    sys.exit(main())
