"""Firmware identity on a real server, with simulated boards of every library
generation: 1.3.x boards updated, types that must match, no downgrade unless
asked, signed uploads, one firmware per content, and a re-send that re-sends."""

import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest
import sqlalchemy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from blynkota.ota.firmware.signatures import fingerprint

from .devices import BUILD_NEW, BUILD_OLD
from .images import esp32_image, esp8266_image
from .servers import ROOT, ServerProcess, clean_env, wait_until
from .test_identity_rules import signed_esp8266

TYPE = "TMPLabc123"
JSON = {"Accept": "application/json"}


def rows(app, sql: str, **params):
    with app.extensions["blynkota.db"].engine.connect() as connection:
        return connection.execute(sqlalchemy.text(sql), params).all()


def image_1_3(version: str, build: str = BUILD_NEW, fw_type: str = TYPE) -> bytes:
    """A sketch built with library 1.3.2 (its blnkinf block as that library lays it out)."""
    fields = {"mcu": version, "fw-type": fw_type, "blynk": "1.3.2", "h-beat": "45",
              "buff-in": "1024", "dev": "NodeMCU"}  # fmt: skip
    return esp8266_image(build, fields=fields)


def start(server, query: str, image: bytes, filename: str = "fw.bin"):
    return server.admin(
        "POST", f"/admin/ota/start{query}", files={"file": (filename, image)}, headers=JSON
    )


def test_a_board_on_library_1_3_is_updated_and_known_by_version_and_type(
    server, simulated, fleet, app
):
    token = fleet.add_device("me@example.com", "Farm")
    board = simulated(token, BUILD_OLD, library="1.3.2", fw="1.0.0", fw_type=TYPE,
                      hardware="NodeMCU", buff_in=1024)  # fmt: skip
    wait_until(board.ready.is_set, message="the 1.3.x board's info answered")
    (listed,) = server.admin("GET", "/admin/devices").json()
    assert (listed["fw_version"], listed["fw_type"], listed["lib_version"]) == (
        "1.0.0", TYPE, "1.3.2",
    )  # fmt: skip
    assert (listed["build"], listed["hardware"]) == (BUILD_OLD, "NodeMCU")

    started = start(server, "?now=true", image_1_3("1.1.0"), filename="pump-1.1.0.bin")
    assert started.status == 200, started.text
    firmware = started.json()["firmware"]
    assert (firmware["fw_version"], firmware["fw_type"], firmware["lib_version"]) == (
        "1.1.0", TYPE, "1.3.2",
    )  # fmt: skip
    assert firmware["title"] == f"1.1.0 ({TYPE})" and firmware["signed_by"] is None
    wait_until(lambda: board.fw == "1.1.0" and board.logins == 2 and board.ready.is_set(),
               timeout=30, message="the update and the reboot")  # fmt: skip
    wait_until(lambda: rows(app, "SELECT state FROM rollout_devices") == [("updated",)],
               message="the board updated")  # fmt: skip
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    assert rollout["firmware"]["title"] == f"1.1.0 ({TYPE})"
    (listed,) = server.admin("GET", "/admin/devices").json()
    assert (listed["fw_version"], listed["build"]) == ("1.1.0", BUILD_NEW)
    (stored,) = server.admin("GET", "/admin/firmware").json()
    assert (stored["fw_version"], stored["fw_type"], stored["title"]) == (
        "1.1.0", TYPE, f"1.1.0 ({TYPE})",
    )  # fmt: skip


def test_another_type_is_incompatible_in_the_dry_run_and_refused_for_one_device(
    server, simulated, fleet
):
    token = fleet.add_device("me@example.com", "Farm")
    board = simulated(token, BUILD_OLD, library="1.3.2", fw="1.0.0", fw_type="TMPLxyz")
    wait_until(board.ready.is_set)
    image = image_1_3("1.1.0")
    dry = start(server, "?dryRun=true", image).json()
    assert dry["devices"] == []
    (entry,) = dry["incompatible"]
    assert entry["reason"] == f"firmware type {TYPE}, the device reports TMPLxyz"
    single = server.upload(f"/admin/ota/start?token={token}", image)
    assert (single.status, single.text) == (
        400, f"Not sent: firmware type {TYPE}, the device reports TMPLxyz.",
    )  # fmt: skip


