"""Fleet-safe rollouts with simulated fleets: now=, percent=, waves=, the download
throttle, auto-pause, pause/resume/stop by hand, dryRun= (issue: fleet controls)."""

import hashlib
from collections import Counter
from datetime import datetime

import gevent
import pytest
import sqlalchemy

from blynkota.ota.rollouts.cohorts import bucket
from blynkota.simulator import SimulatedDevice

from .devices import BUILD_NEW, BUILD_OLD
from .images import esp8266_image
from .servers import wait_until

SLOT_STATES = ("offered", "downloading")


def query(app, sql: str, **params) -> list[dict]:
    with app.extensions["blynkota.db"].engine.connect() as connection:
        return [dict(row) for row in connection.execute(sqlalchemy.text(sql), params).mappings()]


def states(app) -> dict[str, str]:
    rows = query(
        app,
        "SELECT d.token, rd.state FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id",
    )
    return {row["token"]: row["state"] for row in rows}


def rollout_events(app) -> list[dict]:
    return query(app, "SELECT * FROM rollout_events WHERE device_id IS NULL ORDER BY id")


class Fleet:
    """Simulated devices against one server, all stopped at the end."""

    def __init__(self, server) -> None:
        self.server = server
        self.devices: list[SimulatedDevice] = []

    def start(self, tokens, build=BUILD_OLD, **options) -> list[SimulatedDevice]:
        started = []
        for token in tokens:
            device = SimulatedDevice("127.0.0.1", self.server.http_port, token, build, **options)
            device.start()
            started.append(device)
        self.devices += started
        return started

    def stop(self) -> None:
        for device in self.devices:
            device.stop()
        gevent.sleep(0.1)


@pytest.fixture
def fleet_of(fleet):
    running: list[Fleet] = []

    def make(server, count: int, project: str = "Farm") -> tuple[Fleet, list[str]]:
        tokens = [fleet.add_device("owner@example.com", project) for _ in range(count)]
        simulated = Fleet(server)
        running.append(simulated)
        return simulated, tokens

    yield make
    for simulated in running:
        simulated.stop()


def test_now_true_reaches_connected_devices(server_factory, fleet_of, app):
    server = server_factory()
    fleet, tokens = fleet_of(server, 8)
    devices = fleet.start(tokens)
    wait_until(lambda: all(d.ready.is_set() for d in devices))
    server.upload("/admin/ota/start", esp8266_image("Feb  2 2019 00:00:00"))  # login only
    gevent.sleep(0.5)
    assert all(d.ota_urls == [] for d in devices)
    assert server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW)).status == 200
    wait_until(lambda: list(states(app).values()) == ["updated"] * 8, timeout=30)
    assert all(d.build == BUILD_NEW and d.logins == 2 for d in devices)
    # Every device has its outcome: the sweep marks the rollout complete.
    wait_until(lambda: server.admin("GET", "/admin/ota/status").json()[0]["state"] == "complete")
    (rollout, older) = server.admin("GET", "/admin/ota/status").json()  # newest first
    assert rollout["push_online"] is True and rollout["counts"]["updated"] == 8
    # One rollout, or the newest N (what the dashboard polls):
    assert server.admin("GET", "/admin/ota/status?limit=1").json() == [rollout]
    assert server.admin("GET", f"/admin/ota/status?rollout={older['id']}").json() == [older]
    refused = server.admin("GET", "/admin/ota/status?limit=0")
    assert refused.status == 400 and refused.text.startswith("limit must be a whole number")
    assert query(app, "SELECT enrol_due_at FROM rollouts WHERE push_online = :yes", yes=True) == [
        {"enrol_due_at": None}
    ]


