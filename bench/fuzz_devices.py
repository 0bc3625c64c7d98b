"""Fuzz the device port for a long while: random connections of mangled frames.

Run by hand: `python bench/fuzz_devices.py [--connections 20000] [--concurrency 100]
[--seed N] [--db-url URL]`. One server (SQLite by default) with one device;
every connection logs in as it (or not), then sends mangled frames and garbage
in random pieces (tests/fuzzing.py, the generator CI's bounded run uses too).
Prints the frames' bytes sent, how many connections the server closed, the
tracebacks in its log (must be 0), and its RSS and open files before and
after. Every loop is bounded by the connection count.
"""

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import gevent
from gevent import socket
from gevent.pool import Pool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import rss_kib  # noqa: E402
from blynkota import create_app  # noqa: E402
from blynkota.store import upgrade  # noqa: E402
from tests.devices import TOKEN  # noqa: E402
from tests.fuzzing import random_connection  # noqa: E402
from tests.servers import ServerProcess  # noqa: E402


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def one_connection(port: int, sent: tuple[list[bytes], int], tally: dict) -> None:
    pieces, frames = sent
    tally["frames"] += frames
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for piece in pieces:
                sock.sendall(piece)
                tally["bytes"] += len(piece)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            while sock.recv(4096):
                pass
            tally["closed"] += 1
    except OSError:
        tally["reset"] += 1  # closed by the server mid-send


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--db-url", default=None)
    arguments = parser.parse_args()
    rng = random.Random(arguments.seed)
    with tempfile.TemporaryDirectory() as folder:
        db_url = arguments.db_url or f"sqlite:///{folder}/fuzz.db"
        upgrade(db_url)
        app = create_app({"db.url": db_url, "data.folder": folder})
        app.extensions["blynkota.fleet"].add_device("fuzz@example.com", "Fuzz", token=TOKEN)
        server = ServerProcess(Path(folder), db_url).start()
        pid = server.process.pid
        try:
            before = (rss_kib(pid), open_files(pid))
            tally = {"frames": 0, "bytes": 0, "closed": 0, "reset": 0}
            pool = Pool(arguments.concurrency)
            started = time.perf_counter()
            for _ in range(arguments.connections):
                pool.spawn(one_connection, server.http_port, random_connection(rng, TOKEN), tally)
            pool.join(timeout=600)
            seconds = time.perf_counter() - started
            gevent.sleep(5)  # sessions still closing settle
            after = (rss_kib(pid), open_files(pid))
            log = server.log()
            print(f"seed                        {arguments.seed}")
            print(f"connections                 {arguments.connections} in {seconds:.1f} s")
            print(f"frames tried (bytes sent)   {tally['frames']} ({tally['bytes']})")
            print(f"closed cleanly / reset      {tally['closed']} / {tally['reset']}")
            print(f"server alive                {server.process.poll() is None}")
            print(f"tracebacks in the log       {log.count('Traceback')}")
            print(f"RSS before / after          {before[0]} / {after[0]} KiB")
            print(f"open files before / after   {before[1]} / {after[1]}")
        finally:
            server.stop()
            app.extensions["blynkota.db"].dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
