"""The admin API over real HTTPS: the Blynk docs' curl commands, answers, access rules."""

import base64
import contextlib
import hashlib
import json
import socket
import ssl
import threading
import time

import gevent
import pytest
import sqlalchemy

from blynkota import create_app
from blynkota.logsafe import token_tag
from blynkota.protocol import Internal
from blynkota.tls import ensure_certificate
from blynkota.web.https_server import TLS_HANDSHAKE_TIMEOUT

from .devices import BUILD_NEW, BUILD_OLD, TOKEN, without_key
from .images import esp32_image, esp8266_image
from .servers import ADMIN_EMAIL, ADMIN_PASS, ServerProcess, wait_until


def rows(app, sql: str, **params):
    with app.extensions["blynkota.db"].engine.connect() as connection:
        return connection.execute(sqlalchemy.text(sql), params).mappings().all()


@pytest.fixture
def pump(fleet):
    fleet.add_device("owner@example.com", "Farm", name="pump", token=TOKEN)
    return TOKEN


def test_documented_curl_updates_an_online_device_at_once(server, simulated, pump, tmp_path, app):
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(esp8266_image(BUILD_NEW))
    device = simulated(pump, BUILD_OLD)
    wait_until(device.ready.is_set, message="the device to log in")

    answer = server.curl(
        "-v",
        "-F",
        f"file=@{firmware}",
        "--insecure",
        "-u",
        server.credentials,
        f"{server.admin_url}/admin/ota/start?token={pump}",
    )
    assert answer.returncode == 0, answer.stderr
    assert "< HTTP/1.1 200" in answer.stderr
    path = answer.stdout
    assert path.startswith("/static/ota/") and path.endswith(".bin")

    wait_until(lambda: device.downloads, message="the download")
    (url,) = device.ota_urls
    assert without_key(url) == f"http://127.0.0.1:{server.http_port}{path}"
    assert pump not in url  # the token never travels in the clear
    assert device.downloads[0].ok, device.downloads[0].error
    wait_until(lambda: device.logins == 2 and device.ready.is_set(), message="the reboot")
    assert device.build == BUILD_NEW
    (command,) = rows(app, "SELECT * FROM ota_commands")
    assert command["url"] == device.ota_urls[0]
    # The ota frame came only after the info message was answered.
    first_ota = next(i for i, f in enumerate(device.frames) if isinstance(f, Internal))
    assert first_ota > 0
    # A token is a password: the log (access lines included) names the device by its tag.
    log = server.log()
    assert pump not in log and token_tag(pump) in log


def test_single_device_answers_for_offline_and_unknown_tokens(server, pump, tmp_path):
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(esp8266_image(BUILD_NEW))
    for token, expected in [(pump, "No device in session."), ("f" * 32, "Invalid token.")]:
        answer = server.curl(
            "-w",
            "\n%{http_code}",
            "-F",
            f"file=@{firmware}",
            "--insecure",
            "-u",
            server.credentials,
            f"{server.admin_url}/admin/ota/start?token={token}",
        )
        assert answer.stdout.splitlines() == [expected, "400"]


def test_campaign_reaches_devices_at_their_next_login_only_where_the_build_differs(
    server, simulated, fleet, tmp_path
):
    tokens = {name: fleet.add_device("owner@example.com", "Farm", name=name) for name in "abcd"}
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(esp8266_image(BUILD_NEW))
    answer = server.curl(
        "-F", f"file=@{firmware}", "--insecure", "-u", server.credentials,
        f"{server.admin_url}/admin/ota/start",
    )  # fmt: skip
    assert answer.stdout.startswith("/static/ota/")

    old = simulated(tokens["a"], BUILD_OLD)
    current = simulated(tokens["b"], BUILD_NEW)
    no_build = simulated(tokens["c"], None)
    wait_until(lambda: old.build == BUILD_NEW, message="the old device to update")
    wait_until(lambda: current.ready.is_set() and no_build.ready.is_set())
    gevent_pause()
    assert current.ota_urls == [] and no_build.ota_urls == []
    assert len(old.ota_urls) == 1  # after its update it is left alone


