"""Helpers for the chaos scenarios: a /proc sampler of instances, stray checks, API helpers.

The safety properties of every scenario are about real processes, not about what the
API reports. At no moment may more instances of a service run than it has replicas
(a doubled instance). Once the cluster has recovered, exactly that many must run (none
lost). :class:`InstanceSampler` checks both from /proc in a background thread, every
100 ms, while a test injects faults in the foreground.

An instance is a process group: the slave starts each one as ``/bin/sh -c COMMAND`` in
a session and process group of its own, and every process of it carries
``GDPM_SERVICE_ID``, ``GDPM_INSTANCE_ID`` and ``GDPM_NODE_ID`` in its environment.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import TEST_RUN_MARKER, Cluster, SlaveProcess, is_alive, kill_quietly, wait_until

# Seconds between two samples of /proc.
SAMPLE_INTERVAL = 0.1

# Seconds a scenario may take to converge on a loaded two-core machine.
CONVERGE_TIMEOUT = 30.0

LONG_COMMAND = "sleep 1000"


# -- /proc ------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceProcess:
    """The live process group of one instance, as found in /proc."""

    pgid: int
    service_id: str
    instance_id: str
    node_id: str
    # Live pids of the group that carry the instance's variables.
    pids: frozenset[int]


def _read_environment(pid: str) -> dict[bytes, bytes] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            raw = environ.read()
    except OSError:
        return None
    variables = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep:
            variables[name] = value
    return variables


def _read_state_and_group(pid: str) -> tuple[str, int] | None:
    """Return (state letter, process group id) from /proc/PID/stat, or None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    # The command name in brackets may contain spaces, so split after its closing bracket.
    fields = stat[stat.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[2])


