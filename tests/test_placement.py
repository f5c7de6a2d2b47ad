"""Unit tests of the placement rules, without etcd."""

from collections import Counter
from datetime import datetime, timezone

from gdpm.common.models import InstanceRecord, ServiceSpec
from gdpm.master.placement import NodePicker, plan_service

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def spec(replicas: int) -> ServiceSpec:
    return ServiceSpec(id="s1", command="sleep 1", replicas=replicas, created_at=NOW)


def record(index: int, node_id: str | None) -> InstanceRecord:
    return InstanceRecord(id=f"s1-{index}", service_id="s1", index=index, node_id=node_id, created_at=NOW)


def test_new_service_spreads_over_nodes():
    plan = plan_service("s1", spec(5), {}, NodePicker(["a", "b"], {}), NOW)
    nodes = Counter(created.node_id for created in plan.create)
    assert sorted(nodes.values()) == [2, 3]
    assert [created.index for created in plan.create] == [0, 1, 2, 3, 4]
    assert not plan.remove


def test_no_live_node_leaves_pending():
    plan = plan_service("s1", spec(3), {}, NodePicker([], {}), NOW)
    assert [created.node_id for created in plan.create] == [None, None, None]


def test_pending_records_get_placed():
    records = {r.id: r for r in [record(0, None), record(1, None)]}
    plan = plan_service("s1", spec(2), records, NodePicker(["a"], {}), NOW)
    assert not plan.create
    assert [new.node_id for _, new in plan.place] == ["a", "a"]


def test_scale_down_removes_highest_indices():
    records = {r.id: r for r in [record(i, "a" if i % 2 else "b") for i in range(5)]}
    plan = plan_service("s1", spec(2), records, NodePicker(["a", "b"], {"a": 2, "b": 3}), NOW)
    assert [removed.index for removed in plan.remove] == [2, 3, 4]
    assert not plan.create
    assert not plan.place


def test_deleted_service_removes_everything():
    records = {r.id: r for r in [record(0, "a"), record(1, None)]}
    plan = plan_service("s1", None, records, NodePicker(["a"], {}), NOW)
    assert sorted(removed.index for removed in plan.remove) == [0, 1]


def test_scale_up_fills_the_emptier_node():
    records = {r.id: r for r in [record(0, "a"), record(1, "a")]}
    plan = plan_service("s1", spec(4), records, NodePicker(["a", "b"], {"a": 2}), NOW)
    assert [created.node_id for created in plan.create] == ["b", "b"]


def test_steady_state_plans_nothing():
    records = {r.id: r for r in [record(0, "a"), record(1, "b")]}
    plan = plan_service("s1", spec(2), records, NodePicker(["a", "b"], {"a": 1, "b": 1}), NOW)
    assert not plan


def test_down_node_instances_move():
    records = {r.id: r for r in [record(0, "a"), record(1, "dead"), record(2, "dead")]}
    plan = plan_service("s1", spec(3), records, NodePicker(["a", "b"], {"a": 1}), NOW)
    moves = {old.index: (old.node_id, new.node_id) for old, new in plan.place}
    assert moves[1][0] == "dead"
    assert moves[2][0] == "dead"
    assert sorted(new for _, new in moves.values()) == ["a", "b"]
    assert not plan.create
    assert not plan.remove


def test_down_node_instances_pending_without_live_node():
    records = {r.id: r for r in [record(0, "dead")]}
    plan = plan_service("s1", spec(1), records, NodePicker([], {}), NOW)
    assert [(old.node_id, new.node_id) for old, new in plan.place] == [("dead", None)]