def gevent_pause(seconds: float = 0.5) -> None:
    """Let simulated devices run for a moment, to see that nothing more arrives."""
    gevent.sleep(seconds)


def test_online_devices_are_not_interrupted_by_a_campaign(server, simulated, pump, tmp_path):
    device = simulated(pump, BUILD_OLD)
    wait_until(device.ready.is_set)
    assert server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).status == 200
    gevent_pause()
    assert device.ota_urls == []  # Blynk semantics: offered at the next login


def test_user_and_project_campaigns_target_only_their_devices(server, simulated, fleet, tmp_path):
    mine_farm = fleet.add_device("me@example.com", "Farm")
    mine_home = fleet.add_device("me@example.com", "Home")
    theirs = fleet.add_device("them@example.com", "Farm")
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(esp8266_image(BUILD_NEW))

    assert server.curl_upload("?user=nobody@example.com", firmware) == (
        400,
        "Requested user not found.",
    )
    assert server.curl_upload("?user=me@example.com&project=Nope", firmware) == (
        400,
        "Requested project not found.",
    )
    # Project by name, case-insensitive.
    status, path = server.curl_upload("?user=me@example.com&project=fARM", firmware)
    assert status == 200 and path.startswith("/static/ota/")

    devices = {t: simulated(t, BUILD_OLD) for t in (mine_farm, mine_home, theirs)}
    wait_until(lambda: all(d.ready.is_set() for d in devices.values()))
    wait_until(lambda: devices[mine_farm].build == BUILD_NEW, message="the farm device")
    gevent_pause()
    assert devices[mine_home].ota_urls == [] and devices[theirs].ota_urls == []


def test_project_by_dashboard_id_and_user_campaign(server, simulated, fleet, app, tmp_path):
    farm = fleet.add_device("me@example.com", "Farm")
    home = fleet.add_device("me@example.com", "Home")
    other = fleet.add_device("them@example.com", "Farm")
    (home_project,) = rows(app, "SELECT dash_id FROM projects WHERE name = 'Home'")
    esp8266, esp32 = tmp_path / "esp8266.bin", tmp_path / "esp32.bin"
    esp8266.write_bytes(esp8266_image(BUILD_NEW))
    esp32.write_bytes(esp32_image(BUILD_NEW))
    query = f"?user=me@example.com&project={home_project['dash_id']}"
    assert server.curl_upload(query, esp8266)[0] == 200
    assert server.curl_upload("?user=ME@example.com", esp32)[0] == 200
    scopes = rows(app, "SELECT scope, state FROM rollouts ORDER BY id")
    assert [tuple(r.values()) for r in scopes] == [("project", "active"), ("user", "active")]
    # The farm board is an ESP32 (the user's rollout sends it the ESP32 image).
    boards = {farm: "ESP32", home: "ESP8266", other: "ESP8266"}
    devices = {t: simulated(t, BUILD_OLD, hardware=boards[t]) for t in (farm, home, other)}
    wait_until(lambda: devices[home].downloads and devices[farm].downloads)
    gevent_pause()
    assert devices[other].ota_urls == []
    # The project rollout is more specific than the user one.
    names = {r["name"]: r["chip"] for r in rows(app, "SELECT name, chip FROM firmware")}
    home_name = without_key(devices[home].ota_urls[0]).rsplit("/", 1)[1].removesuffix(".bin")
    farm_name = without_key(devices[farm].ota_urls[0]).rsplit("/", 1)[1].removesuffix(".bin")
    assert (names[home_name], names[farm_name]) == ("esp8266", "esp32")


def test_resend_an_uploaded_file_with_get(server, simulated, pump, app):
    other = simulated(pump, BUILD_OLD, fail="refuse")
    wait_until(other.ready.is_set)
    path = server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).text
    name = path.rsplit("/", 1)[1]
    answer = server.admin("GET", f"/admin/ota/start?fileName={name}&token={pump}")
    assert (answer.status, answer.text) == (200, path)
    wait_until(lambda: other.ota_urls, message="the re-sent ota")
    assert without_key(other.ota_urls[0]).endswith(path)
    missing = server.admin("GET", f"/admin/ota/start?fileName=nothere.bin&token={pump}")
    assert (missing.status, missing.text) == (400, "Requested file not found.")
    assert server.admin("GET", "/admin/ota/start").status == 400


