"""Scenarios of parked device sessions, each run in a process of its own:
`python -m tests.parked_scenarios NAME` (tests/test_parked_sessions.py runs them).

The device server runs in that process, monkey-patched as `wsgi.py` runs it,
so a scenario can count the greenlets alive while devices sit idle; its
clients use the same (patched) sockets, so the server runs while they wait.
Each prints "ok" when every check passed; a failed check exits non-zero.
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import gc
import sys
import tempfile
import time
from pathlib import Path

import gevent
import greenlet
import sqlalchemy
from gevent import socket

from blynkota import create_app
from blynkota.protocol import (
    NEED_DATA,
    FrameReader,
    Response,
    Status,
    encode_info,
    encode_login,
    encode_ping,
)
from blynkota.runner import BlynkotaServer

DEVICES = 40


def in_process(folder: Path):
    app = create_app(
        {
            "db.url": f"sqlite:///{folder / 'blynkota.db'}",
            "data.folder": folder / "data",
            "http.port": 0,
            "listen.address": "127.0.0.1",
            "shutdown.grace.seconds": 1,
        }
    )
    server = BlynkotaServer(app, serve_admin=False)
    server.start()
    return app, server


class Device:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = FrameReader()

    def ask(self, frame: bytes):
        self.sock.sendall(frame)
        while (event := self.reader.next_event()) is NEED_DATA:
            data = self.sock.recv(4096)
            if not data:
                return None
            self.reader.feed(data)
        return event

    def log_in(self, token: str) -> None:
        assert self.ask(encode_login(token, 1)) == Response(1, Status.OK)
        assert self.ask(encode_info({"h-beat": "10", "build": "Jan  1 2018"}, 2)) == Response(
            2, Status.OK
        )


def live_greenlets() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead)


def online_rows(app) -> int:
    with app.extensions["blynkota.db"].engine.connect() as connection:
        query = "SELECT COUNT(*) FROM devices WHERE node_id IS NOT NULL"
        return connection.execute(sqlalchemy.text(query)).scalar()


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the deadline"
        gevent.sleep(0.05)


def idle_devices_hold_no_greenlet_and_still_answer(app, server) -> None:
    fleet = app.extensions["blynkota.fleet"]
    tokens = [fleet.add_device("owner@example.com", "Farm") for _ in range(DEVICES)]
    port = server.device_port.server_port
    gevent.sleep(0.2)
    before = live_greenlets()

    devices = [Device(port) for _ in tokens]
    gevent.joinall([gevent.spawn(d.log_in, t) for d, t in zip(devices, tokens, strict=True)])
    wait_for(lambda: online_rows(app) == DEVICES)
    gevent.sleep(0.2)

    # Every device is connected and counted, and none holds a greenlet.
    assert server.device_port.devices == DEVICES
    assert live_greenlets() - before < 5
    # A frame wakes the session, which answers and parks again.
    for round_ in range(3):
        for number, device in enumerate(devices):
            assert device.ask(encode_ping(10 + round_)) == Response(10 + round_, Status.OK), number
    gevent.sleep(0.2)
    assert live_greenlets() - before < 5

    # A device that hangs up wakes its session to end it: offline, uncounted.
    for device in devices[: DEVICES // 2]:
        device.sock.close()
    wait_for(lambda: server.device_port.devices == DEVICES // 2)
    wait_for(lambda: online_rows(app) == DEVICES // 2)


def a_parked_session_closed_by_the_server_is_cleaned_up(app, server) -> None:
    token = app.extensions["blynkota.fleet"].add_device("owner@example.com", "Farm")
    port = server.device_port.server_port
    first = Device(port)
    first.log_in(token)
    wait_for(lambda: online_rows(app) == 1)

    # A second login of the token closes the first, parked, connection.
    second = Device(port)
    second.log_in(token)
    first.sock.settimeout(5)
    assert first.sock.recv(4096) == b""  # closed by the server
    wait_for(lambda: server.device_port.devices == 1)
    assert second.ask(encode_ping(3)) == Response(3, Status.OK)
    assert online_rows(app) == 1  # the first one's cleanup left the newer login's row

    second.sock.close()
    wait_for(lambda: server.device_port.devices == 0)
    wait_for(lambda: online_rows(app) == 0)


def a_parked_device_past_its_deadline_is_closed(app, server) -> None:
    token = app.extensions["blynkota.fleet"].add_device("owner@example.com", "Farm")
    device = Device(server.device_port.server_port)
    assert device.ask(encode_login(token, 1)) == Response(1, Status.OK)
    assert device.ask(encode_info({"h-beat": "1"}, 2)) == Response(2, Status.OK)
    started = time.monotonic()
    device.sock.settimeout(10)
    assert device.sock.recv(4096) == b""  # ceil(1 x 2.3) = 3 s of silence
    assert 2.5 <= time.monotonic() - started < 8
    wait_for(lambda: server.device_port.devices == 0)
    wait_for(lambda: online_rows(app) == 0)


SCENARIOS = {
    function.__name__: function
    for function in (
        idle_devices_hold_no_greenlet_and_still_answer,
        a_parked_session_closed_by_the_server_is_cleaned_up,
        a_parked_device_past_its_deadline_is_closed,
    )
}

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        app, server = in_process(Path(folder))
        try:
            SCENARIOS[sys.argv[1]](app, server)
        finally:
            server.stop()
    print("ok")
