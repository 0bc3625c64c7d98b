"""The device port against a real server: SPEC §2 on the wire, bad input, timeouts."""

import contextlib
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy

from blynkota import create_app
from blynkota.logsafe import DEVICE_LINES, token_tag
from blynkota.protocol import (
    Command,
    Response,
    Status,
    encode_frame,
    encode_info,
    encode_login,
    encode_ping,
)
from blynkota.store.models import Node, utcnow

from .devices import BUILD_NEW, BUILD_OLD, TOKEN, RawDevice
from .images import esp8266_image
from .servers import ServerProcess, wait_until


@pytest.fixture(scope="module")
def device_server(shared_server, shared_fleet):
    """The module's server with the device TOKEN. Each test opens its own
    connections; a later login of TOKEN replaces an earlier one, as on a
    real server, so no test depends on what the one before left open."""
    shared_fleet.add_device("owner@example.com", "Farm", name="pump", token=TOKEN)
    return shared_server


def device_row(app, token=TOKEN):
    with app.extensions["blynkota.db"].engine.connect() as connection:
        return (
            connection.execute(
                sqlalchemy.text("SELECT * FROM devices WHERE token = :token"), {"token": token}
            )
            .mappings()
            .one()
        )


def assert_still_serving(server):
    device = RawDevice(server.http_port)
    try:
        assert device.log_in() == (Response(1, Status.OK), Response(2, Status.OK))
    finally:
        device.close()


def test_login_info_and_ping_are_answered_and_the_report_is_recorded(device_server, shared_app):
    device = RawDevice(device_server.http_port)
    device.send(encode_login(TOKEN, 1))
    assert device.event() == Response(1, Status.OK)
    info = {
        "ver": "0.6.1",
        "h-beat": "10",
        "buff-in": "1024",
        "dev": "ESP32",
        "cpu": "240",
        "fw": "1.0.1",
        "build": BUILD_OLD,
        "tmpl": "TMPL1234",
    }
    device.send(encode_info(info, 2))
    assert device.event() == Response(2, Status.OK)
    device.send(encode_ping(3))
    assert device.event() == Response(3, Status.OK)

    row = device_row(shared_app)
    assert (row["lib_version"], row["fw_version"], row["build"], row["hardware"]) == (
        "0.6.1",
        "1.0.1",
        BUILD_OLD,
        "ESP32",
    )
    assert (row["heartbeat"], row["buff_in"], row["template_id"]) == (10, 1024, "TMPL1234")
    assert row["last_address"] == "127.0.0.1"
    assert row["last_seen_at"] is not None and row["online_since"] is not None
    device.close()
    # Disconnect is recorded too.
    deadline = time.monotonic() + 10
    while device_row(shared_app)["online_since"] is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert device_row(shared_app)["online_since"] is None


def test_old_clients_login_command_is_accepted(device_server):
    device = RawDevice(device_server.http_port)
    device.send(encode_login(TOKEN, 1, legacy=True))
    assert device.event() == Response(1, Status.OK)


@pytest.mark.parametrize(
    "login",
    [
        encode_login("ffffffffffffffffffffffffffffffff", 1),  # unknown
        encode_frame(Command.HW_LOGIN, 1, b"not a token!"),  # malformed
    ],
)
def test_bad_token_gets_invalid_token_then_close(device_server, login):
    device = RawDevice(device_server.http_port)
    device.send(login)
    assert device.event() == Response(1, Status.INVALID_TOKEN)
    assert device.event() is None


def test_anything_before_login_closes_the_connection(device_server):
    device = RawDevice(device_server.http_port)
    device.send(encode_ping(1))
    assert device.event() is None
    garbage = RawDevice(device_server.http_port)
    garbage.send(b"\x01\x02\x03\x04\x05\x06garbage")
    assert garbage.closed_within(5)
    assert_still_serving(device_server)


def test_second_login_gets_already_registered_and_a_flood_is_closed(device_server):
    device = RawDevice(device_server.http_port)
    device.log_in()
    device.send(encode_login(TOKEN, 3))
    assert device.event() == Response(3, Status.ALREADY_REGISTERED)
    # One write: the server closes after the fourth extra login, and a frame
    # written after that close would meet a reset connection.
    device.send(b"".join(encode_login(TOKEN, msg_id) for msg_id in range(4, 10)))
    assert device.closed_within(5)
    assert_still_serving(device_server)


