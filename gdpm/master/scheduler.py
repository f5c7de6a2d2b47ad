"""The scheduler: reconciles desired services with instance records in etcd.

It runs as one task in the master. Each round takes the services whose keys changed
since the last round, plans them (:mod:`gdpm.master.placement`) and writes the plan in
transactions of up to :data:`~gdpm.common.keys.MAX_TXN_OPS` operations. Every write is
conditional on the instance key being as the plan saw it, so a stale view can make a
transaction fail but never place a slot twice. After a round the scheduler waits until
its own writes are back in the view, so the next round plans from them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aetcd.utils
import structlog

from gdpm.common.etcd import UNAVAILABLE_ERRORS, Etcd, PrefixMirror
from gdpm.common.keys import EVENTS_PER_SERVICE, MAX_TXN_BYTES, MAX_TXN_OPS, KeyLayout
from gdpm.common.models import Assignment, Event, InstanceRecord, ServiceSpec, new_event_id, utc_now
from gdpm.master.placement import NodePicker, ServicePlan, plan_service
from gdpm.master.view import ClusterView

log = structlog.get_logger("gdpm.master.scheduler")


@dataclass
class _Write:
    """One instance's change: its conditions and operations, kept in one transaction."""

    service_id: str
    compare: list
    success: list
    # Bytes of keys and values, to keep each transaction under etcd's request size limit.
    size: int = 0


