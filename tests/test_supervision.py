"""Supervision scenarios: restart policies, backoff, failures, settings and events.

Real etcd, master and slave processes; instances are checked through the API and /proc.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from cluster import Cluster, wait_until
from test_cluster import CONVERGE_TIMEOUT, get_service, live_groups, wait_running


def create(cluster: Cluster, command: str, replicas: int = 1, **settings) -> str:
    status, body = cluster.api("POST", "/api/v1/services", json={"command": command, "replicas": replicas, **settings})
    assert status == 201, body
    return body["id"]


def instance(cluster: Cluster, service_id: str, index: int = 0) -> dict:
    """Return one instance of the service, or an empty dict before the scheduler created it."""
    items = [item for item in get_service(cluster, service_id)["instances"] if item["index"] == index]
    return items[0] if items else {}


def event_types(cluster: Cluster, service_id: str) -> list[str]:
    status, body = cluster.api("GET", f"/api/v1/services/{service_id}/events")
    assert status == 200, body
    return [event["type"] for event in body["events"]]


def wait_state(cluster: Cluster, service_id: str, state: str, index: int = 0) -> dict:
    return wait_until(lambda: (item := instance(cluster, service_id, index)).get("state") == state and item,
                      CONVERGE_TIMEOUT, message=f"instance {index} of {service_id} {state}")


def test_crash_loop_follows_backoff(cluster: Cluster):
    """A command that fails at once restarts after 0.2, 0.4, 0.8, 1.6 s (±20 %), not in a tight loop."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    started = time.monotonic()
    service_id = create(cluster, "exit 1", restart_delay=0.2, restart_delay_max=60, max_restarts=None)

    wait_until(lambda: instance(cluster, service_id).get("restarts", 0) >= 4, CONVERGE_TIMEOUT, message="4 restarts")
    elapsed = time.monotonic() - started
    minimum = 0.8 * (0.2 + 0.4 + 0.8)
    assert elapsed >= minimum, f"4 restarts after {elapsed:.2f} s: faster than the backoff allows"
    item = wait_state(cluster, service_id, "backoff")
    assert item["exit_code"] == 1
    assert item["restart_at"] is not None
    assert event_types(cluster, service_id).count("started") <= item["restarts"] + 1


def test_failed_after_max_restarts_until_update(cluster: Cluster):
    """After max_restarts quick failures the instance is failed and stays down; an update starts it again."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    service_id = create(cluster, "exit 4", restart_delay=0.1, restart_delay_max=0.2, max_restarts=2)

    failed = wait_state(cluster, service_id, "failed")
    assert failed["restarts"] == 2
    assert failed["exit_code"] == 4
    assert get_service(cluster, service_id)["failed"] == 1
    assert "failed" in event_types(cluster, service_id)
    assert not live_groups(service_id)

    status, body = cluster.api("PATCH", f"/api/v1/services/{service_id}", json={"command": "exec sleep 1000"})
    assert status == 200, body
    assert body["generation"] == 2
    wait_running(cluster, service_id, 1)


def test_on_failure_policy(cluster: Cluster):
    """on-failure: exit 0 is final, exit 3 restarts."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    clean = create(cluster, "exit 0", restart="on-failure", restart_delay=0.1)
    failing = create(cluster, "exit 3", restart="on-failure", restart_delay=0.1, restart_delay_max=0.1,
                     max_restarts=None)

    wait_until(lambda: instance(cluster, failing).get("restarts", 0) >= 2, CONVERGE_TIMEOUT, message="exit 3 restarted")
    done = wait_state(cluster, clean, "exited")
    assert done["exit_code"] == 0
    assert done["restarts"] == 0
    assert event_types(cluster, clean).count("started") == 1


def test_never_policy(cluster: Cluster):
    cluster.start_master()
    cluster.start_slave("slave-1")
    service_id = create(cluster, "exit 3", restart="never")
    done = wait_state(cluster, service_id, "exited")
    assert done["exit_code"] == 3
    assert done["restarts"] == 0
    assert get_service(cluster, service_id)["running"] == 0