def test_oversized_length_field_closes_only_that_connection(device_server):
    device = RawDevice(device_server.http_port)
    device.log_in()
    device.send(bytes([Command.HARDWARE, 0, 3, 0xFF, 0xFF]) + b"x" * 100)
    assert device.closed_within(5)
    assert_still_serving(device_server)


def test_unknown_command_gets_illegal_command_then_close(device_server):
    device = RawDevice(device_server.http_port)
    device.log_in()
    device.send(encode_frame(50, 3))
    assert device.event() == Response(3, Status.ILLEGAL_COMMAND)
    assert device.event() is None


def test_command_type_100_or_more_closes(device_server):
    device = RawDevice(device_server.http_port)
    device.log_in()
    device.send(encode_frame(120, 3, b"x"))
    assert device.closed_within(5)


def test_known_unhandled_commands_are_ignored(device_server):
    device = RawDevice(device_server.http_port)
    device.log_in()
    device.send(encode_frame(Command.HARDWARE, 3, b"vw\x001\x0042"))
    device.send(encode_frame(Command.PROPERTY, 4, b"1\x00color\x00#FF0000"))
    device.send(encode_ping(5))
    assert device.event() == Response(5, Status.OK)  # nothing answered to 3 and 4


def test_half_sent_frame_is_closed_after_the_heartbeat_timeout(device_server):
    device = RawDevice(device_server.http_port)
    device.log_in(**{"h-beat": "1"})  # closed after ceil(1 x 2.3) = 3 s of silence
    device.send(encode_ping(3)[:2])
    assert not device.closed_within(1.5)
    assert device.closed_within(10)


def test_silent_device_is_closed_and_a_pinging_one_is_not(device_server, shared_fleet):
    shared_fleet.add_device("owner@example.com", "Farm", token="a" * 32)
    silent, pinging = RawDevice(device_server.http_port), RawDevice(device_server.http_port)
    silent.log_in(**{"h-beat": "1"})
    pinging.log_in(token="a" * 32, **{"h-beat": "1"})
    started = time.monotonic()
    for msg_id in range(3, 100):
        pinging.send(encode_ping(msg_id))
        assert pinging.event() == Response(msg_id, Status.OK)
        if silent.closed_within(0.5):
            break
    assert 2 <= time.monotonic() - started < 10
    pinging.send(encode_ping(200))
    assert pinging.event() == Response(200, Status.OK)


def test_connection_that_never_logs_in_is_closed(device_server):
    device = RawDevice(device_server.http_port)  # hard.socket.idle.timeout=3 in tests
    assert device.closed_within(10)


def test_a_second_connection_with_the_same_token_replaces_the_first(device_server, shared_app):
    first = RawDevice(device_server.http_port)
    first.log_in()
    second = RawDevice(device_server.http_port)
    assert second.log_in() == (Response(1, Status.OK), Response(2, Status.OK))
    assert first.closed_within(5)
    second.send(encode_ping(3))
    assert second.event() == Response(3, Status.OK)
    time.sleep(0.3)
    assert (
        device_row(shared_app)["online_since"] is not None
    )  # the old close did not mark it offline


def test_a_device_that_never_reads_is_disconnected(port_server_factory, tmp_path):
    # No message quota here: this device is dropped for not reading, not for its rate.
    device_server = port_server_factory(**{"hardware.max.messages.per.sec": 1_000_000})
    cli = create_app(
        {"db.url": device_server.properties["db.url"], "data.folder": tmp_path / "cli"}
    )
    cli.extensions["blynkota.fleet"].add_device("owner@example.com", "Farm", token=TOKEN)
    cli.extensions["blynkota.db"].dispose()
    device = RawDevice(device_server.http_port)
    device.log_in()
    device.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    device.sock.setblocking(False)
    pings = b"".join(encode_ping(i % 60000 + 1) for i in range(20000))
    deadline = time.monotonic() + 40
    closed = False
    while time.monotonic() < deadline and not closed:
        try:
            device.sock.send(pings)
        except BlockingIOError:
            time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
    assert closed, "the server kept a connection that never reads"
    assert "does not read" in device_server.log()
    assert_still_serving(device_server)


