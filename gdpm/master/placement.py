"""Pure placement decisions: what to create, place and remove for one service.

Nothing here talks to etcd, so the rules can be unit-tested alone. The scheduler turns
the returned actions into transactions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from gdpm.common.models import InstanceRecord, ServiceSpec, instance_id_for


@dataclass
class ServicePlan:
    """The changes that bring one service's instances to its desired state.

    ``create``: new records (placed or pending). ``place``: records that are pending or
    on a node that is down, each with its new record (pending again when no node is
    live). ``remove``: surplus records, or all of a deleted service's.
    """

    create: list[InstanceRecord] = field(default_factory=list)
    place: list[tuple[InstanceRecord, InstanceRecord]] = field(default_factory=list)
    remove: list[InstanceRecord] = field(default_factory=list)
    # Placed records whose assignment must carry a newer service generation.
    update: list[tuple[InstanceRecord, InstanceRecord]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.create or self.place or self.remove or self.update)


class NodePicker:
    """Chooses a live node for each new instance, spreading a service's instances.

    The node with the fewest instances of the service wins, then the one with the
    fewest instances in all, then the next one in round-robin order. Counts are updated
    as instances are picked, so one round spreads its own placements too.
    """

    def __init__(self, live_nodes: Sequence[str], load: Mapping[str, int]) -> None:
        self.live_nodes = sorted(live_nodes)
        self.live = frozenset(self.live_nodes)
        self.load = Counter({node_id: load.get(node_id, 0) for node_id in self.live_nodes})
        self._turn = 0

    def pick(self, service_load: Counter) -> str | None:
        if not self.live_nodes:
            return None
        count = len(self.live_nodes)
        order = [self.live_nodes[(self._turn + offset) % count] for offset in range(count)]
        node_id = min(order, key=lambda node: (service_load[node], self.load[node]))
        self._turn = (self.live_nodes.index(node_id) + 1) % count
        self.load[node_id] += 1
        service_load[node_id] += 1
        return node_id

    def release(self, node_id: str | None) -> None:
        if node_id in self.load:
            self.load[node_id] -= 1


def plan_service(
    service_id: str,
    spec: ServiceSpec | None,
    records: Mapping[str, InstanceRecord],
    picker: NodePicker,
    now: datetime,
) -> ServicePlan:
    """Compare a service's desired replicas with its instance records."""
    plan = ServicePlan()
    replicas = spec.replicas if spec is not None else 0
    generation = spec.generation if spec is not None else 0

    for record in records.values():
        if record.index >= replicas:
            plan.remove.append(record)
            picker.release(record.node_id)

    kept = {record.index: record for record in records.values() if record.index < replicas}
    service_load = Counter(record.node_id for record in kept.values() if record.node_id in picker.live)

    for index in range(replicas):
        record = kept.get(index)
        if record is None:
            node_id = picker.pick(service_load)
            plan.create.append(InstanceRecord(
                id=instance_id_for(service_id, index), service_id=service_id,
                index=index, node_id=node_id, created_at=now, generation=generation,
            ))
        elif record.node_id is None:
            node_id = picker.pick(service_load)
            if node_id is not None:
                plan.place.append((record, record.model_copy(update={"node_id": node_id, "generation": generation})))
        elif record.node_id not in picker.live:
            # The node's lease expired, so its slave has stopped this instance
            # (it fences itself before its lease can expire): run it elsewhere.
            node_id = picker.pick(service_load)
            plan.place.append((record, record.model_copy(update={"node_id": node_id, "generation": generation})))
        elif record.generation != generation:
            plan.update.append((record, record.model_copy(update={"generation": generation})))

    plan.remove.sort(key=lambda record: record.index)
    return plan
