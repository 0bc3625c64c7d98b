"""The health window: a board on the new build is `verifying` before it counts
as updated, and a crash loop, a rollback or silence fails it (issue 28).

Scenarios with simulated boards on SQLite and MariaDB: the firmware's
behaviour after the update (--crash-after, --rollback, --fail brick) is all
the server sees, as with real boards.
"""

import hashlib

from blynkota.ota.rollouts.cohorts import bucket
from blynkota.simulator import SimulatedDevice
from blynkota.status_text import render

from .devices import BUILD_NEW, BUILD_OLD
from .images import esp8266_image
from .servers import wait_until
from .test_lifecycle import device_state, query
from .test_lifecycle import story as events_of

# Short windows, a fast sweep and backoff: seconds instead of minutes.
HEALTH = {
    "ota.health.window": 2,
    "ota.health.max.logins": 3,
    "ota.health.return": 60,
    "ota.retry.backoff": 0.3,
    "ota.attempt.timeout": 60,
}


class Boards:
    """Simulated boards against one server, stopped at the end of the test."""

    def __init__(self, server) -> None:
        self.server, self.running = server, []

    def start(self, token: str, **options) -> SimulatedDevice:
        board = SimulatedDevice("127.0.0.1", self.server.http_port, token, BUILD_OLD, **options)
        board.start()
        self.running.append(board)
        return board

    def stop(self) -> None:
        for board in self.running:
            board.stop()


def status_of(server) -> dict:
    return server.admin("GET", "/admin/ota/status").json()[0]


def test_a_healthy_update_verifies_for_its_window_then_counts(server_factory, fleet, app):
    """Waves 50,100: the first wave's boards verify for the 2 s window; only
    once they have passed it does the second wave open; then all complete."""
    image = esp8266_image(BUILD_NEW)
    early, late = _waves_of(image, fleet, 50, (1, 2))
    # The wave is judged when all its devices have finished: their windows may
    # end in two sweeps, and the next wave must wait for the later one.
    server = server_factory(**{**HEALTH, "ota.wave.min.devices": len(early)})
    tokens = early + late
    boards = Boards(server)
    try:
        for token in tokens:
            boards.start(token)
        wait_until(lambda: all(board.ready.is_set() for board in boards.running))
        answer = server.upload("/admin/ota/start?now=true&waves=50,100", image)
        assert answer.status == 200, answer.text
        # Back on the new build: verifying, one login counted, not yet updated.
        wait_until(lambda: device_state(app, early[0]).get("state") in ("verifying", "updated"))
        status = status_of(server)
        if status["counts"]["verifying"]:
            assert status["state"] == "active" and status["percent"] == 50
            assert "verifying" in render([status])
        wait_until(lambda: status_of(server)["state"] == "complete", timeout=30,
                   message="every window passed: complete")  # fmt: skip
        status = status_of(server)
        assert status["outcome"] == f"{len(tokens)} device(s): {len(tokens)} updated, 0 failed"
        assert status["limits"]["health_window"] == 2
        for token in tokens:
            row = device_state(app, token)
            assert (row["state"], row["health"], row["health_logins"]) == ("updated", "passed", 1)
            assert row["verifying_at"] is not None and row["updated_at"] > row["verifying_at"]
            steps = [(before, after) for before, after, _ in events_of(app, token)]
            assert steps[-2:] == [("downloaded", "verifying"), ("verifying", "updated")]
            assert events_of(app, token)[-1][2] == "passed its health window (2 s)"
        # The second wave opened only after the first had passed its window.
        assert min(_event_ids(app, late, "offered")) > max(_event_ids(app, early, "updated"))
        metrics = server.admin("GET", "/metrics", auth=None, secure=False).text
        line = f'blynkota_rollout_device_health{{outcome="passed",rollout="{status["id"]}"}}'
        assert f"{line} {float(len(tokens))}" in metrics
    finally:
        boards.stop()


def _event_ids(app, tokens: list[str], to_state: str) -> list[int]:
    """The ids of the events that moved these devices to `to_state`."""
    return [
        row["id"]
        for token in tokens
        for row in query(
            app,
            "SELECT e.id FROM rollout_events e JOIN devices d ON d.id = e.device_id "
            "WHERE d.token = :token AND e.to_state = :state",
            token=token,
            state=to_state,
        )
    ]


def _waves_of(image: bytes, fleet, first: int, wanted: tuple[int, int]) -> tuple[list, list]:
    """Devices until the first wave (buckets below `first`) has wanted[0] and the
    rest wanted[1]: which bucket a token falls in is a hash of the image and it."""
    seed = hashlib.sha256(image).hexdigest()[:16]
    early, late = [], []
    for _ in range(200):
        if len(early) >= wanted[0] and len(late) >= wanted[1]:
            break
        token = fleet.add_device("me@example.com", "Farm")
        (early if bucket(seed, token) < first else late).append(token)
    return early, late


