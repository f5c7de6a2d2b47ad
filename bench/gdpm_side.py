"""gdpm under measurement: one etcd, a master and slaves started by the test harness.

The harness (tests/cluster.py) starts real ``gdpm master`` and ``gdpm slave``
processes on loopback and stops them by pid; :class:`GdpmCluster` adds the timed
operations: create a service and poll the API until its instances run, delete it and
poll /proc until its processes are gone.
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO_ROOT, BenchError, POLL_INTERVAL, log
from bench import procfs

sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT)]

from cluster import Cluster, EtcdProcess, http_request  # noqa: E402

COMMAND = "sleep 3600"
# Seconds without progress (neither more instances running in the API nor more processes
# in /proc) after which a start is given up as stalled, before its timeout.
STALL_TIMEOUT = 30.0

# Lines of the master's and slaves' logs that tell why a run went wrong, by what they mean.
LOG_PATTERNS = {
    "lease refresh failed": "] lease refresh failed",
    "slave fenced itself (killed its instances)": "] fenced ",
    "spawn failed": "] spawn failed",
    "Too many open files": "Too many open files",
    "instances moved from a down node": "] instance moved from a down node",
    "signal wakeup fd full (BlockingIOError)": "trying to write to the signal wakeup fd",
}


@dataclass
class StartTiming:
    """Seconds from the create request: until the API reported every instance running,
    and until /proc showed every instance's process (None when not watched)."""

    api: float | None
    spawned: float | None
    polls: int
    # Seconds until /proc showed the first instance's process (None when not watched).
    first: float | None = None
    # Why it did not finish: "timeout" or "stalled"; None when it did.
    failure: str | None = None


@dataclass
class DeleteTiming:
    """Seconds from the delete request until no process of the service was alive."""

    gone: float | None
    processes: int
    # Processes still alive when the wait timed out.
    remaining: int = 0