def test_no_downgrade_unless_the_start_allows_it(server, simulated, fleet, app):
    newer, current = (fleet.add_device("me@example.com", "Farm") for _ in range(2))
    devices = [
        simulated(newer, BUILD_OLD, library="1.3.2", fw="1.3.0", fw_type=TYPE),
        simulated(current, BUILD_OLD, library="1.3.2", fw="1.2.0", fw_type=TYPE),
    ]
    wait_until(lambda: all(device.ready.is_set() for device in devices))
    image = image_1_3("1.2.0")
    dry = start(server, "?dryRun=true", image).json()
    assert dry["devices"] == []  # one newer, one on that version already
    (entry,) = dry["incompatible"]
    assert (entry["token"], entry["reason"]) == (newer, "would downgrade 1.3.0 to 1.2.0")
    refused = server.upload(f"/admin/ota/start?token={newer}", image)
    assert refused.status == 400 and "would downgrade 1.3.0 to 1.2.0" in refused.text
    allowed = start(server, "?dryRun=true&allowDowngrade=true", image).json()
    assert [entry["token"] for entry in allowed["devices"]] == [newer]

    assert start(server, "?now=true", image).status == 200
    wait_until(lambda: sorted(rows(app, "SELECT state FROM rollout_devices"))
               == [("incompatible",), ("updated",)], message="both judged")  # fmt: skip
    assert all(device.ota_urls == [] for device in devices)
    assert start(server, "?now=true&allowDowngrade=true", image).status == 200
    wait_until(lambda: devices[0].fw == "1.2.0", timeout=30, message="the asked-for downgrade")


def test_without_versions_an_older_build_is_a_downgrade(server, simulated, fleet):
    token = fleet.add_device("me@example.com", "Farm")
    board = simulated(token, "Feb  1 2019 00:00:00")
    wait_until(board.ready.is_set)
    dry = start(server, "?dryRun=true", esp8266_image("Aug 14 2017 20:31:49")).json()
    assert [entry["reason"] for entry in dry["incompatible"]] == [
        "would downgrade build Feb  1 2019 00:00:00 to Aug 14 2017 20:31:49"
    ]


def test_a_nodemcu_board_is_not_offered_an_esp32_image(server, simulated, fleet):
    token = fleet.add_device("me@example.com", "Farm")
    board = simulated(token, BUILD_OLD, hardware="NodeMCU")
    wait_until(board.ready.is_set)
    dry = start(server, "?dryRun=true", esp32_image(BUILD_NEW)).json()
    assert [entry["reason"] for entry in dry["incompatible"]] == [
        "the image is for ESP32, the device reports dev=NodeMCU"
    ]
    single = server.upload(f"/admin/ota/start?token={token}", esp32_image(BUILD_NEW))
    assert single.status == 400


def test_the_same_bytes_twice_are_one_firmware_and_rollouts_say_which(server, fleet, app):
    image = esp8266_image(BUILD_NEW)
    first = start(server, "", image, filename="pump.bin").json()
    second = start(server, "", image, filename="pump-again.bin").json()
    assert second["path"] == first["path"] and second["firmware"]["reused"] is True
    assert first["firmware"]["reused"] is False
    assert rows(app, "SELECT count(*) FROM firmware") == [(1,)]
    statuses = server.admin("GET", "/admin/ota/status").json()
    assert [status["firmware"]["title"] for status in statuses] == [
        f"pump.bin, build {BUILD_NEW}"
    ] * 2
    # Deleted, its bytes may come again as a new firmware.
    server.admin("GET", "/admin/ota/stop")
    name = first["path"].rsplit("/", 1)[1].removesuffix(".bin")
    assert server.admin("DELETE", f"/admin/firmware/{name}").status == 200
    third = start(server, "", image).json()
    assert third["path"] != first["path"] and third["firmware"]["reused"] is False


def _silent_download_start(port: int, url: str) -> socket.socket:
    """A download request whose answer is never read: the download has begun."""
    parts = urlsplit(url)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {parts.path}?{parts.query} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    return sock


def test_a_resend_to_a_board_that_has_not_begun_its_download_goes_out_at_once(
    server, simulated, fleet, app
):
    token = fleet.add_device("me@example.com", "Farm")
    board = simulated(token, BUILD_OLD, fail="refuse")  # takes the offer, never downloads
    wait_until(board.ready.is_set)
    first = start(server, f"?token={token}", esp8266_image(BUILD_NEW)).json()
    wait_until(lambda: len(board.ota_urls) == 1, message="the first ota")
    name = first["path"].rsplit("/", 1)[1]
    again = server.admin("GET", f"/admin/ota/start?fileName={name}&token={token}", headers=JSON)
    assert again.status == 200 and again.json()["waiting"] is None
    wait_until(lambda: len(board.ota_urls) == 2, timeout=5, message="the ota sent again at once")
    states = rows(app, "SELECT r.id, d.state FROM rollout_devices d JOIN rollouts r "
                       "ON r.id = d.rollout_id ORDER BY r.id")  # fmt: skip
    assert [state for _, state in states] == ["superseded", "offered"]

    # Once the board is downloading, a re-send waits for it, and says so.
    downloading = _silent_download_start(server.http_port, board.ota_urls[-1])
    try:
        # A small file is in the socket's buffers at once: downloading, then downloaded.
        wait_until(lambda: {("downloading",), ("downloaded",)}
                   & set(rows(app, "SELECT state FROM rollout_devices")),
                   message="the download begun")  # fmt: skip
        waits = server.admin("GET", f"/admin/ota/start?fileName={name}&token={token}", headers=JSON)
        assert waits.status == 200
        assert waits.json()["waiting"] == (
            "an update is in flight already: this one follows when it ends"
        )
        plain = server.admin("GET", f"/admin/ota/start?fileName={name}&token={token}")
        assert plain.text == f"/static/ota/{name}"  # the Blynk answer stays the path
        assert len(board.ota_urls) == 2
    finally:
        downloading.close()


