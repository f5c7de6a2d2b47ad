"""Tests of the slave's log server and of the master's logs route that reads from it.

Every server listens on 127.0.0.1, port 0. The master's route runs in a bare aiohttp
application with a ClusterView filled by hand, and reads from real slave log servers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gdpm.common.keys import KeyLayout
from gdpm.common.models import InstanceRecord, NodeInfo, ServiceSpec, utc_now
from gdpm.master import logs as master_logs
from gdpm.master.errors import error_middleware
from gdpm.master.view import ClusterView
from gdpm.slave.logs import log_path
from gdpm.slave.logserver import build_log_app, start_log_server

# The master's application keeps its view under a string key, as gdpm/master/server.py does.
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web.NotAppKeyWarning")

SERVICE = "5e7a1c00"
INSTANCE = f"{SERVICE}-0"


@dataclass
class SlaveServer:
    url: str
    log_dir: Path
    runner: web.AppRunner

    def write(self, instance_id: str, data: bytes, stream: str = "stdout") -> None:
        with open(log_path(self.log_dir, instance_id, stream), "ab") as file:
            file.write(data)


async def start_slave_server(log_dir: Path) -> SlaveServer:
    log_dir.mkdir(exist_ok=True)
    runner, url = await start_log_server(build_log_app(log_dir), "127.0.0.1", 0)
    return SlaveServer(url, log_dir, runner)


@pytest.fixture
async def slave(tmp_path: Path) -> AsyncIterator[SlaveServer]:
    server = await start_slave_server(tmp_path / "slave-a")
    yield server
    await server.runner.cleanup()


@pytest.fixture
async def other_slave(tmp_path: Path) -> AsyncIterator[SlaveServer]:
    server = await start_slave_server(tmp_path / "slave-b")
    yield server
    await server.runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def read_until(response: aiohttp.ClientResponse, expected: bytes, timeout: float = 10.0) -> bytes:
    """Read the body until it contains ``expected``; return what was read."""
    data = b""
    async with asyncio.timeout(timeout):
        while expected not in data:
            chunk = await response.content.readany()
            if not chunk:
                break
            data += chunk
    assert expected in data, data
    return data


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


# -- the slave's log server ------------------------------------------------------------


async def test_slave_tail(slave: SlaveServer, http: aiohttp.ClientSession) -> None:
    slave.write(INSTANCE, b"".join(f"line {n}\n".encode() for n in range(1, 201)) + b"\xff\xfe raw\n")

    async with http.get(f"{slave.url}/v1/logs/{INSTANCE}", params={"tail": "2"}) as response:
        assert response.status == 200
        assert response.content_type == "application/octet-stream"
        assert await response.read() == b"line 200\n\xff\xfe raw\n"
    async with http.get(f"{slave.url}/v1/logs/{INSTANCE}") as response:
        body = await response.read()
    assert body.count(b"\n") == 100
    assert body.startswith(b"line 102\n")


async def test_slave_stderr_stream(slave: SlaveServer, http: aiohttp.ClientSession) -> None:
    slave.write(INSTANCE, b"out\n")
    slave.write(INSTANCE, b"err\n", stream="stderr")

    async with http.get(f"{slave.url}/v1/logs/{INSTANCE}", params={"stream": "stderr"}) as response:
        assert await response.read() == b"err\n"


@pytest.mark.parametrize("raw_path", [
    "/v1/logs/..%2F..%2Fetc%2Fpasswd",
    "/v1/logs/..",
    "/v1/logs/5e7a1c00-0.stdout.log",
    "/v1/logs/5e7a1c00-0%00",
    "/v1/logs/5E7A1C00-0",
    "/v1/logs/5e7a1c00-01",
    "/v1/logs/secret",
])
async def test_slave_rejects_invalid_instance_id(slave: SlaveServer, http: aiohttp.ClientSession,
                                                 raw_path: str) -> None:
    (slave.log_dir / "secret.stdout.log").write_bytes(b"top secret\n")
    (slave.log_dir.parent / "passwd").write_bytes(b"top secret\n")

    async with http.get(URL(slave.url + raw_path, encoded=True)) as response:
        body = await response.read()

    assert response.status in (400, 404)
    assert b"top secret" not in body
    assert body.count(b"\n") == 1


async def test_slave_invalid_id_message(slave: SlaveServer, http: aiohttp.ClientSession) -> None:
    async with http.get(URL(f"{slave.url}/v1/logs/..%2Fsecret", encoded=True)) as response:
        assert response.status == 400
        assert (await response.text()).startswith("invalid instance id '../secret'")


@pytest.mark.parametrize(("query", "message"), [
    ({"tail": "-1"}, "tail must be an integer from 0 to 100000"),
    ({"tail": "100001"}, "tail must be an integer from 0 to 100000"),
    ({"tail": "ten"}, "tail must be an integer"),
    ({"stream": "stdin"}, "stream must be stdout or stderr"),
    ({"follow": "yes"}, "follow must be 0 or 1"),
])
async def test_slave_rejects_invalid_query(slave: SlaveServer, http: aiohttp.ClientSession,
                                           query: dict[str, str], message: str) -> None:
    slave.write(INSTANCE, b"x\n")

    async with http.get(f"{slave.url}/v1/logs/{INSTANCE}", params=query) as response:
        assert response.status == 400
        assert (await response.text()).startswith(message)


async def test_slave_unknown_instance_is_404(slave: SlaveServer, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{slave.url}/v1/logs/{INSTANCE}") as response:
        assert response.status == 404
        assert await response.text() == f"no stdout log for instance {INSTANCE} on this node\n"


async def test_slave_running_instance_without_output_is_empty(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # The slave creates a log file at the first output, so a quiet instance has none.
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    runner, url = await start_log_server(build_log_app(log_dir, {INSTANCE}.__contains__), "127.0.0.1", 0)
    try:
        async with http.get(f"{url}/v1/logs/{INSTANCE}") as response:
            assert response.status == 200
            assert await response.read() == b""
        async with http.get(f"{url}/v1/logs/{SERVICE}-1") as response:
            assert response.status == 404
    finally:
        await runner.cleanup()


async def test_slave_follow(slave: SlaveServer, http: aiohttp.ClientSession) -> None:
    slave.write(INSTANCE, b"old 1\nold 2\n")

    async with http.get(f"{slave.url}/v1/logs/{INSTANCE}", params={"tail": "1", "follow": "1"}) as response:
        assert response.status == 200
        assert await read_until(response, b"old 2\n") == b"old 2\n"
        slave.write(INSTANCE, b"new \xff\n")
        assert await read_until(response, b"new \xff\n") == b"new \xff\n"


async def test_slave_follow_waits_for_file(slave: SlaveServer, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{slave.url}/v1/logs/{INSTANCE}", params={"follow": "1"}) as response:
        assert response.status == 200
        slave.write(INSTANCE, b"first\n")
        assert await read_until(response, b"first\n") == b"first\n"


async def test_slave_shutdown_ends_follow(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    server = await start_slave_server(tmp_path / "logs")
    server.write(INSTANCE, b"line\n")
    async with http.get(f"{server.url}/v1/logs/{INSTANCE}", params={"follow": "1"}) as response:
        await read_until(response, b"line\n")

        started = time.monotonic()
        await server.runner.cleanup()

        assert time.monotonic() - started < 2.0
        assert await response.content.read() == b""


async def test_start_log_server_url(tmp_path: Path) -> None:
    runner, url = await start_log_server(build_log_app(tmp_path), "127.0.0.1", 0)
    try:
        assert url == f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


# -- the master's route ----------------------------------------------------------------


NODE_A, NODE_B, NODE_DOWN = "aaaaaaaa", "bbbbbbbb", "dddddddd"


def record(index: int, node_id: str | None) -> InstanceRecord:
    return InstanceRecord(id=f"{SERVICE}-{index}", service_id=SERVICE, index=index, node_id=node_id,
                          created_at=utc_now())


@dataclass
class Master:
    url: str
    view: ClusterView


@pytest.fixture
async def master(slave: SlaveServer, other_slave: SlaveServer) -> AsyncIterator[Master]:
    view = ClusterView(KeyLayout("/gdpm"))
    now = utc_now()
    view.services[SERVICE] = ServiceSpec(id=SERVICE, command="true", replicas=4, created_at=now)
    view.nodes[NODE_A] = NodeInfo(id=NODE_A, name="alpha", registered_at=now, log_url=slave.url)
    view.nodes[NODE_B] = NodeInfo(id=NODE_B, name="beta", registered_at=now, log_url=other_slave.url + "/")
    view.nodes[NODE_DOWN] = NodeInfo(id=NODE_DOWN, name="gamma", registered_at=now, log_url=closed_port_url())
    for index, node_id in enumerate([NODE_A, NODE_B, NODE_DOWN, None]):
        view.instances[SERVICE][f"{SERVICE}-{index}"] = record(index, node_id)

    app = web.Application(middlewares=[error_middleware])
    app["view"] = view
    app.add_routes(master_logs.routes)
    master_logs.setup_log_client(app)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield Master(f"http://127.0.0.1:{runner.addresses[0][1]}", view)
    await runner.cleanup()


def logs_url(master: Master, service_id: str = SERVICE) -> str:
    return f"{master.url}/api/v1/services/{service_id}/logs"


async def test_master_tail_prefixes_and_orders(master: Master, slave: SlaveServer, other_slave: SlaveServer,
                                               http: aiohttp.ClientSession) -> None:
    slave.write(f"{SERVICE}-0", b"a1\na2\n\xff\xfe a3")
    other_slave.write(f"{SERVICE}-1", b"b1\nb2\n")

    async with http.get(logs_url(master), params={"tail": "2"}) as response:
        assert response.status == 200
        body = await response.read()

    lines = body.split(b"\n")
    assert lines[:4] == [
        b"[5e7a1c00-0] a2",
        b"[5e7a1c00-0] \xff\xfe a3",  # The unfinished last line gets a newline.
        b"[5e7a1c00-1] b1",
        b"[5e7a1c00-1] b2",
    ]
    assert lines[4].startswith(f"[gdpm] node {NODE_DOWN} (gamma) unreachable: Connection refused".encode())
    assert lines[4].endswith(f"no logs from instance {SERVICE}-2".encode())
    assert lines[5:] == [b""]


async def test_master_tail_one_instance_and_stderr(master: Master, slave: SlaveServer,
                                                   http: aiohttp.ClientSession) -> None:
    slave.write(f"{SERVICE}-0", b"out\n")
    slave.write(f"{SERVICE}-0", b"err\n", stream="stderr")

    params = {"instance": f"{SERVICE}-0", "stream": "stderr"}
    async with http.get(logs_url(master), params=params) as response:
        assert await response.read() == b"[5e7a1c00-0] err\n"


async def test_master_tail_node_without_log_server(master: Master, slave: SlaveServer,
                                                   http: aiohttp.ClientSession) -> None:
    node = master.view.nodes[NODE_A]
    master.view.nodes[NODE_A] = node.model_copy(update={"log_url": None})

    async with http.get(logs_url(master), params={"instance": f"{SERVICE}-0"}) as response:
        body = await response.read()

    assert body == (f"[gdpm] node {NODE_A} (alpha) has no log server (its slave does not report one); "
                    f"no logs from instance {SERVICE}-0\n").encode()


@pytest.mark.parametrize(("path", "query", "status", "message"), [
    ("/api/v1/services/ffffffff/logs", {}, 404, "service 'ffffffff' not found"),
    (f"/api/v1/services/{SERVICE}/logs", {"instance": "ffffffff-0"}, 404, "instance 'ffffffff-0' not found"),
    (f"/api/v1/services/{SERVICE}/logs", {"tail": "100001"}, 400, "tail must be an integer from 0 to 100000"),
    (f"/api/v1/services/{SERVICE}/logs", {"stream": "both"}, 400, "stream must be stdout or stderr"),
    (f"/api/v1/services/{SERVICE}/logs", {"follow": "2"}, 400, "follow must be 0 or 1"),
])
async def test_master_errors_before_stream(master: Master, http: aiohttp.ClientSession, path: str,
                                           query: dict[str, str], status: int, message: str) -> None:
    async with http.get(master.url + path, params=query) as response:
        assert response.status == status
        body = json.loads(await response.read())
    assert body["error"]["message"].startswith(message)


async def test_master_follow_merges_and_moves(master: Master, slave: SlaveServer, other_slave: SlaveServer,
                                              http: aiohttp.ClientSession) -> None:
    slave.write(f"{SERVICE}-0", b"a old\n")
    other_slave.write(f"{SERVICE}-1", b"b old\n")

    async with http.get(logs_url(master), params={"follow": "1", "tail": "1"}) as response:
        assert response.status == 200
        seen = await read_until(response, b"[5e7a1c00-1] b old\n")
        seen += await read_until(response, b"unreachable") if b"unreachable" not in seen else b""
        seen += await read_until(response, b"[5e7a1c00-0] a old\n") if b"a old" not in seen else b""

        slave.write(f"{SERVICE}-0", b"a new\n")
        await read_until(response, b"[5e7a1c00-0] a new\n")
        other_slave.write(f"{SERVICE}-1", b"b new \xff\n")
        await read_until(response, b"[5e7a1c00-1] b new \xff\n")

        # The instance moves to node A, where it writes a new file.
        master.view.instances[SERVICE][f"{SERVICE}-1"] = record(1, NODE_A)
        slave.write(f"{SERVICE}-1", b"b on alpha\n")
        moved = await read_until(response, b"[5e7a1c00-1] b on alpha\n")
        assert f"[gdpm] instance {SERVICE}-1 moved to node {NODE_A} (alpha)\n".encode() in moved

        # A pending instance that gets a node is followed from then on.
        master.view.instances[SERVICE][f"{SERVICE}-3"] = record(3, NODE_B)
        other_slave.write(f"{SERVICE}-3", b"d started\n")
        await read_until(response, b"[5e7a1c00-3] d started\n")

        del master.view.services[SERVICE]
        ended = await read_until(response, b"was deleted\n")
        assert ended.endswith(f"[gdpm] service {SERVICE} was deleted\n".encode())
        assert await response.content.read() == b""


async def test_master_follow_stops_when_client_leaves(master: Master, slave: SlaveServer,
                                                      http: aiohttp.ClientSession) -> None:
    slave.write(f"{SERVICE}-0", b"line\n")

    def follower_tasks() -> list[asyncio.Task]:
        return [task for task in asyncio.all_tasks() if task.get_name().startswith("follow-logs-")]

    response = await http.get(logs_url(master), params={"follow": "1", "instance": f"{SERVICE}-0"})
    await read_until(response, b"[5e7a1c00-0] line\n")
    assert len(follower_tasks()) == 1

    response.close()

    await wait_for(lambda: not follower_tasks())
