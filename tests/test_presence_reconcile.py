"""Presence reconciliation (cluster/nodes.py): a node's rows are made to match
its sockets, every time, whether the tally it reads first (a count and two
sums) finds them equal or not. On the real databases."""

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from blynkota.cluster.nodes import FULL_RECONCILE_EVERY
from blynkota.ota import NewDevice
from blynkota.store import Device, utcnow


@dataclass
class Held:
    """A connection held by the node, as reconciliation sees it (a LocalSession)."""

    session_id: int
    address: str = "10.0.0.9"
    since: datetime = field(default_factory=utcnow)


def rows(db, node_id: int) -> dict[int, int]:
    with db.engine.connect() as connection:
        found = connection.execute(
            select(Device.id, Device.session_id).where(Device.node_id == node_id)
        )
        return dict(found.all())


def test_reconciliation_clears_a_stale_row_and_restores_a_lost_one_between_full_reads(app):
    service, db = app.extensions["blynkota"], app.extensions["blynkota.db"]
    node = service.node
    node.register("reconcile-test:1")
    tokens = app.extensions["blynkota.fleet"].add_devices(
        [NewDevice("ops@example.com", "Plant", token=f"{n:032x}") for n in range(3)]
    )
    with db.engine.connect() as connection:
        ids = connection.scalars(
            select(Device.id).where(Device.token.in_(tokens)).order_by(Device.id)
        ).all()
    held = {device_id: Held(node.new_session_id()) for device_id in ids[:2]}
    for device_id, entry in held.items():
        assert node.device_online(device_id, entry.session_id, entry.address, entry.since).get()

    # The first reads the rows; the next ones read the tally first.
    assert node.reconcile(lambda: held) == (0, 0)
    assert node.reconcile(lambda: held) == (0, 0)
    assert rows(db, node.id) == {device_id: entry.session_id for device_id, entry in held.items()}

    # A socket gone whose disconnect was never written: its row is cleared.
    gone = held.pop(ids[1])
    assert node.reconcile(lambda: held) == (1, 0)
    assert ids[1] not in rows(db, node.id)
    # A connection whose login was never written (a peer reaped this node, say).
    held[ids[2]] = Held(node.new_session_id())
    assert node.reconcile(lambda: held) == (0, 1)
    assert rows(db, node.id) == {ids[0]: held[ids[0]].session_id, ids[2]: held[ids[2]].session_id}
    assert gone.session_id not in rows(db, node.id).values()

    # Up to the next full read and past it, nothing more to do.
    for _ in range(FULL_RECONCILE_EVERY):
        assert node.reconcile(lambda: held) == (0, 0)