def test_stop_ends_every_pending_rollout_and_records_who(server, simulated, pump, app):
    assert server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).status == 200
    assert server.upload("/admin/ota/start?user=owner@example.com", esp8266_image(BUILD_NEW))
    answer = server.admin("GET", "/admin/ota/stop")
    assert (answer.status, answer.text) == (200, "Stopped 2 rollout(s).")
    assert server.admin("POST", "/admin/ota/stop").text == "Stopped 0 rollout(s)."
    stopped = rows(app, "SELECT state, stopped_by, stopped_at FROM rollouts")
    assert {(r["state"], r["stopped_by"]) for r in stopped} == {("stopped", ADMIN_EMAIL)}
    assert all(r["stopped_at"] is not None for r in stopped)
    device = simulated(pump, BUILD_OLD)
    wait_until(device.ready.is_set)
    gevent_pause()
    assert device.ota_urls == []


def test_campaign_without_build_tag_is_refused_but_a_single_device_upload_is_not(
    server, simulated, pump
):
    image = esp8266_image(None)
    answer = server.upload("/admin/ota/start", image)
    assert answer.status == 400 and "no build date" in answer.text
    device = simulated(pump, BUILD_OLD)
    wait_until(device.ready.is_set)
    answer = server.upload(f"/admin/ota/start?token={pump}", image)
    assert answer.status == 200
    wait_until(lambda: device.downloads)
    assert device.downloads[0].ok


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"PK\x03\x04 not firmware", "not 0xE9"),
        (esp8266_image(BUILD_NEW)[:200], "damaged"),
        (b"", "empty"),
    ],
)
def test_bad_images_are_refused_with_the_problem_named(shared_server, data, reason):
    answer = shared_server.upload("/admin/ota/start", data)
    assert answer.status == 400 and reason in answer.text
    assert "\n" not in answer.text.strip()


def test_no_file_in_the_request(shared_server):
    answer = shared_server.admin("POST", "/admin/ota/start")
    assert answer.status == 400 and "curl -F file=@" in answer.text


def test_an_unknown_parameter_is_refused_with_the_closest_known_one(shared_server):
    """A typo never widens a start to every device by being ignored."""
    before = len(shared_server.admin("GET", "/admin/ota/status").json())
    for query, told in (
        ("group=greenhouse", "Unknown parameter 'group': this route takes abortRatio,"),
        ("usr=me@example.com", "Unknown parameter 'usr' (did you mean 'user'?)"),
        ("user=me@example.com&waevs=10,100", "Unknown parameter 'waevs' (did you mean 'waves'?)"),
    ):
        answer = shared_server.upload(f"/admin/ota/start?{query}", esp8266_image(BUILD_NEW))
        assert answer.status == 400 and answer.text.startswith(told), answer.text
        assert "\n" not in answer.text.strip() and "this route takes" in answer.text
    assert len(shared_server.admin("GET", "/admin/ota/status").json()) == before
    limit = shared_server.admin("GET", "/admin/ota/status?limt=1")
    assert limit.status == 400 and "(did you mean 'limit'?)" in limit.text
    none = shared_server.admin("GET", "/admin/firmware?x=1")
    assert none.status == 400 and none.text.endswith("this route takes none.")
    # Credentials are checked first: a stranger learns nothing of the parameters.
    stranger = shared_server.admin("GET", "/admin/devices?x=1", auth=("x@example.com", "y"))
    assert stranger.status in (401, 403)


def test_any_form_field_name_carries_the_file(shared_server):
    answer = shared_server.admin(
        "POST", "/admin/ota/start", files={"upfile": ("x.bin", esp8266_image(BUILD_NEW))}
    )
    assert answer.status == 200


def test_raw_files_are_accepted_when_validation_is_off(server_factory, app):
    server = server_factory(**{"ota.validate.image": "false"})
    answer = server.upload("/admin/ota/start", b"raw\0build\0" + BUILD_NEW.encode() + b"\0")
    assert answer.status == 200, answer.text


