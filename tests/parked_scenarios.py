"""Scenarios of parked device sessions, each run in a process of its own:
`python -m tests.parked_scenarios NAME [DB_URL]` (tests/test_parked_sessions.py
runs them; DB_URL, SQLite by default, is a MariaDB database for the scenarios
in ON_MARIADB).

The device server runs in that process, monkey-patched as `wsgi.py` runs it,
so a scenario can count the greenlets alive while devices sit idle; its
clients use the same (patched) sockets, so the server runs while they wait.
Each prints "ok" when every check passed; a failed check exits non-zero.
"""

if __name__ == "__main__":
    from blynkota.patching import patch_for_gevent

    patch_for_gevent()

import collections
import contextlib
import gc
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path

import gevent
import gevent.socket
import greenlet
import sqlalchemy
from gevent.monkey import get_original

from blynkota import create_app
from blynkota.protocol import Response, Status, encode_info, encode_login, encode_ping
from blynkota.runner import BlynkotaServer
from tests.devices import RawDevice

OK_LOGIN = (Response(1, Status.OK), Response(2, Status.OK))

DEVICES = 40


def in_process(folder: Path, db_url: str | None = None):
    app = create_app(
        {
            "db.url": db_url or f"sqlite:///{folder / 'blynkota.db'}",
            "data.folder": folder / "data",
            "http.port": 0,
            "listen.address": "127.0.0.1",
            "shutdown.grace.seconds": 1,
        }
    )
    server = BlynkotaServer(app, serve_admin=False)
    server.start()
    return app, server


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

    devices = [RawDevice(port) for _ in tokens]
    logins = [gevent.spawn(d.log_in, t) for d, t in zip(devices, tokens, strict=True)]
    gevent.joinall(logins)
    assert [login.value for login in logins] == [OK_LOGIN] * DEVICES
    wait_for(lambda: online_rows(app) == DEVICES)
    gevent.sleep(0.2)

    # Every device is connected and counted, and none holds a greenlet.
    assert server.device_port.devices == DEVICES
    assert live_greenlets() - before < 5
    # A frame wakes the session, which answers and parks again.
    for round_ in range(3):
        for number, device in enumerate(devices):
            device.send(encode_ping(10 + round_))
            assert device.event() == Response(10 + round_, Status.OK), number
    gevent.sleep(0.2)
    assert live_greenlets() - before < 5

    # A device that hangs up wakes its session to end it: offline, uncounted.
    for device in devices[: DEVICES // 2]:
        device.close()
    wait_for(lambda: server.device_port.devices == DEVICES // 2)
    wait_for(lambda: online_rows(app) == DEVICES // 2)


def pings_are_answered_by_the_event_loop_without_a_greenlet(app, server) -> None:
    fleet = app.extensions["blynkota.fleet"]
    tokens = [fleet.add_device("owner@example.com", "Farm") for _ in range(DEVICES)]
    devices = [RawDevice(server.device_port.server_port) for _ in tokens]
    for device, token in zip(devices, tokens, strict=True):
        assert device.log_in(token) == OK_LOGIN
    wait_for(lambda: online_rows(app) == DEVICES)
    gevent.sleep(0.2)

    alive = {o for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead}
    entered: set = set()  # every greenlet switched into while the pings are answered

    def trace(event: str, args: tuple) -> None:
        if event in ("switch", "throw"):
            entered.add(args[1])

    previous = greenlet.settrace(trace)
    try:
        for round_ in range(3):
            for number, device in enumerate(devices):
                device.send(encode_ping(10 + round_))
                assert device.event() == Response(10 + round_, Status.OK), number
    finally:
        greenlet.settrace(previous)
    # 120 pings: a greenlet each if the loop handed them over; the background
    # clocks (fill, heartbeat, presence) may start a few of their own.
    started = [g for g in entered if g not in alive]
    assert len(started) < 10, f"{len(started)} greenlets started for {3 * DEVICES} pings"


def a_parked_session_closed_by_the_server_is_cleaned_up(app, server) -> None:
    token = app.extensions["blynkota.fleet"].add_device("owner@example.com", "Farm")
    port = server.device_port.server_port
    first = RawDevice(port)
    assert first.log_in(token) == OK_LOGIN
    wait_for(lambda: online_rows(app) == 1)

    # A second login of the token closes the first, parked, connection.
    second = RawDevice(port)
    assert second.log_in(token) == OK_LOGIN
    assert first.closed_within(5)  # closed by the server
    wait_for(lambda: server.device_port.devices == 1)
    second.send(encode_ping(3))
    assert second.event() == Response(3, Status.OK)
    assert online_rows(app) == 1  # the first one's cleanup left the newer login's row

    second.close()
    wait_for(lambda: server.device_port.devices == 0)
    wait_for(lambda: online_rows(app) == 0)


def a_parked_device_past_its_deadline_is_closed(app, server) -> None:
    token = app.extensions["blynkota.fleet"].add_device("owner@example.com", "Farm")
    device = RawDevice(server.device_port.server_port)
    assert device.log_in(token, **{"h-beat": "1"}) == OK_LOGIN
    started = time.monotonic()
    assert device.closed_within(10)  # after ceil(1 x 2.3) = 3 s of silence
    assert 2.5 <= time.monotonic() - started < 8
    wait_for(lambda: server.device_port.devices == 0)
    wait_for(lambda: online_rows(app) == 0)


def rows_locked(engine) -> sqlalchemy.Connection:
    """A connection whose open transaction holds every device row's lock."""
    holder = engine.connect()
    holder.begin()
    holder.execute(sqlalchemy.text("SELECT id FROM devices FOR UPDATE")).all()
    return holder


@contextlib.contextmanager
def sessions_handed_over():
    """The greenlets started, inside the block, to go on with a parked session's work."""
    alive = {o for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead}
    handed_over: set = set()

    def trace(event: str, args: tuple) -> None:
        # What a greenlet runs is known until it ends: read it as it starts.
        target = args[1]
        runs = getattr(getattr(target, "_run", None), "__name__", "")
        if event == "switch" and target not in alive and runs == "guarded":
            handed_over.add(target)

    previous = greenlet.settrace(trace)
    try:
        yield handed_over
    finally:
        greenlet.settrace(previous)


def logged_in_with_the_write_waiting(app, server):
    """A known device logged in again while another transaction holds its
    row's lock: its login is answered, its presence write waits.
    (token, device, the locker's engine, the connection holding the lock)."""
    token = app.extensions["blynkota.fleet"].add_device("owner@example.com", "Farm")
    port = server.device_port.server_port
    first = RawDevice(port)
    assert first.log_in(token) == OK_LOGIN  # now the token is known: the next login needs no read
    first.close()
    wait_for(lambda: online_rows(app) == 0)
    locker = sqlalchemy.create_engine(app.config["SETTINGS"].db_url)
    holder = rows_locked(locker)
    device = RawDevice(port)
    device.send(encode_login(token, 1))
    assert device.event() == Response(1, Status.OK)  # answered before the write (soft state)
    return token, device, locker, holder


def an_info_message_before_the_login_is_written_waits_without_a_greenlet(app, server) -> None:
    """A storm's devices send their info message as soon as the login is
    answered, before its presence write lands: the loop holds the message
    until the write is known, then answers it, with no greenlet of its own."""
    token, device, locker, holder = logged_in_with_the_write_waiting(app, server)
    port = server.device_port.server_port
    gevent.sleep(0.2)  # the session has parked

    with sessions_handed_over() as handed_over:
        device.send(encode_info({"ver": "0.6.1", "h-beat": "10", "build": "Jan  1 2018"}, 2))
        with contextlib.suppress(TimeoutError):  # nothing durable before the login is
            assert device.event(timeout=0.5) is None, "answered before the login was written"
        holder.rollback()  # the login's write goes through
        assert device.event() == Response(2, Status.OK)
    holder.close()
    assert not handed_over, f"{len(handed_over)} greenlet(s) took the info message over"
    device.send(encode_ping(3))
    assert device.event() == Response(3, Status.OK)
    wait_for(lambda: online_rows(app) == 1)
    with app.extensions["blynkota.db"].engine.connect() as connection:
        query = "SELECT build FROM devices WHERE token = :token"
        built = connection.execute(sqlalchemy.text(query), {"token": token}).scalar()
    assert built == "Jan  1 2018", built  # the report was recorded

    # A newer connection of the device while the older one's info message
    # waits: the older is closed unanswered, the newer goes on.
    holder = rows_locked(locker)
    device.close()
    older, newer = RawDevice(port), RawDevice(port)
    older.send(encode_login(token, 1))
    assert older.event() == Response(1, Status.OK)
    gevent.sleep(0.2)
    older.send(encode_info({"ver": "0.6.1", "h-beat": "10", "build": "Jan  2 2018"}, 2))
    gevent.sleep(0.2)
    newer.send(encode_login(token, 1))
    assert newer.event() == Response(1, Status.OK)
    assert older.event() is None  # closed (replaced), its info message never answered
    holder.rollback()
    holder.close()
    locker.dispose()
    newer.send(encode_info({"ver": "0.6.1", "h-beat": "10", "build": "Jan  3 2018"}, 2))
    assert newer.event() == Response(2, Status.OK)
    wait_for(lambda: server.device_port.devices == 1)
    assert online_rows(app) == 1
    newer.close()
    wait_for(lambda: online_rows(app) == 0)


def logged_in_devices(app, server) -> list[RawDevice]:
    """DEVICES new devices, each logged in (login and info answered), all online."""
    fleet = app.extensions["blynkota.fleet"]
    tokens = [fleet.add_device("owner@example.com", "Farm") for _ in range(DEVICES)]
    port = server.device_port.server_port
    devices = [RawDevice(port) for _ in tokens]
    for device, token in zip(devices, tokens, strict=True):
        assert device.log_in(token) == OK_LOGIN
    wait_for(lambda: online_rows(app) == DEVICES)
    return devices


def devices_that_hang_up_are_ended_by_the_event_loop(app, server) -> None:
    """A fleet's devices come and go all day: a parked device that closes its
    connection between frames is ended by the loop, with no greenlet of its own."""
    devices = logged_in_devices(app, server)
    gevent.sleep(0.2)  # every session has parked
    with sessions_handed_over() as handed_over:
        for device in devices:
            device.close()
        wait_for(lambda: server.device_port.devices == 0)
        wait_for(lambda: online_rows(app) == 0)
    assert not handed_over, f"{len(handed_over)} greenlet(s) ended a session"


def a_device_that_hangs_up_before_its_login_is_written_ends_after_it(app, server) -> None:
    """Ended by the loop too, once its login's presence write has landed: the
    disconnect is written after the login, never before it."""
    token, device, locker, holder = logged_in_with_the_write_waiting(app, server)
    gevent.sleep(0.2)  # parked, its login's presence write waiting for the lock
    device.close()
    gevent.sleep(0.3)
    assert server.device_port.devices == 1  # the disconnect comes after the login's write
    holder.rollback()
    holder.close()
    locker.dispose()
    wait_for(lambda: server.device_port.devices == 0)
    wait_for(lambda: online_rows(app) == 0)  # written online, then offline, in that order


def a_stop_writes_what_is_queued_before_the_node_leaves(app, server) -> None:
    """A report queued behind its info message's answer when the process is
    told to stop is recorded before the stop ends (and the process with it)."""
    # The login's presence write waits for the lock, and the report waits for it.
    token, device, locker, holder = logged_in_with_the_write_waiting(app, server)
    device.send(encode_info({"ver": "0.6.1", "h-beat": "10", "build": "Jan  4 2018"}, 2))
    gevent.sleep(0.2)
    stopping = gevent.spawn(server.stop)  # SIGTERM's handler
    gevent.sleep(0.3)
    holder.rollback()  # within the grace
    holder.close()
    stopping.join(timeout=10)
    assert stopping.successful(), stopping.exception
    with app.extensions["blynkota.db"].engine.connect() as connection:
        query = "SELECT build, node_id FROM devices WHERE token = :token"
        built, node = connection.execute(sqlalchemy.text(query), {"token": token}).one()
    assert built == "Jan  4 2018", built  # the report was written before the stop ended
    assert node is None  # and the node, leaving after it, marked the device offline
    device.close()
    locker.dispose()


def a_stop_closes_every_device_connection_before_the_node_leaves(app, server) -> None:
    """Parked sessions have no greenlet for the stop to wait on: the stop closes
    them itself, and a session waiting in a greenlet too, so no device stays
    connected to a node that has left."""
    devices = logged_in_devices(app, server)
    devices[0].send(encode_ping(3)[:3])  # half a frame: its session waits in a greenlet
    gevent.sleep(0.2)
    stopping = gevent.spawn(server.stop)  # SIGTERM's handler
    stopping.join(timeout=10)
    assert stopping.successful(), stopping.exception
    for number, device in enumerate(devices):
        assert device.event(timeout=2) is None, number  # closed by the server
        device.close()
    assert server.device_port.devices == 0
    assert online_rows(app) == 0


def logins_already_sent(port: int, tokens: list[str]) -> list[RawDevice]:
    """Devices whose login is in the server's socket before the server
    accepts them (as in a storm), so the event loop answers them: connected
    and sent with the unpatched socket, which does not let the server run."""
    blocking_socket = get_original("socket", "socket")
    devices = []
    for token in tokens:
        raw = blocking_socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.connect(("127.0.0.1", port))  # the kernel completes it from the backlog
        raw.sendall(encode_login(token, 1))
        devices.append(RawDevice.over(gevent.socket.socket(fileno=raw.detach())))
    return devices


def an_unknown_token_is_looked_up_once_and_refused(app, server) -> None:
    """Logins whose token no device has, answered from the event loop: each
    is refused (INVALID_TOKEN, then closed) after one lookup of its token,
    not a second one by the greenlet that writes the refusal."""
    asked: collections.Counter = collections.Counter()

    def count_lookups(connection, cursor, statement, parameters, context, executemany):
        if "devices.token IN" in statement:
            asked.update(set(parameters))  # an IN list is padded with repeats of its last

    engine = app.extensions["blynkota.db"].engine
    sqlalchemy.event.listen(engine, "before_cursor_execute", count_lookups)
    known = app.extensions["blynkota.fleet"].add_device("owner@example.com", "Farm")
    unknown = [secrets.token_hex(16) for _ in range(DEVICES)]
    known_device, *devices = logins_already_sent(server.device_port.server_port, [known, *unknown])
    for number, device in enumerate(devices):
        assert device.event() == Response(1, Status.INVALID_TOKEN), number
        assert device.event() is None, number  # and closed
        device.close()
    assert {token: asked[token] for token in unknown} == dict.fromkeys(unknown, 1), asked
    # A known token, among them, is logged in after the same single lookup.
    assert asked[known] == 1
    assert known_device.event() == Response(1, Status.OK)
    known_device.close()


# Scenarios that need a database where a write can wait for another's lock.
ON_MARIADB = {
    a_device_that_hangs_up_before_its_login_is_written_ends_after_it.__name__,
    an_info_message_before_the_login_is_written_waits_without_a_greenlet.__name__,
    a_stop_writes_what_is_queued_before_the_node_leaves.__name__,
}

SCENARIOS = {
    function.__name__: function
    for function in (
        idle_devices_hold_no_greenlet_and_still_answer,
        pings_are_answered_by_the_event_loop_without_a_greenlet,
        a_parked_session_closed_by_the_server_is_cleaned_up,
        a_parked_device_past_its_deadline_is_closed,
        devices_that_hang_up_are_ended_by_the_event_loop,
        a_device_that_hangs_up_before_its_login_is_written_ends_after_it,
        an_info_message_before_the_login_is_written_waits_without_a_greenlet,
        a_stop_writes_what_is_queued_before_the_node_leaves,
        a_stop_closes_every_device_connection_before_the_node_leaves,
        an_unknown_token_is_looked_up_once_and_refused,
    )
}

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        app, server = in_process(Path(folder), sys.argv[2] if len(sys.argv) > 2 else None)
        try:
            SCENARIOS[sys.argv[1]](app, server)
        finally:
            server.stop()
    print("ok")
