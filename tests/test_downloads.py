"""Firmware downloads on the plain HTTP port, as tiny device updaters fetch them (SPEC §4)."""

import hashlib
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy
from alembic import command

from blynkota.store import alembic_config

from .devices import BUILD_NEW
from .images import esp8266_image
from .servers import ServerProcess, trickled_head, wait_until

ESP8266_HEADERS = (
    "User-Agent: ESP8266-http-Update\r\n"
    "x-ESP8266-STA-MAC: 5C:CF:7F:00:00:01\r\n"
    "x-ESP8266-free-space: 2781184\r\n"
    "x-ESP8266-sketch-size: 301792\r\n"
    "x-ESP8266-sketch-md5: 00000000000000000000000000000000\r\n"
    "x-ESP8266-chip-size: 4194304\r\n"
    "x-ESP8266-sdk-version: 2.2.1\r\n"
    "x-ESP8266-mode: sketch\r\n"
    "x-ESP8266-version: 1\r\n"
)
ESP32_HEADERS = (
    "User-Agent: ESP32-http-Update\r\n"
    "x-ESP32-STA-MAC: 24:0A:C4:00:00:01\r\n"
    "x-ESP32-free-space: 1310720\r\n"
    "x-ESP32-sketch-size: 767808\r\n"
    "x-ESP32-chip-size: 4194304\r\n"
    "x-ESP32-mode: sketch\r\n"
)


def raw_get(port: int, request: str) -> tuple[bytes, bytes, bytes]:
    """Send `request`; return (the first chunk received, head, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode("latin-1"))
        first = sock.recv(65536)
        data = first
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return first, head, body


def headers_of(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {
        name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)
    }


@pytest.fixture(scope="module")
def uploaded(shared_server):
    """One file on the module's server: these tests only download it."""
    image = esp8266_image(BUILD_NEW, size=50_000)
    path = shared_server.upload("/admin/ota/start", image).text
    return path, image


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
@pytest.mark.parametrize("updater", [ESP8266_HEADERS, ESP32_HEADERS, ""])
def test_download_gives_exactly_what_updaters_need(shared_server, uploaded, version, updater):
    path, image = uploaded
    connection = "Connection: close\r\n" if version == "HTTP/1.1" else ""
    first, head, body = raw_get(
        shared_server.http_port, f"GET {path} {version}\r\nHost: x\r\n{updater}{connection}\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200 ")
    headers = headers_of(head)
    assert headers["content-type"] == "application/octet-stream"
    assert int(headers["content-length"]) == len(image) > 0
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-md5"])
    assert headers["x-md5"] == hashlib.md5(image).hexdigest()
    assert "transfer-encoding" not in headers and "content-encoding" not in headers
    assert body == image
    # The status line and every header came together, ahead of the body.
    assert b"\r\n\r\n" in first


def test_range_requests_resume_a_download(shared_server, uploaded):
    path, image = uploaded
    _, head, body = raw_get(
        shared_server.http_port,
        f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-\r\nConnection: close\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 206 ")
    assert headers_of(head)["content-range"] == f"bytes 1000-{len(image) - 1}/{len(image)}"
    assert body == image[1000:]


def test_head_answers_the_headers_only(shared_server, uploaded):
    path, image = uploaded
    _, head, body = raw_get(shared_server.http_port, f"HEAD {path} HTTP/1.0\r\n\r\n")
    assert int(headers_of(head)["content-length"]) == len(image)
    assert body == b""


@pytest.mark.parametrize(
    "path",
    [
        "/static/ota/0123456789abcdef01234567.bin",
        "/static/ota/..%2f..%2fetc.bin",
        "/static/ota/x.bin",
    ],
)
def test_unknown_files_are_404(shared_server, path):
    _, head, _ = raw_get(shared_server.http_port, f"GET {path} HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ")


def test_firmware_is_also_served_on_the_https_port(shared_server, uploaded):
    path, image = uploaded
    answer = shared_server.admin("GET", path, auth=None)
    assert answer.status == 200 and answer.body == image


def test_start_up_takes_in_older_uploads_and_removes_stray_files(db_url, tmp_path):
    """Files of uploads made before the bytes moved into the database are taken in;
    a temporary file of a killed upload and files no row names are removed."""
    config = alembic_config(db_url)
    command.upgrade(config, "0003")
    image = esp8266_image(BUILD_NEW)
    name = "ab" * 12
    engine = sqlalchemy.create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.text(
                "INSERT INTO firmware (name, original_name, size, md5, sha256, build, "
                "uploaded_by, uploaded_at) VALUES (:n, 'old.bin', :s, :m, :h, :b, 'a', :t)"
            ),
            {"n": name, "s": len(image), "m": hashlib.md5(image).hexdigest(),
             "h": hashlib.sha256(image).hexdigest(), "b": BUILD_NEW, "t": "2026-01-01 00:00:00"},
        )  # fmt: skip
    folder = tmp_path / "data" / "ota"
    folder.mkdir(parents=True)
    (folder / f"{name}.bin").write_bytes(image)  # where the old server kept it
    (folder / ".upload-k1ll3d").write_bytes(image[:100])  # a killed upload's temporary file
    (folder / ("f" * 64 + ".bin")).write_bytes(b"no row names this")

    server = ServerProcess(tmp_path, db_url).start()
    try:
        sha = hashlib.sha256(image).hexdigest()
        assert sorted(p.name for p in folder.iterdir()) == [f"{sha}.bin"]
        with engine.connect() as connection:
            blobs = connection.execute(sqlalchemy.text("SELECT sha256 FROM firmware_blobs")).all()
        assert blobs == [(sha,)]
        (folder / f"{sha}.bin").unlink()  # a node with an empty cache
        answer = server.admin("GET", f"/static/ota/{name}.bin", auth=None, secure=False)
        assert (answer.status, answer.body) == (200, image)
        assert answer.headers["x-md5"] == hashlib.md5(image).hexdigest()
    finally:
        server.stop()
        engine.dispose()