def test_uploads_above_the_size_limit_get_413(server_factory, app):
    server = server_factory(**{"ota.max.size": 10000})
    answer = server.upload("/admin/ota/start", esp8266_image(BUILD_NEW, size=20000))
    assert answer.status == 413
    huge = server.upload("/admin/ota/start", esp8266_image(BUILD_NEW, size=200_000))
    assert huge.status == 413
    assert server.upload("/admin/ota/start", esp8266_image(BUILD_NEW, size=4000)).status == 200


def test_stored_file_and_its_record(server, app):
    image = esp8266_image(BUILD_NEW)
    path = server.upload("/admin/ota/start", image, filename="my-sketch.ino.bin").text
    name = path.rsplit("/", 1)[1].removesuffix(".bin")
    assert len(name) >= 16 and int(name, 16) >= 0  # >= 64 random bits, hex
    (record,) = rows(app, "SELECT * FROM firmware")
    assert record["name"] == name
    assert (record["original_name"], record["size"], record["build"], record["chip"]) == (
        "my-sketch.ino.bin",
        len(image),
        BUILD_NEW,
        "esp8266",
    )
    assert record["md5"] == hashlib.md5(image).hexdigest()
    assert record["sha256"] == hashlib.sha256(image).hexdigest()
    assert record["uploaded_by"] == ADMIN_EMAIL and record["uploaded_at"] is not None
    # The bytes are in the database, once per distinct content.
    (blob,) = rows(app, "SELECT * FROM firmware_blobs")
    assert (blob["sha256"], blob["size"], blob["md5"]) == (
        record["sha256"], len(image), record["md5"],
    )  # fmt: skip
    chunks = rows(app, "SELECT data FROM firmware_chunks ORDER BY seq")
    assert b"".join(bytes(chunk["data"]) for chunk in chunks) == image
    # The same bytes again are the same firmware: one row, one file, one path.
    again = server.admin(
        "POST",
        "/admin/ota/start",
        files={"file": ("same-bytes.bin", image)},
        headers={"Accept": "application/json"},
    )
    assert again.status == 200 and again.json()["path"] == path
    assert again.json()["firmware"]["reused"] is True
    assert again.json()["firmware"]["name"] == record["name"]
    assert len(rows(app, "SELECT * FROM firmware")) == 1
    assert len(rows(app, "SELECT * FROM firmware_blobs")) == 1
    # The node's cache file is written, named by content, on the first download.
    download = server.admin("GET", path, auth=None, secure=False)
    assert download.status == 200 and download.body == image
    stored = server.data_folder / "ota" / f"{record['sha256']}.bin"
    assert stored.read_bytes() == image
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]  # no temporary left


def test_a_file_name_with_an_emoji_or_past_its_column_is_stored_cut(server, app):
    long_name = "sketch-\U0001f680-" + "x" * 300 + ".bin"
    answer = server.upload("/admin/ota/start", esp8266_image(BUILD_NEW), filename=long_name)
    assert answer.status == 200, answer.text
    (record,) = rows(app, "SELECT original_name FROM firmware")
    assert record["original_name"] == long_name[:255]


def test_admin_routes_are_https_only_and_never_ask_for_a_password_in_clear(shared_server):
    answer = shared_server.admin("GET", "/admin/ota/stop", secure=False)
    assert answer.status == 403 and "https" in answer.text
    assert "www-authenticate" not in answer.headers


def test_missing_and_wrong_credentials(shared_server):
    missing = shared_server.admin("GET", "/admin/devices", auth=None)
    assert missing.status == 401 and missing.headers["www-authenticate"].startswith("Basic")
    wrong = shared_server.admin("GET", "/admin/devices", auth=(ADMIN_EMAIL, "nope"))
    assert (wrong.status, wrong.text) == (403, "Authentication failed.\n")
    stranger = shared_server.admin("GET", "/admin/devices", auth=("x@example.com", "y"))
    assert stranger.status == 403


