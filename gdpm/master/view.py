"""The master's in-memory view of the cluster, rebuilt from etcd at every start.

A :class:`~gdpm.common.etcd.PrefixMirror` of the whole gdpm prefix feeds
:meth:`ClusterView.apply`, which keeps typed indexes for the API and the scheduler.
Nothing here is written back: the view is a cache of etcd and holds no state of its own.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable

import pydantic
import structlog

from gdpm.common.etcd import Change
from gdpm.common.keys import EVENTS_PER_SERVICE, KeyLayout
from gdpm.common.models import (
    Event,
    InstanceRecord,
    InstanceState,
    InstanceStatus,
    NodeInfo,
    NodeState,
    ServiceSpec,
)

log = structlog.get_logger("gdpm.master.view")


class ClusterView:
    """Typed indexes over the mirrored keys, and the set of services to reconcile."""

    def __init__(self, keys: KeyLayout) -> None:
        self.keys = keys
        self.services: dict[str, ServiceSpec] = {}
        self.instances: dict[str, dict[str, InstanceRecord]] = defaultdict(dict)
        self.nodes: dict[str, NodeInfo] = {}
        self.alive: set[str] = set()
        self.statuses: dict[tuple[str, str], InstanceStatus] = {}
        # (service id, instance id) of the instances placed on each node, for
        # per-node lists and counts without a scan.
        self.placed: dict[str, set[tuple[str, str]]] = defaultdict(set)

        # Each service's event history, by event id (which sorts by time).
        self.events: dict[str, dict[str, Event]] = defaultdict(dict)

        # Services whose desired and assigned instances may differ.
        self.dirty_services: set[str] = set()
        # Services with more events than EVENTS_PER_SERVICE, to trim.
        self.events_over_cap: set[str] = set()
        self.changed = asyncio.Event()

    # -- feeding the view ------------------------------------------------------------

    def apply(self, changes: Iterable[Change]) -> None:
        for change in changes:
            parts = self.keys.parse(change.key)
            if parts is None:
                continue
            try:
                self._apply_one(parts, change.value)
            except pydantic.ValidationError as error:
                log.error("invalid document in etcd, ignored", key=change.key.decode(errors="replace"),
                          error=str(error).splitlines()[0])
        self.changed.set()

    def _apply_one(self, parts: tuple[str, ...], value: bytes | None) -> None:
        kind = parts[0]
        if kind == "services":
            self._apply_service(parts[1], value)
        elif kind == "instances":
            self._apply_instance(parts[1], parts[2], value)
        elif kind == "status":
            key = (parts[1], parts[2])
            if value is None:
                self.statuses.pop(key, None)
            else:
                self.statuses[key] = InstanceStatus.model_validate_json(value)
        elif kind == "nodes":
            if value is None:
                self.nodes.pop(parts[1], None)
            else:
                self.nodes[parts[1]] = NodeInfo.model_validate_json(value)
        elif kind == "alive":
            self._apply_alive(parts[1], value is not None)
        elif kind == "events":
            self._apply_event(parts[1], parts[2], value)
        # Assignments mirror the instance records; the view reads the records only.

    def _apply_service(self, service_id: str, value: bytes | None) -> None:
        if value is None:
            self.services.pop(service_id, None)
        else:
            self.services[service_id] = ServiceSpec.model_validate_json(value)
        self.dirty_services.add(service_id)

    def _apply_instance(self, service_id: str, instance_id: str, value: bytes | None) -> None:
        records = self.instances[service_id]
        previous = records.pop(instance_id, None)
        if previous is not None and previous.node_id is not None:
            self.placed[previous.node_id].discard((service_id, instance_id))
        if value is not None:
            record = InstanceRecord.model_validate_json(value)
            records[instance_id] = record
            if record.node_id is not None:
                self.placed[record.node_id].add((service_id, instance_id))
        if not records:
            del self.instances[service_id]
        self.dirty_services.add(service_id)

    def _apply_event(self, service_id: str, event_id: str, value: bytes | None) -> None:
        events = self.events[service_id]
        if value is None:
            events.pop(event_id, None)
            if not events:
                del self.events[service_id]
            return
        events[event_id] = Event.model_validate_json(value)
        if len(events) > EVENTS_PER_SERVICE:
            self.events_over_cap.add(service_id)
        if service_id not in self.services:
            # A late event of a deleted service: the scheduler deletes it.
            self.dirty_services.add(service_id)

    def _apply_alive(self, node_id: str, is_alive: bool) -> None:
        if is_alive == (node_id in self.alive):
            return
        if is_alive:
            self.alive.add(node_id)
            log.info("node ready", node_id=node_id)
            # A new node can take pending instances.
            self.dirty_services.update(
                service_id for service_id, records in self.instances.items()
                if any(record.node_id is None for record in records.values())
            )
            self.dirty_services.update(
                service_id for service_id, spec in self.services.items()
                if len(self.instances.get(service_id, ())) < spec.replicas
            )
        else:
            self.alive.discard(node_id)
            log.warning("node down", node_id=node_id, instances=len(self.placed.get(node_id, ())))
            # Its instances must move to live nodes.
            self.dirty_services.update(service_id for service_id, _ in self.placed.get(node_id, ()))

    # -- queries for the API ---------------------------------------------------------

    def node_state(self, node_id: str) -> NodeState:
        return NodeState.READY if node_id in self.alive else NodeState.DOWN

    def instance_state(self, record: InstanceRecord) -> InstanceState:
        if record.node_id is None:
            return InstanceState.PENDING
        if record.node_id not in self.alive:
            return InstanceState.LOST
        status = self.statuses.get((record.node_id, record.id))
        return status.state if status is not None else InstanceState.PENDING

    def instance_status(self, record: InstanceRecord) -> InstanceStatus | None:
        if record.node_id is None:
            return None
        return self.statuses.get((record.node_id, record.id))

    def service_instances(self, service_id: str) -> list[InstanceRecord]:
        records = self.instances.get(service_id, {})
        return sorted(records.values(), key=lambda record: record.index)

    def count_states(self, service_id: str) -> dict[InstanceState, int]:
        counts: dict[InstanceState, int] = defaultdict(int)
        for record in self.instances.get(service_id, {}).values():
            counts[self.instance_state(record)] += 1
        return counts

    def service_events(self, service_id: str) -> list[Event]:
        events = self.events.get(service_id, {})
        return [events[event_id] for event_id in sorted(events)]

    def node_instances(self, node_id: str) -> list[InstanceRecord]:
        records = []
        for service_id, instance_id in self.placed.get(node_id, ()):
            record = self.instances.get(service_id, {}).get(instance_id)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda record: (record.service_id, record.index))
