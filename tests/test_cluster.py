"""End-to-end scenarios: real etcd, master and slave processes, checked through /proc."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from cluster import REPO_ROOT, Cluster, EtcdProcess, is_alive, process_group, processes_with_env, wait_until

# Seconds a scenario may take to converge on a loaded two-core machine.
CONVERGE_TIMEOUT = 30.0

LONG_COMMAND = "sleep 1000"


def live_groups(service_id: str) -> dict[int, set[int]]:
    """Map each live process group of a service's instances to its live pids."""
    groups: dict[int, set[int]] = {}
    for pid in processes_with_env("GDPM_SERVICE_ID", service_id):
        group = process_group(pid)
        if group is not None and is_alive(pid):
            groups.setdefault(group, set()).add(pid)
    return groups


def create_service(cluster: Cluster, command: str, replicas: int) -> str:
    status, body = cluster.api("POST", "/api/v1/services", json={"command": command, "replicas": replicas})
    assert status == 201, body
    return body["id"]


def get_service(cluster: Cluster, service_id: str) -> dict:
    status, body = cluster.api("GET", f"/api/v1/services/{service_id}")
    assert status == 200, body
    return body


def running_instances(cluster: Cluster, service_id: str) -> list[dict]:
    return [instance for instance in get_service(cluster, service_id)["instances"] if instance["state"] == "running"]


def wait_running(cluster: Cluster, service_id: str, count: int) -> list[dict]:
    """Wait until the API reports exactly ``count`` running instances and /proc agrees."""
    def converged():
        instances = running_instances(cluster, service_id)
        if len(instances) != count or len(get_service(cluster, service_id)["instances"]) != count:
            return None
        if set(live_groups(service_id)) != {instance["pid"] for instance in instances}:
            return None
        return instances

    return wait_until(converged, CONVERGE_TIMEOUT, message=f"{count} running instances of {service_id}")


def test_scale_up_down_and_delete(cluster: Cluster):
    """Create 5 replicas on 2 slaves, scale to 2, delete.

    Each step is checked in the API and in /proc: the live process groups of the
    service are exactly the pids that the API reports.
    """
    cluster.start_master()
    first = cluster.start_slave("slave-1")
    second = cluster.start_slave("slave-2")
    service_id = create_service(cluster, LONG_COMMAND, 5)

    instances = wait_running(cluster, service_id, 5)
    per_node = Counter(instance["node_id"] for instance in instances)
    assert sorted(per_node.values()) == [2, 3]
    assert set(per_node) == {first.node_id, second.node_id}
    groups = live_groups(service_id)
    assert len(groups) == 5

    status, body = cluster.api("PATCH", f"/api/v1/services/{service_id}", json={"replicas": 2})
    assert status == 200, body
    assert body["replicas"] == 2
    kept = wait_running(cluster, service_id, 2)
    assert sorted(instance["index"] for instance in kept) == [0, 1]
    removed_groups = set(groups) - {instance["pid"] for instance in kept}
    assert len(removed_groups) == 3
    wait_until(lambda: not removed_groups & set(live_groups(service_id)), CONVERGE_TIMEOUT,
               message="process groups of removed instances still alive")

    status, _ = cluster.api("DELETE", f"/api/v1/services/{service_id}")
    assert status == 204
    wait_until(lambda: not live_groups(service_id), CONVERGE_TIMEOUT, message="instances alive after delete")
    status, _ = cluster.api("GET", f"/api/v1/services/{service_id}")
    assert status == 404
    nodes = cluster.api("GET", "/api/v1/nodes")[1]["nodes"]
    assert [node["instances"] for node in nodes] == [0, 0]


