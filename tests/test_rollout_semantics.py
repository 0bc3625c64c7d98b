"""Rollouts that mean what operators mean (issue: rollout semantics): a finished
single-device update lets its device go, a start answers JSON when asked, waves
grow on small fleets and say why they wait, failed attempts and regressions
pause a bad firmware early, hardware that cannot run an image is never
offered it, a server crash costs no attempt, per-rollout limits, retry, and
deleting devices and files."""

import json

import pytest
import sqlalchemy

from blynkota.protocol import Response, Status, encode_login
from blynkota.simulator import SimulatedDevice

from .devices import BUILD_NEW, BUILD_OLD, RawDevice
from .images import esp32_image, esp8266_image
from .servers import wait_until
from .test_downloads import raw_get

BUILD_NEWER = "Jun  6 2019 06:06:06"

sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def rows(app, sql: str, **params):
    with app.extensions["blynkota.db"].engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sqlalchemy.text(sql), params)]


def test_a_finished_single_device_update_lets_a_later_campaign_reach_the_device(
    server, simulated, fleet, app
):
    token = fleet.add_device("me@example.com", "Farm")
    device = simulated(token, BUILD_OLD)
    wait_until(device.ready.is_set)
    assert server.upload(f"/admin/ota/start?token={token}", esp8266_image(BUILD_NEW)).status == 200
    wait_until(lambda: device.build == BUILD_NEW, message="the single-device update")
    wait_until(lambda: rows(app, "SELECT state FROM rollout_devices") == [("updated",)])

    campaign = server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEWER))
    assert campaign.status == 200
    wait_until(lambda: device.build == BUILD_NEWER, message="the campaign after it")
    # The board flashed; the server learns it from the next login's info (written behind).
    wait_until(lambda: rows(app, "SELECT state FROM rollout_devices ORDER BY rollout_id")
               == [("updated",), ("updated",)], message="both updates recorded")  # fmt: skip
    (summary, single) = server.admin("GET", "/admin/ota/status").json()
    assert summary["scope"] == "all" and summary["counts"]["updated"] == 1
    assert single["scope"] == "device" and single["counts"]["updated"] == 1


def test_a_single_device_update_still_in_flight_keeps_its_device(server, simulated, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    device = simulated(token, BUILD_OLD, fail="refuse")  # never takes an update
    wait_until(device.ready.is_set)
    server.upload(f"/admin/ota/start?token={token}", esp8266_image(BUILD_NEW))
    wait_until(lambda: device.ota_urls, message="the single-device offer")
    server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEWER))
    wait_until(lambda: rows(app, "SELECT enrol_due_at FROM rollouts WHERE scope = 'all'")
               == [(None,)], message="the campaign's enrolment")  # fmt: skip
    (campaign, _) = server.admin("GET", "/admin/ota/status").json()
    assert campaign["device_count"] == 0  # the device rollout still holds it


@sqlite_only
def test_a_start_answers_json_when_asked_and_the_blynk_path_otherwise(server, fleet, tmp_path):
    for _ in range(3):
        fleet.add_device("me@example.com", "Farm")
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(esp8266_image(BUILD_NEW))
    status, plain = server.curl_upload("?user=me@example.com", firmware)
    assert status == 200 and plain.startswith("/static/ota/") and plain.endswith(".bin")

    answer = server.curl(
        "-F", f"file=@{firmware}", "--insecure", "-u", server.credentials,
        "-H", "Accept: application/json", f"{server.admin_url}/admin/ota/start",
    )  # fmt: skip
    started = json.loads(answer.stdout)
    assert started["path"].startswith("/static/ota/")
    assert started["scope"] == "all" and started["devices"] == 3
    assert started["build"] == BUILD_NEW
    (newest, _) = server.admin("GET", "/admin/ota/status").json()
    assert newest["id"] == started["rollout"]


