"""Chaos scenarios: slaves, masters and etcd members die, restart and get partitioned.

Each scenario runs real etcd, master and slave processes and checks, from /proc, the
two properties that matter to a user. No instance runs twice: at no sample does a
service have more live process groups than replicas. None is lost: after the recovery
window, it has exactly as many as replicas. An InstanceSampler takes those samples
every 100 ms in a background thread while the test injects a fault. Partitions go
through FaultProxy: a slave started with ``behind_proxies=True`` reaches etcd and its
master only through proxies that ``slave.partition()`` cuts.

What the scenarios expect:

- A dead slave's instances run again elsewhere within 6 s with the default --node-ttl,
  or within the TTL plus REPLACEMENT_MARGIN with a smaller one.
- A slave SIGKILLed has no instance left alive 1 s after its death (its guardian kills
  them), and one that is restarted kills whatever its previous run left.
- A slave that cannot renew its lease kills its own instances before the lease can
  expire, so the master's replacements never overlap the originals.
- Faults shorter than the TTL (a partition, an etcd restart, the loss of the etcd
  leader, a master crash) restart nothing.
- A graceful stop (SIGTERM) revokes the lease, so instances move at once.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest
from chaos import (
    LONG_COMMAND,
    InstanceSampler,
    assert_gone_by,
    create_service,
    get_service,
    hold,
    instance_snapshot,
    kill_slave_with_helpers,
    node_pids,
    node_states,
    scale_service,
    scan_instances,
    stray,
    wait_converged,
)
from cluster import Cluster, EtcdCluster, EtcdProcess, SlaveProcess, wait_until

from gdpm.common.keys import KeyLayout

# The TTL, in seconds, of scenarios that only need the lease to expire soon.
FAST_TTL = 2
# Seconds within which a SIGKILLed slave's instances must be gone.
STRAY_GRACE = 1.0
# Seconds within which a dead slave's instances run again elsewhere, with the default TTL.
DEFAULT_REPLACEMENT_WINDOW = 6.0
# Seconds past the TTL within which they run again with a TTL set by the test: the
# lease expiry, the master's reaction and a spawn.
REPLACEMENT_MARGIN = 2.0
# Seconds the instance count must stay exact after convergence, to catch a late
# duplicate (a reconnected slave restarting what has moved).
QUIET_PERIOD = 2.0
# Seconds a partition lasts in the scenario where it must change nothing. The slave
# fences after TTL - 1 s without a renewal (3 s with the default TTL of 4 s), counted
# from its last refresh, which can be one refresh interval (TTL / 8) before the cut.
SHORT_PARTITION = 1.5

REPLICAS = 6


# -- set-up and checks ------------------------------------------------------------------


def start_cluster(cluster: Cluster, *, slaves: int = 3, node_ttl: int | None = None,
                  proxied: tuple[int, ...] = ()) -> list[SlaveProcess]:
    """Start a master and ``slaves`` slaves named slave-1, slave-2, ..., and wait until all are ready.

    ``node_ttl`` None keeps the default TTL. The slaves numbered in ``proxied`` reach
    etcd and the master through FaultProxy instances.
    """
    cluster.start_master(node_ttl=node_ttl)
    started = [
        cluster.start_slave(f"slave-{number}", wait_ready=False, node_ttl=node_ttl,
                            behind_proxies=number in proxied)
        for number in range(1, slaves + 1)
    ]
    for slave in started:
        slave.wait_ready()
    return started


def spread_service(cluster: Cluster, slaves: list[SlaveProcess], replicas: int = REPLICAS) -> str:
    """Create a service of LONG_COMMAND, wait until it runs, and check it is spread evenly."""
    service_id = create_service(cluster, LONG_COMMAND, replicas)
    instances = wait_converged(cluster, service_id, replicas)
    per_node = Counter(instance["node_id"] for instance in instances)
    expected = {slave.node_id: replicas // len(slaves) for slave in slaves}
    assert per_node == expected, f"precondition: {replicas} instances spread evenly over {len(slaves)} nodes"
    return service_id


def replacement_window(node_ttl: int | None) -> float:
    return DEFAULT_REPLACEMENT_WINDOW if node_ttl is None else node_ttl + REPLACEMENT_MARGIN


def alive_keys(etcd: EtcdProcess, cluster: Cluster, node_ids: list[str]) -> dict[str, tuple[int, int] | None]:
    """Map each node id to (create revision, lease) of its alive key, or None when it has none.

    An unchanged create revision proves that the key was never deleted in between, so
    the node never went down, however briefly.
    """
    keys = KeyLayout(cluster.prefix)
    result = {}
    for node_id in node_ids:
        kv = etcd.get(keys.alive(node_id))
        result[node_id] = (kv["create_revision"], kv["lease"]) if kv is not None else None
    return result


def assert_all_ready(cluster: Cluster, node_ids: list[str]) -> None:
    states = node_states(cluster)
    down = [node_id for node_id in node_ids if states.get(node_id) != "ready"]
    assert not down, f"nodes shown down: {down} ({states})"


def assert_unchanged(before: dict, after: dict, what: str) -> None:
    changed = {key: (before.get(key), after.get(key)) for key in set(before) | set(after)
               if before.get(key) != after.get(key)}
    assert not changed, f"{what} changed (before, after): {changed}"


def wait_node_state(cluster: Cluster, node_id: str, state: str, deadline: float) -> float:
    """Wait until the API shows ``node_id`` in ``state``; return the time it was seen."""
    wait_until(lambda: node_states(cluster).get(node_id) == state, max(deadline - time.monotonic(), 0.1),
               message=f"node {node_id} {state}")
    return time.monotonic()


# -- harness checks ---------------------------------------------------------------------


def test_etcd_cluster_fixture_elects_new_leader(etcd_cluster: EtcdCluster):
    """The three-member etcd fixture elects a new leader when its leader dies, and the member restarts with its data."""
    assert len(etcd_cluster.members) == 3
    assert etcd_cluster.endpoints == ",".join(member.endpoint for member in etcd_cluster.members)
    leader = etcd_cluster.wait_leader()
    member = etcd_cluster.any_member()
    member.gateway("kv/put", {"key": "Y2hhb3M=", "value": "b2s="})  # "chaos" = "ok"

    etcd_cluster.kill(leader)
    assert not leader.running()
    new_leader = etcd_cluster.wait_leader()
    assert new_leader is not leader

    etcd_cluster.restart(leader)
    assert leader.healthy()
    assert leader.get(b"chaos")["value"] == b"ok"
    assert etcd_cluster.wait_leader() in etcd_cluster.members


def test_etcd_restart_keeps_ports_and_data(etcd: EtcdProcess):
    """EtcdProcess.kill() and start() bring etcd back on the same port with the same keys, and compact() compacts."""
    etcd.gateway("kv/put", {"key": "a2V5", "value": "dmFsdWU="})  # "key" = "value"
    first = etcd.get(b"key")
    old_pid = etcd.pid

    etcd.kill()
    assert not etcd.running()
    etcd.start()
    assert etcd.pid != old_pid
    assert etcd.get(b"key") == first

    etcd.gateway("kv/put", {"key": "a2V5", "value": "bmV3"})  # "key" = "new"
    revision = etcd.compact()
    assert revision == etcd.revision()
    with pytest.raises(AssertionError, match="compacted"):
        etcd.gateway("kv/range", {"key": "a2V5", "revision": str(revision - 1)})


def test_sampler_counts_groups(cluster: Cluster):
    """The sampler counts one per process group, however many processes the group has."""
    cluster.start_master()
    slave = cluster.start_slave("slave-1")
    # Three processes per instance: the shell and its two sleeps.
    service_id = create_service(cluster, "sleep 1000 & sleep 1001; wait", 2)
    wait_converged(cluster, service_id, 2)

    with InstanceSampler(cluster.run_id) as sampler:
        sample = sampler.wait_sample_after(time.monotonic())
        assert sample.count(service_id) == 2
        assert sample.count_on(service_id, slave.node_id) == 2
        assert all(len(group.pids) >= 2 for group in sample.instances.values())
        scale_service(cluster, service_id, 1)
        sampler.wait_for(lambda s: s.count(service_id) == 1, time.monotonic() + 15, "scaled down to 1")
    assert sampler.max_count(service_id) == 2
    assert len(sampler.samples) >= 2


# -- scenarios --------------------------------------------------------------------------


def test_slave_sigkill_moves_instances(cluster: Cluster):
    """SIGKILL one of 3 slaves running 6 replicas, with the default --node-ttl.

    Steps:
    1. Start a master and 3 slaves with the default TTL, and run 6 replicas (2 per node).
    2. SIGKILL slave-1.

    Expect: slave-1's 2 instances are dead within 1 s, because its guardian kills them.
    6 run again within 6 s, on slave-2 and slave-3 only, and the instances there keep
    their pids. No sample ever shows more than 6.
    """
    slaves = start_cluster(cluster)
    service_id = spread_service(cluster, slaves)
    victim, survivors = slaves[0], slaves[1:]
    before = instance_snapshot(cluster, service_id)

    with InstanceSampler(cluster.run_id) as sampler:
        victim_pids = node_pids(cluster, victim.node_id)
        assert victim_pids, "precondition: slave-1 runs instances"
        victim.kill(signal.SIGKILL)
        killed_at = time.monotonic()

        assert_gone_by(victim_pids, killed_at + STRAY_GRACE,
                       f"instances of SIGKILLed slave {victim.name} alive {STRAY_GRACE:g} s after its death")
        sampler.wait_for(
            lambda sample: sample.count(service_id) == REPLICAS,
            killed_at + replacement_window(None),
            f"{REPLICAS} instances running within {replacement_window(None):g} s of the kill",
        )
        wait_converged(cluster, service_id, REPLICAS, avoid_node=victim.node_id)
        converged_at = time.monotonic()
        sampler.wait_sample_after(converged_at + QUIET_PERIOD)

    sampler.assert_never_above(service_id, REPLICAS)
    sampler.assert_exactly(service_id, REPLICAS, since=converged_at)
    after = instance_snapshot(cluster, service_id)
    survivor_ids = {slave.node_id for slave in survivors}
    for instance_id, (node_id, pid, restarts) in before.items():
        if node_id in survivor_ids:
            assert after[instance_id] == (node_id, pid, restarts), f"{instance_id} on a live node was touched"
    assert node_states(cluster)[victim.node_id] == "down"


def test_long_partition_fences_and_moves(cluster: Cluster):
    """Partition one slave for longer than the TTL, then heal.

    Steps:
    1. Start 3 slaves with --node-ttl 2, slave-1 behind proxies, and run 6 replicas.
    2. Cut both of slave-1's proxies (blackhole).
    3. Once the 6 run elsewhere, restore the proxies.

    Expect: slave-1 kills its own 2 instances before its lease can expire, so within
    the TTL of the cut, and they are dead by the time its node shows down. They run on
    the other slaves within the TTL plus 2 s. After healing, slave-1 shows ready again
    and still exactly 6 run. No sample ever shows more than 6, before or after healing.
    """
    slaves = start_cluster(cluster, node_ttl=FAST_TTL, proxied=(1,))
    service_id = spread_service(cluster, slaves)
    victim = slaves[0]

    with InstanceSampler(cluster.run_id) as sampler:
        victim_pids = node_pids(cluster, victim.node_id)
        victim.partition()
        cut_at = time.monotonic()

        # etcd expires the lease at most one TTL after the last refresh that reached it,
        # which was before the cut.
        fenced_at = assert_gone_by(victim_pids, cut_at + FAST_TTL,
                                   f"partitioned slave {victim.name} did not kill its instances within the TTL")
        down_at = wait_node_state(cluster, victim.node_id, "down", cut_at + FAST_TTL + REPLACEMENT_MARGIN)
        assert not stray(victim_pids), "instances of the partitioned slave alive when its node showed down"
        sampler.wait_for(
            lambda sample: sample.count(service_id) == REPLICAS and sample.count_on(service_id, victim.node_id) == 0,
            cut_at + replacement_window(FAST_TTL),
            f"{REPLICAS} instances running on the other slaves within {replacement_window(FAST_TTL):g} s of the cut",
        )
        wait_converged(cluster, service_id, REPLICAS, avoid_node=victim.node_id)

        victim.heal()
        wait_node_state(cluster, victim.node_id, "ready", time.monotonic() + 20)
        assert victim.running(), f"slave {victim.name} exited during the partition"
        wait_converged(cluster, service_id, REPLICAS)
        converged_at = time.monotonic()
        sampler.wait_sample_after(converged_at + QUIET_PERIOD)

    assert fenced_at <= down_at
    sampler.assert_never_above(service_id, REPLICAS)
    sampler.assert_exactly(service_id, REPLICAS, since=converged_at)


def test_short_partition_changes_nothing(cluster: Cluster, etcd: EtcdProcess):
    """Partition one slave for 1.5 s, well within the default TTL: nothing moves or restarts.

    Steps:
    1. Start 3 slaves with the default TTL, slave-1 behind proxies, and run 6 replicas.
    2. Cut slave-1's proxies for 1.5 s.
    3. Restore them without closing the held connections, as a short network blip
       leaves TCP connections open.

    Expect, until 6 s after the cut: every node ready at every poll, every instance
    with its pid and restart count unchanged, every alive key never deleted (same
    create revision), and exactly 6 instances at every sample.
    """
    slaves = start_cluster(cluster, proxied=(1,))
    service_id = spread_service(cluster, slaves)
    victim = slaves[0]
    node_ids = [slave.node_id for slave in slaves]
    before = instance_snapshot(cluster, service_id)
    keys_before = alive_keys(etcd, cluster, node_ids)

    with InstanceSampler(cluster.run_id) as sampler:
        start = time.monotonic()
        victim.partition()
        cut_at = time.monotonic()
        hold(SHORT_PARTITION, lambda: assert_all_ready(cluster, node_ids))
        victim.heal(reconnect=False)
        # The default TTL is 4 s (gdpm.common.keys.DEFAULT_NODE_TTL); watching for 6 s
        # after the cut covers any default up to 5 s.
        hold(cut_at + replacement_window(None) - time.monotonic(), lambda: assert_all_ready(cluster, node_ids))
        sampler.wait_sample_after(time.monotonic())

    sampler.assert_exactly(service_id, REPLICAS, since=start)
    assert_unchanged(before, instance_snapshot(cluster, service_id), "instance (node, pid, restarts)")
    assert_unchanged(keys_before, alive_keys(etcd, cluster, node_ids), "alive key (create revision, lease)")


def test_master_sigkill_during_scale_up(cluster: Cluster):
    """SIGKILL the master right after a scale-up request, then restart it.

    Steps:
    1. Start 3 slaves and run 2 replicas.
    2. PATCH the service to 6 replicas and SIGKILL the master at once.
    3. Start the master again on the same port.

    Expect: the scale-up completes (6 running), the 2 original instances keep their
    pids, no instance has restarted, and no sample shows more than 6.
    """
    start_cluster(cluster, node_ttl=FAST_TTL)
    service_id = create_service(cluster, LONG_COMMAND, 2)
    original = {instance["id"]: instance["pid"] for instance in wait_converged(cluster, service_id, 2)}

    with InstanceSampler(cluster.run_id) as sampler:
        scale_service(cluster, service_id, REPLICAS)
        cluster.master.kill(signal.SIGKILL)
        cluster.master.start()
        instances = wait_converged(cluster, service_id, REPLICAS)
        converged_at = time.monotonic()
        sampler.wait_sample_after(converged_at + QUIET_PERIOD)

    sampler.assert_never_above(service_id, REPLICAS)
    sampler.assert_exactly(service_id, REPLICAS, since=converged_at)
    pids = {instance["id"]: instance["pid"] for instance in instances}
    for instance_id, pid in original.items():
        assert pids[instance_id] == pid, f"{instance_id} was restarted"
    assert [instance["restarts"] for instance in instances] == [0] * REPLICAS
    assert all(state == "ready" for state in node_states(cluster).values())


def test_etcd_leader_kill_changes_nothing(cluster_on_etcd_cluster: Cluster, etcd_cluster: EtcdCluster):
    """SIGKILL the leader of a 3-member etcd cluster: no node goes down, nothing restarts.

    Steps:
    1. Start a master and 3 slaves with the default TTL, all given the 3 etcd
       endpoints, and run 6 replicas.
    2. SIGKILL the etcd leader.
    3. Watch until 6 s after a new leader is elected, then scale to 7.

    Expect: every node ready at every poll, every alive key never deleted, every
    instance with its pid and restart count unchanged, and exactly 6 at every sample.
    The scale-up to 7 completes with one member down.
    """
    cluster = cluster_on_etcd_cluster
    slaves = start_cluster(cluster)
    service_id = spread_service(cluster, slaves)
    node_ids = [slave.node_id for slave in slaves]
    before = instance_snapshot(cluster, service_id)
    keys_before = alive_keys(etcd_cluster.any_member(), cluster, node_ids)

    with InstanceSampler(cluster.run_id) as sampler:
        start = time.monotonic()
        leader = etcd_cluster.wait_leader()
        etcd_cluster.kill(leader)
        killed_at = time.monotonic()
        wait_until(lambda: etcd_cluster.leader() not in (None, leader), 30.0, interval=0.1,
                   message="a new etcd leader")
        elected_at = time.monotonic()
        hold(max(killed_at, elected_at) + replacement_window(None) - time.monotonic(),
             lambda: assert_all_ready(cluster, node_ids))
        sampler.wait_sample_after(time.monotonic())
        sampler.assert_exactly(service_id, REPLICAS, since=start)

        assert_unchanged(before, instance_snapshot(cluster, service_id), "instance (node, pid, restarts)")
        assert_unchanged(keys_before, alive_keys(etcd_cluster.any_member(), cluster, node_ids),
                         "alive key (create revision, lease)")
        scale_service(cluster, service_id, REPLICAS + 1)
        wait_converged(cluster, service_id, REPLICAS + 1)

    sampler.assert_never_above(service_id, REPLICAS + 1)
    etcd_cluster.restart(leader)


def test_etcd_restart_within_ttl_changes_nothing(cluster: Cluster, etcd: EtcdProcess):
    """Restart the single etcd (SIGKILL, start on the same ports and data) well within the TTL.

    Steps:
    1. Start 3 slaves with --node-ttl 6, because etcd takes up to about 2 s to restart
       here, and run 6 replicas.
    2. SIGKILL etcd and start it again at once.

    Expect, until the TTL plus 2 s after the kill: every node ready at every poll,
    every alive key never deleted, every instance with its pid and restart count
    unchanged, and exactly 6 at every sample.
    """
    node_ttl = 6
    slaves = start_cluster(cluster, node_ttl=node_ttl)
    service_id = spread_service(cluster, slaves)
    node_ids = [slave.node_id for slave in slaves]
    before = instance_snapshot(cluster, service_id)
    keys_before = alive_keys(etcd, cluster, node_ids)

    with InstanceSampler(cluster.run_id) as sampler:
        start = time.monotonic()
        etcd.kill()
        killed_at = time.monotonic()
        etcd.start()
        outage = time.monotonic() - killed_at
        assert outage < node_ttl / 2, f"precondition: etcd restarted in {outage:.1f} s, not well within the TTL"
        hold(killed_at + replacement_window(node_ttl) - time.monotonic(), lambda: assert_all_ready(cluster, node_ids))
        sampler.wait_sample_after(time.monotonic())

    sampler.assert_exactly(service_id, REPLICAS, since=start)
    assert_unchanged(before, instance_snapshot(cluster, service_id), "instance (node, pid, restarts)")
    assert_unchanged(keys_before, alive_keys(etcd, cluster, node_ids), "alive key (create revision, lease)")


def test_etcd_down_longer_than_ttl_converges(cluster: Cluster, etcd: EtcdProcess):
    """Keep the single etcd down for longer than the TTL, then start it again.

    Steps:
    1. Start 3 slaves with --node-ttl 2 and run 6 replicas.
    2. SIGKILL etcd and keep it down for the TTL plus 1 s. The slaves cannot renew
       their leases meanwhile, so they may fence their instances.
    3. Start etcd on the same ports and data.

    Expect: no sample ever shows more than 6, and the cluster converges back to
    exactly 6, in the API and in /proc.
    """
    slaves = start_cluster(cluster, node_ttl=FAST_TTL)
    service_id = spread_service(cluster, slaves)

    with InstanceSampler(cluster.run_id) as sampler:
        etcd.kill()
        hold(FAST_TTL + 1.0)
        etcd.start()
        wait_converged(cluster, service_id, REPLICAS)
        converged_at = time.monotonic()
        sampler.wait_sample_after(converged_at + QUIET_PERIOD)

    sampler.assert_never_above(service_id, REPLICAS)
    sampler.assert_exactly(service_id, REPLICAS, since=converged_at)
    assert all(slave.running() for slave in slaves), "a slave exited during the etcd outage"


def test_slave_restart_kills_leftovers_and_rejoins(cluster: Cluster):
    """SIGKILL a slave together with its guardian, so its instances survive; restart it.

    Steps:
    1. Start 3 slaves with --node-ttl 6 and run 6 replicas.
    2. Stop slave-1 with SIGSTOP, SIGKILL its children that are not instances (its
       guardian), then SIGKILL slave-1. Its 2 instances keep running as orphans.
    3. Start slave-1 again at once, with the same state dir.

    Expect: slave-1 rejoins as the same node id and kills the leftovers of its
    previous run. It runs its 2 instances again, with new pids, and its node never
    shows down. No sample ever shows more than 6.
    """
    node_ttl = 6
    slaves = start_cluster(cluster, node_ttl=node_ttl)
    service_id = spread_service(cluster, slaves)
    victim = slaves[0]
    node_id = victim.node_id
    node_ids = [slave.node_id for slave in slaves]

    with InstanceSampler(cluster.run_id) as sampler:
        leftover_pids = node_pids(cluster, node_id)
        kill_slave_with_helpers(victim)
        killed_at = time.monotonic()
        assert stray(leftover_pids) == sorted(leftover_pids), \
            "precondition: the instances of the killed slave still run"

        victim.start(wait_ready=False)
        assert victim.wait_ready() == node_id
        assert_gone_by(leftover_pids, time.monotonic() + 10,
                       f"leftovers of {victim.name}'s previous run alive after its restart")

        def share_back() -> bool:
            return scan_instances_on(cluster, service_id, node_id) == 2

        wait_until(share_back, killed_at + node_ttl - time.monotonic(), interval=0.05,
                   message=f"{victim.name} running its 2 instances again within the TTL")
        assert_all_ready(cluster, node_ids)
        instances = wait_converged(cluster, service_id, REPLICAS)
        converged_at = time.monotonic()
        sampler.wait_sample_after(converged_at + QUIET_PERIOD)

    sampler.assert_never_above(service_id, REPLICAS)
    sampler.assert_exactly(service_id, REPLICAS, since=converged_at)
    on_victim = [instance for instance in instances if instance["node_id"] == node_id]
    assert len(on_victim) == 2
    assert not {instance["pid"] for instance in on_victim} & set(leftover_pids)


def scan_instances_on(cluster: Cluster, service_id: str, node_id: str) -> int:
    return sum(1 for group in scan_instances(cluster.run_id).values()
               if group.service_id == service_id and group.node_id == node_id)


def test_slave_sigterm_moves_instances_at_once(cluster: Cluster):
    """SIGTERM a slave with a long TTL: its lease is revoked, so its instances move at once.

    Steps:
    1. Start 3 slaves with --node-ttl 30 and run 6 replicas.
    2. Stop slave-1 with SIGTERM.

    Expect: slave-1's instances are stopped when it exits, and its node shows down
    within 2 s. 6 run again on the other slaves within 5 s, far less than the 30 s
    TTL, and no sample shows more than 6.
    """
    node_ttl = 30
    slaves = start_cluster(cluster, node_ttl=node_ttl)
    service_id = spread_service(cluster, slaves)
    victim = slaves[0]

    with InstanceSampler(cluster.run_id) as sampler:
        victim_pids = node_pids(cluster, victim.node_id)
        assert victim.stop() == 0
        stopped_at = time.monotonic()
        assert not stray(victim_pids), "instances of the stopped slave outlived it"
        wait_node_state(cluster, victim.node_id, "down", stopped_at + 2.0)
        sampler.wait_for(
            lambda sample: sample.count(service_id) == REPLICAS,
            stopped_at + 5.0,
            f"{REPLICAS} instances running within 5 s of the slave's exit",
        )
        wait_converged(cluster, service_id, REPLICAS, avoid_node=victim.node_id)
        converged_at = time.monotonic()
        sampler.wait_sample_after(converged_at + QUIET_PERIOD)

    sampler.assert_never_above(service_id, REPLICAS)
    sampler.assert_exactly(service_id, REPLICAS, since=converged_at)


def test_compaction_during_partition(cluster: Cluster, etcd: EtcdProcess):
    """Compact etcd while a slave is cut off: it still converges to its assignments.

    Steps:
    1. Start 2 slaves with --node-ttl 6, slave-2 behind proxies, and run service A
       with 4 replicas (2 per node).
    2. Cut slave-2 off.
    3. Scale A to 2 and create service B with 2 replicas. slave-2 loses an A instance
       and gains a B instance.
    4. Compact etcd to its current revision, and heal within half the TTL.

    slave-2's watch cannot resume from its last revision, which is compacted.
    Expect: A runs exactly 2 and B exactly 2, and what runs on each node is what the
    API places there. B never runs more than 2. A never runs more than 4, because its
    surplus instance on slave-2 runs until slave-2 learns of the scale-down.
    """
    node_ttl = 6
    slaves = start_cluster(cluster, slaves=2, node_ttl=node_ttl, proxied=(2,))
    service_a = spread_service(cluster, slaves, replicas=4)
    victim = slaves[1]

    with InstanceSampler(cluster.run_id) as sampler:
        victim.partition()
        cut_at = time.monotonic()
        scale_service(cluster, service_a, 2)
        service_b = create_service(cluster, LONG_COMMAND, 2)

        def placed_on_victim() -> bool:
            a_nodes = [instance["node_id"] for instance in get_service(cluster, service_a)["instances"]]
            b_nodes = [instance["node_id"] for instance in get_service(cluster, service_b)["instances"]]
            return len(a_nodes) == 2 and len(b_nodes) == 2 and victim.node_id in b_nodes and None not in b_nodes

        wait_until(placed_on_victim, 5.0, interval=0.05,
                   message="the master placed B on both nodes while slave-2 is cut off")
        etcd.compact()
        partition = time.monotonic() - cut_at
        assert partition < node_ttl / 2, f"precondition: the partition lasted {partition:.1f} s"
        victim.heal()

        for service_id in (service_a, service_b):
            wait_converged(cluster, service_id, 2)
        converged_at = time.monotonic()
        sampler.wait_sample_after(converged_at + QUIET_PERIOD)

    sampler.assert_never_above(service_a, 4)
    sampler.assert_never_above(service_b, 2)
    sampler.assert_exactly(service_a, 2, since=converged_at)
    sampler.assert_exactly(service_b, 2, since=converged_at)
    placed = Counter((instance["service_id"], instance["node_id"])
                     for service_id in (service_a, service_b)
                     for instance in get_service(cluster, service_id)["instances"])
    running = Counter((group.service_id, group.node_id) for group in scan_instances(cluster.run_id).values())
    assert running == placed