def test_ten_wrong_passwords_a_minute_then_429_with_retry_after(server, app):
    for _ in range(10):
        assert server.admin("GET", "/admin/devices", auth=(ADMIN_EMAIL, "nope")).status == 403
    refused = server.admin("GET", "/admin/devices", auth=(ADMIN_EMAIL, "nope"))
    assert refused.status == 429 and "Too many failed logins" in refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # The address's budget is spent: another account from it waits too.
    other = server.admin("GET", "/admin/devices", auth=("x@example.com", "y"))
    assert other.status == 429
    # The budget is in the database, where every process finds it.
    (row,) = rows(app, "SELECT failures FROM login_limits WHERE `key` = 'address 127.0.0.1'")
    assert row["failures"] == 10
    assert "Traceback" not in server.log()


def test_a_right_password_spends_no_budget(server, app):
    for _ in range(12):
        assert server.admin("GET", "/admin/devices").status == 200
    assert all(row["failures"] == 0 for row in rows(app, "SELECT failures FROM login_limits"))


def test_the_lockout_refuses_a_password_known_good_before_it(server, app):
    """Only a success before the lockout counts: after it, the right password
    waits like the wrong ones, however often this process has checked it."""
    assert server.admin("GET", "/admin/devices").status == 200  # now known good
    for _ in range(10):
        assert server.admin("GET", "/admin/devices", auth=(ADMIN_EMAIL, "nope")).status == 403
    for _ in range(3):
        refused = server.admin("GET", "/admin/devices")
        assert refused.status == 429 and "Too many failed logins" in refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 60
    # The account's budget too, from any address: a stale window lets it in again.
    with app.extensions["blynkota.db"].engine.begin() as connection:
        connection.execute(
            sqlalchemy.text(
                "UPDATE login_limits SET window_start = :old WHERE `key` LIKE 'address %'"
            ),
            {"old": "2000-01-01 00:00:00"},
        )
    assert server.admin("GET", "/admin/devices").status == 429  # the account's own budget
    with app.extensions["blynkota.db"].engine.begin() as connection:
        connection.execute(
            sqlalchemy.text("UPDATE login_limits SET window_start = :old"),
            {"old": "2000-01-01 00:00:00"},
        )
    assert server.admin("GET", "/admin/devices").status == 200


def test_concurrent_right_passwords_all_get_in(server):
    """Twenty at once on a fresh server (no password known good yet): the
    checks queue, none is refused for the budget of the others in flight."""
    statuses: list[int] = []

    def attempt() -> None:
        statuses.append(server.admin("GET", "/admin/devices").status)

    threads = [threading.Thread(target=attempt) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 20


def test_a_check_cut_by_kill_9_spends_no_budget(server, app):
    """Right passwords in flight when the process dies leave no count behind."""
    for _ in range(3):
        threads = [
            threading.Thread(target=_quietly, args=(server.admin, "GET", "/admin/devices"))
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.15)  # the first hashes are under way
        server.restart()
        for thread in threads:
            thread.join(60)
    assert all(row["failures"] == 0 for row in rows(app, "SELECT failures FROM login_limits"))
    assert server.admin("GET", "/admin/devices").status == 200


def _quietly(request, *arguments) -> None:
    with contextlib.suppress(OSError):  # the server was killed under this request
        request(*arguments)


def test_an_unknown_email_costs_as_long_as_a_wrong_password(server):
    """Both go through the password hash: the answer's time does not tell who exists."""

    def median_seconds(email: str) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            assert server.admin("GET", "/admin/devices", auth=(email, "nope")).status == 403
            times.append(time.perf_counter() - started)
        return sorted(times)[1]

    known, unknown = median_seconds(ADMIN_EMAIL), median_seconds("nobody@example.com")
    # Before: 4 ms against 104 ms. A generous bound: the hash dominates both.
    assert unknown > known / 4, (known, unknown)


def test_the_default_password_serves_this_machine_only(tmp_path):
    app = create_app(
        {"data.folder": tmp_path / "data", "trusted.proxies": "10.0.0.0/8", "admin.pass": "admin"}
    )
    client = app.test_client()
    through_proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "192.0.2.7"}
    answer = client.get(
        "/admin/devices", headers=through_proxy, environ_base={"REMOTE_ADDR": "10.0.0.5"}
    )
    assert answer.status_code == 403 and b"admin.pass is still the default" in answer.data
    app.extensions["blynkota.db"].dispose()
    configured = create_app(
        {"data.folder": tmp_path / "data2", "trusted.proxies": "10.0.0.0/8", "admin.pass": "x9"}
    )
    answer = configured.test_client().get(
        "/admin/devices", headers=through_proxy, environ_base={"REMOTE_ADDR": "10.0.0.5"}
    )
    assert answer.status_code == 401  # asks for the password instead
    configured.extensions["blynkota.db"].dispose()