def test_pings_do_not_touch_the_database(device_server, shared_app, shared_fleet, shared_db_url):
    """Pings are answered while another process locks the database for longer
    than the server's heartbeat (0.5 s here): on SQLite the server's writes
    (the heartbeat, an upload meanwhile) then wait for the lock without holding
    up the event loop, and land once the lock is released."""
    device = RawDevice(device_server.http_port)
    build = "Feb  2 2019 02:02:02"  # reported by no other test on the module's server
    device.log_in(build=build)
    # The info message is recorded after its answer: let that write land first.
    deadline = time.monotonic() + 10
    while device_row(shared_app)["build"] != build and time.monotonic() < deadline:
        time.sleep(0.05)
    # The upload below queues an update for this offline device only: a
    # campaign would reach the other tests' devices on the module's server.
    offline = shared_fleet.add_device("owner@example.com", "Farm", name="offline")
    engine = shared_app.extensions["blynkota.db"].engine
    last_beat = sqlalchemy.select(sqlalchemy.func.max(Node.heartbeat_at))
    with engine.connect() as connection:
        if shared_db_url.startswith("mysql"):
            # Nobody else can read or write these tables until the lock is released.
            connection.execute(sqlalchemy.text("LOCK TABLES devices WRITE, users WRITE"))
        else:
            # SQLite in WAL mode lets readers through, but nobody else can write.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        uploads: list[str] = []
        image = esp8266_image("Feb  3 2019 03:03:03", size=20_000)
        upload = threading.Thread(
            target=lambda: uploads.append(
                device_server.upload(f"/admin/ota/start?token={offline}&queue=true", image).text
            )
        )
        upload.start()
        started = time.monotonic()
        msg_id = 0
        while time.monotonic() - started < 1.6:  # three heartbeats meet the lock
            msg_id += 1
            device.send(encode_ping(msg_id))
            assert device.event(timeout=3) == Response(msg_id, Status.OK)
            time.sleep(0.01)
        assert msg_id >= 20
        if shared_db_url.startswith("mysql"):
            connection.execute(sqlalchemy.text("UNLOCK TABLES"))
        else:
            connection.exec_driver_sql("ROLLBACK")
        released = utcnow()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            if connection.scalar(last_beat) > released:
                break
        time.sleep(0.05)
    else:
        pytest.fail("the server's heartbeat was not written after the lock was released")
    upload.join(30)
    assert uploads and uploads[0].startswith("/static/ota/"), uploads
    url = f"http://127.0.0.1:{device_server.http_port}{uploads[0]}"
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.read() == image
    device.send(encode_ping(msg_id + 1))
    assert device.event(timeout=3) == Response(msg_id + 1, Status.OK)
    assert "Traceback" not in device_server.log()


