"""Smoke tests of the test harness itself: etcd, the /proc helpers, and a master with a slave."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from cluster import (
    TEST_RUN_MARKER,
    Cluster,
    EtcdProcess,
    is_alive,
    process_group,
    processes_with_env,
    start_etcd,
    wait_until,
)

from gdpm.common.etcd import Etcd, parse_endpoints


async def test_etcd_put_and_get(etcd: EtcdProcess) -> None:
    client = Etcd(parse_endpoints(etcd.endpoint))
    try:
        await client.client.put(b"/harness/key", b"value")
        result = await client.client.get(b"/harness/key")
    finally:
        await client.close()

    assert result is not None
    assert result.value == b"value"


def test_etcd_fixture_attributes(etcd: EtcdProcess) -> None:
    assert etcd.endpoint == f"127.0.0.1:{etcd.port}"
    assert is_alive(etcd.pid)
    assert etcd.data_dir.is_dir()
    assert etcd.healthy()


def test_start_etcd_and_stop(etcd_binary: Path, tmp_path: Path) -> None:
    etcd = start_etcd(etcd_binary, tmp_path / "data", tmp_path / "etcd.log")
    try:
        assert etcd.healthy()
    finally:
        exit_code = etcd.stop()

    assert not is_alive(etcd.pid)
    # etcd 3.4 dies of the SIGTERM; 3.5 handles it and exits 0. Neither needs SIGKILL.
    assert exit_code in (0, -signal.SIGTERM)


def test_process_helpers_find_marked_process() -> None:
    marker = "harness-" + os.urandom(6).hex()
    environment = dict(os.environ, **{TEST_RUN_MARKER: marker})
    child = subprocess.Popen(["sleep", "60"], env=environment, process_group=0)
    try:
        assert processes_with_env(TEST_RUN_MARKER, marker) == [child.pid]
        assert process_group(child.pid) == child.pid
        assert is_alive(child.pid)

        child.kill()
        # Killed but not yet reaped, the child is a zombie, which does not count as alive.
        wait_until(lambda: not is_alive(child.pid), timeout=5, message="killed child still alive")
    finally:
        child.kill()
        child.wait()

    assert process_group(child.pid) is None
    assert processes_with_env(TEST_RUN_MARKER, marker) == []


def test_wait_until_reports_last_value() -> None:
    with pytest.raises(AssertionError, match=r"never true \(timed out after 0.2s; last value: \[\]\)"):
        wait_until(lambda: [], timeout=0.2, message="never true")


def test_wait_until_reports_last_error() -> None:
    def reject_connection() -> bool:
        raise ConnectionRefusedError("rejected by the test")

    with pytest.raises(AssertionError, match="no response .*rejected by the test"):
        wait_until(reject_connection, timeout=0.2, message="no response")


def test_wait_until_raises_other_errors() -> None:
    def fail() -> bool:
        raise KeyError("nodes")

    with pytest.raises(KeyError):
        wait_until(fail, timeout=5)


def test_wait_until_returns_value() -> None:
    values = iter([0, None, "ready"])

    assert wait_until(lambda: next(values), timeout=5) == "ready"


def test_cluster_runs_service_on_slave(cluster: Cluster) -> None:
    """A master and a slave start through the harness and run a service's instances.

    Steps: start the master and slave "alpha", and create a service with 2 replicas.
    Wait until both run. Check that the instances carry the harness's marker, so that
    the teardown would find them. Delete the service and wait until its processes exit.
    """
    cluster.start_master()
    alpha = cluster.start_slave("alpha", node_ttl=5)

    status, body = cluster.api("GET", "/api/v1/nodes")
    assert status == 200
    assert [(node["name"], node["state"]) for node in body["nodes"]] == [("alpha", "ready")]
    assert body["nodes"][0]["id"] == alpha.node_id

    status, body = cluster.api("POST", "/api/v1/services", json={"command": "sleep 300", "replicas": 2})
    assert status == 201, body
    service_id = body["id"]

    def running_count() -> int:
        return cluster.api("GET", f"/api/v1/services/{service_id}")[1]["running"]

    wait_until(lambda: running_count() == 2, timeout=20, message="2 instances not running")

    instance_pids = processes_with_env("GDPM_SERVICE_ID", service_id)
    assert instance_pids, "no process carries GDPM_SERVICE_ID"
    marked = set(cluster.marked_processes())
    assert set(instance_pids) <= marked
    assert alpha.pid in marked
    assert cluster.master.pid in marked

    status, _ = cluster.api("DELETE", f"/api/v1/services/{service_id}")
    assert status == 204
    wait_until(
        lambda: not [pid for pid in instance_pids if is_alive(pid)],
        timeout=20, message="instances of the deleted service still alive",
    )


def test_master_restart_keeps_port(cluster: Cluster) -> None:
    master = cluster.start_master()
    url, old_pid = master.url, master.pid

    master.kill(signal.SIGKILL)
    assert not is_alive(old_pid)
    master.restart()

    assert master.url == url
    assert master.pid != old_pid
    assert cluster.api("GET", "/healthz")[0] == 200