@sqlite_only
def test_waves_grow_on_a_fleet_smaller_than_the_wave_minimum(server, simulated, fleet, app):
    """The README's own example on 30 devices: with ota.wave.min.devices at its
    default (10), the first wave has about 3 devices, and is judged on them."""
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(30)]
    devices = [simulated(token, BUILD_OLD) for token in tokens]
    wait_until(lambda: all(device.ready.is_set() for device in devices), timeout=30)
    answer = server.upload("/admin/ota/start?now=true&waves=10,50,100&success=95",
                           esp8266_image(BUILD_NEW))  # fmt: skip
    assert answer.status == 200, answer.text
    wait_until(lambda: all(device.build == BUILD_NEW for device in devices), timeout=60,
               message="every wave of a small fleet")  # fmt: skip
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    assert rollout["percent"] == 100 and rollout["next_wave"] == "in its last wave"


@sqlite_only
def test_a_rollout_waiting_for_its_wave_says_why(server, fleet):
    for _ in range(30):
        fleet.add_device("me@example.com", "Farm")  # none of them connects
    server.upload("/admin/ota/start?waves=10,50,100&success=95", esp8266_image(BUILD_NEW))
    wait_until(lambda: "has logged in since the start"
               in (server.admin("GET", "/admin/ota/status").json()[0]["next_wave"] or ""),
               message="the reason in the status")  # fmt: skip
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    assert rollout["percent"] in (10, 50)  # 50 only if no device hashed into the first wave


@sqlite_only
def test_a_bad_firmware_pauses_after_the_first_failed_attempts(server_factory, fleet, app):
    """Failed attempts count, not only devices that used all of theirs: with a
    minute of backoff between attempts, no device has used its 3 attempts when
    the rollout pauses."""
    server = server_factory(**{"ota.retry.backoff": 60, "ota.abort.min.devices": 6})
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(12)]
    devices = [SimulatedDevice("127.0.0.1", server.http_port, token, BUILD_OLD, fail="old-build")
               for token in tokens]  # fmt: skip
    try:
        for device in devices:
            device.start()
        wait_until(lambda: all(device.ready.is_set() for device in devices), timeout=30)
        server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW))
        wait_until(lambda: server.admin("GET", "/admin/ota/status").json()[0]["state"]
                   == "paused", timeout=60, message="the pause")  # fmt: skip
        (rollout,) = server.admin("GET", "/admin/ota/status").json()
        assert "failed an attempt" in rollout["pause_reason"]
        assert rows(app, "SELECT max(attempts) FROM rollout_devices") == [(1,)]
        assert rows(app, "SELECT count(*) FROM rollout_devices WHERE state = 'failed'") == [(0,)]
    finally:
        for device in devices:
            device.stop()


def _fleet_on(server, tokens, build):
    devices = [SimulatedDevice("127.0.0.1", server.http_port, token, build) for token in tokens]
    for device in devices:
        device.start()
    wait_until(lambda: all(device.ready.is_set() for device in devices), timeout=30)
    return devices


def _stop(devices) -> None:
    for device in devices:
        device.stop()


@sqlite_only
def test_a_device_back_on_its_old_build_after_updating_is_a_regression_offered_again(
    server_factory, fleet, app
):
    server = server_factory(**{"ota.retry.backoff": 0.2})
    token = fleet.add_device("me@example.com", "Farm")
    (device,) = _fleet_on(server, [token], BUILD_OLD)
    try:
        server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW))
        wait_until(lambda: rows(app, "SELECT state FROM rollout_devices") == [("updated",)])
    finally:
        device.stop()
    (rolled_back,) = _fleet_on(server, [token], BUILD_OLD)  # a rollback by hand
    try:
        wait_until(lambda: rows(app, "SELECT reverts FROM rollout_devices") == [(1,)],
                   message="the regression recorded")  # fmt: skip
        wait_until(lambda: rolled_back.build == BUILD_NEW, message="the update offered again")
        wait_until(
            lambda: (
                rows(app, "SELECT state, last_error FROM rollout_devices") == [("updated", None)]
            ),
            message="updated again, the stale error cleared",
        )
        (event,) = rows(app, "SELECT detail FROM rollout_events "
                             "WHERE from_state = 'updated' AND to_state = 'pending'")  # fmt: skip
        assert f"came back with build {BUILD_OLD}" in event[0]
        (rollout,) = server.admin("GET", "/admin/ota/status").json()
        assert rollout["reverted"] == 1 and rollout["counts"]["updated"] == 1
        assert "rollout 1: device 1 updated -> pending: reverted" in server.log()
    finally:
        rolled_back.stop()


