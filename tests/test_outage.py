"""The database goes away and comes back (issue: scale out).

The server reaches MariaDB through a forwarder the test cuts: while it is
cut, logins are refused with SERVER_ERROR and a clean close, the outage is
one log line (not one per device), and afterwards presence is reconciled: a
device that left during the outage is not shown online.
"""

import re
import time

import gevent
import pytest
import sqlalchemy

from blynkota import create_app
from blynkota.protocol import (
    Command,
    Ignored,
    Response,
    Status,
    encode_frame,
    encode_info,
    encode_login,
)
from blynkota.store import upgrade
from blynkota.web.ops import READY_DEADLINE

from .blynk_standin import BlynkStandIn
from .devices import BUILD_OLD, RawDevice
from .proxy import CuttableProxy
from .servers import ServerProcess, wait_until

pytestmark = pytest.mark.mysql


@pytest.fixture
def proxied_url(mysql_url):
    url = sqlalchemy.engine.make_url(mysql_url)
    proxy = CuttableProxy((url.host, url.port or 3306)).start()
    yield proxy, url.set(port=proxy.port).render_as_string(hide_password=False)
    proxy.stop()


def online(engine) -> dict[str, bool]:
    with engine.connect() as connection:
        rows = connection.execute(sqlalchemy.text("SELECT token, node_id FROM devices")).all()
    return {token: node is not None for token, node in rows}


def test_a_database_outage_refuses_logins_cleanly_and_presence_recovers(
    mysql_url, proxied_url, tmp_path
):
    proxy, url = proxied_url
    upgrade(mysql_url)
    app = create_app({"db.url": mysql_url, "data.folder": tmp_path / "cli"})
    fleet = app.extensions["blynkota.fleet"]
    engine = app.extensions["blynkota.db"].engine
    leaving, late, *others = [fleet.add_device("me@example.com", "Farm") for _ in range(7)]
    server = ServerProcess(tmp_path, url).start()
    try:
        present = RawDevice(server.http_port)
        assert present.log_in(token=leaving)[0] == Response(1, Status.OK)
        wait_until(lambda: online(engine)[leaving], message="the device online")

        proxy.cut()
        present.close()  # leaves while its disconnect cannot be written
        for token in others:
            device = RawDevice(server.http_port)
            device.send(encode_login(token, 1))
            assert device.event(timeout=40) == Response(1, Status.SERVER_ERROR)
            assert device.closed_within(5)
            device.close()
        log = server.log()
        assert log.count("database unreachable") == 1, log
        assert "Traceback" not in log
        # A load balancer's check says so, and so does Prometheus.
        ready = server.admin("GET", "/readyz", auth=None, secure=False)
        assert ready.status == 503 and ready.json()["database"].startswith("unreachable")
        metrics = server.admin("GET", "/metrics", auth=None, secure=False).text
        assert "blynkota_database_up 0.0" in metrics
        # An admin request gets a line to act on, not a 500 and a traceback.
        status = server.admin("GET", "/admin/ota/status")
        assert status.status == 503, status
        assert status.text == "The database is unavailable: try again shortly.\n"
        assert status.headers["retry-after"] == "5"
        assert "GET /admin/ota/status: the database is unavailable" in server.log()
        assert 'blynkota_database_errors_total{kind="unreachable"} 0.0' not in metrics

        proxy.restore()
        wait_until(lambda: "database reachable again" in server.log(), timeout=60,
                   message="the server to see the database back")  # fmt: skip
        assert server.admin("GET", "/readyz", auth=None, secure=False).status == 200
        wait_until(lambda: not online(engine)[leaving], timeout=10,
                   message="the device that left during the outage to be offline")  # fmt: skip
        device = RawDevice(server.http_port)
        assert device.log_in(token=late)[0] == Response(1, Status.OK)
        wait_until(lambda: online(engine)[late], message="a login after the outage")
        device.close()
        assert "Traceback" not in server.log()
    finally:
        server.stop()
        app.extensions["blynkota.db"].dispose()