def test_an_enrolment_left_owed_by_a_stopped_process_is_done_by_the_sweeper(
    server_factory, fleet_of, app
):
    """now=true answers before the connected devices are entered; the rollout row
    records the work as owed until it is done. Here the row is left as a process
    leaves it when it stops right after answering: the sweeper does the work."""
    server = server_factory()
    fleet, tokens = fleet_of(server, 6)
    devices = fleet.start(tokens)
    wait_until(lambda: all(d.ready.is_set() for d in devices))
    server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))  # at the next login only
    gevent.sleep(0.5)
    assert states(app) == {} and all(d.ota_urls == [] for d in devices)
    with app.extensions["blynkota.db"].engine.begin() as connection:
        connection.execute(
            sqlalchemy.text("UPDATE rollouts SET push_online = :yes, enrol_due_at = :long_ago"),
            {"yes": True, "long_ago": datetime(2026, 1, 1)},
        )
    wait_until(lambda: list(states(app).values()) == ["updated"] * 6, timeout=30,
               message="the sweeper to enter the connected devices")  # fmt: skip
    assert query(app, "SELECT enrol_due_at FROM rollouts") == [{"enrol_due_at": None}]


def test_percent_is_a_stable_share_that_expand_widens(server_factory, fleet_of, app):
    server = server_factory()
    fleet, tokens = fleet_of(server, 60)
    image = esp8266_image(BUILD_NEW)
    seed = hashlib.sha256(image).hexdigest()[:16]
    expected = {token for token in tokens if bucket(seed, token) < 30}
    assert 5 < len(expected) < 40
    assert server.upload("/admin/ota/start?now=true&percent=30", image).status == 200
    fleet.start(tokens)
    wait_until(lambda: set(states(app)) == expected and set(states(app).values()) == {"updated"},
               timeout=60, message="the 30% to update")  # fmt: skip

    server.restart()  # kill -9: the same devices, chosen again by hash
    wait_until(lambda: sum(d.ready.is_set() for d in fleet.devices) == 60, timeout=60)
    gevent.sleep(0.5)
    assert set(states(app)) == expected
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    assert rollout["percent"] == 30

    widened = server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/expand?percent=60")
    assert widened.status == 200 and widened.json()["percent"] == 60
    wider = {token for token in tokens if bucket(seed, token) < 60}
    wait_until(lambda: set(states(app)) == wider and set(states(app).values()) == {"updated"},
               timeout=60, message="the 60% to update")  # fmt: skip
    narrower = server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/expand?percent=20")
    assert narrower.status == 400


def test_waves_grow_in_order_when_each_succeeds(server_factory, fleet_of, app):
    server = server_factory(**{"ota.wave.min.devices": 3})
    fleet, tokens = fleet_of(server, 80)
    fleet.start(tokens)
    wait_until(lambda: all(d.ready.is_set() for d in fleet.devices), timeout=30)
    answer = server.upload("/admin/ota/start?now=true&waves=10,50,100&success=95",
                           esp8266_image(BUILD_NEW))  # fmt: skip
    assert answer.status == 200, answer.text
    wait_until(lambda: len(states(app)) == 80 and set(states(app).values()) == {"updated"},
               timeout=90, message="every wave")  # fmt: skip
    widenings = [e for e in rollout_events(app) if "% of devices" in (e["detail"] or "")]
    assert [e["detail"].rsplit(": ", 1)[1] for e in widenings] == [
        "10% -> 50% of devices",
        "50% -> 100% of devices",
    ]
    # No device of a later wave was offered before its wave opened.
    offers = query(
        app,
        "SELECT rd.wave, min(e.id) AS first_offer FROM rollout_events e "
        "JOIN rollout_devices rd ON rd.device_id = e.device_id AND rd.rollout_id = e.rollout_id "
        "WHERE e.to_state = 'offered' GROUP BY rd.wave ORDER BY rd.wave",
    )
    assert [row["wave"] for row in offers] == [1, 2, 3]
    assert offers[1]["first_offer"] > widenings[0]["id"]
    assert offers[2]["first_offer"] > widenings[1]["id"]
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    assert rollout["waves"] == [10, 50, 100] and rollout["percent"] == 100


