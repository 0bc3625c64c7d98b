"""Rollout rules beyond the Blynk server: precedence, supersede, restarts, URLs."""

import socket
import subprocess
import sys

import gevent
import sqlalchemy

from blynkota.simulator import SimulatedDevice

from .devices import BUILD_NEW, BUILD_OLD, RawDevice, without_key
from .images import esp8266_image
from .servers import ROOT, wait_until

BUILD_USER = "Dec 24 2018 18:00:00"


def rows(app, sql: str):
    with app.extensions["blynkota.db"].engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sqlalchemy.text(sql))]


def test_the_most_specific_rollout_wins_and_nothing_ping_pongs(server, simulated, fleet):
    mine = fleet.add_device("me@example.com", "Farm")
    theirs = fleet.add_device("them@example.com", "Farm")
    # All devices first, then the user: Blynk would bounce `mine` between both builds.
    assert server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).status == 200
    user_rollout = server.upload("/admin/ota/start?user=me@example.com", esp8266_image(BUILD_USER))
    assert user_rollout.status == 200

    my_device, their_device = simulated(mine, BUILD_OLD), simulated(theirs, BUILD_OLD)
    wait_until(lambda: my_device.build == BUILD_USER and their_device.build == BUILD_NEW)
    wait_until(lambda: my_device.logins == 2 and their_device.logins == 2)
    gevent.sleep(0.5)
    assert len(my_device.ota_urls) == 1 and len(their_device.ota_urls) == 1


def test_a_device_rollout_beats_the_campaigns(server_factory, fleet):
    server = server_factory(**{"ota.retry.backoff": 0.2})
    token = fleet.add_device("me@example.com", "Farm")
    device = SimulatedDevice("127.0.0.1", server.http_port, token, BUILD_OLD, fail="refuse")
    device.start()
    wait_until(device.ready.is_set)
    single = server.upload(f"/admin/ota/start?token={token}", esp8266_image(BUILD_USER)).text
    server.upload("/admin/ota/start?user=me@example.com", esp8266_image(BUILD_NEW))
    wait_until(lambda: device.ota_urls)
    device.stop()
    again = SimulatedDevice("127.0.0.1", server.http_port, token, BUILD_OLD, fail="refuse")
    again.start()
    try:
        # The first attempt failed (came back with the old build): the retry,
        # after the backoff, is the device rollout again.
        wait_until(lambda: again.ota_urls, message="the retry")
        assert without_key(again.ota_urls[0]).endswith(single)
    finally:
        again.stop()


def test_a_new_rollout_for_the_same_scope_supersedes_the_old_one(server, app):
    server.upload("/admin/ota/start", esp8266_image(BUILD_OLD))
    server.upload("/admin/ota/start?user=nobody@example.com", esp8266_image(BUILD_OLD))
    server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    # The unknown user's upload was refused before anything was stored.
    (old, new) = rows(app, "SELECT id, scope, state, superseded_by_id FROM rollouts ORDER BY id")
    assert old[1:] == ("all", "superseded", new[0])
    assert new[1:] == ("all", "active", None)
    assert rows(app, "SELECT count(*) FROM firmware") == [(2,)]


def test_rollouts_survive_kill_9(server, server_factory, simulated, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    path = server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).text
    server.kill()
    restarted = server_factory()
    device = SimulatedDevice("127.0.0.1", restarted.http_port, token, BUILD_OLD)
    greenlet = device.start()
    try:
        wait_until(lambda: device.build == BUILD_NEW, message="the update after the restart")
        assert without_key(device.ota_urls[0]).endswith(path)
    finally:
        device.stop()
        greenlet.join(5)
    # Still running (complete, once the sweep has seen its one device's outcome).
    assert rows(app, "SELECT state FROM rollouts") in ([("active",)], [("complete",)])


