"""This process as a node: its row, its heartbeat, and where its devices are recorded.

Presence is written with conditions so that processes never undo each
other's work:

- a login sets the device's node and a fresh session id, whatever was there
  (the device's newest connection wins);
- a disconnect clears them only where that session is still recorded, so
  a late close never marks offline a device that logged in again elsewhere;
- a node whose heartbeat is older than its lease is stopped by whichever
  node notices first (one conditional UPDATE decides who), and its devices
  are cleared;
- a node that finds itself stopped (paused too long, or the database was
  away) comes back and records its connected devices again, and every node
  reconciles its rows with its sockets now and then, so no device is shown
  online forever.
"""

import functools
import itertools
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from gevent.event import AsyncResult
from sqlalchemy import Connection, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from ..logs import set_node_name
from ..store import Database, Device, GroupCommit, HotQuery, ManyRows, Node, give_way, utcnow

__all__ = ["ClusterNode", "NodeSettings", "LocalSession", "default_node_name"]

log = logging.getLogger(__name__)

_OFFLINE = {"online_since": None, "node_id": None, "session_id": None}

# The two writes of every login and disconnect, built once, on the table.
_devices = Device.__table__
_ONLINE = ManyRows(
    update(_devices)
    .where(
        _devices.c.id == bindparam("device"),
        or_(_devices.c.online_since.is_(None), _devices.c.online_since <= bindparam("since")),
    )
    .values(
        online_since=bindparam("since"),
        last_seen_at=bindparam("now"),
        last_address=bindparam("address"),
        node_id=bindparam("node"),
        session_id=bindparam("session"),
    ),
    joined_on="device",
)
_SESSIONS_OF = HotQuery(
    select(_devices.c.id, _devices.c.session_id).where(
        _devices.c.id.in_(bindparam("devices", expanding=True))
    )
)
# Streamed: PyMySQL would otherwise parse every row inside `execute`, in one go.
# A chunk of 1,000 rows held the event loop 5 to 9 ms, one of 250 about 1 ms
# (gevent's greenlet trace, 5,000 relayed devices a process): long enough to
# show in the relay's p99.
_CHUNK_ROWS = 100
# What a reconciliation reads first: one row, the count of the node's rows and
# the sums of their device and session ids. Only when it differs from the
# sockets' are the rows read (a session id is new at every login: a lost write
# or a stale row changes a sum), and in any case every FULL_RECONCILE_EVERY-th time.
_TALLY_ON = select(
    func.count(),
    func.coalesce(func.sum(_devices.c.id), 0),
    func.coalesce(func.sum(_devices.c.session_id), 0),
).where(_devices.c.node_id == bindparam("node"))
FULL_RECONCILE_EVERY = 6
_SESSIONS_ON = (
    select(_devices.c.id, _devices.c.session_id)
    .where(_devices.c.node_id == bindparam("node"))
    .execution_options(stream_results=True, max_row_buffer=_CHUNK_ROWS)
)
_ONLINE_IF_FREE = (
    update(_devices)
    .where(_devices.c.id == bindparam("device"), _devices.c.node_id.is_(None))
    .values(
        online_since=bindparam("since"),
        last_address=bindparam("address"),
        node_id=bindparam("node"),
        session_id=bindparam("session"),
    )
)
_OFFLINE_IF_SESSION = ManyRows(
    update(_devices)
    .where(_devices.c.id == bindparam("device"), _devices.c.session_id == bindparam("session"))
    .values(last_seen_at=bindparam("now"), **_OFFLINE),
    joined_on="device",
)

# The heartbeat's statements, every few seconds on every node, built once on
# the tables: the ORM's per-statement work held the event loop ~1 ms each.
_nodes = Node.__table__
_BEAT = (
    update(_nodes)
    .where(_nodes.c.id == bindparam("node"), _nodes.c.stopped_at.is_(None))
    .values(heartbeat_at=bindparam("now"))
)
_BEAT_AGAIN = (  # declared dead meanwhile: it runs again
    update(_nodes)
    .where(_nodes.c.id == bindparam("node"))
    .values(heartbeat_at=bindparam("now"), stopped_at=None)
)
_LATE_NODES = select(_nodes.c.id).where(
    _nodes.c.stopped_at.is_(None),
    _nodes.c.heartbeat_at < bindparam("cutoff"),
    _nodes.c.id != bindparam("node"),
)
_STOP_LATE = (
    update(_nodes)
    .where(
        _nodes.c.id == bindparam("node"),
        _nodes.c.stopped_at.is_(None),
        _nodes.c.heartbeat_at < bindparam("cutoff"),
    )
    .values(stopped_at=bindparam("now"))
)
_CLEAR_NODE = update(_devices).where(_devices.c.node_id == bindparam("node")).values(**_OFFLINE)


def default_node_name(port: int, worker: int | None = None) -> str:
    """host:port, and /worker for a forked worker: the same slot after a restart."""
    name = f"{socket.gethostname()}:{port}"
    return name if worker is None else f"{name}/{worker}"


