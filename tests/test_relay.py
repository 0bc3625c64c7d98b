"""Relay mode on real sockets: blynkota in front of a Blynk server stand-in (and of
another blynkota), every frame passed through, the updates added."""

import contextlib
import socket
import ssl
import struct
import time

import gevent
import pytest
import sqlalchemy

from blynkota.protocol import Command, Response, Status, encode_frame, encode_info, encode_login
from blynkota.simulator import SimulatedDevice
from blynkota.tls import ensure_certificate

from .blynk_standin import BlynkStandIn
from .devices import BUILD_NEW, BUILD_OLD, TOKEN, RawDevice
from .images import esp8266_image
from .servers import wait_until

HEADER = struct.Struct("!BHH")
OTHER = "fedcba9876543210fedcba9876543210"
INFO = {"ver": "0.6.1", "h-beat": "10", "buff-in": "256", "dev": "ESP8266", "build": BUILD_OLD}


def rows(app, sql: str, **params):
    with app.extensions["blynkota.db"].engine.connect() as connection:
        return connection.execute(sqlalchemy.text(sql), params).all()


@pytest.fixture
def upstream():
    standin = BlynkStandIn({TOKEN, OTHER}).start()
    yield standin
    standin.stop()


@pytest.fixture
def relay(server_factory, upstream):
    return server_factory(**{"relay.upstream": f"127.0.0.1:{upstream.port}"})


@pytest.fixture
def socket_relay(port_server_factory, upstream):
    """A relay on SQLite alone, for what the database has no part in."""
    return port_server_factory(**{"relay.upstream": f"127.0.0.1:{upstream.port}"})


def read_exactly(sock: socket.socket, size: int, timeout: float = 5) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _relays_both_ways(device: RawDevice, upstream: BlynkStandIn) -> None:
    """Log in through the relay, then one virtual write each way, byte for byte."""
    assert device.log_in(TOKEN) == (Response(1, 200), Response(2, 200))
    frame = encode_frame(Command.HARDWARE, 21, b"vw\x002\x007")
    device.send(frame)
    wait_until(lambda: upstream.bytes_from(TOKEN).endswith(frame), message="relayed upstream")
    upstream.send(TOKEN, frame)
    assert read_exactly(device.sock, len(frame)) == frame


def test_every_frame_passes_through_unchanged_both_ways(relay, upstream, app):
    device = RawDevice(relay.http_port)
    login = encode_login(TOKEN, 1)
    info = encode_info(INFO, 2)
    sent = [
        login,
        info,
        encode_frame(Command.HARDWARE, 3, b"vw\x005\x0042"),
        encode_frame(Command.PING, 4),
        HEADER.pack(150, 5, 3) + b"abc",  # a reserved command type: the upstream judges it
        encode_frame(Command.HARDWARE, 6, b"x" * 4000),  # past the standalone bound
    ]
    wire = b"".join(sent)
    for at in range(0, len(wire), 7):  # in 7-byte segments
        device.send(wire[at : at + 7])
    wait_until(lambda: upstream.bytes_from(TOKEN) == wire, message="every byte upstream")

    answers = [device.event() for _ in range(3)]  # login, info, ping: answered by the upstream
    assert answers == [Response(1, 200), Response(2, 200), Response(4, 200)]
    from_server = [
        encode_frame(Command.HARDWARE, 7, b"vw\x001\x00on"),
        encode_frame(Command.INTERNAL, 8, b"rtc\x00sync"),
        HEADER.pack(Command.RESPONSE, 9, 2),
    ]
    upstream.send(TOKEN, b"".join(from_server))
    assert read_exactly(device.sock, sum(map(len, from_server))) == b"".join(from_server)
    # What blynkota read on the way: the device is known, with its build, online.
    wait_until(lambda: rows(app, "SELECT build FROM devices WHERE token = :t", t=TOKEN)
               == [(BUILD_OLD,)], message="the info message recorded")  # fmt: skip
    (owner,) = rows(
        app,
        "SELECT u.email FROM devices d JOIN projects p ON p.id = d.project_id "
        "JOIN users u ON u.id = p.user_id WHERE d.token = :t",
        t=TOKEN,
    )
    assert owner[0] == "owner-unknown@relay.blynkota"
    device.close()