class GdpmCluster:
    """A master and ``slave_count`` slaves on one etcd, under a key prefix of their own."""

    def __init__(self, etcd: EtcdProcess, base_dir: Path, slave_count: int, max_replicas: int) -> None:
        self.etcd = etcd
        self.cluster = Cluster(etcd_endpoint=etcd.endpoint, prefix=f"/gdpm-bench-{uuid.uuid4().hex[:12]}",
                               base_dir=base_dir)
        self.slave_count = slave_count
        self.max_replicas = max_replicas

    def __enter__(self) -> GdpmCluster:
        return self.start()

    def start(self) -> GdpmCluster:
        """Start the master, then the slaves, and wait until every slave's node is ready."""
        try:
            self.cluster.start_master(max_replicas=max(self.max_replicas, 1000))
            slaves = [self.cluster.start_slave(f"slave-{number}", wait_ready=False)
                      for number in range(1, self.slave_count + 1)]
            for slave in slaves:
                slave.wait_ready(timeout=120)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        leftovers = self.cluster.teardown()
        if leftovers:
            log(f"gdpm teardown killed {len(leftovers)} leftover processes")

    @property
    def master_pid(self) -> int:
        return self.cluster.master.pid

    @property
    def slave_pids(self) -> list[int]:
        return [slave.pid for slave in self.cluster.slaves]

    @property
    def url(self) -> str:
        return self.cluster.url

    def api(self, method: str, path: str, json: object = None, timeout: float = 30.0) -> tuple[int, object]:
        return http_request(method, f"{self.url}{path}", json=json, timeout=timeout)

    # -- timed operations --------------------------------------------------------

    def create(self, replicas: int, command: str = COMMAND) -> tuple[str, float]:
        """POST the service; return its id and the monotonic time just before the request."""
        started = time.monotonic()
        status, body = self.api("POST", "/api/v1/services", json={"command": command, "replicas": replicas})
        if status != 201:
            raise BenchError(f"POST /api/v1/services responded with {status}: {body}")
        return body["id"], started

    def wait_running(self, service_id: str, count: int, started: float, timeout: float, *,
                     detail: bool, watch_proc: bool = True) -> StartTiming:
        """Poll the API every POLL_INTERVAL until it reports ``count`` running instances of the service.

        With ``detail`` the poll is GET /api/v1/services/ID (every instance), otherwise
        GET /api/v1/services (the ``running`` count of each service), which stays small
        whatever the number of instances. With ``watch_proc``, each poll also counts
        the slaves' children in /proc, to record when every process existed.
        """
        spawned_at = first_at = None
        polls = 0
        deadline = started + timeout
        spawned = 0
        progress, progress_at = (-1, -1), started
        while True:
            if watch_proc and spawned_at is None:
                spawned = self._spawned_count()
                if first_at is None and spawned:
                    first_at = time.monotonic()
                if spawned >= count:
                    spawned_at = time.monotonic()
            running = self._running(service_id, detail)
            now = time.monotonic()
            polls += 1
            if running == count:
                if watch_proc and spawned_at is None:
                    spawned_at = now
                if watch_proc and first_at is None:
                    first_at = now
                return StartTiming(now - started, _since(spawned_at, started), polls, _since(first_at, started))
            if (running or 0, spawned) > progress:
                progress, progress_at = (running or 0, spawned), now
            failure = None
            if now > deadline:
                failure = "timeout"
            elif now - progress_at > STALL_TIMEOUT:
                failure = "stalled"
            if failure:
                log(f"{failure}: {service_id} reports {running} of {count} running after {now - started:.0f} s "
                    f"({spawned} instance processes in /proc); see {self.cluster.logs_dir}")
                return StartTiming(None, _since(spawned_at, started), polls, _since(first_at, started), failure)
            time.sleep(POLL_INTERVAL)

    def _running(self, service_id: str, detail: bool) -> int | None:
        if detail:
            status, body = self.api("GET", f"/api/v1/services/{service_id}")
            if status != 200:
                return None
            return sum(1 for instance in body["instances"] if instance["state"] == "running")
        status, body = self.api("GET", "/api/v1/services")
        if status != 200:
            return None
        service = next((item for item in body["services"] if item["id"] == service_id), None)
        return None if service is None else service["running"]

    def instance_pids(self, service_id: str) -> list[int]:
        status, body = self.api("GET", f"/api/v1/services/{service_id}")
        if status != 200:
            raise BenchError(f"GET /api/v1/services/{service_id} responded with {status}: {body}")
        return [instance["pid"] for instance in body["instances"] if instance["pid"]]

    def delete(self, service_id: str, timeout: float) -> DeleteTiming:
        """DELETE the service and poll /proc until none of its processes is alive.

        Its processes are the members of the instances' process groups (for `sleep 3600`,
        the sleep itself, which the slave runs without a shell), read before the request.
        """
        processes = procfs.group_members(set(self.instance_pids(service_id)))
        started = time.monotonic()
        status, body = self.api("DELETE", f"/api/v1/services/{service_id}")
        if status != 204:
            raise BenchError(f"DELETE /api/v1/services/{service_id} responded with {status}: {body}")
        remaining = processes
        while remaining:
            remaining = procfs.alive_among(remaining)
            now = time.monotonic()
            if not remaining:
                return DeleteTiming(now - started, len(processes))
            if now - started > timeout:
                log(f"timed out: {len(remaining)} processes of {service_id} still alive after {timeout:g} s")
                return DeleteTiming(None, len(processes), len(remaining))
            time.sleep(POLL_INTERVAL)
        return DeleteTiming(time.monotonic() - started, len(processes))

    def wait_settled(self, timeout: float) -> None:
        """Wait until no slave has an instance status left in etcd, so that every stop is finished.

        A delete is timed until its processes are gone, but each slave still records
        every exit afterwards. The next measurement waits for that, or it would be
        timed while the slaves are busy with the last one.
        """
        prefixes = [f"{self.cluster.prefix}/status/{slave.node_id}/".encode() for slave in self.cluster.slaves]
        deadline = time.monotonic() + timeout
        while any(self.etcd.count(prefix) for prefix in prefixes):
            if time.monotonic() > deadline:
                raise BenchError(f"slaves still had instance statuses {timeout:g} s after the delete")
            time.sleep(POLL_INTERVAL)

    def diagnostics(self) -> dict[str, int]:
        """Count the lines of this cluster's logs that match each of LOG_PATTERNS (non-zero only)."""
        counts = dict.fromkeys(LOG_PATTERNS, 0)
        for log_path in self.cluster.logs_dir.glob("*.log"):
            with open(log_path, errors="replace") as lines:
                for line in lines:
                    for label, pattern in LOG_PATTERNS.items():
                        if pattern in line:
                            counts[label] += 1
        return {label: count for label, count in counts.items() if count}

    def slave_fds(self) -> list[int]:
        """Return the number of open file descriptors of each slave."""
        counts = []
        for pid in self.slave_pids:
            try:
                counts.append(len(os.listdir(f"/proc/{pid}/fd")))
            except OSError:
                counts.append(0)
        return counts

    def slave_fd_limit(self) -> int | None:
        """Return the soft RLIMIT_NOFILE of the first slave, from /proc/PID/limits."""
        try:
            for line in Path(f"/proc/{self.slave_pids[0]}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def _spawned_count(self) -> int:
        """Count the instances' processes among the slaves' children (the guardian is a child too)."""
        total = 0
        for slave_pid in self.slave_pids:
            for child in procfs.children(slave_pid):
                if procfs.command_name(child) in ("sh", "sleep"):
                    total += 1
        return total


def _since(moment: float | None, started: float) -> float | None:
    return None if moment is None else moment - started


METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def etcd_metrics(etcd: EtcdProcess) -> dict[str, float]:
    """Read etcd's Prometheus metrics that count work: proposals and gRPC calls by method.

    Keys: ``proposals_committed``, ``unary:METHOD`` (grpc_server_handled_total of unary
    calls) and ``stream:METHOD`` (grpc_server_msg_received_total of streams).
    """
    status, text = http_request("GET", f"{etcd.url}/metrics", timeout=10)
    if status != 200 or not isinstance(text, str):
        raise BenchError(f"GET {etcd.url}/metrics responded with {status}")
    figures: dict[str, float] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match is None:
            continue
        name, labels, value = match["name"], match["labels"] or "", float(match["value"])
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if name == "etcd_server_proposals_committed_total":
            figures["proposals_committed"] = value
        elif name == "grpc_server_handled_total" and label.get("grpc_type") == "unary":
            key = f"unary:{label.get('grpc_method')}"
            figures[key] = figures.get(key, 0.0) + value
        elif name == "grpc_server_msg_received_total" and label.get("grpc_type") == "bidi_stream":
            key = f"stream:{label.get('grpc_method')}"
            figures[key] = figures.get(key, 0.0) + value
    return figures


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after.get(key, 0.0) - before.get(key, 0.0)
            for key in sorted(set(before) | set(after)) if after.get(key, 0.0) != before.get(key, 0.0)}
