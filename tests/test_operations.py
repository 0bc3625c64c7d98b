"""What monitoring sees: /healthz, /readyz, Prometheus /metrics, and JSON log lines."""

import json
import re

import pytest

from blynkota import create_app
from blynkota.logsafe import token_tag
from blynkota.protocol import Response, Status, encode_login
from blynkota.simulator import SimulatedDevice
from blynkota.store import upgrade

from .devices import RawDevice
from .images import esp8266_image
from .servers import ServerProcess, sqlite_fleet, wait_until

OLD, NEW = "Jan  1 2026 00:00:00", "Nov 28 2026 10:00:00"
IMAGE_SIZE = 100_000


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """A server logging JSON, whose /metrics only 10.0.0.0/8 reaches without a password."""
    folder = tmp_path_factory.mktemp("operations")
    db_url, (token,) = sqlite_fleet(folder, [("ops@example.com", "Plant", "")])
    server = ServerProcess(
        folder, db_url, **{"log.format": "json", "allowed.metrics.ips": "10.0.0.0/8"}
    ).start()
    yield server, token
    server.stop()


def _metrics(server: ServerProcess) -> dict[str, float]:
    answer = server.admin("GET", "/metrics")
    assert answer.status == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for line in answer.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_health_and_readiness_on_both_ports(monitored):
    server, _ = monitored
    for secure in (False, True):
        health = server.admin("GET", "/healthz", auth=None, secure=secure)
        assert (health.status, health.text) == (200, "ok\n")
        ready = server.admin("GET", "/readyz", auth=None, secure=secure)
        assert ready.status == 200
        assert ready.json() == {
            "ready": True,
            "database": "ok",
            "listeners": {"devices": True, "admin": True},
        }


def test_metrics_count_logins_offers_downloads_and_the_fleet(monitored):
    server, token = monitored
    image = esp8266_image(NEW, size=IMAGE_SIZE)
    before = _metrics(server)
    refused = RawDevice(server.http_port)
    refused.send(encode_login("0" * 32, 1))
    assert refused.event() == Response(1, Status.INVALID_TOKEN)
    refused.close()
    device = SimulatedDevice("127.0.0.1", server.http_port, token, OLD)
    running = device.start()
    try:
        wait_until(lambda: device.logins >= 1, message="the device logged in")
        started = server.upload(f"/admin/ota/start?token={token}", image)
        assert started.status == 200, started.text
        wait_until(lambda: device.updates == 1, timeout=30, message="the update")
        wait_until(
            lambda: (
                _metrics(server).get('blynkota_rollout_devices{rollout="1",state="updated"}') == 1
            ),
            message="the rollout's row updated",
        )
        after = _metrics(server)
    finally:
        device.stop()
        running.join(10)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0)

    assert grew("blynkota_logins_total") == 2  # before and after the update
    assert grew('blynkota_login_failures_total{reason="invalid_token"}') == 1
    assert grew("blynkota_offers_total") == 1
    assert grew("blynkota_downloads_started_total") == 1
    assert grew("blynkota_downloads_completed_total") == 1
    assert grew("blynkota_downloads_interrupted_total") == 0
    assert grew("blynkota_download_bytes_total") == len(image)
    assert after["blynkota_database_up"] == 1
    connected = [name for name in after if name.startswith("blynkota_devices_connected{")]
    assert len(connected) == 1 and after[connected[0]] == 1  # one node, one device
    assert after["blynkota_sweep_seconds_count"] > 0  # this process holds the sweeper lease
    rollouts = {
        name: value for name, value in after.items() if name.startswith("blynkota_rollouts{")
    }
    assert rollouts in ({'blynkota_rollouts{state="active"}': 1.0},
                        {'blynkota_rollouts{state="complete"}': 1.0})  # fmt: skip
    builds = {name: value for name, value in after.items()
              if name.startswith("blynkota_devices_by_build{")}  # fmt: skip
    assert builds == {f'blynkota_devices_by_build{{build="{NEW}",fw_version=""}}': 1.0}


def test_metrics_need_an_allowed_address_or_an_admin(monitored):
    server, _ = monitored
    plain = server.admin("GET", "/metrics", auth=None, secure=False)
    assert plain.status == 403
    assert plain.text == (
        "Address 127.0.0.1 is not in allowed.metrics.ips "
        "(or scrape the HTTPS port with an admin's basic auth).\n"
    )
    assert server.admin("GET", "/metrics", auth=None).status == 401
    assert server.admin("GET", "/metrics", auth=("admin@blynk.cc", "wrong")).status == 403
    assert server.admin("GET", "/metrics").status == 200


def test_metrics_answer_loopback_without_a_password_by_default(tmp_path):
    app = create_app({"data.folder": tmp_path, "db.url": f"sqlite:///{tmp_path / 'm.db'}"})
    upgrade(app.config["SETTINGS"].db_url)
    client = app.test_client()
    for address in ("127.0.0.1", "::1"):
        answer = client.get("/metrics", environ_base={"REMOTE_ADDR": address})
        assert answer.status_code == 200
        assert b"blynkota_database_up 1.0" in answer.data
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "192.0.2.7"}).status_code == 403
    app.extensions["blynkota.db"].dispose()


def test_json_log_lines_name_the_device_the_rollout_and_the_node(monitored):
    server, token = monitored
    wait_until(lambda: "sent ota" in server.log(), message="an offer in the log")
    lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "event"} <= line.keys() for line in lines)
    assert token not in server.log()  # the token only as its tag
    tag = token_tag(token)
    login = re.compile(r"device t:\w+ \(id \d+\).*logged in")
    logged_in = [line for line in lines if login.match(line["event"])]
    assert logged_in and all(line["device"] == tag and line["node"] for line in logged_in)
    offered = [line for line in lines if "sent ota" in line["event"]]
    assert offered and all(line["device"] == tag and line["rollout"] == 1 for line in offered)


def test_json_access_lines_carry_their_fields(monitored):
    server, _ = monitored
    assert server.admin("GET", "/admin/ota/status?limit=3").status == 200
    wait_until(lambda: '"path": "/admin/ota/status"' in server.log(), message="the access line")
    lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    (access,) = [line for line in lines if line.get("path") == "/admin/ota/status"][-1:]
    assert access["method"] == "GET" and access["status"] == 200 and access["client"] == "127.0.0.1"
    assert access["bytes"] > 0 and 0 <= access["duration"] < 30
    assert "limit" not in access["event"]  # the query never reaches the log


def test_the_json_line_of_a_replaced_connection_names_its_device(monitored):
    """A session closed by another (the device's newer connection, here
    answered from the event loop or a greenlet alike) names its device."""
    server, token = monitored
    first, second = RawDevice(server.http_port), RawDevice(server.http_port)
    try:
        assert first.log_in(token=token)[0] == Response(1, Status.OK)
        assert second.log_in(token=token)[0] == Response(1, Status.OK)
        assert first.closed_within(5)
    finally:
        first.close()
        second.close()
    lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    replaced = [line for line in lines if line["event"].endswith("replaced by a new connection")]
    assert replaced and all(line["device"] == token_tag(token) for line in replaced)