def test_scale_to_zero_and_back(cluster: Cluster, etcd: EtcdProcess):
    """Scaling to 0 and deleting remove every instance record and assignment in etcd.

    Both remove all instances of the service at once, so the scheduler uses range
    deletes. The service then scales up again from its empty key ranges.
    """
    cluster.start_master()
    slaves = [cluster.start_slave("slave-1"), cluster.start_slave("slave-2")]
    service_id = create_service(cluster, LONG_COMMAND, 3)
    wait_running(cluster, service_id, 3)
    prefix = cluster.prefix.encode()

    def keys_left() -> int:
        return etcd.count(prefix + f"/instances/{service_id}/".encode()) + sum(
            etcd.count(prefix + f"/assignments/{slave.node_id}/{service_id}-".encode()) for slave in slaves)

    assert keys_left() == 6
    status, body = cluster.api("PATCH", f"/api/v1/services/{service_id}", json={"replicas": 0})
    assert status == 200, body
    wait_until(lambda: not live_groups(service_id), CONVERGE_TIMEOUT, message="instances alive at 0 replicas")
    wait_until(lambda: keys_left() == 0, CONVERGE_TIMEOUT, message="instance keys left at 0 replicas")

    status, body = cluster.api("PATCH", f"/api/v1/services/{service_id}", json={"replicas": 2})
    assert status == 200, body
    assert sorted(instance["index"] for instance in wait_running(cluster, service_id, 2)) == [0, 1]
    assert keys_left() == 4

    status, _ = cluster.api("DELETE", f"/api/v1/services/{service_id}")
    assert status == 204
    wait_until(lambda: not live_groups(service_id), CONVERGE_TIMEOUT, message="instances alive after delete")
    wait_until(lambda: keys_left() == 0, CONVERGE_TIMEOUT, message="instance keys left after delete")


def test_journal_records_start_times(cluster: Cluster):
    """The slave's journal names each instance's process with its start time, read after the spawn."""
    cluster.start_master()
    slave = cluster.start_slave("slave-1")
    service_id = create_service(cluster, LONG_COMMAND, 3)
    pids = {instance["id"]: instance["pid"] for instance in wait_running(cluster, service_id, 3)}
    journal = slave.state_dir / "processes.journal"

    def recorded() -> dict[str, tuple[int, str]]:
        # The last line of each pid wins: "+ PID START_TIME INSTANCE_ID", '-' for an unknown start time.
        lines = [line.split() for line in journal.read_text().splitlines() if line.startswith("+ ")]
        return {fields[3]: (int(fields[1]), fields[2]) for fields in lines if len(fields) == 4}

    def start_time(pid: int) -> str:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split())[22 - 3]

    expected = {instance_id: (pid, start_time(pid)) for instance_id, pid in pids.items()}
    wait_until(lambda: recorded() == expected, CONVERGE_TIMEOUT, message="start times in the journal")


def test_pending_until_slave_registers(cluster: Cluster):
    """With no slave every instance is pending; a slave that registers then runs them all."""
    cluster.start_master()
    service_id = create_service(cluster, LONG_COMMAND, 3)

    def with_three_records():
        service = get_service(cluster, service_id)
        return service if len(service["instances"]) == 3 else None

    service = wait_until(with_three_records, CONVERGE_TIMEOUT, message="3 instance records")
    assert [instance["state"] for instance in service["instances"]] == ["pending"] * 3
    assert [instance["node_id"] for instance in service["instances"]] == [None] * 3
    assert service["pending"] == 3
    assert service["running"] == 0
    assert not live_groups(service_id)

    slave = cluster.start_slave("slave-1")
    instances = wait_running(cluster, service_id, 3)
    assert {instance["node_id"] for instance in instances} == {slave.node_id}
    assert get_service(cluster, service_id)["pending"] == 0