def test_failures_past_the_threshold_pause_the_rollout_until_resumed(server_factory, fleet_of, app):
    server = server_factory(
        **{"ota.max.attempts": 1, "ota.abort.min.devices": 6, "ota.max.concurrent": 4}
    )
    fleet, tokens = fleet_of(server, 40)
    fleet.start(tokens[:20], fail="old-build")
    fleet.start(tokens[20:])
    wait_until(lambda: all(d.ready.is_set() for d in fleet.devices), timeout=30)
    server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW))
    wait_until(lambda: server.admin("GET", "/admin/ota/status").json()[0]["state"] == "paused",
               timeout=60, message="the pause")  # fmt: skip
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    assert "above ota.abort.failure.ratio 0.2" in rollout["pause_reason"]
    gevent.sleep(1.5)  # in-flight attempts finish; nothing new is offered
    offered = query(app, "SELECT count(*) AS n FROM ota_commands")[0]["n"]
    gevent.sleep(1.0)
    assert query(app, "SELECT count(*) AS n FROM ota_commands")[0]["n"] == offered
    assert offered < 40
    assert "in_flight" not in rollout

    resumed = server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/resume")
    assert resumed.status == 200 and resumed.json()["state"] == "active"
    wait_until(lambda: query(app, "SELECT count(*) AS n FROM ota_commands")[0]["n"] > offered,
               timeout=30, message="offers after the resume")  # fmt: skip
    details = [e["detail"] for e in rollout_events(app)]
    assert any(d.startswith("paused: failure ratio") for d in details)
    assert f"resumed by {'admin@blynk.cc'}" in details


def test_pause_resume_and_stop_by_hand(server_factory, fleet_of, app):
    server = server_factory()
    fleet, tokens = fleet_of(server, 4)
    path = server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).text
    assert path.startswith("/static/ota/")
    (rollout,) = server.admin("GET", "/admin/ota/status").json()
    paused = server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/pause")
    assert paused.json()["state"] == "paused" and paused.json()["pause_reason"] == (
        "by admin@blynk.cc"
    )
    assert server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/pause").status == 409
    devices = fleet.start(tokens)
    wait_until(lambda: all(d.ready.is_set() for d in devices))
    gevent.sleep(0.6)
    assert all(d.ota_urls == [] for d in devices)
    assert set(states(app).values()) == {"pending"}  # they belong to it, and wait
    server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/resume")
    wait_until(lambda: set(states(app).values()) == {"updated"}, timeout=30)
    stopped = server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/stop")
    assert stopped.json()["state"] == "stopped"
    assert server.admin("POST", f"/admin/ota/rollouts/{rollout['id']}/resume").status == 409
    assert server.admin("POST", "/admin/ota/rollouts/999/pause").status == 404


@pytest.mark.timeout(600)
# On MySQL the same replay runs across three nodes with 3,000 devices
# (test_scale_out.py), which covers this one process and costs the suite less.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_throttle_holds_under_a_reconnect_storm(server_factory, fleet_of, app, db_url):
    limit = 5
    server = server_factory(**{"ota.max.concurrent": limit})
    devices = 600  # with 5 slots: 120 rounds of offer, download, reconnect
    fleet, tokens = fleet_of(server, devices)
    server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    fleet.start(tokens)  # every login within a few seconds
    try:
        wait_until(lambda: list(states(app).values()).count("updated") == devices, timeout=300)
    except AssertionError:
        late = [d for d in fleet.devices if states(app).get(d.token) != "updated"]
        raise AssertionError(
            f"not all updated: {Counter(states(app).values())}; late devices: "
            + "; ".join(
                f"{d.token} {states(app).get(d.token)} logins={d.logins} urls={len(d.ota_urls)} "
                f"ready={d.ready.is_set()} downloads={[x.error for x in d.downloads]}"
                for d in late[:10]
            )
        ) from None
    # Replay the recorded transitions in the order the server wrote them: never
    # more than `limit` devices holding a download slot.
    events = query(
        app,
        "SELECT device_id, from_state, to_state, at FROM rollout_events "
        "WHERE device_id IS NOT NULL ORDER BY id",
    )
    holding, most = 0, 0
    for event in events:
        was, now = event["from_state"] in SLOT_STATES, event["to_state"] in SLOT_STATES
        holding += int(now) - int(was)
        most = max(most, holding)
    assert holding == 0
    assert most == limit  # the limit was reached (others waited), never passed
    if db_url.startswith("sqlite"):
        # One writer at a time: the ids' order is the timestamps' order too.
        # (MySQL stamps whole seconds, taken before each transaction queues.)
        times = [event["at"] for event in events]
        assert times == sorted(times)