@dataclass(frozen=True)
class NodeSettings:
    heartbeat: float = 2.0  # seconds between beats
    missed_beats: int = 3  # beats missed before a peer declares the node dead

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.heartbeat * self.missed_beats)


class LocalSession(Protocol):
    """A logged-in connection of this node, as its presence row should show it."""

    session_id: int
    address: str  # the peer's address, without the port
    since: datetime


def _tally(sessions: Mapping[int, LocalSession]) -> tuple[int, int, int]:
    """As `_TALLY_ON` counts the rows: how many, the sum of the device ids, of the session ids."""
    return len(sessions), sum(sessions), sum(entry.session_id for entry in sessions.values())


class ClusterNode:
    def __init__(self, db: Database, settings: NodeSettings, *, control: Database | None = None):
        self.db = db
        # The node's own row (heartbeat, reaping) goes through a small pool of
        # its own: a login storm that takes every connection of `db` must not
        # stop the heartbeat, or peers would declare a busy node dead.
        self.control = control or db
        self.settings = settings
        self.id: int | None = None
        self.run_number = 0  # which run of this node's slot this is (nodes.runs)
        self.name = ""
        self._serials = itertools.count(1)
        self._reconciliations = itertools.count()  # every FULL_RECONCILE_EVERY-th reads the rows
        # Disconnects that could not be written (the database was away).
        self._unwritten_offline: dict[int, int] = {}
        # A login storm's presence writes share transactions (group commit).
        self._logins = GroupCommit(db, self._record_logins, name="logins")
        self._logouts = GroupCommit(db, self._record_logouts, name="disconnects")

    # --- the node's own row ------------------------------------------------------

    def register(self, name: str) -> int:
        """Insert or take over the row named `name`; clear what its previous run left online."""
        now = utcnow()
        self.name = name = name[:128]

        def work(session: Session) -> tuple[int, int]:
            node_id = session.scalar(select(Node.id).where(Node.name == name))
            values = {
                "host": socket.gethostname()[:255],
                "pid": os.getpid(),
                "started_at": now,
                "heartbeat_at": now,
                "stopped_at": None,
            }
            if node_id is None:
                session.add(Node(name=name, runs=1, **values))
                session.flush()
                return session.scalar(select(Node.id).where(Node.name == name)), 1
            session.execute(
                update(Node).where(Node.id == node_id).values(runs=Node.runs + 1, **values)
            )
            # Sessions of this node's previous run: their sockets died with it.
            session.execute(update(Device).where(Device.node_id == node_id).values(**_OFFLINE))
            return node_id, session.scalar(select(Node.runs).where(Node.id == node_id))

        self.id, self.run_number = self.control.run(work)
        set_node_name(name)
        log.info("node %s (id %d) registered", name, self.id)
        return self.id

    def beat(self) -> bool:
        """Refresh the heartbeat; False when a peer had declared this node dead."""
        values = {"node": self.id, "now": utcnow()}

        def work(connection: Connection) -> bool:
            alive = connection.execute(_BEAT, values).rowcount
            if not alive:
                connection.execute(_BEAT_AGAIN, values)
            return bool(alive)

        return self.control.run_core(work)

    def reap(self) -> list[int]:
        """Stop the nodes whose lease ran out and clear their devices; their ids."""
        now = utcnow()
        values = {"node": self.id, "now": now, "cutoff": now - self.settings.lease}

        def work(connection: Connection) -> list[int]:
            reaped = []
            for node_id in connection.scalars(_LATE_NODES, values).all():
                # Whichever node notices first stops it: one conditional UPDATE decides.
                if connection.execute(_STOP_LATE, {**values, "node": node_id}).rowcount:
                    connection.execute(_CLEAR_NODE, {"node": node_id})
                    reaped.append(node_id)
            return reaped

        reaped = self.control.run_core(work)
        for node_id in reaped:
            log.warning("node %d stopped heartbeating: its devices are marked offline", node_id)
        return reaped

    def stop(self) -> None:
        """A clean stop: this node and its devices leave the fleet at once."""
        if self.id is None:
            return
        now = utcnow()

        def work(session: Session) -> None:
            session.execute(update(Node).where(Node.id == self.id).values(stopped_at=now))
            session.execute(update(Device).where(Device.node_id == self.id).values(**_OFFLINE))

        self.control.run(work)

    # --- devices -------------------------------------------------------------------

    def new_session_id(self) -> int:
        """Unique across nodes: the node id in the high bits, a counter below."""
        return ((self.id or 0) << 32) | (next(self._serials) & 0xFFFFFFFF)

    def device_online(
        self, device_id: int, session_id: int, address: str, since: datetime
    ) -> AsyncResult:
        """Queue the presence write of a login that began at `since`, without waiting.

        Presence is soft state, written behind: the device is answered at
        once, and the result (True, or False if a later login already holds
        the device) is read before its info message is handled, before
        anything durable happens for it. A login that was slow (a busy
        database) must not take the device back from the connection it
        opened meanwhile, here or on another node.
        """
        self._unwritten_offline.pop(device_id, None)
        values = {
            "device": device_id,
            "since": since,
            "address": address[:64],
            "node": self.id,
            "session": session_id,
        }
        return self._logins.submit_later(values)

    def _record_logins(self, connection: Connection, logins: Sequence[dict]) -> list[bool]:
        now = utcnow()
        # Two logins of one device in a batch: the later connection is written last.
        ordered = sorted(logins, key=lambda values: (values["device"], values["since"]))
        _ONLINE.execute(connection, [{**values, "now": now} for values in ordered])
        # Whose session the rows hold now, in this transaction: each login's answer.
        holders = dict(
            _SESSIONS_OF.rows(connection, devices=sorted({values["device"] for values in logins}))
        )
        return [holders.get(values["device"]) == values["session"] for values in logins]

    def device_offline(self, device_id: int, session_id: int) -> None:
        """Queue the clearing of the device's presence if `session_id` is still its
        session, without waiting (the event loop ends sessions). A disconnect the
        database refuses is kept, and written by `flush_offline` once it is back."""
        pending = self._logouts.submit_later({"device": device_id, "session": session_id})
        pending.rawlink(functools.partial(self._offline_written, device_id, session_id))

    def _offline_written(self, device_id: int, session_id: int, pending: AsyncResult) -> None:
        if not pending.successful():
            # Written only if the row still holds this session: a later login stays.
            self._unwritten_offline[device_id] = session_id
            log.debug("device id %d: disconnect kept until the database is back", device_id)

    def _write_offline(self, device_id: int, session_id: int) -> None:
        self._logouts.submit({"device": device_id, "session": session_id})

    def _record_logouts(self, connection: Connection, logouts: Sequence[dict]) -> list[None]:
        now = utcnow()
        ordered = sorted(logouts, key=lambda values: values["device"])
        _OFFLINE_IF_SESSION.execute(connection, [{**values, "now": now} for values in ordered])
        return [None] * len(logouts)

    def flush_offline(self) -> int:
        """Write the disconnects that failed earlier; how many were written."""
        written = 0
        for device_id, session_id in list(self._unwritten_offline.items()):
            self._write_offline(device_id, session_id)
            if self._unwritten_offline.get(device_id) == session_id:
                del self._unwritten_offline[device_id]
            written += 1
        return written

    def reconcile(self, local: Callable[[], Mapping[int, LocalSession]]) -> tuple[int, int]:
        """Make the presence rows of this node match its sockets: (cleared, restored).

        `local()` (device id -> its connection here) is read after the rows: a
        connection registers itself before its login is written, so every
        session in the rows read is then either still among the sockets or
        really gone. With tens of thousands of devices this runs often, so it
        first compares one row of counts and sums (`_TALLY_ON`) and reads the
        rows only when they differ; then two columns with Core, and it writes
        only the rows that differ.
        """
        full = next(self._reconciliations) % FULL_RECONCILE_EVERY == 0

        def work(connection: Connection) -> tuple[int, int]:
            if not full:
                recorded_tally = tuple(connection.execute(_TALLY_ON, {"node": self.id}).one())
                mine = local()
                give_way()
                if tuple(map(int, recorded_tally)) == _tally(mine):
                    return 0, 0
            recorded: dict[int, int] = {}
            for rows in connection.execute(_SESSIONS_ON, {"node": self.id}).partitions(_CHUNK_ROWS):
                recorded.update(rows)
                # The rows are read and parsed in this thread (SQLite's, and
                # PyMySQL's from the socket, streamed): between two chunks the
                # event loop relays and answers. A whole read of 10,000 rows held
                # it ~50 ms. Not sleep(0): it runs the ready greenlets again
                # without polling, and the devices' sockets would wait all along
                # (store/giving_way.py).
                give_way()
            mine = local()
            gone = [
                {"device": device_id, "session": session_id, "now": utcnow()}
                for device_id, session_id in recorded.items()
                if (entry := mine.get(device_id)) is None or entry.session_id != session_id
            ]
            cleared = _OFFLINE_IF_SESSION.execute(connection, gone)
            # Not recorded (the login's write was lost, or a peer reaped this
            # node): record it, unless another node holds the device now.
            missing = [
                {
                    "device": device_id,
                    "since": entry.since,
                    "node": self.id,
                    "session": entry.session_id,
                    "address": entry.address[:64],
                }
                for device_id, entry in mine.items()
                if recorded.get(device_id) != entry.session_id
            ]
            restored = connection.execute(_ONLINE_IF_FREE, missing).rowcount if missing else 0
            return cleared, restored

        cleared, restored = self.db.run_core(work)
        if cleared or restored:
            log.info(
                "presence reconciled: %d device(s) marked offline, %d online again",
                cleared,
                restored,
            )
        return cleared, restored