def test_instance_environment_and_shell(cluster: Cluster, tmp_path: Path):
    """Quotes, a pipe, a redirect and $VARs behave as in `sh -c`, in the instance's environment."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    output = tmp_path / "instance.out"
    expected_output = tmp_path / "expected.out"
    template = (
        "printf '%s|%s|%s\\n' \"$GDPM_INSTANCE_INDEX\" 'single  quoted' \"double  $((1 + 2))\""
        " | tr a-z A-Z > {path}; echo \"$GDPM_SERVICE_ID $GDPM_INSTANCE_ID\" >> {path}; exec sleep 1000"
    )
    service_id = create_service(cluster, template.format(path=output), 1)
    wait_running(cluster, service_id, 1)
    wait_until(lambda: output.exists() and output.read_text().count("\n") == 2, CONVERGE_TIMEOUT,
               message="instance output written")

    environment = dict(os.environ, GDPM_INSTANCE_INDEX="0", GDPM_SERVICE_ID=service_id,
                       GDPM_INSTANCE_ID=f"{service_id}-0")
    reference = template.format(path=expected_output).replace("exec sleep 1000", "true")
    subprocess.run(["/bin/sh", "-c", reference], env=environment, check=True, timeout=10)
    assert output.read_text() == expected_output.read_text()
    assert output.read_text().splitlines()[0] == "0|SINGLE  QUOTED|DOUBLE  3"


def test_instance_runs_in_own_session(cluster: Cluster):
    """Each instance leads its own session and process group, with its logs in the state dir."""
    cluster.start_master()
    slave = cluster.start_slave("slave-1")
    service_id = create_service(cluster, "echo to-stdout; echo to-stderr >&2; exec sleep 1000", 2)
    instances = wait_running(cluster, service_id, 2)

    for instance in instances:
        pid = instance["pid"]
        assert process_group(pid) == pid
        assert os.getsid(pid) == pid
        log_dir = slave.state_dir / "logs"
        stdout = log_dir / f"{instance['id']}.stdout.log"
        stderr = log_dir / f"{instance['id']}.stderr.log"
        wait_until(lambda: stdout.exists() and stdout.read_text() == "to-stdout\n", CONVERGE_TIMEOUT,
                   message=f"stdout log {stdout}")
        wait_until(lambda: stderr.exists() and stderr.read_text() == "to-stderr\n", CONVERGE_TIMEOUT,
                   message=f"stderr log {stderr}")


def test_compatible_routes(cluster: Cluster):
    """The Go gdpm's routes accept form and JSON bodies and keep their response shapes."""
    cluster.start_master()
    slave = cluster.start_slave("slave-1")

    status, form_id = cluster.api("POST", "/service/", data="Command=sleep+1000&InstanceNum=2")
    assert status == 200
    form_id = form_id.strip()
    assert len(form_id) == 8
    status, json_id = cluster.api("POST", "/service/", json={"Command": "sleep 1001", "InstanceNum": 1})
    assert status == 200
    json_id = json_id.strip()
    # curl -d '{...}' sends JSON labelled as a form.
    status, curl_id = cluster.api("POST", "/service/", data='{"Command": "sleep 1002", "InstanceNum": 0}')
    assert status == 200, curl_id
    assert cluster.api("GET", f"/api/v1/services/{curl_id.strip()}")[1]["command"] == "sleep 1002"
    wait_running(cluster, form_id, 2)
    wait_running(cluster, json_id, 1)

    status, nodes = cluster.api("GET", "/node/")
    assert status == 200
    assert nodes["Ids"] == [slave.node_id]
    assert nodes["Status"] == [1]
    assert nodes["ServiceNum"] == [2]
    assert len(nodes["Times"]) == 1
    assert nodes["Times"][0].endswith(" UTC")

    status, node = cluster.api("GET", f"/node/{slave.node_id}/")
    assert status == 200
    by_id = dict(zip(node["Ids"], zip(node["Command"], node["Number"])))
    assert by_id == {form_id: ("sleep 1000", 2), json_id: ("sleep 1001", 1)}

    status, text = cluster.api("POST", f"/service/{form_id}/", data="InstanceNum=3")
    assert status == 200
    assert text.strip() == form_id
    wait_running(cluster, form_id, 3)
    status, _ = cluster.api("POST", f"/service/{json_id}/", json={"InstanceNum": 0})
    assert status == 200
    wait_until(lambda: not live_groups(json_id), CONVERGE_TIMEOUT, message="scaled to 0")

    status, _ = cluster.api("DELETE", f"/service/{form_id}/")
    assert status == 200
    wait_until(lambda: not live_groups(form_id), CONVERGE_TIMEOUT, message="deleted")
    status, text = cluster.api("DELETE", f"/service/{form_id}/")
    assert status == 404
    assert form_id in text