def test_allowed_administrator_ips_is_honoured(server_factory, app):
    server = server_factory(**{"allowed.administrator.ips": "10.0.0.0/8"})
    answer = server.admin("GET", "/admin/devices")
    assert answer.status == 403 and "allowed.administrator.ips" in answer.text
    server.stop()
    allowed = server_factory(**{"allowed.administrator.ips": "10.0.0.0/8,127.0.0.0/8"})
    assert allowed.admin("GET", "/admin/devices").status == 200


def test_devices_and_firmware_json(server, simulated, pump):
    device = simulated(pump, BUILD_OLD, fw="1.0.0")
    wait_until(device.ready.is_set)
    server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    (listed,) = server.admin("GET", "/admin/devices").json()
    assert {key: listed[key] for key in ("token", "user", "project", "build", "online")} == {
        "token": pump,
        "user": "owner@example.com",
        "project": "Farm",
        "build": BUILD_OLD,
        "online": True,
    }
    (firmware,) = server.admin("GET", "/admin/firmware").json()
    assert firmware["build"] == BUILD_NEW and firmware["path"].startswith("/static/ota/")
    json.dumps(firmware)  # plain JSON types only


def test_configured_tls_certificate_is_served(server_factory, tmp_path, app):
    cert, key = tmp_path / "mine" / "cert.pem", tmp_path / "mine" / "key.pem"
    ensure_certificate(cert, key)
    server = server_factory(**{"server.ssl.cert": cert, "server.ssl.key": key})
    served = ssl.get_server_certificate(("127.0.0.1", server.https_port))
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert not (server.data_folder / "tls").exists()


def test_default_password_warning_only_while_it_is_in_use(tmp_path, db_url, app):
    default = ServerProcess(tmp_path / "a", db_url, **{"admin.pass": "admin"})
    (tmp_path / "a").mkdir()
    default.start()
    default.stop()
    assert "default password" in default.log()
    custom = ServerProcess(tmp_path / "b", db_url)
    (tmp_path / "b").mkdir()
    custom.start()
    assert custom.admin("GET", "/admin/devices").status == 200
    assert custom.admin("GET", "/admin/devices", auth=(ADMIN_EMAIL, "admin")).status == 403
    custom.stop()
    assert "default password" not in custom.log()
    # One admin row, its password stored as a hash, never in clear.
    (admin,) = rows(app, "SELECT email, password_hash FROM admins")
    assert admin["email"] == ADMIN_EMAIL
    assert "s3cret" not in admin["password_hash"]
    assert admin["password_hash"].startswith("scrypt:")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_clients_that_never_finish_a_tls_handshake_cannot_lock_the_admin_api_out(server):
    # More silent TCP connections than the admin port serves at once (100).
    silent = [socket.create_connection(("127.0.0.1", server.https_port)) for _ in range(120)]
    try:
        started = time.monotonic()
        answer = server.admin("GET", "/admin/ota/status")
        assert answer.status == 200
        assert time.monotonic() - started < 15  # the handshake deadline (5 s) freed the pool
    finally:
        for sock in silent:
            sock.close()
    wait_until(lambda: "no TLS session" in server.log(), message="the handshake deadline")
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_connections_that_keep_reconnecting_without_tls_do_not_slow_the_admin(server):
    """150 TCP connections that never speak TLS, each opened again as soon as it
    is dropped: handshakes have a budget of their own, so an admin request
    waits for none of them (before: for the handshake deadline, 2-4 s)."""
    stop = threading.Event()

    def pester() -> None:
        while not stop.is_set():
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", server.https_port), timeout=10) as sock,
            ):
                sock.settimeout(0.2)
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        if sock.recv(1) == b"":
                            break  # dropped by the handshake deadline: again

    pesterers = [threading.Thread(target=pester, daemon=True) for _ in range(150)]
    for thread in pesterers:
        thread.start()
    try:
        time.sleep(1)  # all of them connected
        for _ in range(5):
            started = time.monotonic()
            assert server.admin("GET", "/admin/ota/status").status == 200
            assert time.monotonic() - started < TLS_HANDSHAKE_TIMEOUT / 2
    finally:
        stop.set()
        for thread in pesterers:
            thread.join(15)
    assert "Traceback" not in server.log()