def test_a_crash_looping_firmware_pauses_its_rollout_in_the_first_wave(server_factory, fleet, app):
    """Every board reboots 0.3 s after each login on the new build. Each of the
    first wave's is failed as a crash loop at its third login; the rollout
    pauses on the failure ratio and the second wave never opens."""
    settings = {**HEALTH, "ota.health.window": 60, "ota.wave.min.devices": 2,
                "ota.abort.min.devices": 2}  # fmt: skip
    server = server_factory(**settings)
    image = esp8266_image(BUILD_NEW)
    early, late = _waves_of(image, fleet, 50, (2, 2))
    boards = Boards(server)
    try:
        by_token = {token: boards.start(token, crash_after=0.3) for token in early + late}
        wait_until(lambda: all(board.ready.is_set() for board in boards.running))
        answer = server.upload("/admin/ota/start?now=true&waves=50,100", image)
        assert answer.status == 200, answer.text
        wait_until(lambda: status_of(server)["state"] == "paused", timeout=60,
                   message="the pause on the failure ratio")  # fmt: skip
        status = status_of(server)
        assert "failure ratio" in status["pause_reason"] and status["percent"] == 50
        for token in early:
            wait_until(lambda token=token: device_state(app, token)["state"] == "failed")
            row = device_state(app, token)
            assert row["health"] == "crash_loop" and row["health_logins"] == 3
            assert row["last_error"].startswith("crash loop: 3 logins in ")
            assert by_token[token].crashes >= 2
        # The second wave was never offered anything.
        assert all(by_token[token].ota_urls == [] for token in late)
        assert all(device_state(app, token).get("state") in (None, "pending") for token in late)
        # Failed for good: not offered the same firmware again without `retry`.
        offers = {token: len(by_token[token].ota_urls) for token in early}
        server.admin("POST", f"/admin/ota/rollouts/{status['id']}/resume")
        wait_until(lambda: status_of(server)["state"] in ("active", "paused"))
        assert {token: len(by_token[token].ota_urls) for token in early} == offers
    finally:
        boards.stop()


def test_a_rollback_and_silence_fail_the_device_until_retried(server_factory, fleet, app):
    """One board rolls back to its old build at the first crash, one downloads
    the whole file and never comes back: each is failed with its reason and
    offered again only after `retry`."""
    server = server_factory(**{**HEALTH, "ota.health.window": 60, "ota.health.return": 2})
    rolling, bricked = (fleet.add_device("me@example.com", "Farm") for _ in range(2))
    boards = Boards(server)
    try:
        # Half a second on the new build, then back on the old one.
        rolled = boards.start(rolling, rollback=True, crash_after=0.5)
        boards.start(bricked, fail="brick")
        wait_until(lambda: all(board.ready.is_set() for board in boards.running))
        answer = server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW))
        assert answer.status == 200, answer.text
        wait_until(lambda: device_state(app, rolling).get("state") == "failed", timeout=30)
        row = device_state(app, rolling)
        assert row["health"] == "rollback"
        assert row["last_error"].startswith(f"rollback: came back with build {BUILD_OLD} ")
        wait_until(lambda: device_state(app, bricked).get("state") == "failed", timeout=30)
        row = device_state(app, bricked)
        assert row["health"] == "silence"
        assert row["last_error"] == (
            "never came back after the download (no login within ota.health.return, 2 s)"
        )
        assert status_of(server)["outcome"] == "2 device(s): 0 updated, 2 failed"
        assert len(rolled.ota_urls) == 1  # failed: no new offer at its next logins
        rollout = status_of(server)["id"]
        assert server.admin("POST", f"/admin/ota/rollouts/{rollout}/retry").status == 200
        wait_until(lambda: len(rolled.ota_urls) == 2, timeout=30, message="the offer after retry")
    finally:
        boards.stop()


def test_a_health_window_survives_a_restart(server_factory, fleet, app):
    """The window is rows and stamps: killed while a board verifies, the server
    comes back and ends the window at the stored time. The board's login after
    the restart is not counted towards a crash loop: the server closed its
    session, the board did not reboot (two deploys in a window would otherwise
    fail every healthy board verifying)."""
    server = server_factory(**{**HEALTH, "ota.health.window": 5})
    token = fleet.add_device("me@example.com", "Farm")
    boards = Boards(server)
    try:
        board = boards.start(token)
        wait_until(board.ready.is_set)
        assert server.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW)).status == 200
        wait_until(lambda: device_state(app, token).get("state") == "verifying", timeout=30)
        before = device_state(app, token)
        assert before["health_logins"] == 1 and before["health_node_id"] is not None
        server.restart()
        board.port = server.http_port  # the restarted server's port
        wait_until(lambda: device_state(app, token)["health_node_run"] != before["health_node_run"],
                   timeout=30, message="the login after the restart, judged")  # fmt: skip
        after = device_state(app, token)
        assert after["state"] == "verifying" and after["health_logins"] == 1  # not counted
        assert after["verifying_at"] == before["verifying_at"]  # the same window
        excused = "not counted: the server that held its last session has restarted since"
        assert [detail for _, _, detail in events_of(app, token) if excused in (detail or "")]
        wait_until(lambda: device_state(app, token)["state"] == "updated", timeout=30)
        assert device_state(app, token)["health"] == "passed"
    finally:
        boards.stop()