class Scheduler:
    def __init__(self, view: ClusterView, mirror: PrefixMirror, etcd: Etcd, keys: KeyLayout) -> None:
        self.view = view
        self.mirror = mirror
        self.etcd = etcd
        self.keys = keys
        self.rounds = 0

    async def run(self) -> None:
        """Reconcile whenever the view changes, until cancelled."""
        await self.mirror.loaded.wait()
        retry_delay = 0.2
        while True:
            await self.view.changed.wait()
            self.view.changed.clear()
            dirty, self.view.dirty_services = self.view.dirty_services, set()
            dirty |= self.view.events_over_cap
            self.view.events_over_cap = set()
            if not dirty:
                continue
            try:
                await self.reconcile(dirty)
                retry_delay = 0.2
            except Exception as error:  # noqa: BLE001 - the scheduler must outlive any one round
                if isinstance(error, UNAVAILABLE_ERRORS):
                    log.warning("reconcile failed, retrying", error=str(error) or type(error).__name__,
                                retry_in=retry_delay)
                else:
                    log.exception("reconcile failed, retrying", service_ids=sorted(dirty), retry_in=retry_delay)
                self.view.dirty_services |= dirty
                await asyncio.sleep(retry_delay)
                retry_delay = min(retry_delay * 2, 5.0)
                self.view.changed.set()

    async def reconcile(self, service_ids: set[str]) -> None:
        """Plan and write one round for the given services."""
        self.rounds += 1
        picker = NodePicker(
            sorted(self.view.alive & self.view.nodes.keys()),
            {node_id: len(placed) for node_id, placed in self.view.placed.items()},
        )
        now = utc_now()
        writes: list[_Write] = []
        for service_id in sorted(service_ids):
            spec = self.view.services.get(service_id)
            records = self.view.instances.get(service_id, {})
            plan = plan_service(service_id, spec, records, picker, now)
            if plan:
                self._log_plan(service_id, plan)
                if plan.remove and len(plan.remove) == len(records):
                    writes += self._sized(self._remove_all(service_id, plan.remove))
                    plan.remove = []
                writes += self._sized(self._writes_for(service_id, spec, plan))
                writes += self._sized(self._plan_events(service_id, plan, now))
            writes += self._event_trimming(service_id, spec)
        if writes:
            await self._commit(writes)

    def _writes_for(self, service_id: str, spec: ServiceSpec | None, plan: ServicePlan) -> list[_Write]:
        ops = self.etcd.ops
        writes = []
        for record in plan.create:
            key = self.keys.instance(service_id, record.id)
            success = [ops.put(key, record.to_json())]
            if record.node_id is not None:
                success.append(self._put_assignment(spec, record))
            writes.append(_Write(service_id, [ops.version(key) == 0], success))
        for old, new in plan.place:
            key = self.keys.instance(service_id, old.id)
            success = [ops.put(key, new.to_json())]
            if old.node_id is not None:
                success.append(ops.delete(self.keys.assignment(old.node_id, old.id)))
            if new.node_id is not None:
                success.append(self._put_assignment(spec, new))
            writes.append(_Write(service_id, [ops.value(key) == old.to_json()], success))
        for old, new in plan.update:
            key = self.keys.instance(service_id, old.id)
            success = [ops.put(key, new.to_json()), self._put_assignment(spec, new)]
            writes.append(_Write(service_id, [ops.value(key) == old.to_json()], success))
        for record in plan.remove:
            success = [ops.delete(self.keys.instance(service_id, record.id))]
            if record.node_id is not None:
                success.append(ops.delete(self.keys.assignment(record.node_id, record.id)))
            writes.append(_Write(service_id, [], success))
        return writes

    def _remove_all(self, service_id: str, records: list[InstanceRecord]) -> list[_Write]:
        """Delete every instance of a service, deleted or scaled to 0, with one range delete per node.

        Instance ids are SERVICE_ID-INDEX, so `assignments/NODE/SERVICE_ID-` contains exactly
        the service's assignments on that node. 1000 instances are then deleted in one
        transaction rather than 16 of 64 instances each, and a slave gets every deletion
        in one watch response. The instance records go in the last write, so that
        records stay behind, to be removed again next round, if a write fails.
        """
        ops = self.etcd.ops
        ranges = [self.keys.assignment(node_id, f"{service_id}-")
                  for node_id in sorted({record.node_id for record in records if record.node_id is not None})]
        ranges.append(self.keys.instances_of(service_id))
        return [
            _Write(service_id, [], [ops.delete(prefix, range_end=aetcd.utils.prefix_range_end(prefix))
                                    for prefix in ranges[start:start + MAX_TXN_OPS]])
            for start in range(0, len(ranges), MAX_TXN_OPS)
        ]

    def _plan_events(self, service_id: str, plan: ServicePlan, now) -> list[_Write]:
        """Return event writes for a plan: one per node and kind of change, not one per instance."""
        if service_id not in self.view.services:
            return []
        by_node: dict[tuple[str, str | None], list[str]] = {}
        for record in plan.create:
            by_node.setdefault(("placed", record.node_id), []).append(record.id)
        for old, new in plan.place:
            kind = "moved" if old.node_id is not None else "placed"
            by_node.setdefault((kind, new.node_id), []).append(old.id)
        writes = []
        for (kind, node_id), instance_ids in sorted(by_node.items(), key=lambda item: (item[0][0], item[0][1] or "")):
            where = f"node {node_id}" if node_id else "no node (pending)"
            if kind == "moved":
                message = f"moved {len(instance_ids)} instance(s) from a down node to {where}"
                event_type = "moved"
            elif node_id is None:
                message = f"{len(instance_ids)} instance(s) pending: no ready node"
                event_type = "pending"
            else:
                message = f"placed {len(instance_ids)} instance(s) on {where}"
                event_type = "placed"
            in_order = sorted(instance_ids, key=lambda instance_id: int(instance_id.rsplit("-", 1)[1]))
            message += ": " + ", ".join(in_order[:10]) + (" ..." if len(instance_ids) > 10 else "")
            event = Event(time=now, type=event_type, message=message,
                          instance_id=instance_ids[0] if len(instance_ids) == 1 else None, node_id=node_id)
            key = self.keys.event(service_id, new_event_id())
            writes.append(_Write(service_id, [], [self.etcd.ops.put(key, event.to_json())]))
        return writes

    def _event_trimming(self, service_id: str, spec: ServiceSpec | None) -> list[_Write]:
        """Delete the events of a deleted service, or the oldest beyond the cap."""
        events = self.view.events.get(service_id)
        if not events:
            return []
        ops = self.etcd.ops
        if spec is None:
            prefix = self.keys.events_of(service_id)
            return [_Write(service_id, [], [ops.delete(prefix, range_end=aetcd.utils.prefix_range_end(prefix))])]
        surplus = sorted(events)[:max(0, len(events) - EVENTS_PER_SERVICE)]
        return [_Write(service_id, [], [ops.delete(self.keys.event(service_id, event_id))]) for event_id in surplus]

    def _sized(self, writes: list[_Write]) -> list[_Write]:
        for write in writes:
            items = [*write.compare, *write.success]
            write.size = sum(len(item.key) + _byte_length(getattr(item, "value", None)) for item in items)
        return writes

    def _put_assignment(self, spec: ServiceSpec | None, record: InstanceRecord):
        assert spec is not None and record.node_id is not None
        assignment = Assignment(
            instance_id=record.id, service_id=record.service_id, index=record.index,
            generation=spec.generation, **spec.run_spec().model_dump(),
        )
        return self.etcd.ops.put(self.keys.assignment(record.node_id, record.id), assignment.to_json())

    async def _commit(self, writes: list[_Write]) -> None:
        """Write in batches; a batch whose conditions fail is planned again next round."""
        revision = 0
        for batch in _batches(writes):
            compare = [condition for write in batch for condition in write.compare]
            success = [operation for write in batch for operation in write.success]
            succeeded, batch_revision = await self.etcd.txn(compare, success)
            if succeeded:
                revision = batch_revision
            else:
                stale = {write.service_id for write in batch}
                log.info("placement conflict, replanning", service_ids=sorted(stale))
                self.view.dirty_services |= stale
                self.view.changed.set()
        if revision:
            await self.mirror.wait_for_revision(revision)

    def _log_plan(self, service_id: str, plan: ServicePlan) -> None:
        placed = [record for record in plan.create if record.node_id]
        placed += [new for old, new in plan.place if old.node_id is None and new.node_id]
        moved = [(old, new) for old, new in plan.place if old.node_id is not None]
        pending = sum(1 for record in plan.create if record.node_id is None)
        for old, new in moved:
            log.warning("instance moved from a down node", service_id=service_id, instance_id=old.id,
                        from_node=old.node_id, to_node=new.node_id or "pending")
        if placed:
            log.info("instances placed", service_id=service_id, count=len(placed),
                     nodes=sorted({record.node_id for record in placed}))
        if pending:
            log.info("instances pending, no ready node", service_id=service_id, count=pending)
        if plan.remove:
            log.info("instances removed", service_id=service_id, count=len(plan.remove))


def _byte_length(value: object) -> int:
    return len(value) if isinstance(value, bytes) else 0


def _batches(writes: list[_Write]) -> list[list[_Write]]:
    """Group writes so that no transaction exceeds etcd's operation or size limit."""
    batches: list[list[_Write]] = []
    current: list[_Write] = []
    compares = operations = size = 0
    for write in writes:
        too_many = (compares + len(write.compare) > MAX_TXN_OPS
                    or operations + len(write.success) > MAX_TXN_OPS
                    or size + write.size > MAX_TXN_BYTES)
        if current and too_many:
            batches.append(current)
            current, compares, operations, size = [], 0, 0, 0
        current.append(write)
        compares += len(write.compare)
        operations += len(write.success)
        size += write.size
    if current:
        batches.append(current)
    return batches