def test_a_report_lost_after_its_answer_is_told_to_the_device(mysql_url, proxied_url, tmp_path):
    """An info message is answered at once and its report written behind it.
    When that write fails, the device hears SERVER_ERROR for the same message
    and is closed: it reconnects and reports again, and nothing was half-recorded."""
    proxy, url = proxied_url
    upgrade(mysql_url)
    app = create_app({"db.url": mysql_url, "data.folder": tmp_path / "cli"})
    token = app.extensions["blynkota.fleet"].add_device("me@example.com", "Farm")
    engine = app.extensions["blynkota.db"].engine

    def reported_build():
        with engine.connect() as connection:
            query = sqlalchemy.text("SELECT build FROM devices WHERE token = :token")
            return connection.execute(query, {"token": token}).scalar_one()

    server = ServerProcess(tmp_path, url).start()
    try:
        device = RawDevice(server.http_port)
        device.send(encode_login(token, 1))
        assert device.event() == Response(1, Status.OK)
        # The login is durable: the info message is answered without waiting.
        wait_until(lambda: online(engine)[token], message="the device online")
        proxy.cut()
        device.send(encode_info({"ver": "0.6.1", "h-beat": "10", "build": BUILD_OLD}, 2))
        assert device.event() == Response(2, Status.OK)
        assert device.event(timeout=40) == Response(2, Status.SERVER_ERROR)
        assert device.closed_within(5)
        device.close()

        proxy.restore()
        wait_until(lambda: "database reachable again" in server.log(), timeout=60,
                   message="the server to see the database back")  # fmt: skip
        assert reported_build() is None
        again = RawDevice(server.http_port)
        assert again.log_in(token=token) == (Response(1, Status.OK), Response(2, Status.OK))
        wait_until(lambda: reported_build() == BUILD_OLD, message="the report recorded")
        again.close()
        assert "Traceback" not in server.log()
    finally:
        server.stop()
        app.extensions["blynkota.db"].dispose()


def test_an_info_message_waiting_for_a_lost_login_write_is_answered_server_error(
    mysql_url, proxied_url, tmp_path
):
    """A storm's info message waits for its login's presence write (nothing
    durable before the login is). When that write fails, the info message is
    answered SERVER_ERROR and the device closed, as when the database is away
    at the login itself; the next login goes through."""
    proxy, url = proxied_url
    upgrade(mysql_url)
    app = create_app({"db.url": mysql_url, "data.folder": tmp_path / "cli"})
    token = app.extensions["blynkota.fleet"].add_device("me@example.com", "Farm")
    engine = app.extensions["blynkota.db"].engine
    server = ServerProcess(tmp_path, url).start()
    holder = engine.connect()
    try:
        first = RawDevice(server.http_port)
        assert first.log_in(token=token) == (Response(1, Status.OK), Response(2, Status.OK))
        first.close()  # now the server knows the token: the next login asks nothing first
        wait_until(lambda: not online(engine)[token], message="the device offline")

        # The device's row is locked (not through the proxy): the presence write waits.
        holder.begin()
        holder.execute(sqlalchemy.text("SELECT id FROM devices FOR UPDATE")).all()
        device = RawDevice(server.http_port)
        device.send(encode_login(token, 1))
        assert device.event() == Response(1, Status.OK)
        device.send(encode_info({"ver": "0.6.1", "h-beat": "10", "build": BUILD_OLD}, 2))
        with pytest.raises(TimeoutError):
            device.event(timeout=1)  # the info message waits for the login's write
        proxy.cut()  # the waiting write fails with its connection
        assert device.event(timeout=40) == Response(2, Status.SERVER_ERROR)
        assert device.closed_within(5)
        device.close()
        holder.rollback()

        proxy.restore()
        wait_until(lambda: "database reachable again" in server.log(), timeout=60,
                   message="the server to see the database back")  # fmt: skip
        again = RawDevice(server.http_port)
        assert again.log_in(token=token) == (Response(1, Status.OK), Response(2, Status.OK))
        wait_until(lambda: online(engine)[token], message="the device online")
        again.close()
        assert "Traceback" not in server.log()
    finally:
        holder.close()
        server.stop()
        app.extensions["blynkota.db"].dispose()