def test_the_upstream_decides_every_login(relay, upstream, fleet, app):
    known_here = fleet.add_device("me@example.com", "Farm")  # unknown to the upstream
    refused = RawDevice(relay.http_port)
    refused.send(encode_login(known_here, 1))
    assert refused.event() == Response(1, Status.INVALID_TOKEN)
    assert refused.closed_within(2)
    # A token the upstream accepts and blynkota knows: its own row, its own owner.
    fleet.add_device("me@example.com", "Farm", token=OTHER)
    accepted = RawDevice(relay.http_port)
    assert accepted.log_in(OTHER) == (Response(1, 200), Response(2, 200))
    assert rows(app, "SELECT COUNT(*) FROM devices WHERE token = :t", t=OTHER) == [(1,)]
    assert upstream.logins[-2:] == [(known_here, 9), (OTHER, 200)]
    accepted.close()


def test_an_update_goes_through_the_relay(relay, upstream, app):
    """The whole update, with the board's virtual writes going up and the
    upstream's commands coming down before the update and after it."""
    board = SimulatedDevice("127.0.0.1", relay.http_port, TOKEN, BUILD_OLD, chatter=0.1)
    running = board.start()
    commands = gevent.spawn(_command_every, upstream, TOKEN, 0.1)
    try:
        wait_until(board.ready.is_set, message="the board logged in through the relay")
        wait_until(lambda: len(_hardware(board.frames)) >= 3, message="commands reach the board")
        answer = relay.upload(f"/admin/ota/start?token={TOKEN}", esp8266_image(BUILD_NEW))
        assert answer.status == 200, answer.text
        wait_until(
            lambda: rows(app, "SELECT state FROM rollout_devices") == [("updated",)],
            timeout=30,
            message="updated through the relay",
        )
        assert board.build == BUILD_NEW and board.logins == 2
        offered_at = next(at for at, event in enumerate(board.frames) if _is_ota(event))
        wait_until(lambda: len(_hardware(board.frames[offered_at:])) >= 3,
                   message="commands reach the board on its new build")  # fmt: skip
        wait_until(lambda: all(session.count(b"vw\x001\x00") >= 3
                               for session in upstream.sessions_of(TOKEN)),
                   message="virtual writes upstream from both builds")  # fmt: skip
    finally:
        commands.kill()
        board.stop()
        running.join(10)
    # The upstream saw both logins and both info messages, and never the ota.
    assert [status for token, status in upstream.logins if token == TOKEN] == [200, 200]
    sessions = upstream.sessions_of(TOKEN)
    assert len(sessions) == 2
    assert BUILD_OLD.encode() in sessions[0] and BUILD_NEW.encode() in sessions[1]
    assert all(b"ota\x00" not in session for session in sessions)
    # Every command arrived whole and in order: numbered 1, 2, 3... within each session.
    for session in (board.frames[:offered_at], board.frames[offered_at:]):
        numbers = [int(event.body.split(b"\0")[-1]) for event in _hardware(session)]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def _command_every(upstream: BlynkStandIn, token: str, interval: float) -> None:
    """The upstream's own commands to the board (`vw 2 <n>`), whichever connection is its."""
    for number in range(1, 10_000):
        with contextlib.suppress(KeyError, OSError):  # between two connections
            upstream.send(token, encode_frame(Command.HARDWARE, number, b"vw\x002\x00%d" % number))
        gevent.sleep(interval)


def _hardware(frames: list) -> list:
    return [event for event in frames if getattr(event, "command", None) == Command.HARDWARE]


def _is_ota(event) -> bool:
    return getattr(event, "words", ())[:1] == ("ota",)


def test_a_dead_upstream_closes_every_relayed_device_and_they_come_back(port_server_factory):
    tokens = [f"{number:032x}" for number in range(1000)]
    upstream = BlynkStandIn(set(tokens)).start()
    try:
        relay = port_server_factory(**{"relay.upstream": f"127.0.0.1:{upstream.port}"})
        devices = []
        for token in tokens:
            device = RawDevice(relay.http_port)
            device.send(encode_login(token, 1))
            devices.append(device)
        assert all(device.event(timeout=10) == Response(1, 200) for device in devices)
        started = time.monotonic()
        upstream.stop()
        assert all(device.closed_within(2) for device in devices)
        assert time.monotonic() - started < 3, "every relayed device closed within 2 s"
        upstream.start(upstream.port)
        for token in tokens[:20]:
            again = RawDevice(relay.http_port)
            assert again.log_in(token) == (Response(1, 200), Response(2, 200))
            again.close()
        assert "Traceback" not in relay.log()
    finally:
        upstream.stop()


def test_an_unreachable_upstream_closes_the_device_unanswered(port_server_factory, relay_port_free):
    server = port_server_factory(**{"relay.upstream": f"127.0.0.1:{relay_port_free}"})
    for _ in range(3):
        device = RawDevice(server.http_port)
        device.send(encode_login(TOKEN, 1))
        assert device.event(timeout=10) is None  # closed, no answer: the library tries again
    wait_until(lambda: "could not be reached" in server.log(), message="the one line")
    assert server.log().count("could not be reached") == 1
    assert "Traceback" not in server.log()