def test_only_killed_instances_restart(cluster: Cluster):
    """Kill 2 of 3 instances by hand: those 2 restart, the third keeps its pid."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    service_id = create(cluster, "exec sleep 1000", 3, restart_delay=0.1)
    before = {item["index"]: item["pid"] for item in wait_running(cluster, service_id, 3)}

    for index in (0, 2):
        os.killpg(before[index], signal.SIGKILL)

    def restarted():
        items = {item["index"]: item for item in get_service(cluster, service_id)["instances"]}
        return all(items[index]["restarts"] == 1 and items[index]["state"] == "running" for index in (0, 2)) and items

    items = wait_until(restarted, CONVERGE_TIMEOUT, message="killed instances restarted")
    assert items[1]["pid"] == before[1]
    assert items[1]["restarts"] == 0
    assert items[0]["pid"] != before[0]
    assert items[2]["pid"] != before[2]
    assert len(live_groups(service_id)) == 3


def test_delete_during_backoff_starts_nothing(cluster: Cluster):
    """A service deleted while its instance backs off is not started again."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    service_id = create(cluster, "sleep 0.2; exit 1", restart_delay=2, restart_delay_max=2)
    wait_state(cluster, service_id, "backoff")

    status, _ = cluster.api("DELETE", f"/api/v1/services/{service_id}")
    assert status == 204
    # Watch for longer than the backoff delay: nothing of the service may start.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert not live_groups(service_id)
        time.sleep(0.05)


def test_stop_signal_and_timeout(cluster: Cluster, tmp_path: Path):
    """stop_signal reaches the instance, which prints a last line and exits in time."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    marker = tmp_path / "stopped"
    command = f"trap 'echo got-int > {marker}; exit 0' INT; while :; do sleep 0.05; done"
    service_id = create(cluster, command, stop_signal="INT", stop_timeout=5)
    assert get_service(cluster, service_id)["stop_signal"] == "SIGINT"
    wait_running(cluster, service_id, 1)

    started = time.monotonic()
    status, _ = cluster.api("PATCH", f"/api/v1/services/{service_id}", json={"replicas": 0})
    assert status == 200
    wait_until(lambda: not live_groups(service_id), CONVERGE_TIMEOUT, message="stopped")
    assert time.monotonic() - started < 4.0
    wait_until(lambda: marker.exists(), CONVERGE_TIMEOUT, message="trap ran")
    assert marker.read_text() == "got-int\n"


def test_env_cwd_and_update_restart(cluster: Cluster, tmp_path: Path):
    """env and cwd reach the instance; changing env restarts it with the new value."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    output = tmp_path / "out"
    service_id = create(cluster, f'echo "$GREETING $(pwd)" > {output}; exec sleep 1000',
                        env={"GREETING": "hello world"}, cwd=str(tmp_path))
    first = wait_running(cluster, service_id, 1)[0]
    wait_until(lambda: output.exists() and output.read_text() == f"hello world {tmp_path}\n", CONVERGE_TIMEOUT,
               message="env and cwd in the output")

    status, body = cluster.api("PATCH", f"/api/v1/services/{service_id}", json={"env": {"GREETING": "bye"}})
    assert status == 200, body
    wait_until(lambda: output.read_text() == f"bye {tmp_path}\n", CONVERGE_TIMEOUT, message="restarted with new env")
    second = wait_running(cluster, service_id, 1)[0]
    assert second["pid"] != first["pid"]


