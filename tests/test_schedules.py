"""When rollouts run: startAt= (a scheduled rollout) and window= with tz= (issue 29).

The clock is the test's: a start a few seconds ahead, windows placed around
the current time of a named zone, and the window's rules judged at times the
test gives (OfferWindow), never by sleeping hours.
"""

from datetime import UTC, datetime, timedelta

import gevent
import pytest

from blynkota.ota.rollouts.planner import RolloutPlanner
from blynkota.ota.rollouts.schedule import OfferWindow, ScheduleError, parse_start_at, parse_window
from blynkota.simulator import SimulatedDevice
from blynkota.status_text import render
from blynkota.store import Rollout, RolloutState, utcnow

from .devices import BUILD_NEW, BUILD_OLD
from .images import esp8266_image
from .servers import wait_until
from .test_lifecycle import query

JSON = {"Accept": "application/json"}


def test_a_window_across_midnight_and_when_it_opens_next():
    night = OfferWindow(*parse_window("22:30-04:00"), "Europe/Berlin")  # UTC+1 in December
    at = lambda text: datetime.fromisoformat(text)  # noqa: E731 (naive UTC)
    assert night.contains(at("2026-12-07T21:30:00")) and night.contains(at("2026-12-08T02:59:00"))
    assert not night.contains(at("2026-12-08T03:00:00"))  # 04:00 in Berlin: closed
    assert not night.contains(at("2026-12-07T21:29:59"))
    assert night.opens_at(at("2026-12-07T12:00:00")) == at("2026-12-07T21:30:00")
    assert night.opens_at(at("2026-12-07T22:00:00")) == at("2026-12-08T21:30:00")
    # Summer time: the same wall-clock window is an hour earlier in UTC.
    assert night.opens_at(at("2026-07-01T12:00:00")) == at("2026-07-01T20:30:00")
    assert night.outlook(at("2026-12-07T12:00:00")) == (
        "offers inside 22:30-04:00 Europe/Berlin: opens at 2026-12-07 21:30 UTC"
    )
    day = OfferWindow(*parse_window("09:00-17:00"), "UTC")
    assert day.contains(at("2026-12-07T09:00:00")) and not day.contains(at("2026-12-07T17:00:00"))
    for bad in ("25:00-01:00", "2:00-05:00", "02:00-02:00", "02:00", "02:00-05:00 "):
        with pytest.raises(ScheduleError):
            parse_window(bad)
    now = datetime(2026, 12, 7, 12, 0)
    assert parse_start_at("2026-12-07T14:00:00+01:00", "UTC", now) == datetime(2026, 12, 7, 13)
    assert parse_start_at("2026-12-07T14:00:00", "Europe/Berlin", now) == datetime(2026, 12, 7, 13)
    assert parse_start_at("2026-12-07T13:00:00Z", "Europe/Berlin", now) == datetime(2026, 12, 7, 13)
    for bad in ("2026-12-07T11:00:00Z", "tomorrow", "2028-01-01T00:00:00Z"):
        with pytest.raises(ScheduleError):
            parse_start_at(bad, "UTC", now)


@pytest.mark.parametrize(
    "query_string, told",
    [
        ("window=25:00-01:00", "window must be HH:MM-HH:MM"),
        ("window=02:00-02:00", "window must not start when it ends"),
        ("window=02:00-05:00&tz=Mars/Olympus", "tz must be an IANA time zone"),
        ("tz=UTC", "tz needs window or startAt"),
        ("startAt=2020-01-01T00:00:00Z", "has passed"),
        ("startAt=soon", "startAt must be an ISO 8601 time"),
    ],
)
def test_bad_schedules_are_refused_in_one_line(shared_server, query_string, told):
    answer = shared_server.upload(f"/admin/ota/start?{query_string}", esp8266_image(BUILD_NEW))
    assert answer.status == 400 and told in answer.text and "\n" not in answer.text.strip()


def test_one_device_takes_no_campaign_parameters(shared_server):
    token = "0" * 32
    answer = shared_server.upload(
        f"/admin/ota/start?token={token}&window=02:00-05:00&percent=10", esp8266_image(BUILD_NEW)
    )
    assert answer.status == 400
    assert answer.text == "percent, window: for campaigns, not one device (token)."