def test_an_upstream_that_does_not_answer_in_time(port_server_factory):
    """One that never accepts (its backlog full): closed unanswered after
    relay.connect.timeout, counted as a timeout. One that accepts and says
    nothing: closed when the login's time is up. Neither holds the device."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = []
    with contextlib.suppress(TimeoutError):  # until one is left waiting: the backlog is full
        for _ in range(3):
            queued.append(socket.create_connection(full.getsockname(), timeout=0.5))
    try:
        cases = (
            (full, 1, 'blynkota_relay_connect_failures_total{cause="timeout"} 1.0'),
            (silent, 2, 'blynkota_login_failures_total{reason="no_login"} 1.0'),
        )
        for upstream, seconds, counted in cases:
            server = port_server_factory(**{
                "relay.upstream": f"127.0.0.1:{upstream.getsockname()[1]}",
                "relay.connect.timeout": "1",
                "hard.socket.idle.timeout": "2",
            })  # fmt: skip
            device = RawDevice(server.http_port)
            device.send(encode_login(TOKEN, 1))
            started = time.monotonic()
            assert device.event(timeout=10) is None
            assert seconds - 0.5 < time.monotonic() - started < seconds + 2
            assert counted in server.admin("GET", "/metrics", auth=None, secure=False).text
            assert "Traceback" not in server.log()
    finally:
        for sock in (silent, full, *queued):
            sock.close()


def test_a_silent_relayed_device_is_closed_after_its_heartbeat_span(socket_relay, upstream):
    """h-beat 1: closed after ceil(1 × 2.3) = 3 s of silence, counted from its
    last frame (a ping at 2 s moves the deadline to 5 s), and its upstream too."""
    device = RawDevice(socket_relay.http_port)
    started = time.monotonic()
    assert device.log_in(TOKEN, **{"h-beat": "1"}) == (Response(1, 200), Response(2, 200))
    time.sleep(2)
    device.send(encode_frame(Command.PING, 3))
    assert device.event() == Response(3, 200)
    assert device.closed_within(5)
    assert 4.5 < time.monotonic() - started < 6.5
    wait_until(lambda: TOKEN in upstream.ended, timeout=1, message="the upstream side closed")
    wait_until(lambda: "silent too long" in socket_relay.log(), message="the line saying why")


@pytest.fixture
def relay_port_free():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_device_that_leaves_closes_its_upstream_connection(socket_relay, upstream):
    device = RawDevice(socket_relay.http_port)
    assert device.log_in(TOKEN) == (Response(1, 200), Response(2, 200))
    wait_until(lambda: TOKEN in upstream.connections, message="relayed")
    device.close()
    wait_until(lambda: TOKEN in upstream.ended, timeout=1, message="the upstream side closed")


def test_a_relayed_device_over_its_rate_is_closed_both_ways(socket_relay, upstream):
    """blynkota keeps its own limits in relay mode: past hardware.max.messages.per.sec
    (100) the device is closed, and so is its upstream connection."""
    device = RawDevice(socket_relay.http_port)
    assert device.log_in(TOKEN) == (Response(1, 200), Response(2, 200))
    frame = encode_frame(Command.HARDWARE, 3, b"vw\x001\x001")
    device.send(frame * 150)
    assert device.closed_within(2)
    wait_until(lambda: TOKEN in upstream.ended, timeout=1, message="the upstream side closed")
    assert upstream.bytes_from(TOKEN).count(frame) < 150
    wait_until(lambda: "more than 100 frames in a second" in socket_relay.log(),
               message="the line saying why")  # fmt: skip


def test_relayed_over_tls_to_an_upstream_with_its_own_certificate(port_server_factory, tmp_path):
    ensure_certificate(tmp_path / "cert.pem", tmp_path / "key.pem")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    upstream = BlynkStandIn({TOKEN}, tls=context).start()
    try:
        relay = port_server_factory(**{
            "relay.upstream": f"127.0.0.1:{upstream.port}",
            "relay.upstream.ssl": str(tmp_path / "cert.pem"),  # the CA: itself
        })  # fmt: skip
        device = RawDevice(relay.http_port)
        _relays_both_ways(device, upstream)
        device.close()
    finally:
        upstream.stop()


def test_blynkota_in_front_of_blynkota(server_factory, server, fleet, app, tmp_path):
    """The upstream a standalone blynkota (it answers logins from its own fleet)."""
    token = fleet.add_device("me@example.com", "Farm")
    relay = server_factory(**{
        "relay.upstream": f"127.0.0.1:{server.http_port}",
        "db.url": f"sqlite:///{tmp_path / 'relay.db'}",
        "data.folder": str(tmp_path / "relay-data"),
    })  # fmt: skip
    device = RawDevice(relay.http_port)
    assert device.log_in(token) == (Response(1, 200), Response(2, 200))
    device.send(encode_frame(Command.PING, 3))
    assert device.event() == Response(3, 200)  # answered by the upstream blynkota
    wait_until(lambda: rows(app, "SELECT node_id IS NOT NULL FROM devices WHERE token = :t",
                            t=token) == [(1,)], message="online upstream")  # fmt: skip
    stranger = RawDevice(relay.http_port)
    stranger.send(encode_login("0" * 32, 1))
    assert stranger.event() == Response(1, Status.INVALID_TOKEN)
    device.close()


def test_what_an_operator_sees_of_the_relay(socket_relay, upstream):
    relay = socket_relay
    ready = relay.admin("GET", "/readyz", auth=None, secure=False).json()
    assert ready["ready"] is True
    assert ready["upstream"] == {
        "address": f"127.0.0.1:{upstream.port}",
        "tls": "false",
        "reachable": None,  # no device has logged in yet
        "last_error": None,
    }
    device = RawDevice(relay.http_port)
    assert device.log_in(TOKEN) == (Response(1, 200), Response(2, 200))
    ready = relay.admin("GET", "/readyz", auth=None, secure=False).json()
    assert ready["upstream"]["reachable"] is True
    metrics = relay.admin("GET", "/metrics", auth=None, secure=False).text
    assert "blynkota_relayed_sessions 1.0" in metrics
    assert "blynkota_relay_frames_from_devices_total 2.0" in metrics  # login, info
    assert "blynkota_relay_frames_from_upstream_total 2.0" in metrics  # their answers
    assert "blynkota_relay_connect_seconds_count 1.0" in metrics
    page = relay.admin("GET", "/admin/fleet").text
    assert f"Blynk server at\n  <b>127.0.0.1:{upstream.port}</b>" in page
    assert "<b>Reachable</b> at the last login" in page
    upstream.stop()
    assert device.closed_within(2)
    refused = RawDevice(relay.http_port)
    refused.send(encode_login(TOKEN, 1))
    assert refused.event(timeout=10) is None
    ready = relay.admin("GET", "/readyz", auth=None, secure=False)
    assert ready.status == 200 and ready.json()["upstream"]["reachable"] is False
    assert (
        'blynkota_relay_connect_failures_total{cause="refused"} 1.0'
        in relay.admin("GET", "/metrics", auth=None, secure=False).text
    )


def _tls_device(port: int) -> RawDevice:
    """A board built with the library's _SSL headers: TLS to the HTTPS port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return RawDevice.over(context.wrap_socket(raw))


