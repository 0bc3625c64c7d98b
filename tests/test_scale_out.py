"""Three server processes, one MariaDB database: one fleet (issue: scale out).

Each node is a real `python wsgi.py` on its own ports and data folder; the
devices are the project's simulator, spread over the nodes, failing over to
the others when theirs goes away (as behind a TCP load balancer).
"""

import hashlib
import socket
import threading
import time
from collections import Counter

import gevent
import pytest
import sqlalchemy

from blynkota.simulator import SimulatedDevice

from .devices import BUILD_NEW, BUILD_OLD
from .images import esp8266_image
from .servers import ADMIN_EMAIL, ServerProcess, upload_at_once, wait_until

pytestmark = [pytest.mark.mysql, pytest.mark.multinode]

SLOT_STATES = ("offered", "downloading")
DEVICES = 1500  # 500 a node hold the 20 slots contended across nodes; more only takes longer
LIMIT = 20
# Between the fleet's build and the campaign's: the campaign after the
# single-device update is an upgrade for that device too, not a downgrade
# (which it would refuse without allowDowngrade=true).
BUILD_TOKEN = "Mar  3 2018 03:03:03"


def query(engine, sql: str, **params) -> list[dict]:
    with engine.connect() as connection:
        return [dict(row) for row in connection.execute(sqlalchemy.text(sql), params).mappings()]


def provision(engine, fleet, count: int) -> list[str]:
    """`count` devices of one user and project, inserted in bulk (the fleet is large)."""
    first = fleet.add_device("owner@example.com", "Farm")
    (project,) = query(engine, "SELECT project_id FROM devices WHERE token = :t", t=first)
    tokens = [first] + [hashlib.md5(f"device-{i}".encode()).hexdigest() for i in range(1, count)]
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.text(
                "INSERT INTO devices (project_id, name, token, created_at) "
                "VALUES (:project, '', :token, NOW())"
            ),
            [{"project": project["project_id"], "token": token} for token in tokens[1:]],
        )
    return tokens


@pytest.fixture
def cluster(mysql_url, tmp_path):
    nodes = []
    settings = {
        "ota.max.concurrent": LIMIT,
        "ota.retry.backoff": 1,
        "ota.attempt.timeout": 30,
        "hardware.max.connections": 5000,
        "db.pool.size": 30,  # 3 nodes x 31 connections: within MariaDB's 151
        # The default beat: a node busy with a thousand devices on a shared
        # 2-core machine must not look dead (lease 6 s).
        "node.heartbeat.interval": 2,
    }
    for name in "abc":
        folder = tmp_path / name
        folder.mkdir()
        nodes.append(ServerProcess(folder, mysql_url, **settings).start())
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture
def engine(mysql_url):
    engine = sqlalchemy.create_engine(mysql_url)
    yield engine
    engine.dispose()


def node_ids(engine) -> dict[str, int]:
    return {row["name"]: row["id"] for row in query(engine, "SELECT id, name FROM nodes")}