def test_a_token_update_to_a_board_that_runs_the_image_already_is_not_sent(
    server, simulated, fleet, app
):
    """A ?token= offer is judged by the rules of every other offer (one rule set,
    rollouts/offering.py): a board already on the image is not sent it again."""
    token = fleet.add_device("me@example.com", "Farm")
    board = simulated(token, BUILD_NEW)
    wait_until(board.ready.is_set)
    answer = start(server, f"?token={token}", esp8266_image(BUILD_NEW))
    assert answer.status == 200, answer.text
    assert answer.json()["waiting"] == "the device runs this firmware already"
    assert rows(app, "SELECT state FROM rollout_devices") == [("updated",)]
    assert rows(app, "SELECT COUNT(*) FROM ota_commands") == [(0,)]
    time.sleep(0.5)  # a frame written would have reached the board by now
    assert board.ota_urls == []


@pytest.fixture(scope="module")
def signing_key():
    return rsa.generate_private_key(65537, 2048)


def test_with_signing_keys_only_signed_uploads_are_taken(
    server_factory, app, signing_key, tmp_path
):
    public = tmp_path / "release-key.pem"
    public.write_bytes(
        signing_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    server = server_factory(**{"ota.signing.keys": public})
    unsigned = start(server, "", esp8266_image(BUILD_NEW))
    assert unsigned.status == 400
    assert unsigned.text == "Not signed: ota.signing.keys requires a signature on every upload."
    other = rsa.generate_private_key(65537, 2048)
    foreign = start(server, "", signed_esp8266(esp8266_image(BUILD_NEW), other))
    assert foreign.status == 400 and foreign.text.startswith("Signed by an unknown key")
    signed = start(server, "", signed_esp8266(esp8266_image(BUILD_NEW), signing_key))
    assert signed.status == 200, signed.text
    name = fingerprint(signing_key.public_key())
    assert signed.json()["firmware"]["signed_by"] == name
    (listed,) = server.admin("GET", "/admin/firmware").json()
    assert listed["signed_by"] == name
    assert rows(app, "SELECT signed_by FROM firmware") == [(name,)]


def test_a_signing_key_that_is_not_a_key_stops_the_start_with_one_line(tmp_path):
    (tmp_path / "key.pem").write_text("not a key\n")
    server = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'x.db'}",
                           **{"ota.signing.keys": tmp_path / "key.pem"})  # fmt: skip
    with pytest.raises(RuntimeError, match="exited"):
        server.start(timeout=20)
    assert server.process.returncode == 2
    assert f"ota.signing.keys: {tmp_path / 'key.pem'}: not a PEM public key" in server.log()
    assert "Traceback" not in server.log()


def test_the_simulator_speaks_every_library_layout(server, fleet, app):
    """The command line too: `--library 1.3.2 --fw 2.0.0 --fw-type T --dev NodeMCU`."""
    token = fleet.add_device("me@example.com", "Farm")
    run = subprocess.run(
        [sys.executable, "-m", "blynkota.simulator", "--port", str(server.http_port),
         "--token", token, "--build", BUILD_OLD, "--library", "1.3.2", "--fw", "2.0.0",
         "--fw-type", TYPE, "--dev", "NodeMCU", "--duration", "1.5"],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    reported = rows(app, "SELECT fw_version, fw_type, lib_version, hardware FROM devices")
    assert reported == [("2.0.0", TYPE, "1.3.2", "NodeMCU")]


def test_an_images_version_past_its_column_is_cut_counted_and_told(server, app):
    long_version = "1." + "9" * 100
    answer = start(server, "", image_1_3(long_version))
    assert answer.status == 200, answer.text
    assert rows(app, "SELECT fw_version FROM firmware") == [(long_version[:64],)]
    metrics = server.admin("GET", "/metrics", auth=None, secure=False).text
    assert 'blynkota_values_cut_total{key="fw_version"} 1.0' in metrics
