"""Batched writes of instance statuses to etcd, tied to the slave's lease."""

from __future__ import annotations

import asyncio

import aetcd.exceptions
import structlog

from gdpm.common.etcd import Etcd
from gdpm.common.keys import KeyLayout
from gdpm.common.models import Event, InstanceStatus, new_event_id

log = structlog.get_logger("gdpm.slave.status")

# Events kept while etcd is unreachable; older ones are dropped first.
MAX_QUEUED_EVENTS = 10_000

# Events of one service and type in one write, beyond which they are written as one
# event that counts them, and the instances whose messages it quotes.
MAX_EVENTS_PER_KIND = 3
QUOTED_EVENTS = 3

# The verb of a merged event's message, by event type, as in "12 instances backing off: ...".
_MERGED_VERBS = {"backoff": "backing off", "spawn-failed": "failed to spawn"}


def aggregate_events(events: list[tuple[str, Event]]) -> list[tuple[str, Event]]:
    """Merge the (service id, event) pairs of each service and type beyond MAX_EVENTS_PER_KIND into one.

    Starting 1000 instances would otherwise write 1000 "started" events, and the
    history of a service keeps only the last 200. The merged event reads "1000
    instances started: ...", quoting the first few messages. It takes the place of the
    first event of its kind and the time of the last.
    """
    groups: dict[tuple[str, str], list[Event]] = {}
    for service_id, event in events:
        groups.setdefault((service_id, event.type), []).append(event)
    result = []
    merged: set[tuple[str, str]] = set()
    for service_id, event in events:
        kind = (service_id, event.type)
        group = groups[kind]
        if len(group) <= MAX_EVENTS_PER_KIND:
            result.append((service_id, event))
        elif kind not in merged:
            merged.add(kind)
            result.append((service_id, _merged_event(group)))
    return result


def _merged_event(group: list[Event]) -> Event:
    """Return one event that counts the events of ``group`` and quotes the first QUOTED_EVENTS."""
    event_type = group[0].type
    quoted = "; ".join(f"{event.instance_id}: {event.message}" for event in group[:QUOTED_EVENTS])
    return Event(
        time=group[-1].time, type=event_type, node_id=group[-1].node_id,
        message=f"{len(group)} instances {_MERGED_VERBS.get(event_type, event_type)}: {quoted}; "
                f"and {len(group) - QUOTED_EVENTS} more",
    )


class StatusWriter:
    """Coalesces status changes and writes them in transactions.

    Only the latest status of each instance is written, so an instance that goes from
    starting to running between two flushes costs one put. A status of None deletes
    the key. Writes that fail are kept and retried, unless a newer status replaced them.
    """

    def __init__(self, etcd: Etcd, keys: KeyLayout, node_id: str) -> None:
        self.etcd = etcd
        self.keys = keys
        self.node_id = node_id
        self.lease_id: int | None = None
        self._pending: dict[str, InstanceStatus | None] = {}
        self._events: list[tuple[str, Event]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def publish(self, instance_id: str, status: InstanceStatus | None) -> None:
        self._pending[instance_id] = status
        self._idle.clear()
        self._wake.set()

    def add_event(self, service_id: str, event: Event) -> None:
        """Queue an event for the service's history; events carry no lease."""
        self._events.append((service_id, event))
        self._idle.clear()
        self._wake.set()

    def republish_all(self, statuses: dict[str, InstanceStatus]) -> None:
        """Queue every status again, as after a new lease whose keys are all gone."""
        for instance_id, status in statuses.items():
            self._pending.setdefault(instance_id, status)
        if self._pending:
            self._idle.clear()
            self._wake.set()

    async def flushed(self, timeout: float) -> None:
        """Wait until every queued status is written, at most ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    async def run(self) -> None:
        retry_delay = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, {}
            events, self._events = self._events, []
            operations = self._operations(batch) + [
                self.etcd.ops.put(self.keys.event(service_id, new_event_id()), event.to_json())
                for service_id, event in aggregate_events(events)
            ]
            try:
                await self.etcd.apply_in_batches(operations)
                retry_delay = 0.1
            # A lost lease also lands here ("requested lease not found"); the agent
            # then grants a new one and the retry succeeds.
            except aetcd.exceptions.ClientError as error:
                log.warning("status write failed, retrying", count=len(batch),
                            error=str(error) or type(error).__name__, retry_in=retry_delay)
                for instance_id, status in batch.items():
                    self._pending.setdefault(instance_id, status)
                # Older events go first again, and the history keeps at most a few
                # hundred per service, so a long outage keeps the newest.
                self._events = (events + self._events)[-MAX_QUEUED_EVENTS:]
                await asyncio.sleep(retry_delay)
                retry_delay = min(retry_delay * 2, 2.0)
                self._wake.set()
            if not self._pending and not self._events:
                self._idle.set()

    def _operations(self, batch: dict[str, InstanceStatus | None]) -> list:
        ops = self.etcd.ops
        operations = []
        for instance_id, status in batch.items():
            key = self.keys.status(self.node_id, instance_id)
            if status is None:
                operations.append(ops.delete(key))
            else:
                operations.append(ops.put(key, status.to_json(), lease=self.lease_id))
        return operations