def test_both_ports_answer_a_download_with_the_same_headers(shared_server, uploaded):
    """Port 8080 sends files itself (sendfile); the HTTPS port through Flask."""
    path, image = uploaded
    _, head, body = raw_get(
        shared_server.http_port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    secure = shared_server.admin("GET", path, auth=None)
    assert body == secure.body == image
    per_request = {"date", "expires", "connection"}
    plain = {k: v for k, v in headers_of(head).items() if k not in per_request}
    assert plain == {k: v for k, v in secure.headers.items() if k not in per_request}


def responses(data: bytes) -> list[tuple[bytes, dict[str, str], bytes]]:
    """Split keep-alive answers by their Content-Length: (status line, headers, body)."""
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        headers = headers_of(head)
        length = int(headers.get("content-length", 0))
        answers.append((head.split(b"\r\n")[0], headers, rest[:length]))
        data = rest[length:]
    return answers


def test_keep_alive_serves_requests_in_turn_and_hands_conditional_ones_to_flask(
    shared_server, uploaded
):
    path, image = uploaded
    etag = hashlib.md5(image).hexdigest()
    plain = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"
    ranged = f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=-100\r\n\r\n"
    conditional = f'GET {path} HTTP/1.1\r\nHost: x\r\nIf-None-Match: "{etag}"\r\n\r\n'
    last = f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    _, head, rest = raw_get(shared_server.http_port, plain + ranged + conditional + last)
    answers = responses(head + b"\r\n\r\n" + rest)
    statuses = [status.split(b" ")[1] for status, _, _ in answers[:3]]
    assert statuses == [b"200", b"206", b"304"]
    assert answers[0][2] == image
    assert answers[1][2] == image[-100:]
    assert (
        answers[1][1]["content-range"] == f"bytes {len(image) - 100}-{len(image) - 1}/{len(image)}"
    )
    # After the 304 the connection belongs to Flask, which answers the HEAD and closes.
    assert answers[3][0].startswith(b"HTTP/1.1 200") and len(answers) == 4


@pytest.mark.parametrize(
    "header, status",
    [
        ("Range: bytes=999999-", b"416"),  # past the end: Flask's answer
        # RFC 9110: a malformed Range is ignored, several may be: the whole file.
        ("Range: bytes=0-1,5-9", b"200"),
        ("Range: bytes=0-\u00b2", b"200"),  # not ASCII digits
        ("Range: bytes=5-1", b"200"),  # last before first: invalid, ignored
        ("Range: pages=1-2", b"200"),
        ("Content-Length: 5", b"200"),  # a body on a GET: Flask reads it
    ],
)
def test_odd_requests_get_flasks_answer(shared_server, uploaded, header, status):
    path, image = uploaded
    body = "hello" if header.startswith("Content-Length") else ""
    _, head, _ = raw_get(
        shared_server.http_port,
        f"GET {path} HTTP/1.1\r\nHost: x\r\n{header}\r\nConnection: close\r\n\r\n{body}",
    )
    assert head.split(b" ")[1] == status


def test_a_request_head_that_arrives_in_pieces_is_answered(shared_server, uploaded):
    path, image = uploaded
    with socket.create_connection(("127.0.0.1", shared_server.http_port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHo".encode())
        time.sleep(0.3)  # a slow client: the server waits for the rest of the head
        sock.sendall(b"st: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == image


def test_requests_trickling_their_heads_are_closed_after_the_head_deadline(port_server_factory):
    """A header byte a second keeps a per-read timeout happy; the head as a
    whole has HEAD_DEADLINE (10 s), on the firmware fast path (closed
    unanswered) as for any other request (a 400). Both trickle at once, on
    SQLite alone (no database has a part in it), so the suite waits 10 s once."""
    server = port_server_factory()
    path = server.upload("/admin/ota/start", esp8266_image(BUILD_NEW, size=50_000)).text
    with ThreadPoolExecutor(2) as pool:
        firmware = pool.submit(trickled_head, server.http_port, f"GET {path} HTTP/1.1")
        other = pool.submit(trickled_head, server.http_port, "GET /anything HTTP/1.1")
        (firmware_answer, firmware_seconds), (answer, seconds) = firmware.result(), other.result()
    assert firmware_answer == b""  # closed, unanswered
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert 9 <= firmware_seconds < 20 and 9 <= seconds < 20
    assert "request head not complete" in server.log()
    assert "Traceback" not in server.log()


def test_a_request_line_reaches_the_log_escaped_and_without_its_query(port_server_factory):
    server = port_server_factory()
    raw_get(
        server.http_port,
        "GET /static/ota/\x1b[31mx\rFORGED.bin?token=s3cr3t-token HTTP/1.1\r\n"
        "Host: x\r\nConnection: close\r\n\r\n",
    )
    time.sleep(0.2)  # the access line is written after the answer
    log = server.log()
    assert "\x1b" not in log and "\rFORGED" not in log
    assert "\\x1b[31mx\\rFORGED.bin" in log
    assert "s3cr3t-token" not in log


def test_over_a_hundred_headers_is_a_400_and_one_line(port_server_factory):
    server = port_server_factory()
    headers = "".join(f"X-Filler-{n}: a\r\n" for n in range(150))
    first, _, _ = raw_get(server.http_port, f"GET /anything HTTP/1.1\r\n{headers}\r\n")
    assert first.startswith(b"HTTP/1.1 400")
    time.sleep(0.2)
    log = server.log()
    assert "got more than 100 headers" in log and "Traceback" not in log


def test_a_flood_of_bad_requests_is_counted_not_logged_line_by_line(port_server_factory):
    server = port_server_factory()
    for _ in range(150):
        raw_get(server.http_port, "GET / HTTP/9.9\r\nHost: x\r\n\r\n")
    time.sleep(1.1)  # the next second: the count goes out with the next line
    first, _, _ = raw_get(server.http_port, "GET / HTTP/9.9\r\nHost: x\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 400")
    time.sleep(0.2)
    lines = [line for line in server.log().splitlines() if "request from" in line]
    assert len(lines) <= 3 * 20 + 1  # at most 20 a second over the flood's few seconds
    assert "more such lines dropped" in lines[-1]


@pytest.mark.parametrize("family", ["ESP8266", "ESP32"])
def test_an_updater_already_running_the_file_gets_304_on_both_ports(
    shared_server, uploaded, family
):
    path, image = uploaded
    md5 = hashlib.md5(image).hexdigest()
    same = f"x-{family}-sketch-md5: {md5}\r\n"
    _, head, body = raw_get(
        shared_server.http_port, f"GET {path} HTTP/1.1\r\n{same}Connection: close\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 304 ") and body == b""
    assert headers_of(head)["x-md5"] == md5
    secure = shared_server.admin("GET", path, auth=None, headers={f"x-{family}-sketch-md5": md5})
    assert secure.status == 304 and secure.body == b""
    other = f"x-{family}-sketch-md5: {'0' * 32}\r\n"
    _, head, body = raw_get(shared_server.http_port, f"GET {path} HTTP/1.0\r\n{other}\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == image


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_304_counts_the_offered_device_as_already_on_the_firmware(server, simulated, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    device = simulated(token, "Jan  1 2018 00:00:00", fail="refuse")  # takes the frame only
    image = esp8266_image(BUILD_NEW, size=50_000)
    server.upload("/admin/ota/start?now=true", image)
    wait_until(lambda: device.ota_urls, message="the offer")
    url = device.ota_urls[0].split(f":{server.http_port}", 1)[1]
    sketch = f"x-ESP8266-sketch-md5: {hashlib.md5(image).hexdigest()}\r\n"
    _, head, _ = raw_get(
        server.http_port, f"GET {url} HTTP/1.1\r\n{sketch}Connection: close\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 304 ")
    with app.extensions["blynkota.db"].engine.connect() as connection:
        state = connection.execute(
            sqlalchemy.text("SELECT state, already_current FROM rollout_devices")
        ).all()
        (detail,) = connection.execute(
            sqlalchemy.text("SELECT detail FROM rollout_events WHERE to_state = 'updated'")
        ).one()
    assert [tuple(row) for row in state] == [("updated", True)]
    assert "sketch MD5" in detail


NAME = "0123456789abcdef01234567"


@pytest.mark.parametrize("updater", [ESP8266_HEADERS, ESP32_HEADERS])
def test_the_sender_reads_an_updaters_head_itself(updater):
    """The fast path reads the updaters' heads (parsed as latin-1, all header
    lines matched at once); names are case-blind, values trimmed of blanks."""
    from blynkota.web.file_sender import _parse

    head = f"GET /static/ota/{NAME}.bin?o=k1 HTTP/1.1\r\nHost: x\r\n{updater}"
    request = _parse(f"{head}X-Blanks:\t a\tb \t\r\nX-Latin: caf\u00e9\r\n\r\n".encode("latin-1"))
    assert (request.method, request.name, request.offer_key) == ("GET", NAME, "k1")
    assert request.keep_alive and request.range is None
    assert request.headers["user-agent"].endswith("-http-Update")
    assert request.headers["x-blanks"] == "a\tb"
    assert request.headers["x-latin"] == "caf\u00e9"
    http_1_0 = _parse(f"HEAD /static/ota/{NAME}.bin HTTP/1.0\r\n\r\n".encode())
    assert http_1_0.method == "HEAD" and http_1_0.offer_key is None and not http_1_0.keep_alive


@pytest.mark.parametrize(
    "header",
    [
        "X-Odd: a\x01b",  # a control character: Flask's rules, not ours
        "X-Odd: a\x7fb",
        "X-Odd: a\rb",  # a bare CR
        " folded: line",  # obsolete line folding
        "No-Colon",
        "Bad Name: x",
        "Host: y",  # twice
        "If-None-Match: *",  # a conditional request
        "Content-Length: 1",  # a body
    ],
)
def test_a_head_the_sender_does_not_read_goes_to_flask_untouched(header):
    from blynkota.web.file_sender import _HandOver, _parse

    head = f"GET /static/ota/{NAME}.bin HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n"
    with pytest.raises(_HandOver):
        _parse(head.encode("latin-1"))


def test_waiting_downloads_go_one_per_idle_turn_of_the_loop():
    """However many downloads wait, one sends per idle turn: device work that
    arrives meanwhile runs between two downloads' chunks, not after all of them."""
    import gevent

    from blynkota.web.file_sender import _DevicesFirst

    turns = _DevicesFirst()
    order = []

    def download(name: str) -> None:
        turns.wait()
        order.append(name)  # its chunk
        gevent.spawn(order.append, f"frame after {name}")  # a device's frame arrives

    gevent.joinall([gevent.spawn(download, name) for name in "abc"], timeout=5)
    turns.close()
    assert order == ["a", "frame after a", "b", "frame after b", "c", "frame after c"]


def test_a_download_lets_ready_device_work_go_first_but_is_never_stalled():
    """Between chunks a download waits for an idle event loop, bounded by a timer."""
    import gevent

    from blynkota.web.file_sender import DEVICES_FIRST_AT_MOST, _DevicesFirst

    turns = _DevicesFirst()

    # A quiet loop: the download goes on at once.
    started = time.monotonic()
    turns.wait()
    assert time.monotonic() - started < DEVICES_FIRST_AT_MOST

    # Device work ready: it runs before the download's next chunk.
    ran = []
    gevent.spawn(ran.append, "device frame")
    turns.wait()
    assert ran == ["device frame"]

    # A loop that never goes idle (a storm): the timer lets the download go on.
    spins, busy = [0], [True]

    def storm():
        while busy[0]:
            spins[0] += 1
            gevent.sleep(0)

    spinner = gevent.spawn(storm)
    gevent.sleep(0)
    started = time.monotonic()
    turns.wait()
    waited = time.monotonic() - started
    busy[0] = False
    spinner.join(timeout=5)
    assert spins[0] > 1  # the storm's work ran meanwhile
    assert DEVICES_FIRST_AT_MOST * 0.5 <= waited < 5  # by the timer, not for ever

    # Once more with the same watchers: a chunk after a timed-out wait.
    ran.clear()
    gevent.spawn(ran.append, "next frame")
    turns.wait()
    turns.close()
    assert ran == ["next frame"]
