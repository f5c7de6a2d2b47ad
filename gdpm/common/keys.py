"""The etcd key layout and the lease timings, in one place.

Every key lives under a prefix (``/gdpm`` by default). Values are JSON documents of
the models in :mod:`gdpm.common.models`.

``{prefix}/services/{service_id}``
    The desired state of a service: command and replica count.
    Written by the master's API. Read by the master. No lease.
``{prefix}/instances/{service_id}/{instance_id}``
    One replica slot of a service and the node it is placed on (``node_id`` is null
    while pending). Written by the scheduler. Read by the master. No lease.
``{prefix}/assignments/{node_id}/{instance_id}``
    What a node must run. Written by the scheduler in the same transaction as the
    instance record, so both always agree. Watched by the slave with that node id.
    No lease.
``{prefix}/status/{node_id}/{instance_id}``
    The actual state of an instance on a node: pid, state, exit code, times.
    Written by the slave. Read by the master. Tied to the slave's lease, so the
    status of a dead node's instances disappears with the node.
``{prefix}/nodes/{node_id}``
    A registered node: id, name, registration time. Written by the master when a
    slave registers. No lease, so a dead node stays listed as down.
``{prefix}/events/{service_id}/{event_id}``
    One entry of a service's event history; ``event_id`` sorts by time. Written by
    the scheduler (placements, moves) and by slaves (starts, exits, backoff,
    failures). The master trims each service to EVENTS_PER_SERVICE entries and
    deletes them with the service. No lease, so a dead node's last events stay.
``{prefix}/alive/{node_id}``
    The liveness of a node. Written by the slave, tied to its lease: the node is
    ``ready`` while this key exists and ``down`` once the lease has expired.
"""

from __future__ import annotations

from dataclasses import dataclass

# Seconds a slave's lease lives without a refresh. A node is shown down, and its
# instances move, at most this long (plus etcd's lease check interval, 0.5 s) after
# its slave died, so a dead node's instances run again elsewhere within about 5.5 s.
# A slave fences itself one second before the TTL runs out, so an etcd leader
# election (1 to 2 s with etcd's default election timeout) must fit in 4 s.
DEFAULT_NODE_TTL = 5

# etcd rejects a transaction with more operations than its --max-txn-ops setting,
# whose default is 128 in etcd 3.4 and 3.5.
MAX_TXN_OPS = 128

# Entries kept in each service's event history; older ones are deleted.
EVENTS_PER_SERVICE = 200

# Bytes of keys and values in one transaction. etcd rejects requests over its
# --max-request-bytes, 1.5 MiB by default, so stay well below it.
MAX_TXN_BYTES = 512 * 1024


@dataclass(frozen=True)
class KeyLayout:
    """Builds and parses the keys under one prefix."""

    prefix: str = "/gdpm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", self.prefix.rstrip("/"))

    @property
    def root(self) -> bytes:
        return f"{self.prefix}/".encode()

    def service(self, service_id: str) -> bytes:
        return f"{self.prefix}/services/{service_id}".encode()

    @property
    def services(self) -> bytes:
        return f"{self.prefix}/services/".encode()

    def instance(self, service_id: str, instance_id: str) -> bytes:
        return f"{self.prefix}/instances/{service_id}/{instance_id}".encode()

    def instances_of(self, service_id: str) -> bytes:
        return f"{self.prefix}/instances/{service_id}/".encode()

    def assignment(self, node_id: str, instance_id: str) -> bytes:
        return f"{self.prefix}/assignments/{node_id}/{instance_id}".encode()

    def assignments_of(self, node_id: str) -> bytes:
        return f"{self.prefix}/assignments/{node_id}/".encode()

    def status(self, node_id: str, instance_id: str) -> bytes:
        return f"{self.prefix}/status/{node_id}/{instance_id}".encode()

    def node(self, node_id: str) -> bytes:
        return f"{self.prefix}/nodes/{node_id}".encode()

    def event(self, service_id: str, event_id: str) -> bytes:
        return f"{self.prefix}/events/{service_id}/{event_id}".encode()

    def events_of(self, service_id: str) -> bytes:
        return f"{self.prefix}/events/{service_id}/".encode()

    def alive(self, node_id: str) -> bytes:
        return f"{self.prefix}/alive/{node_id}".encode()

    def parse(self, key: bytes) -> tuple[str, ...] | None:
        """Split a key into its kind and ids: ``("status", node_id, instance_id)``.

        Returns None for a key outside the prefix or of an unknown kind.
        """
        text = key.decode(errors="replace")
        root = f"{self.prefix}/"
        if not text.startswith(root):
            return None
        parts = tuple(text[len(root):].split("/"))
        expected_length = _KIND_LENGTHS.get(parts[0])
        if expected_length is None or len(parts) != expected_length:
            return None
        if not all(parts):
            return None
        return parts


# Number of path segments, the kind included, of each kind of key.
_KIND_LENGTHS = {
    "services": 2,
    "instances": 3,
    "assignments": 3,
    "status": 3,
    "nodes": 2,
    "alive": 2,
    "events": 3,
}