BAD_REQUESTS = [
    # (method, path, kind, body, status, words the message must contain)
    ("POST", "/api/v1/services", "json", {"replicas": 1}, 400, "command is missing"),
    ("POST", "/api/v1/services", "json", {"command": "  ", "replicas": 1}, 400, "command must not be empty"),
    ("POST", "/api/v1/services", "json", {"command": 5}, 400, "command must be a string"),
    ("POST", "/api/v1/services", "json", {"command": "x", "replicas": "3"}, 400, "replicas must be an integer"),
    ("POST", "/api/v1/services", "json", {"command": "x", "replicas": 2.5}, 400, "replicas must be an integer"),
    ("POST", "/api/v1/services", "json", {"command": "x", "replicas": True}, 400, "replicas must be an integer"),
    ("POST", "/api/v1/services", "json", {"command": "x", "replicas": -1}, 400, "must not be negative"),
    ("POST", "/api/v1/services", "json", {"command": "x", "replicas": 6}, 400, "at most 5"),
    ("POST", "/api/v1/services", "json", {"command": "x", "replica": 1}, 400, "unknown field 'replica'"),
    ("POST", "/api/v1/services", "raw", "{not json", 400, "malformed JSON"),
    ("POST", "/api/v1/services", "raw", "[1, 2]", 400, "must be an object"),
    ("POST", "/api/v1/services", "raw", "x" * (300 * 1024), 413, "too large"),
    ("POST", "/api/v1/services", "raw", '{"command": "x", "replicas": ' + "9" * 5000 + "}", 400, "invalid JSON"),
    ("POST", "/api/v1/services", "raw", '{"command": "\\ud800"}', 400, "lone surrogate"),
    ("POST", "/api/v1/services", "raw", "[" * 100_000 + "]" * 100_000, 400, "nested too deeply"),
    ("POST", "/api/v1/services", "raw", '{"command": ' + "[" * 100_000 + "]" * 100_000 + "}", 400,
     "nested too deeply"),
    ("PATCH", "/api/v1/services/{service_id}", "json", {"replicas": -3}, 400, "must not be negative"),
    ("PATCH", "/api/v1/services/{service_id}", "json", {}, 400, "nothing to update"),
    ("PATCH", "/api/v1/services/0badc0de", "json", {"replicas": 1}, 404, "not found"),
    ("GET", "/api/v1/services/0badc0de", "none", None, 404, "not found"),
    ("DELETE", "/api/v1/services/0badc0de", "none", None, 404, "not found"),
    ("GET", "/api/v1/nodes/0badc0de", "none", None, 404, "not found"),
    ("PUT", "/api/v1/services", "json", {}, 405, "not allowed"),
    ("DELETE", "/api/v1/nodes", "none", None, 405, "not allowed"),
    ("GET", "/api/v1/nothing-here", "none", None, 404, "no route"),
    ("POST", "/service/", "form", "InstanceNum=1", 400, "Command is missing"),
    ("POST", "/service/", "form", "Command=x&InstanceNum=abc", 400, "InstanceNum must be an integer"),
    ("POST", "/service/", "form", "Command=x&InstanceNum=-2", 400, "must not be negative"),
    ("POST", "/service/", "json-text", "{broken", 400, "malformed JSON"),
    ("POST", "/service/{service_id}/", "form", "InstanceNum=99", 400, "at most 5"),
    ("POST", "/service/0badc0de/", "form", "InstanceNum=1", 404, "not found"),
    ("GET", "/node/0badc0de/", "none", None, 404, "not found"),
    ("PUT", "/service/", "none", None, 405, "not allowed"),
    ("POST", "/service/", "form", "Command=x&InstanceNum=%D9%A1", 400, "InstanceNum must be an integer"),
    ("DELETE", "/api/v1/nodes/{node_id}", "none", None, 409, "is ready"),
]


