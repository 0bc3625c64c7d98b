"""Rollouts that finish: every row of the per-device state table, each failure reason,
the loop breaker, the history, and restarts in the middle (issue: per-device lifecycle)."""

import dataclasses
import hashlib
import re
import time

import gevent
import pytest
import sqlalchemy

from blynkota.console.commands import finished
from blynkota.ota import TRANSITIONS, IllegalDeviceTransition
from blynkota.ota.rollouts.cohorts import bucket
from blynkota.ota.rollouts.device_states import move, start_tracking
from blynkota.simulator import SimulatedDevice
from blynkota.status_text import render
from blynkota.store import DeviceState, Firmware, Rollout, utcnow

from .devices import BUILD_NEW, BUILD_OLD
from .images import esp8266_image
from .servers import wait_until

FAST = {"ota.retry.backoff": 0.3, "ota.attempt.timeout": 60, "ota.max.attempts": 3}


def query(app, sql: str, **params) -> list[dict]:
    with app.extensions["blynkota.db"].engine.connect() as connection:
        return [dict(row) for row in connection.execute(sqlalchemy.text(sql), params).mappings()]


def device_state(app, token: str) -> dict:
    rows = query(
        app,
        "SELECT rd.* FROM rollout_devices rd JOIN devices d ON d.id = rd.device_id "
        "WHERE d.token = :token ORDER BY rd.id",
        token=token,
    )
    return rows[-1] if rows else {}


def story(app, token: str) -> list[tuple]:
    """The device's whole story, one SQL query on the event table."""
    rows = query(
        app,
        "SELECT e.from_state, e.to_state, e.detail FROM rollout_events e "
        "JOIN devices d ON d.id = e.device_id WHERE d.token = :token ORDER BY e.id",
        token=token,
    )
    return [(row["from_state"], row["to_state"], row["detail"]) for row in rows]


def start_device(server, token, build, **options) -> SimulatedDevice:
    device = SimulatedDevice("127.0.0.1", server.http_port, token, build, **options)
    device.start()
    return device


def run_until(server, app, token, build, state, **options) -> SimulatedDevice:
    """Run one simulated device until its row in the rollout reaches `state`."""
    device = start_device(server, token, build, **options)
    try:
        wait_until(lambda: device_state(app, token).get("state") == state, timeout=60)
    finally:
        device.stop()
    return device


@pytest.fixture
def fast_server(server_factory, app):
    return server_factory(**FAST)


