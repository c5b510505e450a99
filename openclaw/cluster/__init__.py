"""
Several gateway instances as one: the route, the session token, key-pool
rests and heartbeats shared through a store (Redis in production,
L{openclaw.cluster.store.MemoryStore} in unit tests).
"""

from openclaw.cluster.node import ClusterNode, StoreUnavailable
from openclaw.cluster.store import MemoryStore, SharedStore, Versioned

__all__ = ["ClusterNode", "MemoryStore", "SharedStore", "StoreUnavailable", "Versioned"]