def send_json_text(cluster: Cluster, method: str, path: str, text: str, *, with_headers: bool = False):
    """Send ``text`` as is, labelled application/json; return the status and body (and headers)."""
    host, port = cluster.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=text.encode(), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read().decode()
        if with_headers:
            return response.status, body, dict(response.getheaders())
        return response.status, body
    finally:
        connection.close()


def test_bad_input_rejected_without_state_loss(cluster: Cluster):
    """Every bad request gets its status and a message naming the problem; nothing changes."""
    cluster.start_master(max_replicas=5)
    slave = cluster.start_slave("slave-1")
    service_id = create_service(cluster, LONG_COMMAND, 2)
    wait_running(cluster, service_id, 2)
    services_before = cluster.api("GET", "/api/v1/services")[1]

    for method, path, kind, body, expected_status, words in BAD_REQUESTS:
        path = path.format(service_id=service_id, node_id=slave.node_id)
        if kind == "json":
            status, response = cluster.api(method, path, json=body)
        elif kind in ("raw", "form"):
            status, response = cluster.api(method, path, data=body)
        elif kind == "json-text":
            status, response = send_json_text(cluster, method, path, body)
        else:
            status, response = cluster.api(method, path)
        case = f"{method} {path} {str(body)[:60]}"
        assert status == expected_status, f"{case}: {response}"
        if path.startswith("/api/"):
            assert set(response) == {"error"}, case
            message = response["error"]["message"]
            assert response["error"]["code"], case
        else:
            message = response
        assert words in message, f"{case}: {message}"

    status, _, headers = send_json_text(cluster, "PUT", "/api/v1/services", "{}", with_headers=True)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD, POST"

    assert cluster.master.running
    assert cluster.api("GET", "/healthz")[0] == 200
    assert cluster.api("GET", "/api/v1/services")[1] == services_before
    assert len(running_instances(cluster, service_id)) == 2


def test_master_sigkill_keeps_instances(cluster: Cluster):
    """SIGKILL the master right after a scale-up; a restarted master finishes it.

    Instances that ran before the crash keep their pids and restart counts, and
    changes made after the restart still apply.
    """
    cluster.start_master()
    cluster.start_slave("slave-1")
    cluster.start_slave("slave-2")
    service_id = create_service(cluster, LONG_COMMAND, 2)
    before = {instance["id"]: instance["pid"] for instance in wait_running(cluster, service_id, 2)}

    status, _ = cluster.api("PATCH", f"/api/v1/services/{service_id}", json={"replicas": 6})
    assert status == 200
    cluster.master.kill(signal.SIGKILL)
    cluster.master.start()

    after = wait_running(cluster, service_id, 6)
    pids_after = {instance["id"]: instance["pid"] for instance in after}
    for instance_id, pid in before.items():
        assert pids_after[instance_id] == pid, f"{instance_id} was restarted"
    assert all(instance["restarts"] == 0 for instance in after)

    status, _ = cluster.api("PATCH", f"/api/v1/services/{service_id}", json={"replicas": 1})
    assert status == 200
    kept = wait_running(cluster, service_id, 1)
    assert kept[0]["pid"] == before[f"{service_id}-0"]


def test_slave_sigterm_stops_instances_and_rejoins(cluster: Cluster):
    """SIGTERM a slave: its instances stop, its node is down at once; a restart rejoins as the same node."""
    cluster.start_master()
    slave = cluster.start_slave("slave-1", node_ttl=30)
    node_id = slave.node_id
    service_id = create_service(cluster, LONG_COMMAND, 3)
    wait_running(cluster, service_id, 3)

    assert slave.stop() == 0
    assert not live_groups(service_id)
    # The slave revoked its lease, so the node is down well before its 30 s TTL.
    nodes = wait_until(lambda: [n for n in cluster.api("GET", "/api/v1/nodes")[1]["nodes"] if n["state"] == "down"],
                       10.0, message="node down after SIGTERM")
    assert [node["id"] for node in nodes] == [node_id]

    status, _ = cluster.api("DELETE", f"/api/v1/nodes/{node_id}")
    assert status == 204
    assert cluster.api("GET", "/api/v1/nodes")[1]["nodes"] == []

    slave.restart()
    assert slave.node_id == node_id
    wait_running(cluster, service_id, 3)