def test_replicas_only_update_keeps_instances(cluster: Cluster):
    """Scaling does not restart the instances that stay."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    service_id = create(cluster, "exec sleep 1000", 2)
    before = {item["index"]: item["pid"] for item in wait_running(cluster, service_id, 2)}
    status, body = cluster.api("PATCH", f"/api/v1/services/{service_id}", json={"replicas": 3})
    assert status == 200
    assert body["generation"] == 1
    after = {item["index"]: item["pid"] for item in wait_running(cluster, service_id, 3)}
    assert after[0] == before[0]
    assert after[1] == before[1]


INVALID_SETTINGS = [
    ({"env": ["A=1"]}, "env must be an object"),
    ({"env": {"A": 1}}, "env value of A must be a string"),
    ({"env": {"1A": "x"}}, "env name '1A' is invalid"),
    ({"cwd": "relative/dir"}, "cwd must be an absolute path"),
    ({"restart": "sometimes"}, "restart must be one of always, on-failure, never"),
    ({"stop_signal": "SIGNOPE"}, "stop_signal 'SIGNOPE' is not a signal name"),
    ({"stop_signal": "STOP"}, "stop_signal SIGSTOP"),
    ({"stop_timeout": -1}, "stop_timeout must be from 0"),
    ({"restart_delay": 0}, "restart_delay must be from 0.1"),
    ({"restart_delay": 5, "restart_delay_max": 2}, "restart_delay_max (2) must not be below restart_delay (5)"),
    ({"max_restarts": -1}, "max_restarts must be an integer"),
    ({"min_uptime": "10s"}, "min_uptime must be a number of seconds"),
]


def test_invalid_settings_rejected(cluster: Cluster):
    cluster.start_master()
    for settings, words in INVALID_SETTINGS:
        status, body = cluster.api("POST", "/api/v1/services", json={"command": "true", **settings})
        assert status == 400, f"{settings}: {body}"
        assert words in body["error"]["message"], f"{settings}: {body}"
    assert cluster.api("GET", "/api/v1/services")[1]["services"] == []


def test_events_history(cluster: Cluster):
    """The history records placement, starts, exits and backoff, with instance and node."""
    cluster.start_master()
    slave = cluster.start_slave("slave-1")
    service_id = create(cluster, "sleep 0.1; exit 2", restart_delay=0.1, restart_delay_max=0.1, max_restarts=1)
    wait_state(cluster, service_id, "failed")

    status, body = cluster.api("GET", f"/api/v1/services/{service_id}/events")
    assert status == 200
    events = body["events"]
    types = [event["type"] for event in events]
    assert types[0] == "placed"
    assert types.count("started") == 2
    assert types.count("exited") == 2
    assert "backoff" in types
    assert types[-1] == "failed"
    assert all(event["node_id"] == slave.node_id for event in events)
    exited = next(event for event in events if event["type"] == "exited")
    assert exited["instance_id"] == f"{service_id}-0"
    assert "exited with code 2" in exited["message"]
    times = [event["time"] for event in events]
    assert times == sorted(times)


def test_burst_of_starts_recorded_in_few_events(cluster: Cluster):
    """50 instances that start together are recorded, but in far fewer than 50 "started" events."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    service_id = create(cluster, "sleep 1000", replicas=50)
    wait_running(cluster, service_id, 50)

    def started() -> list[dict]:
        status, body = cluster.api("GET", f"/api/v1/services/{service_id}/events")
        assert status == 200
        return [event for event in body["events"] if event["type"] == "started"]

    def instances_counted(events: list[dict]) -> int:
        # "N instances started: ..." counts N; an event of one instance counts 1.
        return sum(int(event["message"].split()[0]) if event["instance_id"] is None else 1 for event in events)

    wait_until(lambda: instances_counted(started()) == 50, CONVERGE_TIMEOUT, message="50 starts recorded")
    events = started()
    assert len(events) < 50
    merged = [event for event in events if event["instance_id"] is None]
    assert merged and all(" instances started: " in event["message"] for event in merged)

    status, body = cluster.api("GET", f"/api/v1/services/{service_id}/events")
    [placed] = [event["message"] for event in body["events"] if event["type"] == "placed"]
    first_ten = ", ".join(f"{service_id}-{index}" for index in range(10))
    assert placed.endswith(f"instance(s) on node {cluster.slaves[0].node_id}: {first_ten} ...")