def test_a_restarted_node_clears_its_own_stale_sessions_at_once(server, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    device = RawDevice(server.http_port)
    device.log_in(token=token)
    wait_until(lambda: rows(app, "SELECT node_id FROM devices")[0][0] is not None)
    server.restart()  # kill -9, then the same process slot (host:port) starts again
    assert rows(app, "SELECT online_since, node_id, session_id FROM devices") == [
        (None, None, None)
    ]
    (node,) = rows(app, "SELECT name, stopped_at FROM nodes")
    assert node == (f"{socket.gethostname()}:{server.http_port}", None)


def test_a_dead_nodes_devices_are_marked_offline_by_another_within_its_lease(
    server, server_factory, fleet, app
):
    token = fleet.add_device("me@example.com", "Farm")
    device = RawDevice(server.http_port)
    device.log_in(token=token)
    wait_until(lambda: rows(app, "SELECT node_id FROM devices")[0][0] is not None)
    server.kill()
    other = server_factory()  # another node on the same database
    # heartbeat 0.5 s in the test servers: a lease of 1.5 s, then the next beat reaps
    wait_until(
        lambda: rows(app, "SELECT online_since FROM devices") == [(None,)],
        timeout=5,
        message="the dead node's device to be shown offline",
    )
    stopped = rows(app, "SELECT name FROM nodes WHERE stopped_at IS NOT NULL")
    assert stopped == [(f"{socket.gethostname()}:{server.http_port}",)]
    assert "stopped heartbeating" in other.log()
    device.close()


def test_url_uses_server_host_and_the_http_port(server_factory, simulated, fleet, app):
    server = server_factory(**{"server.host": "ota.example.com"})
    token = fleet.add_device("me@example.com", "Farm")
    device = SimulatedDevice("127.0.0.1", server.http_port, token, BUILD_OLD, fail="refuse")
    greenlet = device.start()
    try:
        wait_until(device.ready.is_set)
        path = server.upload(f"/admin/ota/start?token={token}", esp8266_image(BUILD_NEW)).text
        wait_until(lambda: device.ota_urls)
        (url,) = device.ota_urls
        assert without_key(url) == f"http://ota.example.com:{server.http_port}{path}"
    finally:
        device.stop()
        greenlet.join(5)


def test_an_ota_frame_that_does_not_fit_buff_in_is_not_sent(server_factory, fleet, app):
    """A 400 with the reason, whoever claims the new row first: the request, or
    the node's own fill (polling every 10 ms here, it often wins the race
    between the start's commit and the request's own claim, and fails the row)."""
    server = server_factory(**{"node.poll.interval": 0.01})
    for attempt in range(4):
        token = fleet.add_device("me@example.com", "Farm")
        device = SimulatedDevice("127.0.0.1", server.http_port, token, BUILD_OLD, buff_in=40)
        device.start()
        try:
            wait_until(device.ready.is_set)
            answer = server.upload(f"/admin/ota/start?token={token}", esp8266_image(BUILD_NEW))
            assert answer.status == 400 and "receive buffer" in answer.text, (attempt, answer)
            gevent.sleep(0.3)
            assert device.ota_urls == []
        finally:
            device.stop()
    assert rows(app, "SELECT count(*) FROM ota_commands") == [(0,)]
    failed = rows(app, "SELECT last_error FROM rollout_devices WHERE state = 'failed'")
    assert len(failed) == 4 and all("receive buffer" in error for (error,) in failed)


def test_a_campaign_device_whose_buffer_is_too_small_fails_at_once(server, simulated, fleet, app):
    token = fleet.add_device("me@example.com", "Farm")
    device = simulated(token, BUILD_OLD, buff_in=40)
    wait_until(device.ready.is_set)
    assert server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW)).status == 200
    wait_until(
        lambda: rows(app, "SELECT state FROM rollout_devices") == [("failed",)],
        message="the device failed, not pending forever",
    )
    (event,) = rows(app, "SELECT detail FROM rollout_events WHERE to_state = 'failed'")
    assert "40-byte receive buffer" in event[0]
    assert device.ota_urls == []
    assert rows(app, "SELECT count(*) FROM ota_commands") == [(0,)]


def test_the_simulator_command_runs_a_fleet_through_an_update(server, fleet, tmp_path):
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(3)]
    (tmp_path / "tokens.txt").write_text("".join(f"{token}\n" for token in tokens))
    assert server.upload("/admin/ota/start", esp8266_image(BUILD_NEW)).status == 200
    result = subprocess.run(
        [sys.executable, "-m", "blynkota.simulator", "--server", "127.0.0.1",
         "--port", str(server.http_port), "--tokens-file", str(tmp_path / "tokens.txt"),
         "--devices", "3", "--build", BUILD_OLD, "--updates", "1", "--duration", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "3 device(s), 3 updated"
    assert sorted(lines[1:]) == sorted(f"{token} build={BUILD_NEW!r} logins=2" for token in tokens)


def test_the_simulator_crashes_after_an_update_as_asked(server, simulated, fleet):
    """--crash-after: the updated board reboots again and again on the new build;
    --rollback: it crashes once and comes back on the build it had."""
    looping, rolling = (fleet.add_device("me@example.com", "Farm") for _ in range(2))
    crashing = simulated(looping, BUILD_OLD, crash_after=0.3)
    rolled = simulated(rolling, BUILD_OLD, rollback=True)
    wait_until(lambda: crashing.ready.is_set() and rolled.ready.is_set())
    for token in (looping, rolling):
        answer = server.upload(f"/admin/ota/start?token={token}", esp8266_image(BUILD_NEW))
        assert answer.status == 200, answer.text
    wait_until(lambda: len(crashing.builds_reported) >= 5, timeout=30, message="a crash loop")
    assert crashing.builds_reported[:5] == [BUILD_OLD] + [BUILD_NEW] * 4
    assert crashing.updates == 1 and crashing.crashes >= 3
    wait_until(lambda: len(rolled.builds_reported) >= 3, timeout=30, message="a rollback")
    assert rolled.builds_reported[:3] == [BUILD_OLD, BUILD_NEW, BUILD_OLD]
