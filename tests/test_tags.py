"""Device groups: tags from the command line, CSV and API, campaigns aimed at a
tag, and the device list's search and pages (issue 29)."""

import urllib.parse

import pytest

from blynkota.logsafe import token_tag
from blynkota.ota import NewDevice
from blynkota.simulator import SimulatedDevice

from .devices import BUILD_NEW, BUILD_OLD
from .images import esp8266_image
from .servers import wait_until
from .test_cli import run
from .test_lifecycle import device_state

BUILD_ALL = "Nov 20 2018 12:00:00"


def test_tags_from_the_command_line_and_csv(app, tmp_path):
    fleet = app.extensions["blynkota.fleet"]
    first = fleet.add_device("me@example.com", "Farm", name="pump")
    second = fleet.add_device("me@example.com", "Farm", name="gate")
    tagged = run(app, "devices", "tag", "GreenHouse", first, "gate")
    assert tagged.exit_code == 0 and "Tagged 2 device(s)." in tagged.output
    again = run(app, "devices", "tag", "greenhouse", first)
    assert "Tagged 0 device(s)." in again.output  # kept lowercase, and already there
    bad = run(app, "devices", "tag", "green house!", first)
    assert bad.exit_code == 1 and "A tag is 1 to 24 of letters, digits" in bad.output
    unknown = run(app, "devices", "tag", "north", "no-such-device")
    assert unknown.exit_code == 1 and "no device is no-such-device" in unknown.output
    listed = run(app, "devices", "list", "--tag", "greenhouse").output
    assert first in listed and second in listed and "greenhouse" in listed
    assert run(app, "devices", "tag", "greenhouse", "gate", "--remove").exit_code == 0
    listed = run(app, "devices", "list", "--tag", "greenhouse").output
    assert first in listed and second not in listed
    rows = tmp_path / "fleet.csv"
    rows.write_text(
        f"token,user,project,name,tags\n{'c' * 32},you@example.com,Barn,fan,barn north\n"
    )
    assert run(app, "devices", "import-csv", str(rows)).exit_code == 0
    exported = run(app, "devices", "export-csv").output.splitlines()
    assert exported[0].endswith(",tags")
    assert any(line.startswith("c" * 32) and line.endswith(",barn north") for line in exported)
    rows.write_text(f"token,user,project,name,tags\n{'d' * 32},you@example.com,Barn,x,BAD!\n")
    refused = run(app, "devices", "import-csv", str(rows))
    assert refused.exit_code == 1 and "row 1: A tag is" in refused.output
    assert "d" * 32 not in run(app, "devices", "list").output  # nothing added


def test_a_campaign_aimed_at_a_tag_takes_only_its_devices_and_ranks_first(server, fleet, app):
    """All devices get BUILD_ALL; the greenhouse ones BUILD_NEW (a tag ranks just
    above its own scope untagged), and nothing bounces between the two."""
    tagged, plain = (fleet.add_device("me@example.com", "Farm") for _ in range(2))
    assert run(app, "devices", "tag", "greenhouse", tagged).exit_code == 0
    typo = server.upload("/admin/ota/start?tag=greenhose", esp8266_image(BUILD_NEW))
    assert typo.status == 400 and typo.text == "No device is tagged 'greenhose'."
    assert server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_ALL)).status == 200
    answer = server.upload("/admin/ota/start?now=true&tag=greenhouse", esp8266_image(BUILD_NEW))
    assert answer.status == 200, answer.text
    boards = {token: SimulatedDevice("127.0.0.1", server.http_port, token, BUILD_OLD)
              for token in (tagged, plain)}  # fmt: skip
    for board in boards.values():
        board.start()
    try:
        wait_until(lambda: boards[tagged].build == BUILD_NEW and boards[plain].build == BUILD_ALL,
                   timeout=30, message="each on its campaign's build")  # fmt: skip
        wait_until(lambda: device_state(app, tagged).get("state") == "updated")
        (newest, oldest) = server.admin("GET", "/admin/ota/status").json()
        assert newest["target"] == "all devices tagged greenhouse" and newest["tag"] == "greenhouse"
        assert oldest["state"] in ("active", "complete")  # both run: different targets
        assert newest["targeted"] == 1 and oldest["targeted"] == 2
        assert all(len(board.ota_urls) == 1 for board in boards.values())  # no ping-pong
    finally:
        for board in boards.values():
            board.stop()


def test_the_device_list_searches_pages_and_tags_through_the_api(server, fleet):
    tokens = [fleet.add_device("me@example.com", "Farm", name=f"valve-{n}") for n in range(3)]
    for token in tokens[:2]:
        answer = server.admin("POST", f"/admin/devices/{token}/tags?tag=North")
        assert answer.status == 200 and answer.json()["tags"] == ["north"]
    page = server.admin("GET", "/admin/devices?tag=north&limit=1")
    assert page.status == 200 and page.headers["x-total-count"] == "2"
    assert [row["token"] for row in page.json()] == [tokens[0]]
    second = server.admin("GET", "/admin/devices?tag=north&limit=1&offset=1").json()
    assert [row["token"] for row in second] == [tokens[1]]
    by_log_tag = server.admin("GET", f"/admin/devices?search={token_tag(tokens[2])}").json()
    assert [row["token"] for row in by_log_tag] == [tokens[2]]
    by_name = server.admin("GET", "/admin/devices?search=VALVE-1").json()
    assert [row["name"] for row in by_name] == ["valve-1"]
    assert server.admin("GET", "/admin/devices?online=true").json() == []
    removed = server.admin("DELETE", f"/admin/devices/{tokens[0]}/tags/north")
    assert removed.status == 200 and removed.json() == {
        "device": token_tag(tokens[0]), "tags": [], "changed": 1}  # fmt: skip
    bad = server.admin("POST", f"/admin/devices/{tokens[0]}/tags?tag=no%20spaces")
    assert bad.status == 400 and "A tag is" in bad.text
    assert server.admin("POST", f"/admin/devices/{'e' * 32}/tags?tag=x").status == 404
    # The dashboard's device list and a device's page.
    listing = server.admin("GET", "/admin/fleet/devices?" + urllib.parse.urlencode(
        {"search": "valve", "tag": "north"})).text  # fmt: skip
    assert "valve-1" in listing and "valve-0" not in listing and "Devices <small>(1)" in listing
    device_id = server.admin("GET", "/admin/devices?search=valve-1").json()[0]["id"]
    story = server.admin("GET", f"/admin/fleet/devices/{device_id}").text
    assert "valve-1" in story and token_tag(tokens[1]) in story and "north" in story
    assert tokens[1] not in story  # the page names it by its tag, never the token
    assert server.admin("GET", "/admin/fleet/devices/99999").status == 404


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the pages' links, not the database
def test_the_device_list_comes_a_page_at_a_time(server, fleet):
    fleet.add_devices([NewDevice("me@example.com", "Farm", f"d{n:02d}") for n in range(51)])
    first = server.admin("GET", "/admin/fleet/devices").text
    assert first.count("<tr data-device=") == 50 and "page 1 of 2" in first
    assert 'href="/admin/fleet/devices?page=2" rel="next">next →</a>' in first
    assert 'rel="prev"' not in first
    second = server.admin("GET", "/admin/fleet/devices?page=2").text
    assert second.count("<tr data-device=") == 1 and "page 2 of 2" in second
    assert 'rel="prev">← previous</a>' in second and 'rel="next"' not in second
    refused = server.admin("GET", "/admin/fleet/devices?page=0")
    assert refused.status == 400 and "page must be a whole number from 1." in refused.text
