"""The Procfile's process types: gunicorn for the admin API, device workers sharing a port.

Started as an operator starts them, with the real gunicorn and `python wsgi.py
devices --workers N`, on MariaDB (several processes need a server database;
SQLite is refused in one line).
"""

import base64
import http.client
import json
import signal
import socket
import subprocess
import sys
import time

import pytest
import sqlalchemy

from blynkota import create_app
from blynkota.protocol import Command, encode_frame
from blynkota.store import upgrade

from .blynk_standin import BlynkStandIn
from .devices import RawDevice
from .images import esp8266_image
from .servers import ADMIN_EMAIL, ADMIN_PASS, ROOT, clean_env, wait_until, write_properties

AUTH = "Basic " + base64.b64encode(f"{ADMIN_EMAIL}:{ADMIN_PASS}".encode()).decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def properties(tmp_path, db_url: str, **extra) -> dict:
    values = {
        "listen.address": "127.0.0.1",
        "data.folder": tmp_path / "data",
        "db.url": db_url,
        "admin.email": ADMIN_EMAIL,
        "admin.pass": ADMIN_PASS,
        "node.heartbeat.interval": 0.5,
        "shutdown.grace.seconds": 1,
        **extra,
    }
    return {"BLYNKOTA_CONFIG": str(write_properties(tmp_path / "p.properties", values))}


def run(command: list[str], env: dict, **options) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=clean_env(**env), **options)


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the process exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def request(port: int, method: str, path: str, headers: dict, body: bytes | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "blynkota-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="fw.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "wsgi.py", "devices"],
        [sys.executable, "-m", "gunicorn", "-k", "gevent", "-b", "127.0.0.1:0", "wsgi:app"],
    ],
    ids=["devices", "gunicorn"],
)
def test_multi_process_modes_refuse_sqlite_in_one_line(tmp_path, command):
    env = properties(tmp_path, f"sqlite:///{tmp_path / 'x.db'}", **{"http.port": 0})
    process = run(command, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("blynkota:")]
    assert len(lines) == 1 and "db.url" in lines[0] and "SQLite" in lines[0], stderr
    assert "Traceback" not in stderr


@pytest.mark.mysql
def test_gunicorn_serves_the_admin_api_behind_a_trusted_proxy(mysql_url, tmp_path):
    upgrade(mysql_url)  # the Procfile's release step
    port = free_port()
    env = properties(tmp_path, mysql_url, **{"trusted.proxies": "127.0.0.1/32"})
    process = run(
        [sys.executable, "-m", "gunicorn", "-k", "gevent", "-b", f"127.0.0.1:{port}", "wsgi:app"],
        env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        proxied = {"Authorization": AUTH, "X-Forwarded-Proto": "https"}
        status, _, body = request(port, "GET", "/admin/devices", proxied)
        assert (status, json.loads(body)) == (200, [])
        # Without the proxy's word it is plain HTTP: refused before any password is read.
        status, headers, body = request(port, "GET", "/admin/devices", {"Authorization": AUTH})
        assert status == 403 and b"https" in body and "www-authenticate" not in headers
        image = esp8266_image("Nov 29 2018 12:00:00")
        payload, content_type = multipart(image)
        status, _, path = request(
            port, "POST", "/admin/ota/start", {**proxied, "Content-Type": content_type}, payload
        )
        assert status == 200 and path.startswith(b"/static/ota/")
        status, headers, body = request(port, "GET", path.decode(), {})
        assert (status, body) == (200, image) and headers["content-length"] == str(len(image))
    finally:
        stop(process)


def test_forwarded_headers_count_only_from_trusted_proxies(tmp_path):
    app = create_app(
        {"data.folder": tmp_path / "data", "trusted.proxies": "10.0.0.0/8", "admin.pass": "x9"}
    )
    client = app.test_client()
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.1.1.1"}
    stranger = client.get(
        "/admin/devices", headers=headers, environ_base={"REMOTE_ADDR": "1.2.3.4"}
    )
    assert stranger.status_code == 403 and b"https" in stranger.data
    proxy = client.get("/admin/devices", headers=headers, environ_base={"REMOTE_ADDR": "10.0.0.5"})
    assert proxy.status_code == 401  # secure now: asks for credentials
    app.extensions["blynkota.db"].dispose()


@pytest.mark.mysql
@pytest.mark.parametrize("relayed", [False, True], ids=["standalone", "relayed"])
def test_device_workers_share_one_port_and_each_is_a_node(mysql_url, tmp_path, relayed):
    """Two device workers; relayed, each worker relays its own devices to the
    Blynk server, which decides their logins (blynkota adopts the tokens)."""
    upgrade(mysql_url)  # the Procfile's release step
    port = free_port()
    fleet = create_app({"db.url": mysql_url, "data.folder": tmp_path / "cli"}).extensions[
        "blynkota.fleet"
    ]
    if relayed:
        tokens = [f"{number:032x}" for number in range(7_000, 7_030)]
        upstream = BlynkStandIn(set(tokens)).start()
        settings = {"http.port": port, "relay.upstream": f"127.0.0.1:{upstream.port}"}
    else:
        tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(30)]
        upstream, settings = None, {"http.port": port}
    env = properties(tmp_path, mysql_url, **settings)
    log = open(tmp_path / "workers.log", "w")  # noqa: SIM115 (closed with the process)
    process = run(
        [sys.executable, "wsgi.py", "devices", "--workers", "2"], env, stdout=log, stderr=log
    )
    engine = sqlalchemy.create_engine(mysql_url)
    devices = []
    try:
        wait_until(lambda: _alive_nodes(engine) == 2, timeout=60, message="two device workers")
        for token in tokens:
            device = RawDevice(port)
            device.log_in(token=token)
            devices.append(device)
        if relayed:
            frame = encode_frame(Command.HARDWARE, 3, b"vw\x001\x001")
            for device in devices:
                device.send(frame)
            wait_until(lambda: all(upstream.bytes_from(token).endswith(frame) for token in tokens),
                       message="every device's virtual write upstream")  # fmt: skip
        wait_until(lambda: sum(count for _, count in _held(engine)) == 30,
                   message="every device online, in the database")  # fmt: skip
        host = socket.gethostname()
        assert [name for name, _ in _held(engine)] == [f"{host}:{port}/0", f"{host}:{port}/1"]
    finally:
        for device in devices:
            device.close()
        assert stop(process) == 0
        if upstream is not None:
            upstream.stop()
    assert _alive_nodes(engine) == 0  # each worker left the fleet on SIGTERM
    engine.dispose()
    assert "Traceback" not in (tmp_path / "workers.log").read_text()


def _held(engine) -> list:
    """(node name, devices online there), by node."""
    with engine.connect() as connection:
        return connection.execute(
            sqlalchemy.text(
                "SELECT n.name, count(d.id) FROM devices d JOIN nodes n ON n.id = d.node_id "
                "GROUP BY n.name ORDER BY n.name"
            )
        ).all()


def _alive_nodes(engine) -> int:
    with engine.connect() as connection:
        return connection.execute(
            sqlalchemy.text("SELECT count(*) FROM nodes WHERE stopped_at IS NULL")
        ).scalar_one()