def test_dry_run_lists_the_devices_and_starts_nothing(server_factory, fleet_of, fleet, app):
    server = server_factory()
    _, tokens = fleet_of(server, 30)
    current = fleet.add_device("owner@example.com", "Farm")
    image = esp8266_image(BUILD_NEW)
    with app.extensions["blynkota.db"].engine.begin() as connection:
        connection.execute(sqlalchemy.text("UPDATE devices SET build = :b"), {"b": BUILD_OLD})
        connection.execute(sqlalchemy.text("UPDATE devices SET build = :b WHERE token = :t"),
                           {"b": BUILD_NEW, "t": current})  # fmt: skip
    answer = server.upload("/admin/ota/start?dryRun=true", image)
    assert answer.status == 200
    listed = answer.json()
    assert listed["dry_run"] is True and listed["build"] == BUILD_NEW
    assert sorted(d["token"] for d in listed["devices"]) == sorted(tokens)
    first = listed["devices"][0]
    assert set(first) >= {"token", "user", "project", "build", "online"}
    assert (first["user"], first["project"], first["build"], first["online"]) == (
        "owner@example.com", "Farm", BUILD_OLD, False,
    )  # fmt: skip
    seed = hashlib.sha256(image).hexdigest()[:16]
    half = server.upload("/admin/ota/start?dryRun=true&percent=50", image).json()
    assert sorted(d["token"] for d in half["devices"]) == sorted(
        token for token in tokens if bucket(seed, token) < 50
    )
    assert query(app, "SELECT count(*) AS n FROM rollouts")[0]["n"] == 0
    assert query(app, "SELECT count(*) AS n FROM firmware")[0]["n"] == 0


BAD_CONTROLS = [
    ("percent=0", "percent must be a whole number from 1 to 100, not '0'"),
    ("percent=abc", "percent must be a whole number"),
    # isdigit() says yes to these; int() or the database did not.
    ("percent=%C2%B2", "percent must be a whole number from 1 to 100, not '²'"),
    ("success=%C2%B2&waves=10,100", "success must be a whole number"),
    ("percent=%D9%A5", "percent must be a whole number"),  # an Arabic-Indic 5
    ("percent=+5", "percent must be a whole number"),
    ("waves=10,%C2%B2", "waves must be percentages from 1 to 100"),
    ("waves=10,,50", "waves must be percentages from 1 to 100"),
    ("waves=50,10", "waves must grow"),
    ("waves=10,50&percent=10", "not both"),
    ("success=95", "success needs waves"),
    ("now=maybe", "now must be true or false"),
]
BAD_NUMBERS = [
    ("POST", "/admin/ota/stop?rollout=%C2%B2", "rollout must be a rollout id"),
    ("POST", f"/admin/ota/stop?rollout={10**30}", "rollout must be a rollout id"),
    ("GET", f"/admin/ota/rollouts/{2**64}", "rollout must be a rollout id"),
    ("GET", "/admin/ota/rollouts/%C2%B2", "rollout must be a rollout id"),
    ("POST", f"/admin/ota/rollouts/{2**31}/pause", "rollout must be a rollout id"),
    ("POST", "/admin/ota/rollouts/1/expand?percent=%C2%B2", "percent must be a whole number"),
]


def test_bad_controls_and_numbers_are_a_400_naming_the_parameter(server):
    """One server for every case: each is a request, none changes anything."""
    image = esp8266_image(BUILD_NEW)
    wrong = []
    for query_string, message in BAD_CONTROLS:
        answer = server.upload(f"/admin/ota/start?{query_string}", image)
        if answer.status != 400 or message not in answer.text:
            wrong.append((query_string, answer.status, answer.text))
    for method, path, message in BAD_NUMBERS:
        answer = server.admin(method, path)
        if answer.status != 400 or message not in answer.text:
            wrong.append((path, answer.status, answer.text))
    assert wrong == []
    assert "Traceback" not in server.log()


def test_a_project_given_as_an_odd_number_is_just_not_found(server, fleet):
    fleet.add_device("owner@example.com", "Farm")
    for project in ("%C2%B2", str(10**30)):
        answer = server.upload(
            f"/admin/ota/start?user=owner@example.com&project={project}", esp8266_image(BUILD_NEW)
        )
        assert answer.status == 400 and "Requested project not found" in answer.text, answer.text