def scan_instances(run_id: str | None = None) -> dict[int, InstanceProcess]:
    """Map the process group id of each live instance to what /proc shows of it.

    With ``run_id``, only processes marked ``GDPM_TEST_RUN=run_id`` count, so that
    another test run on the same machine is not counted. Zombies do not count: a
    killed instance that is not reaped yet runs nothing.
    """
    marker = run_id.encode() if run_id is not None else None
    groups: dict[int, dict[str, Any]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        environment = _read_environment(entry)
        if environment is None or b"GDPM_SERVICE_ID" not in environment:
            continue
        if marker is not None and environment.get(TEST_RUN_MARKER.encode()) != marker:
            continue
        state_and_group = _read_state_and_group(entry)
        if state_and_group is None or state_and_group[0] in ("Z", "X"):
            continue
        pgid = state_and_group[1]
        group = groups.setdefault(pgid, {
            "service_id": environment[b"GDPM_SERVICE_ID"].decode(errors="replace"),
            "instance_id": environment.get(b"GDPM_INSTANCE_ID", b"").decode(errors="replace"),
            "node_id": environment.get(b"GDPM_NODE_ID", b"").decode(errors="replace"),
            "pids": set(),
        })
        group["pids"].add(int(entry))
    return {
        pgid: InstanceProcess(pgid, group["service_id"], group["instance_id"], group["node_id"],
                              frozenset(group["pids"]))
        for pgid, group in groups.items()
    }


def node_pids(cluster: Cluster, node_id: str) -> set[int]:
    """Return the live pids of every instance process that a node's slave started."""
    return {pid for group in scan_instances(cluster.run_id).values() if group.node_id == node_id
            for pid in group.pids}


def stray(pids: Iterable[int]) -> list[int]:
    """Return the pids among ``pids`` that are still alive (zombies are not)."""
    return sorted(pid for pid in pids if is_alive(pid))


def assert_gone_by(pids: Iterable[int], deadline: float, what: str) -> float:
    """Wait until none of ``pids`` is alive, failing if one still is at ``deadline`` (time.monotonic()).

    Returns the time at which they were all gone.
    """
    pids = set(pids)
    while True:
        now = time.monotonic()
        alive = stray(pids)
        if not alive:
            return now
        if now >= deadline:
            details = ", ".join(f"{pid} ({_command_line(pid)})" for pid in alive)
            raise AssertionError(f"{what}: {len(alive)} processes still alive: {details}")
        time.sleep(min(0.02, deadline - now))


def child_processes(parent_pid: int) -> list[int]:
    """Return the pids whose parent is ``parent_pid``."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2:].split()[1]) == parent_pid:
            children.append(int(entry))
    return sorted(children)


def kill_slave_with_helpers(slave: SlaveProcess) -> list[int]:
    """SIGKILL a slave and every child of it that is not an instance (its guardian).

    This leaves the slave's instances running as orphans, as when a whole slave
    service is killed but the instances, in sessions of their own, are not. The slave
    is stopped with SIGSTOP first, so that it cannot start a new guardian in between,
    and its guardian cannot see the slave's end before it dies itself.
    Returns the pids of the helpers that were killed.
    """
    os.kill(slave.pid, signal.SIGSTOP)
    helpers = []
    for pid in child_processes(slave.pid):
        environment = _read_environment(str(pid)) or {}
        if b"GDPM_INSTANCE_ID" not in environment:
            helpers.append(pid)
            kill_quietly(pid)
    # The stopped slave cannot reap its killed helpers, so they stay zombies, which
    # is_alive does not count.
    wait_until(lambda: not stray(helpers), 5.0, message=f"helpers {helpers} of slave {slave.name} survived SIGKILL")
    slave.kill(signal.SIGKILL)
    return helpers


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone)"


# -- the sampler ------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The live instances at one moment: ``time`` is time.monotonic() after the scan."""

    time: float
    instances: dict[int, InstanceProcess]

    def count(self, service_id: str) -> int:
        return sum(1 for group in self.instances.values() if group.service_id == service_id)

    def count_on(self, service_id: str, node_id: str) -> int:
        return sum(1 for group in self.instances.values()
                   if group.service_id == service_id and group.node_id == node_id)

    def describe(self, service_id: str, started: float) -> str:
        groups = sorted((group for group in self.instances.values() if group.service_id == service_id),
                        key=lambda group: (group.instance_id, group.pgid))
        listed = ", ".join(f"{group.instance_id} on {group.node_id} (pgid {group.pgid})" for group in groups)
        return f"t={self.time - started:+.2f}s count={len(groups)}: {listed}"


class InstanceSampler:
    """Samples the live instances of one cluster from /proc every ``interval`` seconds.

    Start it with ``with InstanceSampler(cluster.run_id) as sampler:`` or
    :meth:`start`; :meth:`stop` ends the thread and re-raises an error that it hit.
    Each scan reads /proc/PID/environ of every process on the machine, which takes a
    few milliseconds. A scan is not atomic, so a process that ends and another that
    starts during the same scan can both be counted. An instance killed and started
    again between two samples is not seen to go; compare pids for that.
    """

    def __init__(self, run_id: str | None = None, interval: float = SAMPLE_INTERVAL) -> None:
        self.run_id = run_id
        self.interval = interval
        self.started = time.monotonic()
        self._samples: list[Sample] = []
        self._condition = threading.Condition()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="instance-sampler", daemon=True)

    def start(self) -> InstanceSampler:
        self.started = time.monotonic()
        self._thread.start()
        self.wait_sample_after(self.started)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(10.0)
        if self._error is not None:
            raise AssertionError(f"the instance sampler failed: {self._error!r}") from self._error

    def __enter__(self) -> InstanceSampler:
        return self.start()

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.stop()
        else:
            # Keep the test's own error; a sampler error would only hide it.
            self._stopping.set()
            self._thread.join(10.0)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                instances = scan_instances(self.run_id)
                sample = Sample(time.monotonic(), instances)
                with self._condition:
                    self._samples.append(sample)
                    self._condition.notify_all()
                # The sampling period, not a synchronisation: the next scan is due.
                self._stopping.wait(self.interval)
        except BaseException as error:  # noqa: BLE001 - reported by stop()
            self._error = error
            with self._condition:
                self._condition.notify_all()

    # -- reading the samples -------------------------------------------------------

    @property
    def samples(self) -> list[Sample]:
        """A copy of every sample taken so far, oldest first."""
        with self._condition:
            return list(self._samples)

    def samples_since(self, since: float | None = None) -> list[Sample]:
        return [sample for sample in self.samples if since is None or sample.time >= since]

    def counts(self, service_id: str, since: float | None = None) -> list[tuple[float, int]]:
        """Return (time, live instance count) of ``service_id`` for each sample since ``since``."""
        return [(sample.time, sample.count(service_id)) for sample in self.samples_since(since)]

    def max_count(self, service_id: str, since: float | None = None) -> int:
        return max((count for _, count in self.counts(service_id, since)), default=0)

    def latest(self) -> Sample:
        samples = self.samples
        assert samples, "the sampler has taken no sample yet"
        return samples[-1]

    def wait_sample_after(self, moment: float, timeout: float = 10.0) -> Sample:
        """Wait for a sample that was taken after ``moment`` (time.monotonic()) and return it."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                if self._error is not None:
                    raise AssertionError(f"the instance sampler failed: {self._error!r}") from self._error
                if self._samples and self._samples[-1].time > moment:
                    return self._samples[-1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"the instance sampler took no sample in {timeout:g} s")
                self._condition.wait(remaining)

    def wait_for(self, predicate: Callable[[Sample], bool], deadline: float, message: str) -> Sample:
        """Wait for a sample, taken from now on, for which ``predicate`` is true.

        ``deadline`` is a time.monotonic() value. Raises AssertionError with
        ``message`` and the last sample when none matched by then.
        """
        moment = time.monotonic()
        while True:
            sample = self.wait_sample_after(moment)
            if predicate(sample):
                return sample
            if sample.time >= deadline:
                raise AssertionError(f"{message}; last sample {sample.time - self.started:+.2f}s: "
                                     f"{_summary(sample)}")
            moment = sample.time

    # -- checks ----------------------------------------------------------------------

    def assert_never_above(self, service_id: str, limit: int, since: float | None = None) -> None:
        """Fail when a sample since ``since`` shows more than ``limit`` live instances (a doubled instance)."""
        over = [sample for sample in self.samples_since(since) if sample.count(service_id) > limit]
        if over:
            shown = "\n".join(sample.describe(service_id, self.started) for sample in over[:5])
            raise AssertionError(
                f"{len(over)} samples show more than {limit} live instances of {service_id}; the first:\n{shown}"
            )

    def assert_exactly(self, service_id: str, count: int, since: float) -> None:
        """Fail unless every sample since ``since`` shows exactly ``count`` live instances."""
        samples = self.samples_since(since)
        assert samples, f"no sample since t={since - self.started:+.2f}s"
        wrong = [sample for sample in samples if sample.count(service_id) != count]
        if wrong:
            shown = "\n".join(sample.describe(service_id, self.started) for sample in wrong[:5])
            raise AssertionError(
                f"{len(wrong)} of {len(samples)} samples since t={since - self.started:+.2f}s do not show exactly "
                f"{count} live instances of {service_id}; the first:\n{shown}"
            )


def _summary(sample: Sample) -> str:
    per_service = Counter(group.service_id for group in sample.instances.values())
    return ", ".join(f"{service_id}: {count}" for service_id, count in sorted(per_service.items())) or "none"


def hold(seconds: float, check: Callable[[], None] | None = None, interval: float = 0.1) -> None:
    """Keep a fault in place for ``seconds``, calling ``check`` every ``interval`` meanwhile.

    This is the duration of a fault, such as a partition, not a wait for a condition.
    ``check`` raises to fail the test at once.
    """
    deadline = time.monotonic() + seconds
    while True:
        if check is not None:
            check()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(interval, remaining))


# -- the API --------------------------------------------------------------------------


def create_service(cluster: Cluster, command: str, replicas: int) -> str:
    status, body = cluster.api("POST", "/api/v1/services", json={"command": command, "replicas": replicas})
    assert status == 201, body
    return body["id"]


def scale_service(cluster: Cluster, service_id: str, replicas: int) -> None:
    status, body = cluster.api("PATCH", f"/api/v1/services/{service_id}", json={"replicas": replicas})
    assert status == 200, body


def get_service(cluster: Cluster, service_id: str) -> dict:
    status, body = cluster.api("GET", f"/api/v1/services/{service_id}")
    assert status == 200, body
    return body


def node_states(cluster: Cluster) -> dict[str, str]:
    """Map each node id to its state, ``ready`` or ``down``."""
    status, body = cluster.api("GET", "/api/v1/nodes", timeout=2.0)
    assert status == 200, body
    return {node["id"]: node["state"] for node in body["nodes"]}


def instance_snapshot(cluster: Cluster, service_id: str) -> dict[str, tuple[str | None, int | None, int]]:
    """Map each instance id to (node id, pid, restarts) as the API reports them."""
    return {instance["id"]: (instance["node_id"], instance["pid"], instance["restarts"])
            for instance in get_service(cluster, service_id)["instances"]}


def wait_converged(cluster: Cluster, service_id: str, count: int, timeout: float = CONVERGE_TIMEOUT,
                   avoid_node: str | None = None) -> list[dict]:
    """Wait until the API reports exactly ``count`` running instances and /proc agrees.

    "Agrees" means the live process groups of the service are exactly the pids that
    the API reports. With ``avoid_node``, no instance may be placed on that node.
    Returns the instances.
    """
    def converged() -> list[dict] | None:
        instances = get_service(cluster, service_id)["instances"]
        running = [instance for instance in instances if instance["state"] == "running"]
        if len(instances) != count or len(running) != count:
            return None
        if avoid_node is not None and any(instance["node_id"] == avoid_node for instance in instances):
            return None
        groups = {group.pgid for group in scan_instances(cluster.run_id).values() if group.service_id == service_id}
        if groups != {instance["pid"] for instance in running}:
            return None
        return running

    return wait_until(converged, timeout, interval=0.1,
                      message=f"{count} running instances of {service_id}, in the API and in /proc")
