"""Races between writers (issue: scale out).

On MariaDB a test connection holds a row lock so that the server's own
writers meet in exactly the order that used to lose an update or deadlock a
login (SQLite has one writer at a time, so these orders only exist on MySQL).
Concurrent uploads and offers run on both databases.
"""

import threading
import time

import pytest
import sqlalchemy

from blynkota.ota import DownloadTicket, Upload
from blynkota.protocol import Response, Status, encode_info, encode_login, encode_ping

from .devices import BUILD_NEW, BUILD_OLD, RawDevice
from .images import esp8266_image
from .servers import ServerProcess, upload_at_once, wait_until


def one(engine, sql: str, **params):
    with engine.connect() as connection:
        return connection.execute(sqlalchemy.text(sql), params).mappings().one()


def queued_update(app, token: str, state: str) -> int:
    """A device rollout for `token` whose row is put in `state`, as if offered; its id."""
    service = app.extensions["blynkota"]
    service.admin.start_for_device(
        token, Upload(esp8266_image(BUILD_NEW), "fw.bin"), "t", queue=True
    )
    engine = app.extensions["blynkota.db"].engine
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.text(
                "UPDATE rollout_devices SET state = :s, attempts = 1, offered_at = NOW(), "
                "first_offered_at = NOW(), downloading_at = NOW()"
            ),
            {"s": state},
        )
    return one(engine, "SELECT id FROM rollout_devices")["id"]


@pytest.fixture
def fleet_on_mysql(mysql_app):
    return mysql_app.extensions["blynkota.fleet"]


@pytest.mark.mysql
def test_a_download_ending_after_the_login_never_overwrites_updated(mysql_app, fleet_on_mysql):
    token = fleet_on_mysql.add_device("me@example.com", "Farm")
    row_id = queued_update(mysql_app, token, "downloading")
    service = mysql_app.extensions["blynkota"]
    engine = mysql_app.extensions["blynkota.db"].engine
    device = service.devices.find_device(token)
    firmware_size = one(engine, "SELECT size FROM firmware")["size"]
    ticket = DownloadTicket(row_id, firmware_size, 0, firmware_size)  # every byte written

    holder = engine.connect()
    transaction = holder.begin()
    holder.execute(sqlalchemy.text("SELECT id FROM rollout_devices WHERE id = :i FOR UPDATE"),
                   {"i": row_id})  # fmt: skip
    # The login (reporting the new build) queues on the row first, the end of
    # the download after it: the order in which "downloaded" used to win.
    login = threading.Thread(
        target=service.devices.device_reported, args=(device, {"build": BUILD_NEW})
    )
    login.start()
    time.sleep(0.5)
    finish = threading.Thread(target=service.downloads.download_finished, args=(ticket, True))
    finish.start()
    time.sleep(0.5)
    transaction.commit()
    holder.close()
    login.join(30)
    finish.join(30)

    assert one(engine, "SELECT state FROM rollout_devices WHERE id = :i", i=row_id)["state"] == (
        "updated"
    )
    with engine.connect() as connection:
        events = connection.execute(
            sqlalchemy.text(
                "SELECT from_state, to_state FROM rollout_events "
                "WHERE device_id IS NOT NULL ORDER BY id"
            )
        ).all()
    assert events[-1] == ("downloading", "updated")
    assert ("downloading", "downloaded") not in events


@pytest.mark.mysql
@pytest.mark.parametrize("order", ["rollout row first", "device row first"])
def test_a_login_that_meets_a_deadlock_is_retried_and_stays_connected(
    mysql_app, fleet_on_mysql, mysql_url, tmp_path, order
):
    token = fleet_on_mysql.add_device("me@example.com", "Farm")
    row_id = queued_update(mysql_app, token, "offered")
    engine = mysql_app.extensions["blynkota.db"].engine
    device_id = one(engine, "SELECT id FROM devices")["id"]
    rollout_id = one(engine, "SELECT id FROM rollouts")["id"]
    server = ServerProcess(tmp_path, mysql_url).start()
    device = RawDevice(server.http_port)
    try:
        device.send(encode_login(token, 1))
        assert device.event() == Response(1, Status.OK)

        holder = engine.connect()
        transaction = holder.begin()
        # Weight: InnoDB rolls back the transaction that changed fewer rows,
        # here the server's login, which must then run again.
        holder.execute(
            sqlalchemy.text(
                "INSERT INTO rollout_events (rollout_id, device_id, from_state, to_state, at, "
                "detail) VALUES (:r, NULL, 'active', 'active', NOW(), 'test weight')"
            ),
            [{"r": rollout_id}] * 50,
        )
        lock_device = sqlalchemy.text("UPDATE devices SET last_address = 'held' WHERE id = :d")
        lock_row = sqlalchemy.text("UPDATE rollout_devices SET bytes_sent = 0 WHERE id = :i")
        first, second = (
            (lock_row, lock_device) if order == "rollout row first" else (lock_device, lock_row)
        )
        holder.execute(first, {"d": device_id, "i": row_id})
        device.send(encode_info({"ver": "0.6.1", "h-beat": "10", "build": BUILD_NEW}, 2))
        assert device.event() == Response(2, Status.OK)  # answered before the database work
        time.sleep(0.5)  # the login now waits for a row this transaction holds
        try:
            holder.execute(second, {"d": device_id, "i": row_id})
            transaction.commit()
        except sqlalchemy.exc.OperationalError as error:
            # This side was chosen as the victim: the login goes on unharmed.
            assert error.orig.args[0] == 1213
            transaction.rollback()
        holder.close()

        wait_until(
            lambda: (
                one(engine, "SELECT state FROM rollout_devices WHERE id = :i", i=row_id)["state"]
                == "updated"
            ),
            timeout=10,
            message="the login to record the update",
        )
        device.send(encode_ping(3))
        assert device.event() == Response(3, Status.OK)  # still connected
        assert "internal error" not in server.log()
        assert one(engine, "SELECT build FROM devices")["build"] == BUILD_NEW
    finally:
        device.close()
        server.stop()


def test_ten_concurrent_campaign_uploads_leave_one_running(db_url, server, app):
    app.extensions["blynkota.fleet"].add_device("racer@example.com", "Farm")
    assert upload_at_once([server] * 10, "/admin/ota/start?user=racer@example.com") == [200] * 10
    engine = app.extensions["blynkota.db"].engine
    with engine.connect() as connection:
        states = connection.execute(
            sqlalchemy.text("SELECT state, count(*) FROM rollouts GROUP BY state ORDER BY state")
        ).all()
    assert states == [("active", 1), ("superseded", 9)]


def test_old_build_device_is_never_offered_twice_for_one_attempt(server, app, simulated):
    """Login and the node's fill race for the same pending device: one offer."""
    fleet = app.extensions["blynkota.fleet"]
    tokens = [fleet.add_device("me@example.com", "Farm") for _ in range(20)]
    server.upload("/admin/ota/start", esp8266_image(BUILD_NEW))
    devices = [simulated(token, BUILD_OLD) for token in tokens]
    wait_until(lambda: all(d.build == BUILD_NEW for d in devices), timeout=60)
    engine = app.extensions["blynkota.db"].engine
    with engine.connect() as connection:
        sent = connection.execute(
            sqlalchemy.text("SELECT device_id, count(*) FROM ota_commands GROUP BY device_id")
        ).all()
    assert sorted(count for _, count in sent) == [1] * 20
    assert all(len(d.ota_urls) == 1 for d in devices)