def test_a_normal_update_walks_every_state_with_its_timestamp(fast_server, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    fast_server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    run_until(fast_server, app, token, BUILD_OLD, DeviceState.UPDATED)
    row = device_state(app, token)
    assert row["attempts"] == 1 and row["last_error"] is None
    for stamp in ("pending_at", "first_offered_at", "offered_at", "downloading_at",
                  "downloaded_at", "updated_at"):  # fmt: skip
        assert row[stamp] is not None, stamp
    assert row["pending_at"] <= row["offered_at"] <= row["downloading_at"]
    assert row["downloading_at"] <= row["downloaded_at"] <= row["updated_at"]
    assert row["bytes_sent"] == len(esp8266_image(BUILD_NEW))
    assert [(a, b) for a, b, _ in story(app, token)] == [
        (None, "pending"),
        ("pending", "offered"),
        ("offered", "downloading"),
        ("downloading", "downloaded"),
        ("downloaded", "updated"),
    ]


def test_already_up_to_date_devices_count_as_updated(fast_server, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    fast_server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    device = run_until(fast_server, app, token, BUILD_NEW, DeviceState.UPDATED)
    assert device.ota_urls == []
    (rollout,) = fast_server.admin("GET", "/admin/ota/status").json()
    assert rollout["counts"]["updated"] == 1 and rollout["already_up_to_date"] == 1


def test_a_board_that_always_comes_back_old_gets_exactly_max_attempts_offers(
    fast_server, fleet, app
):
    token = fleet.add_device("me@example.com", "Farm")
    fast_server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    device = start_device(fast_server, token, BUILD_OLD, fail="old-build")
    try:
        # The second attempt downloaded (or already failed): an attempt that a
        # crash cuts short mid-download is given back (not charged), and would
        # add an offer this test does not count.
        wait_until(
            lambda: (
                len(device.ota_urls) == 2
                and device_state(app, token).get("state")
                in (DeviceState.DOWNLOADED, DeviceState.PENDING)
            ),
            message="the second download",
        )
        fast_server.restart()  # kill -9 in the middle of the rollout
        wait_until(lambda: device_state(app, token).get("state") == DeviceState.FAILED,
                   timeout=30, message="the device to fail")  # fmt: skip
        logins = device.logins
        # More reconnects, and another restart: never offered again.
        fast_server.restart()
        wait_until(lambda: device.logins >= logins + 1 and device.ready.is_set(), timeout=30)
        device.stop()
        again = start_device(fast_server, token, BUILD_OLD, fail="old-build")
        wait_until(again.ready.is_set)
        gevent.sleep(1.5)  # several sweeps
        again.stop()
    finally:
        device.stop()
    assert len(device.ota_urls) == 3 and again.ota_urls == []
    row = device_state(app, token)
    assert (row["state"], row["attempts"]) == ("failed", 3)
    assert row["last_error"] == f"came back with build {BUILD_OLD}"
    offers = query(app, "SELECT count(*) AS n FROM ota_commands")[0]["n"]
    assert offers == 3
    failed = [detail for _, to, detail in story(app, token) if to == "failed"]
    assert failed == [f"came back with build {BUILD_OLD}; all 3 attempt(s) used"]


def test_a_retry_waits_out_its_whole_backoff(server_factory, fleet, app):
    """The backoff is kept to the fraction of a second (MySQL stored whole seconds once)."""
    backoff = 1.5
    server = server_factory(**{**FAST, "ota.retry.backoff": backoff})
    token = fleet.add_device("me@example.com", "Farm")
    server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    device = start_device(server, token, BUILD_OLD, fail="old-build")
    try:
        wait_until(lambda: device.logins == 2, message="the login after the first download")
        came_back = time.monotonic()  # the attempt failed here: back on the old build
        wait_until(lambda: len(device.ota_urls) == 2, message="the second offer")
        waited = time.monotonic() - came_back
    finally:
        device.stop()
    assert waited >= backoff - 0.1  # the polls above see each step up to 50 ms late


@pytest.mark.parametrize(
    ("timeout", "reason"),
    [
        ("ota.attempt.timeout", "timed out"),
        # Well before ota.attempt.timeout (60 s): a board that took the command
        # and never asked for the file frees its download slot.
        ("ota.offer.timeout", "offered, never downloaded within ota.offer.timeout (0.5 s)"),
    ],
)
def test_a_board_that_never_downloads_times_out_and_is_retried_while_online(
    server_factory, fleet, app, timeout, reason
):
    server = server_factory(**{**FAST, timeout: 0.5, "ota.max.attempts": 2})
    token = fleet.add_device("me@example.com", "Farm")
    server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    device = start_device(server, token, BUILD_OLD, fail="refuse")
    try:
        wait_until(lambda: device_state(app, token).get("state") == DeviceState.FAILED,
                   timeout=30)  # fmt: skip
        assert device.logins == 1  # the retry reached it without a reconnect
    finally:
        device.stop()
    assert len(device.ota_urls) == 2
    reasons = [detail for _, to, detail in story(app, token) if to in ("pending", "failed")]
    assert reasons[1].startswith(f"{reason}; next attempt after ")
    assert reasons[2] == f"{reason}; all 2 attempt(s) used"


def test_a_download_cut_short_is_recorded_with_its_byte_count(server_factory, fleet, app):
    server = server_factory(**{**FAST, "ota.max.attempts": 1})
    token = fleet.add_device("me@example.com", "Farm")
    size = 12 * 1024 * 1024
    image = esp8266_image(BUILD_NEW, size=size)
    assert server.upload("/admin/ota/start", image).status == 200
    device = start_device(server, token, BUILD_OLD, fail="half")
    try:
        wait_until(lambda: device_state(app, token).get("state") == DeviceState.FAILED,
                   timeout=60)  # fmt: skip
    finally:
        device.stop()
    row = device_state(app, token)
    found = re.fullmatch(r"download interrupted at (\d+) of (\d+) bytes", row["last_error"])
    assert found, row["last_error"]
    assert int(found[2]) == len(image) and len(image) // 2 <= int(found[1]) < len(image)
    assert device.downloads[0].size == len(image) // 2


def test_stop_cancels_pending_devices_and_in_flight_ones_still_finish(server_factory, fleet, app):
    fast_server = server_factory(**{**FAST, "ota.retry.backoff": 60})
    waiting = fleet.add_device("me@example.com", "Farm")
    busy = fleet.add_device("me@example.com", "Farm")
    fast_server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    refusing = start_device(fast_server, busy, BUILD_OLD, fail="refuse")
    old_board = start_device(fast_server, waiting, BUILD_OLD, fail="refuse")
    try:
        wait_until(lambda: refusing.ota_urls and old_board.ota_urls)
        old_board.stop()  # back with its old build: pending, backing off for 60 s
        again = start_device(fast_server, waiting, BUILD_OLD, fail="refuse")
        wait_until(lambda: device_state(app, waiting).get("state") == DeviceState.PENDING)
        again.stop()
        assert fast_server.admin("GET", "/admin/ota/stop").text == "Stopped 1 rollout(s)."
        assert device_state(app, waiting)["state"] == DeviceState.CANCELLED
        # The offered one comes back updated: still counted.
        refusing.stop()
        updated = start_device(fast_server, busy, BUILD_NEW)
        wait_until(lambda: device_state(app, busy).get("state") == DeviceState.UPDATED)
        updated.stop()
    finally:
        refusing.stop()
        old_board.stop()
    (rollout,) = fast_server.admin("GET", "/admin/ota/status").json()
    assert rollout["state"] == "stopped"
    assert rollout["counts"]["cancelled"] == 1 and rollout["counts"]["updated"] == 1


def test_a_replaced_rollout_marks_its_pending_devices_superseded(server_factory, fleet, app):
    fast_server = server_factory(**{**FAST, "ota.retry.backoff": 60})
    token = fleet.add_device("me@example.com", "Farm")
    fast_server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    device = start_device(fast_server, token, BUILD_OLD, fail="refuse")
    try:
        wait_until(lambda: device.ota_urls)
        device.stop()
        again = start_device(fast_server, token, BUILD_OLD, fail="refuse")
        wait_until(lambda: device_state(app, token).get("state") == DeviceState.PENDING)
        again.stop()
    finally:
        device.stop()
    fast_server.upload("/admin/ota/start", esp8266_image("Dec 31 2018 23:59:59"))
    first, second = fast_server.admin("GET", "/admin/ota/status").json()[::-1]
    assert first["state"] == "superseded" and first["superseded_by"] == second["id"]
    assert first["counts"]["superseded"] == 1


def test_queue_true_keeps_a_single_device_update_for_an_offline_device(fast_server, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    image = esp8266_image(BUILD_NEW)
    refused = fast_server.upload(f"/admin/ota/start?token={token}", image)
    assert (refused.status, refused.text) == (400, "No device in session.")
    queued = fast_server.upload(f"/admin/ota/start?token={token}&queue=true", image)
    assert queued.status == 200 and queued.text.startswith("/static/ota/")
    assert device_state(app, token)["state"] == DeviceState.PENDING
    device = run_until(fast_server, app, token, BUILD_OLD, DeviceState.UPDATED)
    assert device.build == BUILD_NEW


def test_status_detail_stop_one_and_the_cli(fast_server, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    fast_server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    fast_server.upload("/admin/ota/start?user=me@example.com", esp8266_image(BUILD_NEW))
    run_until(fast_server, app, token, BUILD_OLD, DeviceState.UPDATED)
    user_rollout, all_rollout = fast_server.admin("GET", "/admin/ota/status").json()
    assert (user_rollout["scope"], user_rollout["target"]) == ("user", "me@example.com")
    assert (all_rollout["scope"], all_rollout["target"]) == ("all", "all devices")
    assert set(user_rollout["counts"]) == set(DeviceState.ALL)
    assert user_rollout["counts"]["updated"] == 1 and user_rollout["device_count"] == 1
    assert user_rollout["firmware"]["build"] == BUILD_NEW
    assert user_rollout["started_by"] == "admin@blynk.cc" and user_rollout["started_at"]

    detail = fast_server.admin("GET", f"/admin/ota/rollouts/{user_rollout['id']}").json()
    (row,) = detail["devices"]
    assert (row["token"], row["state"], row["attempts"]) == (token, "updated", 1)
    assert row["updated_at"] and row["offered_at"]
    assert fast_server.admin("GET", "/admin/ota/rollouts/999").status == 404

    stopped = fast_server.admin("GET", f"/admin/ota/stop?rollout={all_rollout['id']}")
    assert stopped.text == "Stopped 1 rollout(s)."
    states = {r["id"]: r["state"] for r in fast_server.admin("GET", "/admin/ota/status").json()}
    # Its one device updated: the user's rollout is complete (or about to be, at the next sweep).
    assert states[all_rollout["id"]] == "stopped"
    assert states[user_rollout["id"]] in ("active", "complete")
    assert fast_server.admin("GET", "/admin/ota/stop?rollout=abc").status == 400

    table = app.test_cli_runner().invoke(args=["ota", "status"]).output.splitlines()
    assert table[0].split()[:5] == ["ID", "SCOPE", "TARGET", "BUILD", "STATE"]
    assert "UPDATED" in table[0].split()
    one = app.test_cli_runner().invoke(args=["ota", "status", str(user_rollout["id"])])
    assert one.exit_code == 0 and f"{token}  updated  1" in one.output
    # `flask ota status` shows what `blynkota rollout status` shows, from the same code.
    assert table == render(fast_server.admin("GET", "/admin/ota/status").json()).splitlines()


def test_counts_and_backoff_survive_kill_9(server_factory, fleet, app):
    # A backoff long enough to be caught waiting: with FAST's 0.3 s the bad
    # board can use all its attempts between two looks.
    fast_server = server_factory(**{**FAST, "ota.retry.backoff": 30})
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(3)]
    fast_server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    good = start_device(fast_server, tokens[0], BUILD_OLD)
    bad = start_device(fast_server, tokens[1], BUILD_OLD, fail="old-build")
    try:
        wait_until(lambda: device_state(app, tokens[0]).get("state") == DeviceState.UPDATED, 40)
        wait_until(lambda: device_state(app, tokens[1]).get("next_attempt_at") is not None, 40)
        bad.stop()
        before = fast_server.admin("GET", "/admin/ota/status").json()
        backoff_until = device_state(app, tokens[1])["next_attempt_at"]
        fast_server.restart()
        after = fast_server.admin("GET", "/admin/ota/status").json()
        assert after == before
        assert device_state(app, tokens[1])["next_attempt_at"] == backoff_until
        # Devices keep moving to updated after the restart.
        late = start_device(fast_server, tokens[2], BUILD_OLD)
        wait_until(lambda: device_state(app, tokens[2]).get("state") == DeviceState.UPDATED)
        late.stop()
    finally:
        good.stop()
        bad.stop()


def test_the_progress_view_matches_the_rows(fast_server, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    fast_server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    run_until(fast_server, app, token, BUILD_OLD, DeviceState.UPDATED)
    (progress,) = query(app, "SELECT * FROM rollout_progress")
    assert (progress["devices"], progress["updated"], progress["pending"]) == (1, 1, 0)
    # (complete once the sweep has seen its one device's outcome)
    assert progress["build"] == BUILD_NEW and progress["state"] in ("active", "complete")


def test_a_transition_not_in_the_table_raises(app, fleet):
    fleet.add_device("me@example.com", "Farm", token="t" * 32)
    db = app.extensions["blynkota.db"]
    with db.begin() as session:
        (device_id,) = session.execute(sqlalchemy.text("SELECT id FROM devices")).one()
        firmware = Firmware(name="f", original_name="f.bin", size=1, md5="x", sha256="y",
                            uploaded_by="a")  # fmt: skip
        session.add(firmware)
        session.flush()
        rollout = Rollout(scope="all", firmware_id=firmware.id, started_by="a")
        session.add(rollout)
        session.flush()
        rollout_id = rollout.id
        row = start_tracking(session, rollout_id=rollout_id, device_id=device_id,
                             state=DeviceState.PENDING, at=utcnow())  # fmt: skip
        with pytest.raises(IllegalDeviceTransition):
            move(session, row, DeviceState.DOWNLOADED, utcnow())
        with pytest.raises(IllegalDeviceTransition):
            start_tracking(session, rollout_id=rollout_id, device_id=device_id,
                           state=DeviceState.OFFERED, at=utcnow())  # fmt: skip
    # A failed device is offered again only through an operator's retry (back
    # to pending, a fresh set of attempts), never straight away.
    assert (DeviceState.FAILED, DeviceState.OFFERED) not in TRANSITIONS
    assert (DeviceState.UPDATED, DeviceState.OFFERED) not in TRANSITIONS
    assert (DeviceState.INCOMPATIBLE, DeviceState.OFFERED) not in TRANSITIONS


def test_a_device_holding_another_rollouts_offer_does_not_hold_a_wave(app, fleet):
    """Rollout 1 (replaced) still has its offer out to the third board; rollout 2's
    first wave is the three boards, two of them updated. The third is not this
    wave's to wait for: the wave is judged on two, and opens."""
    for number in range(3):
        fleet.add_device("me@example.com", "Farm", token=f"{number}" * 32)
    guards = app.extensions["blynkota"].clock.guards
    with app.extensions["blynkota.db"].begin() as session:
        devices = [row[0] for row in session.execute(sqlalchemy.text("SELECT id FROM devices"))]
        firmware = Firmware(name="f", original_name="f.bin", size=1, md5="x", sha256="y",
                            uploaded_by="a")  # fmt: skip
        session.add(firmware)
        session.flush()
        replaced = Rollout(scope="all", firmware_id=firmware.id, started_by="a",
                           state="superseded")  # fmt: skip
        current = Rollout(scope="all", firmware_id=firmware.id, started_by="a",
                          waves="50,100", percent=50)  # fmt: skip
        session.add_all([replaced, current])
        session.flush()
        now = utcnow()
        held = start_tracking(session, rollout_id=replaced.id, device_id=devices[2],
                              state=DeviceState.PENDING, at=now)  # fmt: skip
        move(session, held, DeviceState.OFFERED, now, attempts=1)
        for device_id, state in zip(devices, ("updated", "updated", "pending"), strict=True):
            row = start_tracking(session, rollout_id=current.id, device_id=device_id,
                                 state=DeviceState.PENDING, at=now, cohort_bucket=10)  # fmt: skip
            if state == "updated":
                move(session, row, DeviceState.OFFERED, now, attempts=1)
                offered = dataclasses.replace(row, state=DeviceState.OFFERED, attempts=1)
                move(session, offered, DeviceState.UPDATED, now)
        share, why = guards.next_wave(session, current)
        assert (share, why) == (100, "wave reached 100% updated of 2 finished (needs 100%)")
        # Once it is free (its offer failed, back to pending here), it is the wave's again.
        session.execute(sqlalchemy.text("UPDATE rollout_devices SET state = 'failed' "
                                        "WHERE rollout_id = :r"), {"r": replaced.id})  # fmt: skip
        share, why = guards.next_wave(session, current)
        assert share is None and "2 of 3 device(s) finished" in why


def test_a_stuck_board_does_not_stall_the_next_rollouts_wave(server_factory, fleet, app):
    """The issue's case, with boards: one takes rollout 1's offer and never
    downloads; rollout 2 (waves 99,100) replaces rollout 1. Its first wave is
    judged on the two boards that update, not on the stuck one, whose offer
    (60 s) is still out when the second wave opens."""
    server = server_factory(**{**FAST, "ota.offer.timeout": 60})
    later = "Dec 31 2018 23:59:59"
    later_image = esp8266_image(later)
    # A rollout's cohort seed is its image's digest: the stuck board's token is
    # one that hashes into rollout 2's first wave (99 buckets in 100 do).
    seed = hashlib.sha256(later_image).hexdigest()[:16]
    stuck = next(t for t in (f"{n:032x}" for n in range(1, 100)) if bucket(seed, t) < 99)
    good = [fleet.add_device("me@example.com", "Farm") for _ in range(2)]
    fleet.add_device("me@example.com", "Farm", token=stuck)
    assert server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW)).status == 200
    boards = [start_device(server, token, BUILD_OLD) for token in good]
    boards.append(start_device(server, stuck, BUILD_OLD, fail="refuse"))
    try:
        wait_until(lambda: boards[2].ota_urls and all(b.build == BUILD_NEW for b in boards[:2]),
                   timeout=30, message="rollout 1: two updated, one offered")  # fmt: skip
        answer = server.upload("/admin/ota/start?now=true&waves=99,100", later_image)
        assert answer.status == 200, answer.text
        (second,) = query(app, "SELECT id, cohort_seed FROM rollouts WHERE state = 'active'")
        assert second["cohort_seed"] == seed and bucket(seed, stuck) < 99
        wait_until(lambda: query(app, "SELECT percent FROM rollouts WHERE id = :r",
                                 r=second["id"]) == [{"percent": 100}],
                   timeout=30, message="the second wave opened")  # fmt: skip
        assert device_state(app, stuck)["state"] == DeviceState.PENDING  # in rollout 2
        held = query(app, "SELECT rd.state FROM rollout_devices rd JOIN devices d "
                     "ON d.id = rd.device_id WHERE d.token = :t AND rd.rollout_id != :r",
                     t=stuck, r=second["id"])  # fmt: skip
        assert held == [{"state": DeviceState.OFFERED}]  # rollout 1's offer, still out
        # The good boards update (one may hash into the second wave, just opened).
        wait_until(lambda: all(board.build == later for board in boards[:2]), timeout=30,
                   message="both good boards on the later build")  # fmt: skip
    finally:
        for board in boards:
            board.stop()


def test_a_campaign_says_how_many_devices_it_targets_and_has_seen(fast_server, fleet, app):
    """Before any device logs in, a campaign has met none ("0 of 0"): its reach
    says what it targets and how many it has seen, in the JSON, the CLI text
    and the dashboard."""
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(3)]
    assert fast_server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).status == 200
    (status,) = fast_server.admin("GET", "/admin/ota/status").json()
    assert (status["device_count"], status["targeted"], status["seen"]) == (0, 3, 0)
    assert status["reach"] == "3 targeted, 0 seen yet"
    assert "reach: 3 targeted, 0 seen yet" in render([status])
    assert not finished(status)  # `rollout status --watch` waits for the devices it has not met
    page = fast_server.admin("GET", "/admin/").text
    assert "3 targeted, 0 seen yet" in page
    device = start_device(fast_server, tokens[0], BUILD_OLD)
    try:
        wait_until(lambda: fast_server.admin("GET", "/admin/ota/status").json()[0]["reach"]
                   == "3 targeted, 1 seen since the start", message="one seen")  # fmt: skip
    finally:
        device.stop()
    fast_server.admin("POST", f"/admin/ota/rollouts/{status['id']}/stop")
    (ended,) = fast_server.admin("GET", "/admin/ota/status").json()
    assert (ended["targeted"], ended["seen"], ended["reach"]) == (None, None, None)