def run_client(cluster: Cluster, *arguments: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GDPM_")}
    environment["PYTHONPATH"] = str(REPO_ROOT)
    environment["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "gdpm", "client", "--master", cluster.url, *arguments],
        capture_output=True, text=True, timeout=30, env=environment,
    )


def test_cli_against_live_cluster(cluster: Cluster):
    """The CLI's tables and -o json show what the API shows, and errors are one line."""
    cluster.start_master()
    slave = cluster.start_slave("slave-1")

    created = run_client(cluster, "-o", "json", "create", "-r", "2", "--", LONG_COMMAND)
    assert created.returncode == 0, created.stderr
    service_id = json.loads(created.stdout)["id"]
    wait_running(cluster, service_id, 2)

    nodes = run_client(cluster, "get", "nodes")
    assert nodes.returncode == 0, nodes.stderr
    header, row = nodes.stdout.splitlines()[:2]
    assert header.split() == ["ID", "NAME", "STATE", "INSTANCES", "REGISTERED"]
    assert row.split()[:4] == [slave.node_id, "slave-1", "ready", "2"]

    services = run_client(cluster, "get", "services")
    assert services.returncode == 0, services.stderr
    row = next(line for line in services.stdout.splitlines() if line.startswith(service_id))
    assert "sleep 1000" in row
    assert row.split()[-4:-1] == ["2", "2", "0"]

    detail = run_client(cluster, "get", "service", service_id)
    assert detail.returncode == 0, detail.stderr
    assert detail.stdout.count(" running ") == 2

    as_json = run_client(cluster, "-o", "json", "get", "service", service_id)
    assert as_json.returncode == 0, as_json.stderr
    shown = json.loads(as_json.stdout)
    assert shown["id"] == service_id
    assert sorted(instance["pid"] for instance in shown["instances"]) == \
        sorted(instance["pid"] for instance in get_service(cluster, service_id)["instances"])

    scaled = run_client(cluster, "update", service_id, "-r", "1")
    assert scaled.returncode == 0, scaled.stderr
    wait_running(cluster, service_id, 1)

    missing = run_client(cluster, "get", "service", "0badc0de")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1
    assert "not found" in missing.stderr
    assert "Traceback" not in missing.stderr

    rejected = run_client(cluster, "update", service_id, "-r", "-4")
    assert rejected.returncode == 1
    assert "must not be negative" in rejected.stderr

    deleted = run_client(cluster, "delete", service_id)
    assert deleted.returncode == 0, deleted.stderr
    wait_until(lambda: not live_groups(service_id), CONVERGE_TIMEOUT, message="deleted through the CLI")


def test_zero_replicas_runs_nothing(cluster: Cluster):
    """A service with 0 replicas is valid and runs no process."""
    cluster.start_master()
    cluster.start_slave("slave-1")
    service_id = create_service(cluster, LONG_COMMAND, 0)
    service = get_service(cluster, service_id)
    assert service["replicas"] == 0
    assert service["instances"] == []
    assert not live_groups(service_id)


def test_large_commands_batched_by_size(cluster: Cluster):
    """40 instances of a 60 KB command exceed etcd's request size in one transaction.

    The scheduler splits its writes by size, so all of them run and the master stays up.
    """
    cluster.start_master()
    cluster.start_slave("slave-1")
    command = "exec sleep 1000 # " + "x" * 60_000
    service_id = create_service(cluster, command, 40)
    wait_running(cluster, service_id, 40)
    assert cluster.master.running
    status, _ = cluster.api("DELETE", f"/api/v1/services/{service_id}")
    assert status == 204
    wait_until(lambda: not live_groups(service_id), CONVERGE_TIMEOUT, message="deleted")