@sqlite_only
def test_regressions_count_towards_the_pause(server_factory, fleet, app):
    server = server_factory(**{"ota.retry.backoff": 60, "ota.abort.min.devices": 3})
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(4)]
    devices = _fleet_on(server, tokens, BUILD_OLD)
    try:
        server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW))
        wait_until(
            lambda: (
                rows(app, "SELECT state, count(*) FROM rollout_devices GROUP BY state")
                == [("updated", 4)]
            )
        )
        assert server.admin("GET", "/admin/ota/status").json()[0]["state"] in (
            "active",
            "complete",  # every device has its outcome, for now
        )
    finally:
        _stop(devices)
    devices = _fleet_on(server, tokens, BUILD_OLD)
    try:
        wait_until(lambda: server.admin("GET", "/admin/ota/status").json()[0]["state"]
                   == "paused", timeout=30, message="the pause")  # fmt: skip
        (rollout,) = server.admin("GET", "/admin/ota/status").json()
        assert "of 4 devices with an outcome failed an attempt" in rollout["pause_reason"]
        wait_until(lambda: server.admin("GET", "/admin/ota/status").json()[0]["reverted"] == 4,
                   message="every regression counted")  # fmt: skip
    finally:
        _stop(devices)


@sqlite_only
def test_an_image_is_never_offered_to_hardware_that_cannot_run_it(server, simulated, fleet, app):
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(3)]
    devices = [simulated(token, BUILD_OLD) for token in tokens]  # report dev=ESP8266
    wait_until(lambda: all(device.ready.is_set() for device in devices))
    image = esp32_image(BUILD_NEW)

    dry = server.upload("/admin/ota/start?dryRun=true", image).json()
    assert dry["chip"] == "esp32" and dry["devices"] == []
    assert sorted(entry["token"] for entry in dry["incompatible"]) == sorted(tokens)
    assert dry["incompatible"][0]["reason"] == (
        "the image is for ESP32, the device reports dev=ESP8266"
    )

    single = server.upload(f"/admin/ota/start?token={tokens[0]}", image)
    assert single.status == 400
    assert single.text == "Not sent: the image is for ESP32, the device reports dev=ESP8266."

    assert server.upload("/admin/ota/start?now=true", image).status == 200
    wait_until(lambda: rows(app, "SELECT state, count(*) FROM rollout_devices GROUP BY state")
               == [("incompatible", 3)], message="the devices judged")  # fmt: skip
    assert all(device.ota_urls == [] for device in devices)
    assert rows(app, "SELECT count(*) FROM ota_commands") == [(0,)]
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    assert rollout["counts"]["incompatible"] == 3
    detail = server.admin("GET", f"/admin/ota/rollouts/{rollout['id']}").json()
    assert {d["last_error"] for d in detail["devices"]} == {
        "the image is for ESP32, the device reports dev=ESP8266"
    }


@sqlite_only
def test_an_attempt_cut_by_the_servers_own_crash_is_not_charged(server_factory, fleet, app):
    server = server_factory(**{"ota.retry.backoff": 60})
    token = fleet.add_device("me@example.com", "Farm")
    device = SimulatedDevice("127.0.0.1", server.http_port, token, BUILD_OLD, fail="refuse")
    device.start()
    try:
        wait_until(device.ready.is_set)
        server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW))
        wait_until(lambda: device.ota_urls, message="the offer")
        server.restart()  # kill -9 before the download completed
        wait_until(lambda: len(device.ota_urls) == 2, timeout=30,
                   message="offered again at once, with no backoff")  # fmt: skip
        assert rows(app, "SELECT state, attempts FROM rollout_devices") == [("offered", 1)]
        (event,) = rows(app, "SELECT detail FROM rollout_events WHERE from_state = 'offered' "
                             "AND to_state = 'pending'")  # fmt: skip
        assert "not counted, the server stopped before the download completed" in event[0]
    finally:
        device.stop()