def test_a_device_over_tls_on_the_https_port_standalone(server, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    device = _tls_device(server.https_port)
    assert device.log_in(token) == (Response(1, 200), Response(2, 200))
    device.send(encode_frame(Command.PING, 3))
    assert device.event() == Response(3, 200)
    answer = server.upload(f"/admin/ota/start?token={token}", esp8266_image(BUILD_NEW))
    assert answer.status == 200, answer.text
    ota = device.event()
    assert ota.words[0] == "ota"
    assert ota.words[1].startswith(f"http://127.0.0.1:{server.http_port}/static/ota/")
    # The same port still answers HTTPS.
    assert server.admin("GET", "/admin/ota/status").status == 200
    assert server.admin("GET", "/healthz", auth=None).text == "ok\n"
    device.close()


def test_a_device_over_tls_on_the_https_port_relayed(socket_relay, upstream):
    device = _tls_device(socket_relay.https_port)
    _relays_both_ways(device, upstream)
    device.close()
    wait_until(lambda: TOKEN in upstream.ended, timeout=1, message="the upstream side closed")
    assert socket_relay.admin("GET", "/healthz", auth=None).text == "ok\n"


def test_now_true_reaches_the_relayed_devices(relay, upstream, app):
    devices = []
    for token in (TOKEN, OTHER):
        device = RawDevice(relay.http_port)
        assert device.log_in(token) == (Response(1, 200), Response(2, 200))
        devices.append(device)
    answer = relay.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW))
    assert answer.status == 200, answer.text
    for device in devices:
        ota = device.event(timeout=10)
        assert ota.words[0] == "ota" and "/static/ota/" in ota.words[1]
    assert rows(app, "SELECT state FROM rollout_devices ORDER BY id") == [("offered",)] * 2
    for token in (TOKEN, OTHER):
        assert b"ota\x00" not in upstream.bytes_from(token)
    for device in devices:
        device.close()
