"""Instance output and stops through a real cluster: logs, rotation, forwarding, strays."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cluster import REPO_ROOT, Cluster, processes_with_env, wait_until
from test_cluster import CONVERGE_TIMEOUT, live_groups, wait_running
from test_supervision import create


def log_bytes(slave_dir: Path, instance_id: str, stream: str = "stdout") -> bytes:
    """Return everything an instance wrote to a stream, rotated files included, oldest first."""
    log_dir = slave_dir / "logs"
    current = log_dir / f"{instance_id}.{stream}.log"
    rotated = sorted(log_dir.glob(f"{instance_id}.{stream}.log.*"), key=lambda path: -int(path.suffix[1:]))
    return b"".join(path.read_bytes() for path in [*rotated, current] if path.exists())


def test_fast_output_is_stored_completely(cluster: Cluster):
    """50 MB written as fast as possible are all stored, rotated, and the writer is not blocked."""
    cluster.start_master()
    slave = cluster.start_slave("slave-1", log_max_bytes=8 * 1024 * 1024, log_backups=8)
    service_id = create(cluster, "head -c 50000000 /dev/zero; echo done >&2; exec sleep 1000")
    instance_id = f"{service_id}-0"
    wait_running(cluster, service_id, 1)

    wait_until(lambda: log_bytes(slave.state_dir, instance_id, "stderr") == b"done\n", CONVERGE_TIMEOUT,
               message="writer finished")
    wait_until(lambda: len(log_bytes(slave.state_dir, instance_id)) == 50_000_000, CONVERGE_TIMEOUT,
               message="50 MB stored")
    files = list((slave.state_dir / "logs").glob(f"{instance_id}.stdout.log*"))
    assert len(files) == -(-50_000_000 // (8 * 1024 * 1024))
    assert all(path.stat().st_size <= 8 * 1024 * 1024 for path in files)


def test_invalid_utf8_stored_as_written(cluster: Cluster):
    cluster.start_master()
    slave = cluster.start_slave("slave-1")
    service_id = create(cluster, r"printf '\377\376abc\n\300\n'; exec sleep 1000")
    wait_running(cluster, service_id, 1)
    wait_until(lambda: log_bytes(slave.state_dir, f"{service_id}-0") == b"\xff\xfeabc\n\xc0\n", CONVERGE_TIMEOUT,
               message="raw bytes in the log")
    assert len(live_groups(service_id)) == 1


def test_last_line_on_sigterm_kept(cluster: Cluster):
    """What an instance prints while handling SIGTERM reaches its log."""
    cluster.start_master()
    slave = cluster.start_slave("slave-1")
    service_id = create(cluster, "trap 'echo bye-bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done")
    wait_running(cluster, service_id, 1)
    instance_id = f"{service_id}-0"
    wait_until(lambda: log_bytes(slave.state_dir, instance_id) == b"ready\n", CONVERGE_TIMEOUT, message="ready")

    status, _ = cluster.api("PATCH", f"/api/v1/services/{service_id}", json={"replicas": 0})
    assert status == 200
    wait_until(lambda: not live_groups(service_id), CONVERGE_TIMEOUT, message="stopped")
    wait_until(lambda: log_bytes(slave.state_dir, instance_id) == b"ready\nbye-bye\n", CONVERGE_TIMEOUT,
               message="last line kept")


def client(cluster: Cluster, *arguments: str, **popen) -> list[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GDPM_")}
    environment["PYTHONPATH"] = str(REPO_ROOT)
    return [sys.executable, "-m", "gdpm", "client", "--master", cluster.url, *arguments], environment


def test_logs_through_master(cluster: Cluster):
    """`gdpm client logs` shows every instance's lines, each prefixed by its instance."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    cluster.start_slave("slave-2")
    service_id = create(cluster, 'echo "hello from $GDPM_INSTANCE_INDEX"; echo oops >&2; exec sleep 1000', 2)
    wait_running(cluster, service_id, 2)

    def lines(*extra: str) -> list[str]:
        command, environment = client(cluster, "logs", service_id, *extra)
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, env=environment)
        assert result.returncode == 0, result.stderr
        return sorted(result.stdout.splitlines())

    expected = [f"[{service_id}-0] hello from 0", f"[{service_id}-1] hello from 1"]
    wait_until(lambda: lines() == expected, CONVERGE_TIMEOUT, message="stdout of both instances")
    assert lines("--stderr", "--instance", f"{service_id}-1") == [f"[{service_id}-1] oops"]


def test_logs_of_quiet_instance_empty(cluster: Cluster):
    """An instance that has printed nothing has no log file yet; its logs are empty, not an error."""
    cluster.start_master()
    slave = cluster.start_slave("slave-1")
    service_id = create(cluster, "sleep 1000")
    wait_running(cluster, service_id, 1)
    assert not (slave.state_dir / "logs" / f"{service_id}-0.stdout.log").exists()

    command, environment = client(cluster, "logs", service_id)
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, env=environment)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_logs_follow_across_restart(cluster: Cluster):
    """`logs -f` keeps following an instance through its restarts."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    service_id = create(cluster, 'echo "run $$"; sleep 0.3; exit 1', restart_delay=0.2, restart_delay_max=0.2,
                        max_restarts=None)
    command, environment = client(cluster, "logs", "-f", service_id)
    follower = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
    seen: list[bytes] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(follower.stdout.readline, b"")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: len({line for line in seen if b"run " in line}) >= 3, CONVERGE_TIMEOUT,
                   message="three runs followed")
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            follower.wait(timeout=10)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.wait(timeout=10)
        follower.stdout.close()
        follower.stderr.close()
        reader.join(timeout=5)
    runs = [line for line in seen if b"run " in line]
    assert all(line.startswith(f"[{service_id}-0] run ".encode()) for line in runs)
    assert len(set(runs)) == len(runs)


def test_delete_leaves_no_daemon(cluster: Cluster):
    """A setsid grandchild and a double-forked daemon end with the instance."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    command = "setsid sleep 1001 & (setsid sh -c 'sleep 1002' &) ; exec sleep 1000"
    service_id = create(cluster, command)
    # The daemons lead groups of their own, so wait_running's one-group-per-instance
    # check does not apply: wait for the processes instead.
    wait_until(lambda: len(processes_with_env("GDPM_SERVICE_ID", service_id)) >= 4, CONVERGE_TIMEOUT,
               message="daemons started")

    started = time.monotonic()
    status, _ = cluster.api("DELETE", f"/api/v1/services/{service_id}")
    assert status == 204
    wait_until(lambda: not processes_with_env("GDPM_SERVICE_ID", service_id), CONVERGE_TIMEOUT,
               message="every process of the instance gone")
    assert time.monotonic() - started < 5.0