def test_token_with_user_or_project_is_refused(server, pump):
    for extra in ("user=owner@example.com", "project=Farm"):
        answer = server.upload(f"/admin/ota/start?token={pump}&{extra}", esp8266_image(BUILD_NEW))
        assert answer.status == 400 and "not both" in answer.text


def test_ten_uploads_at_once_to_one_device_leave_it_one_ota_in_flight(server, simulated, pump, app):
    """At most one `ota` in flight per device. Each explicit start re-sends
    (issue 25): it replaces an offer the device has not begun to download, so
    the device may hear several, but one offer is in flight, and every frame
    it heard is journaled."""
    device = simulated(pump, BUILD_OLD, fail="refuse")  # takes the ota, never downloads
    wait_until(device.ready.is_set)
    images = [esp8266_image(f"Nov 29 2018 12:00:{n:02d}") for n in range(10)]
    uploads = [
        gevent.spawn(server.upload, f"/admin/ota/start?token={pump}", image) for image in images
    ]
    gevent.joinall(uploads, timeout=60, raise_error=True)
    assert all(upload.value.status == 200 for upload in uploads)
    gevent.sleep(1)
    in_flight = rows(
        app,
        "SELECT d.state, c.url FROM rollout_devices d JOIN ota_commands c "
        "ON c.rollout_id = d.rollout_id AND c.device_id = d.device_id "
        "WHERE d.state IN ('offered', 'downloading', 'downloaded')",
    )
    assert len(in_flight) == 1 and in_flight[0]["state"] == "offered"
    assert 1 <= len(device.ota_urls) <= 10
    assert in_flight[0]["url"] in device.ota_urls
    assert rows(app, "SELECT count(*) AS n FROM ota_commands")[0]["n"] == len(device.ota_urls)


def _upload_dropped(server, image: bytes, *, extra_length: int, sent_share: float) -> None:
    """An authenticated upload over TLS whose client vanishes (no close_notify)
    after `sent_share` of the body, having announced `extra_length` more bytes."""
    boundary = "dropped-upload"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="fw.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    credentials = base64.b64encode(f"{ADMIN_EMAIL}:{ADMIN_PASS}".encode()).decode()
    head = (
        "POST /admin/ota/start HTTP/1.1\r\nHost: blynkota\r\n"
        f"Authorization: Basic {credentials}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body) + extra_length}\r\n\r\n"
    ).encode()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", server.https_port), timeout=10)
    secure = context.wrap_socket(raw)
    secure.sendall(head + body[: int(len(body) * sent_share)])
    time.sleep(0.3)
    raw.close()  # the TCP connection goes, without TLS's goodbye


@pytest.mark.parametrize(
    ("extra_length", "sent_share"), [(0, 0.5), (1000, 1.0)], ids=["closed-at-half", "long-length"]
)
def test_an_upload_whose_client_goes_away_leaves_one_line_and_nothing_stored(
    server, app, extra_length, sent_share
):
    assert server.admin("GET", "/admin/devices").status == 200  # the password is known good
    _upload_dropped(
        server, esp8266_image(BUILD_NEW), extra_length=extra_length, sent_share=sent_share
    )
    gone = "the client went away before the answer"
    wait_until(lambda: gone in server.log(), message="the line for the dropped upload")
    log = server.log()
    assert log.count(gone) == 1
    assert "Traceback" not in log and "SSLEOFError" not in log.replace("EOF occurred", "")
    assert '"POST /admin/ota/start HTTP/1.1" 500' not in log
    assert rows(app, "SELECT id FROM firmware") == []
    assert rows(app, "SELECT sha256 FROM firmware_blobs") == []
    ota_folder = server.data_folder / "ota"
    assert not ota_folder.exists() or list(ota_folder.iterdir()) == []
    # The server goes on: the next upload is stored.
    assert server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).status == 200