def test_a_database_shutting_down_is_one_line_whatever_is_asked_meanwhile(
    mysql_url, proxied_url, tmp_path
):
    """MariaDB stopping answers the next command on each open connection with
    1053 ("Server shutdown in progress") and refuses new ones. Pooled
    connections it killed are dropped quietly: no pool traceback for each."""
    proxy, url = proxied_url
    upgrade(mysql_url)
    app = create_app({"db.url": mysql_url, "data.folder": tmp_path / "cli"})
    tokens = [
        app.extensions["blynkota.fleet"].add_device("me@example.com", "Farm") for _ in range(4)
    ]
    server = ServerProcess(tmp_path, url).start()
    try:
        devices = [RawDevice(server.http_port) for _ in tokens]
        for device, token in zip(devices, tokens, strict=True):
            assert device.log_in(token=token)[0] == Response(1, Status.OK)
        # Connections in the pool, some idle and some in use, when it stops.
        for _ in range(3):
            assert server.admin("GET", "/readyz", auth=None, secure=False).status == 200
            assert server.admin("GET", "/admin/ota/status").status == 200
        proxy.shut_down()
        for _ in range(6):
            assert server.admin("GET", "/readyz", auth=None, secure=False).status == 503
            assert server.admin("GET", "/admin/ota/status").status == 503
            gevent.sleep(0.5)
        proxy.restore()
        wait_until(lambda: "database reachable again" in server.log(), timeout=60,
                   message="the server to see the database back")  # fmt: skip
        assert server.admin("GET", "/readyz", auth=None, secure=False).status == 200
        log = server.log()
        assert log.count("database unreachable") == 1, log
        assert "Traceback" not in log and "Exception during reset" not in log, log
        for device in devices:
            device.close()
    finally:
        server.stop()
        app.extensions["blynkota.db"].dispose()


def test_a_database_that_stops_answering_fails_readiness_in_time_without_a_traceback(
    mysql_url, proxied_url, tmp_path
):
    """The network drops the database's packets (or it is stopped with SIGSTOP):
    every readiness check still answers within its deadline, and the
    connections it cut off are dropped, never pooled with an answer pending."""
    proxy, url = proxied_url
    upgrade(mysql_url)
    server = ServerProcess(tmp_path, url).start()
    try:
        assert server.admin("GET", "/readyz", auth=None, secure=False).status == 200
        proxy.hang()
        for _ in range(3):
            started = time.monotonic()
            ready = server.admin("GET", "/readyz", auth=None, secure=False)
            assert ready.status == 503 and ready.json()["database"] == "unreachable (Timeout)"
            assert time.monotonic() - started < READY_DEADLINE + 2
        proxy.flow()
        wait_until(
            lambda: server.admin("GET", "/readyz", auth=None, secure=False).status == 200,
            message="readiness back",
        )
        assert server.admin("GET", "/admin/ota/status").status == 200
        log = server.log()
        assert "Traceback" not in log and "Exception during reset" not in log, log
    finally:
        proxy.flow()
        server.stop()