@sqlite_only
@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("maxConcurrent=0", "maxConcurrent"),
        ("maxAttempts=abc", "maxAttempts"),
        ("attemptTimeout=1e3", "attemptTimeout"),
        ("attemptTimeout=8d", "attemptTimeout"),
        ("abortRatio=1.5", "abortRatio"),
        ("abortRatio=nan", "abortRatio"),
        ("waveDelay=24h", "waveDelay needs waves"),
    ],
)
def test_per_rollout_limits_are_checked(server, query, named):
    answer = server.upload(f"/admin/ota/start?{query}", esp8266_image(BUILD_NEW))
    assert answer.status == 400 and named in answer.text
    assert server.admin("GET", "/admin/ota/status").json() == []


@sqlite_only
def test_per_rollout_limits_are_shown_and_hold(server_factory, fleet, app):
    server = server_factory(**{"ota.max.concurrent": 50})
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(6)]
    devices = [SimulatedDevice("127.0.0.1", server.http_port, token, BUILD_OLD, fail="refuse")
               for token in tokens]  # fmt: skip
    try:
        for device in devices:
            device.start()
        wait_until(lambda: all(device.ready.is_set() for device in devices))
        answer = server.upload(
            "/admin/ota/start?now=true&maxConcurrent=2&attemptTimeout=1&maxAttempts=1"
            "&abortRatio=1&healthWindow=5m", esp8266_image(BUILD_NEW),
        )  # fmt: skip
        assert answer.status == 200, answer.text
        (rollout,) = server.admin("GET", "/admin/ota/status").json()
        assert rollout["limits"] == {
            "max_concurrent": 2,
            "attempt_timeout": 1,
            "max_attempts": 1,
            "abort_ratio": 1.0,
            "wave_delay": None,
            "health_window": 300,
        }
        # Devices that never download: each holds its slot until its one attempt
        # times out (1 s), then is failed; never more than 2 offered at once.
        wait_until(lambda: rows(app, "SELECT state, count(*) FROM rollout_devices GROUP BY state")
                   == [("failed", 6)], timeout=30, message="every attempt timed out")  # fmt: skip
        holding = most = 0
        for (to_state,) in rows(app, "SELECT to_state FROM rollout_events "
                                     "WHERE device_id IS NOT NULL ORDER BY id"):  # fmt: skip
            holding += {"offered": 1, "failed": -1}.get(to_state, 0)
            most = max(most, holding)
        assert most == 2
        (detail,) = set(rows(app, "SELECT last_error FROM rollout_devices"))
        assert detail == ("timed out",)
    finally:
        for device in devices:
            device.stop()


@sqlite_only
def test_retry_gives_failed_devices_a_fresh_set_of_attempts(server_factory, fleet, app):
    server = server_factory()
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(3)]
    failing = [SimulatedDevice("127.0.0.1", server.http_port, token, BUILD_OLD, fail="old-build")
               for token in tokens]  # fmt: skip
    for device in failing:
        device.start()
    try:
        wait_until(lambda: all(device.ready.is_set() for device in failing))
        server.upload("/admin/ota/start?now=true&maxAttempts=1", esp8266_image(BUILD_NEW))
        wait_until(lambda: rows(app, "SELECT state, count(*) FROM rollout_devices GROUP BY state")
                   == [("failed", 3)], message="every device failed its one attempt")  # fmt: skip
    finally:
        _stop(failing)
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    devices = _fleet_on(server, tokens, BUILD_OLD)  # fixed boards, same tokens
    try:
        answer = server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/retry")
        assert answer.status == 200 and answer.json()["retried"] == 3
        wait_until(lambda: all(device.build == BUILD_NEW for device in devices),
                   message="the retried devices flashed")  # fmt: skip
        # Each board's next login reports its build; the server records it behind the answer.
        wait_until(lambda: rows(app, "SELECT DISTINCT state, attempts FROM rollout_devices")
                   == [("updated", 1)], message="recorded as updated")  # fmt: skip
        gone = server.admin("POST", "/admin/ota/rollouts/99/retry")
        assert gone.status == 404
    finally:
        _stop(devices)


