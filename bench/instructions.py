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
update, its `ota` frame received). Every wait is bounded.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHIPPED_TIMINGS  # noqa: E402
from bench.login_storm import log_in, timed_storm  # noqa: E402
from blynkota import create_app  # noqa: E402
from blynkota.store import upgrade  # noqa: E402
from tests.images import esp8266_image  # noqa: E402
from tests.servers import ServerProcess  # noqa: E402

WARM_UP = 50
SLOW = 300.0  # seconds for its start, stop and idle timeout: the server runs 50 times slower
QUIET = 30  # seconds between the background clocks' ticks


def callgrind(pid: int, switch: str) -> None:
    subprocess.run(["callgrind_control", "-i", switch, str(pid)], check=True, capture_output=True)


def counted(out: Path) -> int:
    """The instructions callgrind counted, from its output's totals line."""
    totals = [line for line in out.read_text().splitlines() if line.startswith("totals:")]
    return int(totals[-1].split()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--campaign", action="store_true", help="offer every device an update")
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
        tokens = [fleet.add_device("bench@example.com", "Bench") for _ in range(WARM_UP + count)]
        app.extensions["blynkota.db"].dispose()
        timings = {
            **SHIPPED_TIMINGS,
            "ota.sweep.interval": QUIET,
            "node.heartbeat.interval": QUIET,
            "node.poll.interval": QUIET,
            "hard.socket.idle.timeout": int(SLOW),
        }
        slots = {"ota.max.concurrent": WARM_UP + count}  # every device offered at once
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
            if arguments.campaign:
                server.upload("/admin/ota/start?queue=true", esp8266_image("Mar  3 2019 03:03:03"))
            port = server.http_port
            # With a campaign each device waits for its `ota` frame (login_storm.py).
            offers: list[float] | None = [] if arguments.campaign else None
            warm = [(port, token, sockets, offers) for token in tokens[:WARM_UP]]
            timed_storm(log_in, warm, WARM_UP)
            time.sleep(2)
            callgrind(server.process.pid, "on")
            measured = [(port, token, sockets, offers) for token in tokens[WARM_UP:]]
            took = timed_storm(log_in, measured, arguments.concurrency)
            time.sleep(2)  # the writes behind the last logins
            callgrind(server.process.pid, "off")
        finally:
            for sock, _ in sockets:
                sock.close()
            server.stop(timeout=SLOW)
        instructions = counted(out)
    what = "login offered an update" if arguments.campaign else "login"
    print(f"devices                        {count} (after {WARM_UP} not counted)")
    print(f"logins under valgrind          {took:.1f} s")
    print(f"instructions, server process   {instructions / 1e6:.1f} M")
    print(f"instructions per {what:<13} {instructions / count / 1e3:.0f} k")
    return 0


if __name__ == "__main__":
    sys.exit(main())