def test_logins_the_database_cannot_serve_are_counted_and_told_in_one_warning(
    mysql_url, proxied_url, tmp_path
):
    """A slow database and a pool of one connection: the logins that find no
    connection free within db.pool.timeout are closed, counted by cause, and
    told in one WARNING line, not silently."""
    proxy, url = proxied_url
    upgrade(mysql_url)
    app = create_app({"db.url": mysql_url, "data.folder": tmp_path / "cli"})
    fleet = app.extensions["blynkota.fleet"]
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(20)]
    server = ServerProcess(tmp_path, url, **{"db.pool.size": 1, "db.pool.timeout": 0.1}).start()
    try:
        proxy.slow(0.3)  # every round trip 0.6 s: the one connection is never free for long
        devices = []
        # Logins are looked up and written in batches, so whether a batch finds the
        # one connection taken (by another batch, the sweep or the offer fill) is a
        # matter of timing: logins keep coming, a few a second, until some are shed.
        deadline = time.monotonic() + 40
        told = False
        while not told and time.monotonic() < deadline and len(devices) < 400:
            token = tokens[len(devices) % len(tokens)]
            device = RawDevice(server.http_port)  # the login, and the info that waits for its write
            device.send(encode_login(token, 1) + encode_info({"build": BUILD_OLD}, 2))
            devices.append(device)
            if len(devices) >= len(tokens):  # a first burst of all of them, then a trickle
                gevent.sleep(0.1)
            told = "the database could not serve them" in server.log()
        assert told, f"no line about shed logins after {len(devices)} logins"
        (line,) = [entry for entry in server.log().splitlines() if "could not serve" in entry]
        assert " WARNING " in line
        shed = int(re.search(r"in time \(db\.pool\.size\): (\d+)", line).group(1))
        assert 1 <= shed <= len(devices)
        proxy.slow(0)
        metrics = server.admin("GET", "/metrics", auth=None, secure=False).text
        counted = re.search(r'blynkota_sessions_shed_total\{cause="pool_timeout"\} (\S+)', metrics)
        assert int(float(counted.group(1))) >= shed
        for device in devices:
            device.close()
        assert "Traceback" not in server.log()
    finally:
        proxy.slow(0)
        server.stop()
        app.extensions["blynkota.db"].dispose()


def test_relayed_devices_keep_their_blynk_server_while_the_database_is_away(
    mysql_url, proxied_url, tmp_path
):
    """Relay mode: the upstream decides logins, so a database outage costs the
    devices their updates only. A device already relayed keeps relaying; one that
    logs in meanwhile is relayed without updates, and recorded when it comes back."""
    proxy, url = proxied_url
    upgrade(mysql_url)
    engine = sqlalchemy.create_engine(mysql_url)
    present_token, late_token = "1" * 32, "2" * 32
    upstream = BlynkStandIn({present_token, late_token}).start()
    server = ServerProcess(tmp_path, url, **{"relay.upstream": f"127.0.0.1:{upstream.port}"})
    server.start()
    try:
        present = RawDevice(server.http_port)
        assert present.log_in(token=present_token) == (Response(1, 200), Response(2, 200))
        wait_until(lambda: online(engine).get(present_token), message="adopted, online")

        proxy.cut()
        late = RawDevice(server.http_port)
        assert late.log_in(token=late_token) == (Response(1, 200), Response(2, 200))
        for number, (device, token) in enumerate(((present, present_token), (late, late_token))):
            frame = encode_frame(Command.HARDWARE, 10 + number, b"vw\x001\x00%d" % number)
            device.send(frame)
            wait_until(lambda t=token, f=frame: upstream.bytes_from(t).endswith(f),
                       message="a virtual write upstream during the outage")  # fmt: skip
            upstream.send(token, frame)
            assert device.event() == Ignored(10 + number, Command.HARDWARE, frame[5:])
        wait_until(lambda: "relayed without updates: database" in server.log(),
                   message="the line about the login not recorded")  # fmt: skip

        proxy.restore()
        wait_until(lambda: "database reachable again" in server.log(), timeout=60,
                   message="the server to see the database back")  # fmt: skip
        late.close()
        again = RawDevice(server.http_port)
        assert again.log_in(token=late_token) == (Response(1, 200), Response(2, 200))
        wait_until(lambda: online(engine).get(late_token), message="recorded when it came back")
        assert "Traceback" not in server.log()
        present.close()
        again.close()
    finally:
        server.stop()
        upstream.stop()
        engine.dispose()