def test_a_scheduled_rollout_starts_at_its_time_and_takes_over_then(server, fleet, app):
    """Scheduled 3 s ahead: until then the running rollout keeps the fleet and
    the connected board (updated by it) is offered nothing; then it starts (once), supersedes
    the running one and offers at once (now=true)."""
    token = fleet.add_device("me@example.com", "Farm")
    first = server.upload("/admin/ota/start", esp8266_image("Nov 28 2018 12:00:00"))
    assert first.status == 200
    board = SimulatedDevice("127.0.0.1", server.http_port, token, BUILD_OLD)
    board.start()
    try:
        wait_until(lambda: board.updates == 1 and board.ready.is_set(), timeout=30,
                   message="the first rollout's update")  # fmt: skip
        board.ota_urls.clear()
        start_at = (datetime.now(UTC) + timedelta(seconds=3)).isoformat(timespec="seconds")
        answer = server.admin(
            "POST", f"/admin/ota/start?now=true&startAt={start_at.replace('+', '%2B')}",
            files={"file": ("fw.bin", esp8266_image(BUILD_NEW))}, headers=JSON,
        )  # fmt: skip
        assert answer.status == 200, answer.text
        started = answer.json()
        assert started["state"] == "scheduled" and started["start_at"].startswith(start_at[:19])
        (scheduled, running) = server.admin("GET", "/admin/ota/status").json()
        assert scheduled["state"] == "scheduled"
        assert running["state"] in ("active", "complete")  # its one board has updated
        assert f"scheduled: starts at {started['start_at']}" in render([scheduled])
        assert board.ota_urls == []
        wait_until(lambda: board.ota_urls, timeout=30, message="the offer once it started")
        assert datetime.now(UTC) >= datetime.fromisoformat(start_at)
        (now_running, superseded) = server.admin("GET", "/admin/ota/status").json()
        # Its one board may have updated already (it downloads as soon as offered).
        assert now_running["state"] in ("active", "complete")
        assert superseded["state"] == "superseded"
        assert superseded["superseded_by"] == now_running["id"]
        events = query(app, "SELECT detail FROM rollout_events WHERE rollout_id = :r "
                       "AND device_id IS NULL ORDER BY id", r=now_running["id"])  # fmt: skip
        assert events[0]["detail"].startswith("scheduled for ")
        assert [e["detail"] for e in events].count(
            f"started as scheduled (startAt {started['start_at'][:19].replace('T', ' ')} UTC)"
        ) == 1
    finally:
        board.stop()


def test_a_scheduled_rollout_starts_once_whatever_the_number_of_sweepers(app):
    """Two sweeps (two nodes) find the same rollout due: one starts it."""
    db = app.extensions["blynkota.db"]
    planner = RolloutPlanner()
    with db.begin() as session:
        from blynkota.ota.rollouts.cohorts import Controls
        from blynkota.store import Firmware

        firmware = Firmware(name="a" * 24, original_name="fw.bin", build=BUILD_NEW, size=1,
                            md5="0" * 32, sha256="0" * 64, uploaded_by="t")  # fmt: skip
        session.add(firmware)
        session.flush()
        controls = Controls(start_at=utcnow() + timedelta(hours=1))
        rollout_id = planner.start(session, scope="all", firmware=firmware, started_by="t",
                                   controls=controls).id  # fmt: skip
    with db.begin() as session:  # what both sweeps read: due, still scheduled
        seen = session.get(Rollout, rollout_id)
        session.expunge(seen)
    with db.begin() as session:
        assert planner.start_scheduled(session, seen, utcnow())
    with db.begin() as session:
        assert not planner.start_scheduled(session, seen, utcnow())  # the row says: started
        assert session.get(Rollout, rollout_id).state == RolloutState.ACTIVE
    rows = query(app, "SELECT count(*) AS n FROM rollout_events WHERE to_state = 'active'")
    assert rows == [{"n": 1}]


def _window_around(now: datetime, *, open_now: bool) -> str:
    """A one-hour window (UTC) that holds `now`, or one that opened an hour ago and closed."""
    start = now - timedelta(minutes=5) if open_now else now - timedelta(hours=2)
    end = start + timedelta(hours=1)
    return f"{start:%H:%M}-{end:%H:%M}"


def test_a_window_holds_offers_until_it_opens(server, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    board = SimulatedDevice("127.0.0.1", server.http_port, token, BUILD_OLD)
    board.start()
    try:
        wait_until(board.ready.is_set)
        closed = _window_around(datetime.now(UTC), open_now=False)
        answer = server.upload(f"/admin/ota/start?now=true&window={closed}&tz=UTC",
                               esp8266_image("Nov 30 2018 12:00:00"))  # fmt: skip
        assert answer.status == 200, answer.text
        wait_until(lambda: query(app, "SELECT state FROM rollout_devices") == [
            {"state": "pending"}], message="the board entered, pending")  # fmt: skip
        gevent.sleep(1.0)  # fills ran: nothing offered outside the window
        assert board.ota_urls == []
        (status,) = server.admin("GET", "/admin/ota/status").json()
        assert status["window"] == f"{closed} UTC"
        assert status["window_outlook"].startswith(f"offers inside {closed} UTC: opens at ")
        assert f"window: {status['window_outlook']}" in render([status])
        # Another rollout, its window open now, takes over: offered at once.
        opened = _window_around(datetime.now(UTC), open_now=True)
        answer = server.upload(f"/admin/ota/start?now=true&window={opened}&tz=UTC",
                               esp8266_image(BUILD_NEW))  # fmt: skip
        assert answer.status == 200, answer.text
        wait_until(lambda: board.build == BUILD_NEW, timeout=30, message="the update")
        (status, _) = server.admin("GET", "/admin/ota/status").json()
        assert status["window_outlook"] == f"offers inside {opened} UTC: open now"
    finally:
        board.stop()