@sqlite_only
def test_wave_delay_holds_a_successful_wave(server, fleet, app):
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(20)]
    devices = _fleet_on(server, tokens, BUILD_OLD)
    try:
        answer = server.upload("/admin/ota/start?now=true&waves=50,100&waveDelay=1h",
                               esp8266_image(BUILD_NEW))  # fmt: skip
        assert answer.status == 200, answer.text
        wait_until(lambda: rows(app, "SELECT count(*) FROM rollout_devices WHERE state = 'updated'")
                   == [(len(rows(app, "SELECT id FROM rollout_devices")),)]
                   and server.admin("GET", "/admin/ota/status").json()[0]["next_wave"]
                   .endswith("(waveDelay)"), message="the first wave done, held")  # fmt: skip
        (rollout,) = server.admin("GET", "/admin/ota/status").json()
        assert rollout["percent"] == 50 and rollout["limits"]["wave_delay"] == 3600
    finally:
        _stop(devices)


@sqlite_only
def test_delete_a_device(server, simulated, fleet, app):
    busy, leaving = (
        fleet.add_device("me@example.com", "Farm"),
        fleet.add_device("me@example.com", "Farm"),
    )
    held = simulated(busy, BUILD_OLD, fail="refuse")  # keeps its offer in flight
    gone = simulated(leaving, BUILD_OLD)
    wait_until(lambda: held.ready.is_set() and gone.ready.is_set())
    server.upload(f"/admin/ota/start?token={leaving}", esp8266_image(BUILD_NEWER))
    wait_until(lambda: gone.build == BUILD_NEWER)
    # Back to BUILD_NEW for `gone`, older than the BUILD_NEWER it runs: asked for.
    server.upload("/admin/ota/start?now=true&allowDowngrade=true", esp8266_image(BUILD_NEW))
    wait_until(lambda: held.ota_urls and gone.build == BUILD_NEW)

    refused = server.admin("DELETE", f"/admin/devices/{busy}")
    assert refused.status == 409 and "in flight" in refused.text
    assert server.admin("DELETE", "/admin/devices/nosuchtoken").status == 404
    answer = server.admin("DELETE", f"/admin/devices/{leaving}")
    assert answer.status == 200, answer.text
    tokens = {device["token"] for device in server.admin("GET", "/admin/devices").json()}
    assert tokens == {busy}
    assert rows(app, "SELECT scope FROM rollouts") == [("all",)]  # its own rollout went too
    again = RawDevice(server.http_port)
    again.send(encode_login(leaving, 1))  # only the login: the server closes after refusing it
    assert again.event() == Response(1, Status.INVALID_TOKEN)
    again.close()
    assert leaving not in server.log() and busy not in server.log()


@sqlite_only
def test_delete_a_firmware_file(server, fleet):
    path = server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).text
    name = path.rsplit("/", 1)[1].removesuffix(".bin")
    assert server.admin("GET", path, auth=None).status == 200
    assert raw_get(server.http_port, f"GET {path} HTTP/1.0\r\n\r\n")[1].startswith(b"HTTP/1.1 200")
    in_use = server.admin("DELETE", f"/admin/firmware/{name}")
    assert in_use.status == 409 and "running rollout(s) 1" in in_use.text
    server.admin("POST", "/admin/ota/rollouts/1/stop")
    answer = server.admin("DELETE", f"/admin/firmware/{name}")
    assert answer.status == 200, answer.text
    assert server.admin("DELETE", f"/admin/firmware/{name}").status == 404
    assert server.admin("GET", "/admin/firmware").json() == []
    assert server.admin("GET", path, auth=None).status == 404
    request = f"GET {path} HTTP/1.0\r\n\r\n"
    wait_until(lambda: raw_get(server.http_port, request)[1].startswith(b"HTTP/1.1 404"),
               timeout=10, message="the fast path to notice")  # fmt: skip
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    assert rollout["firmware"]["name"] == name  # the history keeps naming it