def test_many_bad_clients_at_once_leave_the_server_serving(device_server):
    def bad_client(kind: int) -> None:
        device = RawDevice(device_server.http_port)
        try:
            if kind == 0:
                device.send(b"\xff" * 64)
            elif kind == 1:
                device.send(encode_login("f" * 32, 1))
            else:
                device.send(bytes([Command.HW_LOGIN, 0, 1]))  # half a header
            device.closed_within(6)
        finally:
            device.close()

    threads = [threading.Thread(target=bad_client, args=(i % 3,)) for i in range(60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert_still_serving(device_server)
    assert "Traceback" not in device_server.log()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_out_of_file_descriptors_the_server_pauses_accepting_and_recovers(tmp_path, db_url, fleet):
    fleet.add_device("owner@example.com", "Farm", name="pump", token=TOKEN)
    server = ServerProcess(tmp_path, db_url, **{"hardware.max.connections": 1000})
    server.open_files = 120  # the database, the listeners and about 80 connections
    server.start()
    try:
        assert "open-files limit 120 is below hardware.max.connections 1000" in server.log()
        # Silent connections: each holds a descriptor until the login deadline.
        held = [socket.create_connection(("127.0.0.1", server.http_port)) for _ in range(150)]
        deadline = time.monotonic() + 10
        while "out of file descriptors" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        for sock in held:
            sock.close()
        assert server.log().count("out of file descriptors") == 1  # one line, not one per accept
        assert_still_serving(server)
        assert "Traceback" not in server.log()
    finally:
        server.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_full_house_of_devices_leaves_room_for_downloads(server_factory, fleet):
    server = server_factory(**{"hardware.max.connections": 3})
    tokens = [fleet.add_device("owner@example.com", "Farm") for _ in range(4)]
    path = server.upload("/admin/ota/start?queue=true", esp8266_image(BUILD_NEW)).text.strip()
    present = [RawDevice(server.http_port) for _ in range(3)]
    for device, token in zip(present, tokens, strict=False):
        assert device.log_in(token) == (Response(1, Status.OK), Response(2, Status.OK))
    extra = RawDevice(server.http_port)
    extra.send(encode_login(tokens[3], 1))
    assert extra.closed_within(5)  # closed unanswered: it comes back later
    assert "3 devices connected (hardware.max.connections)" in server.log()
    download = server.admin("GET", path, auth=None, secure=False)
    assert download.status == 200 and download.body == esp8266_image(BUILD_NEW)
    present[0].close()
    answer, deadline = None, time.monotonic() + 10
    while answer != (Response(1, Status.OK), Response(2, Status.OK)):
        assert time.monotonic() < deadline, "a freed place was never taken"
        again = RawDevice(server.http_port)
        try:
            answer = again.log_in(tokens[3])  # as the library does: try again
        except OSError:
            answer = None
        if answer != (Response(1, Status.OK), Response(2, Status.OK)):
            time.sleep(0.1)


def test_odd_numbers_and_long_strings_in_the_info_message_are_tolerated(device_server, shared_app):
    """`²` and 400 digits are no numbers (ignored); strings longer than their
    columns are cut; an emoji is stored as sent. The device is served."""
    device = RawDevice(device_server.http_port)
    device.send(encode_login(TOKEN, 1))
    assert device.event() == Response(1, Status.OK)
    info = {
        "h-beat": "\u00b2",
        "buff-in": "9" * 400,
        "ver": "v" * 100,
        "build": "Mar  3 2019 \U0001f680",
        "dev": "ESP" * 100,
    }
    device.send(encode_info(info, 2))
    assert device.event() == Response(2, Status.OK)
    device.send(encode_ping(3))
    assert device.event() == Response(3, Status.OK)
    row = device_row(shared_app)
    assert (row["heartbeat"], row["buff_in"]) == (None, None)
    assert row["lib_version"] == "v" * 32 and row["hardware"] == ("ESP" * 100)[:64]
    assert row["build"] == "Mar  3 2019 \U0001f680"
    device.close()
    assert "Traceback" not in device_server.log()


def test_a_device_over_its_message_rate_is_disconnected_with_one_line(device_server, shared_fleet):
    # A device of its own: TOKEN's lines of this minute may be spent by the
    # module's other tests (a device has 10 a minute, logsafe.DeviceLines).
    token = shared_fleet.add_device("owner@example.com", "Farm", name="flooder")
    device = RawDevice(device_server.http_port)
    device.log_in(token=token)
    device.send(b"".join(encode_ping(msg_id) for msg_id in range(3, 303)))  # 300 at once
    assert device.closed_within(5)
    log = device_server.log()
    assert log.count("more than 100 frames in a second") == 1
    assert "Traceback" not in log
    assert_still_serving(device_server)


def _peer(device: RawDevice) -> str:
    host, port = device.sock.getsockname()[:2]
    return f"{host}:{port}"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_logins_already_here_at_accept_are_answered_from_the_event_loop(server_factory, fleet, app):
    """A storm's devices have sent their login (and info message) before the
    server accepts them: here the server is stopped (SIGSTOP) while they
    connect, and the kernel holds them. Each is answered from the event loop,
    without a greenlet; what the loop cannot finish (an unknown token, a frame
    before the login, half a login) goes on in a greenlet, which answers as
    always. A device that logs in after it was accepted takes the greenlet."""
    server = server_factory(**{"log.level": "DEBUG"})
    port = server.http_port
    tokens = [fleet.add_device("owner@example.com", "Farm") for _ in range(20)]
    late_token = fleet.add_device("owner@example.com", "Farm")
    info = {"ver": "0.6.1", "h-beat": "10", "dev": "ESP8266", "build": BUILD_NEW}
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        storm = [RawDevice(port) for _ in tokens]  # the kernel completes each connect
        for device, token in zip(storm, tokens, strict=True):
            device.send(encode_login(token, 1) + encode_info(info, 2))
        stranger, early_ping, half = RawDevice(port), RawDevice(port), RawDevice(port)
        stranger.send(encode_login("f" * 32, 1))
        early_ping.send(encode_ping(1))
        half.send(encode_login(late_token, 1)[:7])
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    for device in storm:
        assert (device.event(), device.event()) == (Response(1, Status.OK), Response(2, Status.OK))
    assert stranger.event() == Response(1, Status.INVALID_TOKEN) and stranger.event() is None
    assert early_ping.event() is None
    half.send(encode_login(late_token, 1)[7:])
    assert half.event() == Response(1, Status.OK)
    half_peer = _peer(half)
    half.close()
    late = RawDevice(port)
    time.sleep(0.3)  # accepted, and sniffed, before its login arrives
    assert late.log_in(token=late_token) == (Response(1, Status.OK), Response(2, Status.OK))

    with app.extensions["blynkota.db"].engine.connect() as connection:
        builds = connection.execute(
            sqlalchemy.text("SELECT build FROM devices WHERE token IN :tokens").bindparams(
                sqlalchemy.bindparam("tokens", expanding=True)
            ),
            {"tokens": tokens},
        ).scalars()
        assert list(builds) == [BUILD_NEW] * len(tokens)
    log = server.log()
    assert all(f"{_peer(device)}: logged in from the event loop" in log for device in storm)
    assert f"{half_peer}: logged in\n" in log and f"{_peer(late)}: logged in\n" in log
    assert "Traceback" not in log
    for device in (*storm, stranger, early_ping, late):
        device.close()


def test_a_ping_flood_does_not_hold_up_other_devices(server_factory, fleet):
    """Frames waiting in one device's buffer are handled with a turn for everyone else
    between them: a login answers while another device floods without a pause."""
    fleet.add_device("owner@example.com", "Farm", name="pump", token=TOKEN)
    flooder_token = fleet.add_device("owner@example.com", "Farm", name="flood")
    server = server_factory(**{"hardware.max.messages.per.sec": 1_000_000})
    flooder = RawDevice(server.http_port)
    flooder.log_in(token=flooder_token)
    stop = threading.Event()

    def flood() -> None:
        pings = b"".join(encode_ping(i % 60000 + 1) for i in range(2000))
        deadline = time.monotonic() + 20
        with contextlib.suppress(OSError):
            while not stop.is_set() and time.monotonic() < deadline:
                flooder.sock.sendall(pings)

    def drain() -> None:  # read the answers, or the flooder is dropped for not reading
        deadline = time.monotonic() + 25
        with contextlib.suppress(OSError):
            flooder.sock.settimeout(1)
            while not stop.is_set() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    if not flooder.sock.recv(65536):
                        return

    workers = [threading.Thread(target=flood), threading.Thread(target=drain)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1)  # the flood is under way
        started = time.monotonic()
        assert_still_serving(server)
        # Without a turn between frames this waited for the whole flood (20 s).
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
        flooder.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_devices_answered(server):
    """A device connection gets its login answered (a wrong token here: no fleet needed)."""
    device = RawDevice(server.http_port)
    try:
        device.send(encode_login("f" * 32, 1))
        assert device.event() == Response(1, Status.INVALID_TOKEN)
    finally:
        device.close()


def test_half_a_method_word_costs_almost_no_cpu(port_server_factory):
    """`G` and `PO` could still become GET or POST: the connection waits for the
    rest, peeking again after 10 ms, then ever less often (not every 20 ms)."""
    device_server = port_server_factory()
    held = [socket.create_connection(("127.0.0.1", device_server.http_port)) for _ in range(300)]
    try:
        for n, sock in enumerate(held):
            sock.sendall(b"G" if n % 2 else b"PO")
        time.sleep(0.5)  # the first, quick peeks are over
        before = _cpu_seconds(device_server.process.pid)
        time.sleep(2)
        spent = _cpu_seconds(device_server.process.pid) - before
        # Polling every 20 ms: 30,000 peeks in these 2 s, most of a core.
        assert spent < 0.5, f"{spent:.2f} s of CPU for 300 idle half-requests"
        assert_devices_answered(device_server)
    finally:
        for sock in held:
            sock.close()


def test_http_clients_and_devices_have_a_limit_each(port_server_factory):
    server = port_server_factory(**{"http.max.connections": 5, "hardware.max.connections": 5})
    slow = [socket.create_connection(("127.0.0.1", server.http_port)) for _ in range(8)]
    try:
        for sock in slow:
            sock.sendall(b"GET /anything HTTP/1.1\r\n")  # and nothing more
        time.sleep(0.5)
        closed = 0
        for sock in slow:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:  # closed with its request line unread
                closed += 1
            except TimeoutError:
                pass
        assert closed == 3  # the HTTP clients over the limit
        assert_devices_answered(server)  # devices have their own
        assert "http.max.connections" in server.log()
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_device_reconnecting_in_a_loop_has_a_budget_of_log_lines(server, fleet):
    """Its first lines of the minute are logged; the rest are counted (/metrics)
    and named in one summary line (at the minute's end, or at the stop)."""
    token = fleet.add_device("looper@example.com", "Farm")
    logins = 40
    for _ in range(logins):
        device = RawDevice(server.http_port)
        assert device.log_in(token=token)[1] == Response(2, Status.OK)
        device.close()
    tag = token_tag(token)
    # A login line each, and for most a close ("replaced by a new connection").
    left_out = logins - DEVICE_LINES.per_device
    wait_until(lambda: _dropped_lines(server) >= left_out, message="the dropped lines counted")
    assert len([line for line in server.log().splitlines() if tag in line]) == (
        DEVICE_LINES.per_device
    )
    server.stop()
    (summary,) = [line for line in server.log().splitlines() if "left out" in line]
    assert " WARNING " in summary and "of 1 device(s)" in summary, summary
    assert int(re.search(rf": {tag} (\d+)$", summary).group(1)) >= left_out


def _dropped_lines(server) -> int:
    metrics = server.admin("GET", "/metrics", auth=None, secure=False).text
    count = re.search(r"^blynkota_device_log_lines_dropped_total (\S+)$", metrics, re.M)
    return int(float(count.group(1)))


def test_a_value_cut_to_its_column_is_counted_and_told_once_per_device_and_key(
    server_factory, fleet, app
):
    server = server_factory(**{"log.level": "DEBUG"})
    token = fleet.add_device("long@example.com", "Farm")
    long_ver = "1." + "9" * 38  # 40 characters, the column holds 32
    for _ in range(2):
        device = RawDevice(server.http_port)
        assert device.log_in(token=token, ver=long_ver)[1] == Response(2, Status.OK)
        device.close()

    def stored() -> str | None:
        with app.extensions["blynkota.db"].engine.connect() as connection:
            return connection.execute(
                sqlalchemy.text("SELECT lib_version FROM devices WHERE token = :t"), {"t": token}
            ).scalar_one()

    # The info message is answered at once; its report is written behind the answer.
    wait_until(lambda: stored() == long_ver[:32], message="the value stored, cut")
    metrics = server.admin("GET", "/metrics", auth=None, secure=False).text
    assert 'blynkota_values_cut_total{key="ver"} 2.0' in metrics
    told = [line for line in server.log().splitlines() if "cut to its column" in line]
    assert len(told) == 1 and " DEBUG " in told[0]
    assert (
        f"device {token_tag(token)}: ver cut to its column's 32 characters (it had 40)" in told[0]
    )
