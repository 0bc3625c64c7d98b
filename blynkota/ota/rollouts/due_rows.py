"""Which pending rows a node's fill looks at (rollouts/offering.py).

A node fills every `node.poll.interval` (a quarter second as shipped), most
of the time with nothing to offer. An idle fill asks one question first:
is any row pending for a device on this node? One indexed read instead of
the slot count, the offer windows and the due rows (three reads in an ORM
session). On SQLite every read holds the event loop, relayed sessions
included, and 0.25 s is a short period: the idle fill was the largest of
the clocks' pauses.
"""

from sqlalchemy import Integer, bindparam, select

from ...store import (
    Database,
    Device,
    DeviceState,
    HotQuery,
    Project,
    Rollout,
    RolloutDevice,
    RolloutState,
)

__all__ = ["DUE", "pending_here"]

# The pending devices due on a node, oldest first (built once: a campaign fills many a
# second), read from the pending rows on: STRAIGHT_JOIN keeps MariaDB from starting at
# the active rollouts and reading every row they have (0.2 s a fill at 100k devices).
DUE = HotQuery(
    select(
        RolloutDevice.id,
        RolloutDevice.rollout_id,
        Device.id,
        Device.token,
        Device.project_id,
        Project.user_id,
    )
    .join(Device, Device.id == RolloutDevice.device_id)
    .join(Project, Project.id == Device.project_id)
    .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
    .where(
        RolloutDevice.state == DeviceState.PENDING,
        (RolloutDevice.next_attempt_at.is_(None))
        | (RolloutDevice.next_attempt_at <= bindparam("now")),
        Rollout.state == RolloutState.ACTIVE,
        Rollout.id.not_in(bindparam("closed", expanding=True)),
        Device.node_id == bindparam("node"),
    )
    .order_by(RolloutDevice.pending_at, RolloutDevice.id)
    .limit(bindparam("limit", type_=Integer))
    .prefix_with("STRAIGHT_JOIN", dialect="mysql")
)
# Any row pending for a device on the node, due or not, in any rollout: a
# superset of DUE's rows, so "none" means DUE has none either.
_ANY_PENDING = HotQuery(
    select(RolloutDevice.id)
    .join(Device, Device.id == RolloutDevice.device_id)
    .where(RolloutDevice.state == DeviceState.PENDING, Device.node_id == bindparam("node"))
    .limit(1)
)


def pending_here(db: Database, node_id: int) -> bool:
    """Whether any row is pending for a device connected to node `node_id`."""
    return bool(db.run_core(lambda connection: _ANY_PENDING.rows(connection, node=node_id)))
