"""Ownership election: sessions, locks, leader election and fencing tokens over any KV.

from podkit.election import LeaderElection, Lock, FencedResource
"""

from podkit.backends.cas import cas_update  # here too: election began with it
from podkit.election.core import (
    PREFIX,
    FencedResource,
    Leader,
    LeaderElection,
    LeadershipLost,
    Lease,
    Lock,
    Session,
    StaleToken,
)

__all__ = [
    "PREFIX",
    "FencedResource",
    "Leader",
    "LeaderElection",
    "LeadershipLost",
    "Lease",
    "Lock",
    "Session",
    "StaleToken",
    "cas_update",
]