def test_rollouts_complete_and_a_campaign_reopens_for_a_device_that_joins(fast_server, fleet, app):
    """A campaign completes once every device its target names has an outcome
    (not while one has not been seen), goes back to active for a device that
    joins, and completes again; --watch ends on complete."""
    first, second = (fleet.add_device("me@example.com", "Farm") for _ in range(2))
    assert fast_server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).status == 200

    def summary() -> dict:
        (found,) = fast_server.admin("GET", "/admin/ota/status").json()
        return found

    run_until(fast_server, app, first, BUILD_OLD, DeviceState.UPDATED)
    time.sleep(0.6)  # three sweeps: the second device has not been seen, so not complete
    assert summary()["state"] == "active" and not finished(summary())
    run_until(fast_server, app, second, BUILD_OLD, DeviceState.UPDATED)
    wait_until(lambda: summary()["state"] == "complete", message="complete")
    assert summary()["outcome"] == "2 device(s): 2 updated, 0 failed"
    assert finished(summary()) and "complete: 2 device(s): 2 updated, 0 failed" in render(
        [summary()]
    )
    joining = fleet.add_device("me@example.com", "Farm")
    board = start_device(fast_server, joining, BUILD_OLD)
    try:
        wait_until(lambda: board.build == BUILD_NEW, timeout=30, message="the joiner updated")
        wait_until(lambda: summary()["outcome"] == "3 device(s): 3 updated, 0 failed",
                   message="complete again")  # fmt: skip
    finally:
        board.stop()
    details = [row["detail"] for row in query(
        app, "SELECT detail FROM rollout_events WHERE device_id IS NULL ORDER BY id")]  # fmt: skip
    assert details[-3:] == [
        "complete: 2 device(s): 2 updated, 0 failed",
        "active again: a device to update (joined, retried or reverted)",
        "complete: 3 device(s): 3 updated, 0 failed",
    ]


