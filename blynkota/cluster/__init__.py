"""Many processes, one fleet: nodes, presence and leases, all kept in the database.

Each process that holds device connections is a node: a row in `nodes` it
refreshes every few seconds. A device's row says which node (and which of its
sessions) holds it. Whatever must hold across processes is decided by the
database, with conditional writes and row locks, never in memory.
"""

from .leases import Lease, lock_offer_slots
from .nodes import ClusterNode, LocalSession, NodeSettings, default_node_name

__all__ = [
    "ClusterNode",
    "Lease",
    "LocalSession",
    "NodeSettings",
    "default_node_name",
    "lock_offer_slots",
]