@pytest.mark.timeout(900)
def test_three_nodes_serve_one_fleet(cluster, engine, mysql_app):
    a, b, c = cluster
    ports = [node.http_port for node in cluster]
    tokens = provision(engine, mysql_app.extensions["blynkota.fleet"], DEVICES)
    devices = []
    for i, token in enumerate(tokens):
        home = ports[i % 3]
        others = tuple(port for port in ports if port != home)
        devices.append(SimulatedDevice("127.0.0.1", home, token, BUILD_OLD, fallback_ports=others))
    try:
        for batch in range(0, DEVICES, 300):  # a fleet coming up, not one burst
            for device in devices[batch : batch + 300]:
                device.start()
            gevent.sleep(1.0)
        wait_until(
            lambda: sum(d.ready.is_set() for d in devices) == DEVICES,
            timeout=180,
            message="every device logged in",
        )
        # A login a device gave up on (no answer within 3 s: it tried another
        # node) can be written after the login that replaced it; the node
        # holding the device puts its row right at its next reconciliation.
        wait_until(
            lambda: (
                query(engine, "SELECT count(*) AS n FROM devices WHERE node_id IS NULL")
                == [{"n": 0}]
            ),
            timeout=30,
            message="every connected device shown online",
        )
        online = query(engine, "SELECT node_id, count(*) AS n FROM devices GROUP BY node_id")
        # Spread over the three (a device whose login answer came late tried another).
        assert len(online) == 3 and all(row["n"] > DEVICES // 5 for row in online), online
        assert len(query(engine, "SELECT id FROM nodes WHERE stopped_at IS NULL")) == 3

        # ?token= through node A for a device held by node C: C sends the ota
        # within a second, and serves the file A stored.
        on_c = query(
            engine,
            "SELECT token FROM devices WHERE node_id = :n ORDER BY id LIMIT 1",
            n=node_ids(engine)[f"{socket.gethostname()}:{c.http_port}"],
        )[0]["token"]
        target = next(device for device in devices if device.token == on_c)
        image = esp8266_image(BUILD_TOKEN)
        started = time.monotonic()
        answer = a.upload(f"/admin/ota/start?token={target.token}", image)
        assert answer.status == 200, answer.text
        wait_until(lambda: target.ota_urls, timeout=2, message="the ota on another node")
        assert time.monotonic() - started < 1.0
        assert f":{c.http_port}/static/ota/" in target.ota_urls[0]
        wait_until(lambda: target.build == BUILD_TOKEN, timeout=15)
        (download,) = target.downloads
        assert download.ok and download.headers["x-md5"] == hashlib.md5(image).hexdigest()
        assert int(download.headers["content-length"]) == len(image)

        # An all-devices campaign with now=true, uploaded through B, limit 20
        # download slots across the three nodes; node C is killed halfway.
        assert b.upload("/admin/ota/start?now=true", esp8266_image(BUILD_NEW)).status == 200
        (rollout,) = query(engine, "SELECT id FROM rollouts WHERE scope = 'all'")

        def updated() -> int:
            return query(
                engine,
                "SELECT count(*) AS n FROM rollout_devices "
                "WHERE rollout_id = :r AND state = 'updated'",
                r=rollout["id"],
            )[0]["n"]

        wait_until(lambda: updated() >= DEVICES // 3, timeout=300, message="a third updated")
        dead = node_ids(engine)[f"{socket.gethostname()}:{c.http_port}"]
        c.kill()
        # Its devices are shown offline within the lease (3 beats of 2 s),
        # whether or not they have reconnected elsewhere yet.
        wait_until(
            lambda: (
                query(engine, "SELECT stopped_at FROM nodes WHERE id = :n", n=dead)[0]["stopped_at"]
                is not None
            ),
            timeout=10,
            message="a peer to declare node C dead (lease 6 s, beat 2 s)",
        )
        held = query(engine, "SELECT count(*) AS n FROM devices WHERE node_id = :n", n=dead)
        assert held[0]["n"] == 0

        try:
            wait_until(lambda: updated() == DEVICES, timeout=420, message="every device")
        except AssertionError:
            counts = query(
                engine,
                "SELECT state, count(*) AS n FROM rollout_devices WHERE rollout_id = :r "
                "GROUP BY state",
                r=rollout["id"],
            )
            raise AssertionError(f"not all updated: {counts}") from None
        # The device updated by ?token= left its finished device rollout: the
        # campaign reached it too.
        assert all(d.build == BUILD_NEW for d in devices)
        wait_until(
            lambda: sum(d.ready.is_set() for d in devices) == DEVICES,
            timeout=60,
            message="every device connected again",
        )
        on = query(engine, "SELECT node_id, count(*) AS n FROM devices GROUP BY node_id")
        assert {row["node_id"] for row in on} <= set(node_ids(engine).values()) - {dead}
        assert sum(row["n"] for row in on) == DEVICES

        # Replay the transitions in write order: the limit held across nodes.
        events = query(
            engine,
            "SELECT from_state, to_state FROM rollout_events "
            "WHERE device_id IS NOT NULL AND rollout_id = :r ORDER BY id",
            r=rollout["id"],
        )
        holding, most = 0, 0
        for event in events:
            holding += int(event["to_state"] in SLOT_STATES) - int(
                event["from_state"] in SLOT_STATES
            )
            most = max(most, holding)
        assert holding == 0 and most == LIMIT
        # Each offer counted once: a device's attempts are its ota commands.
        mismatched = query(
            engine,
            "SELECT rd.device_id, rd.attempts, count(c.id) AS sent FROM rollout_devices rd "
            "LEFT JOIN ota_commands c ON c.rollout_id = rd.rollout_id "
            "AND c.device_id = rd.device_id WHERE rd.rollout_id = :r "
            "GROUP BY rd.device_id, rd.attempts HAVING rd.attempts <> count(c.id)",
            r=rollout["id"],
        )
        assert mismatched == []
        attempts = Counter(
            row["attempts"]
            for row in query(
                engine,
                "SELECT attempts FROM rollout_devices WHERE rollout_id = :r",
                r=rollout["id"],
            )
        )
        assert attempts[1] >= DEVICES * 2 // 3  # all but those cut off by the kill: one offer
    finally:
        for device in devices:
            device.stop()
        gevent.sleep(0.5)


def test_concurrent_uploads_and_logins_on_three_nodes_meet_one_truth(cluster, engine, mysql_app):
    mysql_app.extensions["blynkota.fleet"].add_device("racer@example.com", "Farm")
    spread = [cluster[i % 3] for i in range(10)]
    assert upload_at_once(spread, "/admin/ota/start?user=racer@example.com") == [200] * 10
    states = Counter(row["state"] for row in query(engine, "SELECT state FROM rollouts"))
    assert states == {"active": 1, "superseded": 9}
    (running,) = query(engine, "SELECT running_key FROM rollouts WHERE state = 'active'")
    assert running["running_key"].startswith("user:")

    # Wrong passwords spread over the three processes meet one budget, a row
    # in the database: of 15 at once, exactly 10 are checked and 5 refused.
    statuses: list[int] = []

    def attempt(server) -> None:
        statuses.append(server.admin("GET", "/admin/devices", auth=(ADMIN_EMAIL, "nope")).status)

    threads = [threading.Thread(target=attempt, args=(cluster[i % 3],)) for i in range(15)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert Counter(statuses) == {403: 10, 429: 5}