def test_a_single_device_rollout_completes_for_good(fast_server, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    board = start_device(fast_server, token, BUILD_OLD)
    try:
        wait_until(board.ready.is_set)
        answer = fast_server.upload(f"/admin/ota/start?token={token}", esp8266_image(BUILD_NEW))
        assert answer.status == 200, answer.text
        wait_until(lambda: fast_server.admin("GET", "/admin/ota/status").json()[0]["state"]
                   == "complete", timeout=30, message="complete")  # fmt: skip
    finally:
        board.stop()
    (done,) = fast_server.admin("GET", "/admin/ota/status").json()
    assert done["outcome"] == "1 device(s): 1 updated, 0 failed"
    assert (done["targeted"], done["reach"]) == (None, None)
    page = fast_server.admin("GET", f"/admin/rollouts/{done['id']}").text
    assert "1 device(s): 1 updated, 0 failed" in page


def test_a_retry_makes_a_complete_rollout_active_again(server_factory, fleet, app):
    """Its one board fails its one attempt: complete, "1 failed". A retry gives
    the board a fresh attempt, so the rollout is active again until it ends."""
    server = server_factory(**{**FAST, "ota.max.attempts": 1})
    token = fleet.add_device("me@example.com", "Farm")
    board = start_device(server, token, BUILD_OLD, fail="old-build")
    try:
        wait_until(board.ready.is_set)
        answer = server.upload(f"/admin/ota/start?token={token}", esp8266_image(BUILD_NEW))
        assert answer.status == 200, answer.text

        def status() -> dict:
            return server.admin("GET", "/admin/ota/status").json()[0]

        wait_until(lambda: status()["outcome"] == "1 device(s): 0 updated, 1 failed",
                   timeout=30, message="complete, failed")  # fmt: skip
        retried = server.admin("POST", f"/admin/ota/rollouts/{status()['id']}/retry")
        assert retried.status == 200, retried.text
        wait_until(lambda: len(board.ota_urls) == 2, timeout=30, message="offered again")
        wait_until(lambda: status()["state"] == "complete", timeout=30, message="complete again")
    finally:
        board.stop()
    details = [row["detail"] for row in query(
        app, "SELECT detail FROM rollout_events WHERE device_id IS NULL ORDER BY id")]  # fmt: skip
    assert "active again: a device to update (joined, retried or reverted)" in details
