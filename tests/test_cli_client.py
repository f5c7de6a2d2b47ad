"""Unit tests of ``gdpm client`` against a fake master that serves canned JSON.

The fake master is an aiohttp server on 127.0.0.1 in a background thread with its own
event loop, so that the CLI can call ``asyncio.run`` from the test's thread. The tests
against a real master and slaves live elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from aiohttp import web
from typer.testing import CliRunner

from gdpm.cli import app
from gdpm.cli.render import format_age, shorten_command

NOW = datetime.now(timezone.utc)
FIVE_MINUTES_AGO = (NOW - timedelta(minutes=5, seconds=10)).isoformat()
TWO_HOURS_AGO = (NOW - timedelta(hours=2, minutes=1)).isoformat()

NODES = {
    "nodes": [
        {"id": "a1b2c3d4", "name": "alpha", "state": "ready", "registered_at": FIVE_MINUTES_AGO, "instances": 2},
        {"id": "e5f6a7b8", "name": "beta", "state": "down", "registered_at": TWO_HOURS_AGO, "instances": 0},
    ]
}

INSTANCES = [
    {
        "id": "5e7a1c00-0", "service_id": "5e7a1c00", "index": 0, "node_id": "a1b2c3d4",
        "state": "running", "pid": 4242, "exit_code": None, "exit_signal": None, "restarts": 0,
        "started_at": FIVE_MINUTES_AGO, "exited_at": None,
    },
    {
        "id": "5e7a1c00-1", "service_id": "5e7a1c00", "index": 1, "node_id": "e5f6a7b8",
        "state": "exited", "pid": None, "exit_code": None, "exit_signal": 9, "restarts": 7,
        "started_at": TWO_HOURS_AGO, "exited_at": FIVE_MINUTES_AGO,
    },
    {
        "id": "5e7a1c00-2", "service_id": "5e7a1c00", "index": 2, "node_id": None,
        "state": "pending", "pid": None, "exit_code": None, "exit_signal": None, "restarts": 0,
        "started_at": None, "exited_at": None,
    },
]

LONG_COMMAND = "python3 -c 'import time; time.sleep(1000)' " + "--flag-" * 20

SERVICE = {
    "id": "5e7a1c00", "command": "sleep 600", "replicas": 3, "created_at": FIVE_MINUTES_AGO,
    "running": 1, "pending": 1,
}
SERVICES = {
    "services": [
        SERVICE,
        {"id": "9f8e7d6c", "command": LONG_COMMAND, "replicas": 12, "created_at": TWO_HOURS_AGO,
         "running": 11, "pending": 0},
    ]
}
SERVICE_DETAIL = {**SERVICE, "instances": INSTANCES}
NODE_DETAIL = {**NODES["nodes"][0], "instances": INSTANCES[:1]}

NOT_FOUND = {"error": {"code": "not_found", "message": "service 'nope' not found"}}

EVENTS = {
    "events": [
        {"time": "2024-05-01T10:00:03.123456+00:00", "type": "placed", "message": "placed on node alpha",
         "instance_id": "5e7a1c00-0", "node_id": "a1b2c3d4"},
        {"time": "2024-05-01T12:00:04+02:00", "type": "exited", "message": "exited with code 3",
         "instance_id": "5e7a1c00-0", "node_id": "a1b2c3d4"},
        {"time": "2024-05-01T10:00:05+00:00", "type": "scaled", "message": "replicas 3 -> 4",
         "instance_id": None, "node_id": None},
    ]
}

RUN_SETTINGS = {
    "env": {"PORT": "8080", "GREETING": "hello world"}, "cwd": "/srv/app", "restart": "on-failure",
    "restart_delay": 0.5, "restart_delay_max": 30.0, "min_uptime": 10.0, "max_restarts": None,
    "stop_signal": "SIGINT", "stop_timeout": 2.5,
}


@dataclass
class RecordedRequest:
    method: str
    path: str
    body: Any
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class CannedResponse:
    status: int = 200
    json_body: Any = None
    text: str | None = None
    delay: float = 0.0
    # A streamed application/octet-stream body, sent chunk by chunk; with hold_open the
    # response then stays open, as a followed log does, until the client leaves.
    chunks: list[bytes] | None = None
    hold_open: bool = False


@dataclass
class FakeMaster:
    """Routes ``(method, path)`` to canned responses and records every request."""

    url: str = ""
    responses: dict[tuple[str, str], CannedResponse] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)

    def serve(self, method: str, path: str, status: int = 200, json_body: Any = None,
              text: str | None = None, delay: float = 0.0) -> None:
        self.responses[(method, path)] = CannedResponse(status, json_body, text, delay)

    def serve_stream(self, path: str, chunks: list[bytes], *, hold_open: bool = False) -> None:
        self.responses[("GET", path)] = CannedResponse(chunks=chunks, hold_open=hold_open)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        # The raw path keeps percent-escapes, so a test can check how an id was quoted.
        path = request.rel_url.raw_path
        self.requests.append(RecordedRequest(request.method, path, body, dict(request.query)))
        canned = self.responses.get((request.method, path))
        if canned is None:
            return web.json_response(
                {"error": {"code": "not_found", "message": f"no route for {request.method} {path}"}},
                status=404,
            )
        if canned.delay:
            await asyncio.sleep(canned.delay)
        if canned.chunks is not None:
            return await self._stream(request, canned)
        if canned.text is not None:
            return web.Response(status=canned.status, text=canned.text, content_type="text/html")
        if canned.json_body is None:
            return web.Response(status=canned.status)
        return web.json_response(canned.json_body, status=canned.status)

    async def _stream(self, request: web.Request, canned: CannedResponse) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for chunk in canned.chunks:
            await response.write(chunk)
        if canned.hold_open:
            # Ends when the client disconnects, or when the fixture's cleanup cancels it.
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.05)
            return response
        await response.write_eof()
        return response


class FrozenDatetime(datetime):
    """A datetime whose now() is NOW, so that ages such as "5m" do not depend on when a test runs."""

    @classmethod
    def now(cls, tz=None) -> datetime:
        return NOW.astimezone(tz) if tz is not None else NOW.replace(tzinfo=None)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # The canned timestamps are computed once, at import, and the whole suite can take
    # minutes before these tests run.
    monkeypatch.setattr("gdpm.cli.client.datetime", FrozenDatetime)


@pytest.fixture
def master() -> Iterator[FakeMaster]:
    fake = FakeMaster()
    loop = asyncio.new_event_loop()
    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", fake.handle)
    # A short shutdown_timeout, so a handler still sleeping for a timeout test does
    # not hold up the teardown for aiohttp's default 60 s.
    runner = web.AppRunner(application, shutdown_timeout=1.0)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner.addresses[0][1]

    thread = threading.Thread(target=loop.run_forever, name="fake-master", daemon=True)
    thread.start()
    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture
def closed_port_url() -> str:
    """Return the URL of a loopback port that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_client(master_url: str, *args: str, env: dict[str, str] | None = None):
    runner = CliRunner()
    return runner.invoke(app, ["client", "--master", master_url, *args], env=env)


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# -- requests ------------------------------------------------------------------------


def test_get_nodes_request_and_table(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/nodes", json_body=NODES)

    result = run_client(master.url, "get", "nodes")

    assert result.exit_code == 0, result.output
    assert [(r.method, r.path, r.body) for r in master.requests] == [("GET", "/api/v1/nodes", None)]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE", "INSTANCES", "REGISTERED"]
    assert lines[1].split() == ["a1b2c3d4", "alpha", "ready", "2", "5m"]
    assert lines[2].split() == ["e5f6a7b8", "beta", "down", "0", "2h"]
    assert "\x1b[" not in result.stdout


def test_get_node_request_and_detail(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/nodes/a1b2c3d4", json_body=NODE_DETAIL)

    result = run_client(master.url, "get", "node", "a1b2c3d4")

    assert result.exit_code == 0, result.output
    assert [(r.method, r.path) for r in master.requests] == [("GET", "/api/v1/nodes/a1b2c3d4")]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["node:", "a1b2c3d4"]
    assert lines[1].split() == ["name:", "alpha"]
    assert lines[2].split() == ["state:", "ready"]
    assert lines[3].startswith("registered:")
    assert "(5m ago)" in lines[3]
    assert lines[4].split() == ["instances:", "1"]
    header = next(line for line in lines if line.startswith("ID"))
    assert header.split() == ["ID", "SERVICE", "INDEX", "STATE", "PID", "EXIT", "RESTARTS", "STARTED", "EXITED"]
    row = next(line for line in lines if line.startswith("5e7a1c00-0"))
    assert row.split() == ["5e7a1c00-0", "5e7a1c00", "0", "running", "4242", "-", "0", "5m", "-"]


def test_get_services_request_and_table(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services", json_body=SERVICES)

    result = run_client(master.url, "get", "services")

    assert result.exit_code == 0, result.output
    assert [(r.method, r.path) for r in master.requests] == [("GET", "/api/v1/services")]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "COMMAND", "REPLICAS", "RUNNING", "PENDING", "AGE"]
    assert lines[1].split() == ["5e7a1c00", "sleep", "600", "3", "1", "1", "5m"]
    assert lines[2].startswith("9f8e7d6c")
    assert lines[2].split()[-4:] == ["12", "11", "0", "2h"]
    assert shorten_command(LONG_COMMAND) in lines[2]
    assert LONG_COMMAND not in result.stdout


def test_get_service_request_and_detail(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services/5e7a1c00", json_body=SERVICE_DETAIL)

    result = run_client(master.url, "get", "service", "5e7a1c00")

    assert result.exit_code == 0, result.output
    assert [(r.method, r.path) for r in master.requests] == [("GET", "/api/v1/services/5e7a1c00")]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["service:", "5e7a1c00"]
    assert lines[1].split() == ["command:", "sleep", "600"]
    assert lines[2].split() == ["replicas:", "3"]
    assert lines[3].split() == ["running:", "1"]
    assert lines[4].split() == ["pending:", "1"]
    assert "(5m ago)" in lines[5]
    header = next(line for line in lines if line.startswith("ID"))
    assert header.split() == ["ID", "INDEX", "NODE", "STATE", "PID", "EXIT", "RESTARTS", "STARTED", "EXITED"]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("5e7a1c00-")}
    assert rows["5e7a1c00-0"] == ["5e7a1c00-0", "0", "a1b2c3d4", "running", "4242", "-", "0", "5m", "-"]
    assert rows["5e7a1c00-1"] == ["5e7a1c00-1", "1", "e5f6a7b8", "exited", "-", "SIGKILL", "7", "2h", "5m"]
    assert rows["5e7a1c00-2"] == ["5e7a1c00-2", "2", "-", "pending", "-", "-", "0", "-", "-"]


def test_get_service_without_optional_fields(master: FakeMaster) -> None:
    minimal = {
        "id": "5e7a1c00-0", "index": 0, "node_id": "a1b2c3d4", "state": "exited", "pid": None,
        "exit_code": 3, "started_at": TWO_HOURS_AGO,
    }
    master.serve("GET", "/api/v1/services/5e7a1c00", json_body={**SERVICE, "instances": [minimal]})

    result = run_client(master.url, "get", "service", "5e7a1c00")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("ID"))
    assert header.split() == ["ID", "INDEX", "NODE", "STATE", "PID", "EXIT", "STARTED"]
    row = next(line for line in lines if line.startswith("5e7a1c00-0"))
    assert row.split() == ["5e7a1c00-0", "0", "a1b2c3d4", "exited", "-", "3", "2h"]


def test_tables_on_terminal_are_coloured_and_fit(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services/5e7a1c00", json_body=SERVICE_DETAIL)

    # FORCE_COLOR makes rich treat stdout as an 80-column colour terminal.
    result = run_client(master.url, "get", "service", "5e7a1c00", env={"FORCE_COLOR": "1", "COLUMNS": "80"})

    assert result.exit_code == 0, result.output
    assert "\x1b[32mrunning" in result.stdout
    assert "\x1b[31mexited" in result.stdout
    assert "\x1b[33mpending" in result.stdout
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    assert "…" not in plain
    assert max(len(line) for line in plain.splitlines()) <= 80


def test_create_joins_words_and_sends_replicas(master: FakeMaster) -> None:
    created = {**SERVICE, "command": "sh -c echo hi", "running": 0, "pending": 3}
    master.serve("POST", "/api/v1/services", status=201, json_body=created)

    result = run_client(master.url, "create", "-r", "3", "--", "sh", "-c", "echo hi")

    assert result.exit_code == 0, result.output
    assert [(r.method, r.path, r.body) for r in master.requests] == [
        ("POST", "/api/v1/services", {"command": "sh -c echo hi", "replicas": 3}),
    ]
    lines = result.stdout.splitlines()
    assert lines[0] == "created service 5e7a1c00"
    assert lines[2].split()[0] == "5e7a1c00"
    assert lines[2].split()[-4:] == ["3", "0", "3", "5m"]


def test_create_defaults_to_one_replica(master: FakeMaster) -> None:
    master.serve("POST", "/api/v1/services", status=201, json_body={**SERVICE, "replicas": 1})

    result = run_client(master.url, "create", "sleep", "600")

    assert result.exit_code == 0, result.output
    assert master.requests[0].body == {"command": "sleep 600", "replicas": 1}


def test_update_sends_patch(master: FakeMaster) -> None:
    master.serve("PATCH", "/api/v1/services/5e7a1c00", json_body={**SERVICE, "replicas": 5})

    result = run_client(master.url, "update", "5e7a1c00", "-r", "5")

    assert result.exit_code == 0, result.output
    assert [(r.method, r.path, r.body) for r in master.requests] == [
        ("PATCH", "/api/v1/services/5e7a1c00", {"replicas": 5}),
    ]
    assert result.stdout.splitlines()[0] == "updated service 5e7a1c00: replicas 5"


def test_delete_sends_delete(master: FakeMaster) -> None:
    master.serve("DELETE", "/api/v1/services/5e7a1c00", status=204)

    result = run_client(master.url, "delete", "5e7a1c00")

    assert result.exit_code == 0, result.output
    assert [(r.method, r.path) for r in master.requests] == [("DELETE", "/api/v1/services/5e7a1c00")]
    assert result.stdout == "deleted service 5e7a1c00\n"


def test_id_with_slash_stays_one_segment(master: FakeMaster) -> None:
    result = run_client(master.url, "get", "service", "a/b")

    assert master.requests[0].path == "/api/v1/services/a%2Fb"
    assert_one_error_line(result, "(HTTP 404)")


def test_master_url_trailing_slash(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/nodes", json_body={"nodes": []})

    result = run_client(master.url + "/", "get", "nodes")

    assert result.exit_code == 0, result.output
    assert master.requests[0].path == "/api/v1/nodes"
    assert result.stdout == "no nodes registered\n"


def test_master_from_environment(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services", json_body={"services": []})

    result = CliRunner().invoke(app, ["client", "get", "services"], env={"GDPM_MASTER": master.url})

    assert result.exit_code == 0, result.output
    assert len(master.requests) == 1
    assert result.stdout == "no services\n"


# -- JSON output ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "method", "path", "status", "served"),
    [
        (["get", "nodes"], "GET", "/api/v1/nodes", 200, NODES),
        (["get", "node", "a1b2c3d4"], "GET", "/api/v1/nodes/a1b2c3d4", 200, NODE_DETAIL),
        (["get", "services"], "GET", "/api/v1/services", 200, SERVICES),
        (["get", "service", "5e7a1c00"], "GET", "/api/v1/services/5e7a1c00", 200, SERVICE_DETAIL),
        (["create", "sleep", "600"], "POST", "/api/v1/services", 201, SERVICE),
        (["update", "5e7a1c00", "-r", "3"], "PATCH", "/api/v1/services/5e7a1c00", 200, SERVICE),
        (["events", "5e7a1c00"], "GET", "/api/v1/services/5e7a1c00/events", 200, EVENTS),
    ],
)
def test_json_output_equals_served_json(
    master: FakeMaster, args: list[str], method: str, path: str, status: int, served: Any,
) -> None:
    master.serve(method, path, status=status, json_body=served)

    result = run_client(master.url, "-o", "json", *args)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == served
    assert result.stdout.startswith("{\n  \"")


def test_json_output_of_delete(master: FakeMaster) -> None:
    master.serve("DELETE", "/api/v1/services/5e7a1c00", status=204)

    result = run_client(master.url, "--output", "json", "delete", "5e7a1c00")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"deleted": "5e7a1c00"}


def test_invalid_output_is_usage_error(master: FakeMaster) -> None:
    result = run_client(master.url, "-o", "yaml", "get", "nodes")

    assert result.exit_code == 2
    assert master.requests == []


# -- errors --------------------------------------------------------------------------


def test_not_found_is_one_line(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services/nope", status=404, json_body=NOT_FOUND)

    result = run_client(master.url, "get", "service", "nope")

    assert_one_error_line(result, "service 'nope' not found", "(HTTP 404)")
    assert result.stderr == "error: service 'nope' not found (HTTP 404)\n"


def test_not_found_in_json_mode_is_one_line(master: FakeMaster) -> None:
    master.serve("DELETE", "/api/v1/services/nope", status=404, json_body=NOT_FOUND)

    result = run_client(master.url, "-o", "json", "delete", "nope")

    assert_one_error_line(result, "service 'nope' not found", "(HTTP 404)")


def test_negative_replicas_reach_the_api(master: FakeMaster) -> None:
    rejected = {"error": {"code": "invalid_request", "message": "replicas must not be negative, got -1"}}
    master.serve("PATCH", "/api/v1/services/5e7a1c00", status=400, json_body=rejected)

    result = run_client(master.url, "update", "5e7a1c00", "--replicas", "-1")

    assert master.requests[0].body == {"replicas": -1}
    assert_one_error_line(result, "replicas must not be negative, got -1 (HTTP 400)")


def test_replicas_not_an_integer_is_usage_error(master: FakeMaster) -> None:
    result = run_client(master.url, "create", "-r", "three", "sleep", "1")

    assert result.exit_code == 2
    assert master.requests == []


def test_empty_id_is_usage_error(master: FakeMaster) -> None:
    result = run_client(master.url, "delete", "")

    assert result.exit_code == 2
    assert master.requests == []


def test_server_error_without_json_body(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/nodes", status=502, text="<html>\n<h1>Bad Gateway</h1>\n</html>")

    result = run_client(master.url, "get", "nodes")

    assert_one_error_line(result, "HTTP 502", "GET /api/v1/nodes", "Bad Gateway")


def test_non_json_success_body(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services", text="<html>hello</html>")

    result = run_client(master.url, "get", "services")

    assert_one_error_line(result, "not JSON", "text/html", "<html>hello</html>", master.url)


@pytest.mark.parametrize(
    ("args", "method", "path", "served"),
    [
        (["get", "nodes"], "GET", "/api/v1/nodes", {"items": []}),
        (["get", "services"], "GET", "/api/v1/services", {"services": ["5e7a1c00"]}),
        (["get", "service", "x"], "GET", "/api/v1/services/x", [1, 2]),
        (["-o", "json", "get", "nodes"], "GET", "/api/v1/nodes", {"nodes": 3}),
    ],
)
def test_unexpected_json_shape(master: FakeMaster, args: list[str], method: str, path: str, served: Any) -> None:
    master.serve(method, path, json_body=served)

    result = run_client(master.url, *args)

    assert_one_error_line(result, "unexpected response", f"{method} {path}")


def test_empty_success_body_for_get(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services/x", status=200)

    result = run_client(master.url, "get", "service", "x")

    assert_one_error_line(result, "unexpected response", "empty body")


def test_timeout_is_one_line(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/nodes", json_body=NODES, delay=0.8)

    result = run_client(master.url, "--timeout", "0.2", "get", "nodes")

    assert_one_error_line(result, "GET /api/v1/nodes", "timed out after 0.2 s", "--timeout")


def test_unreachable_master_is_one_line(closed_port_url: str) -> None:
    result = run_client(closed_port_url, "get", "nodes")

    assert_one_error_line(result, f"cannot reach the master at {closed_port_url}", "Connection refused",
                          "gdpm master")


def test_invalid_master_url_is_usage_error() -> None:
    result = run_client("127.0.0.1:8989", "get", "nodes")

    assert result.exit_code == 2
    assert result.stderr.startswith("error: invalid master URL '127.0.0.1:8989'")
    assert len(result.stderr.splitlines()) == 1


def test_unreachable_master_in_subprocess(closed_port_url: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-W", "error", "-m", "gdpm", "client", "--master", closed_port_url, "get", "services"],
        capture_output=True, text=True, timeout=60,
    )

    assert completed.returncode == 1
    assert completed.stdout == ""
    assert completed.stderr == (
        f"error: cannot reach the master at {closed_port_url}: Connection refused "
        "(start one with 'gdpm master' or set --master/GDPM_MASTER)\n"
    )


def test_table_in_subprocess_is_plain(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services", json_body=SERVICES)

    completed = subprocess.run(
        [sys.executable, "-W", "error", "-m", "gdpm", "client", "--master", master.url, "get", "services"],
        capture_output=True, text=True, timeout=60,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert "\x1b[" not in completed.stdout
    assert "5e7a1c00" in completed.stdout
    assert "9f8e7d6c" in completed.stdout


# -- run settings --------------------------------------------------------------------


def test_create_sends_only_given_settings(master: FakeMaster) -> None:
    master.serve("POST", "/api/v1/services", status=201, json_body=SERVICE)

    result = run_client(
        master.url, "create", "-r", "2", "--env", "PORT=8080", "--env", "GREETING=hello=world", "--env", "EMPTY=",
        "--cwd", "/srv/app", "--restart", "on-failure", "--restart-delay", "0.5", "--restart-delay-max", "30",
        "--min-uptime", "10", "--max-restarts", "unlimited", "--stop-signal", "INT", "--stop-timeout", "2.5",
        "--", "exec", "./server",
    )

    assert result.exit_code == 0, result.output
    assert master.requests[0].body == {
        "command": "exec ./server", "replicas": 2,
        "env": {"PORT": "8080", "GREETING": "hello=world", "EMPTY": ""}, "cwd": "/srv/app",
        "restart": "on-failure", "restart_delay": 0.5, "restart_delay_max": 30.0, "min_uptime": 10.0,
        "max_restarts": None, "stop_signal": "INT", "stop_timeout": 2.5,
    }


def test_create_numbers_for_restarts_and_signal(master: FakeMaster) -> None:
    master.serve("POST", "/api/v1/services", status=201, json_body=SERVICE)

    result = run_client(master.url, "create", "--max-restarts", "3", "--stop-signal", "15", "sleep", "1")

    assert result.exit_code == 0, result.output
    assert master.requests[0].body == {"command": "sleep 1", "replicas": 1, "max_restarts": 3, "stop_signal": 15}


@pytest.mark.parametrize("args", [
    ["--env", "NOVALUE"],
    ["--env", "=value"],
    ["--max-restarts", "many"],
    ["--restart", "sometimes"],
    ["--restart-delay", "soon"],
])
def test_create_malformed_setting_is_usage_error(master: FakeMaster, args: list[str]) -> None:
    result = run_client(master.url, "create", *args, "sleep", "1")

    assert result.exit_code == 2, result.output
    assert master.requests == []


def test_update_settings_without_replicas(master: FakeMaster) -> None:
    master.serve("PATCH", "/api/v1/services/5e7a1c00", json_body={**SERVICE, **RUN_SETTINGS})

    result = run_client(master.url, "update", "5e7a1c00", "--env", "A=1", "--stop-timeout", "3")

    assert result.exit_code == 0, result.output
    assert master.requests[0].body == {"env": {"A": "1"}, "stop_timeout": 3.0}
    assert result.stdout.splitlines()[0] == "updated service 5e7a1c00: env, stop_timeout"


def test_update_replicas_and_settings(master: FakeMaster) -> None:
    master.serve("PATCH", "/api/v1/services/5e7a1c00", json_body={**SERVICE, "replicas": 4})

    result = run_client(master.url, "update", "5e7a1c00", "-r", "4", "--restart", "never")

    assert result.exit_code == 0, result.output
    assert master.requests[0].body == {"replicas": 4, "restart": "never"}
    assert result.stdout.splitlines()[0] == "updated service 5e7a1c00: replicas 4, restart"


def test_update_without_changes_is_usage_error(master: FakeMaster) -> None:
    result = run_client(master.url, "update", "5e7a1c00")

    assert result.exit_code == 2
    assert master.requests == []
    assert result.stderr.startswith("error: nothing to update")


def test_get_service_shows_run_settings_and_new_states(master: FakeMaster) -> None:
    instances = [
        {**INSTANCES[0], "state": "backoff", "pid": None, "exit_code": 1, "restarts": 3,
         "exited_at": FIVE_MINUTES_AGO},
        {**INSTANCES[1], "state": "failed", "exit_signal": "SIGSEGV", "restarts": 10},
        {**INSTANCES[2], "state": "exited", "exit_signal": "TERM", "node_id": "a1b2c3d4"},
    ]
    master.serve("GET", "/api/v1/services/5e7a1c00", json_body={**SERVICE, **RUN_SETTINGS, "instances": instances})

    result = run_client(master.url, "get", "service", "5e7a1c00")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines[:15] if ":" in line}
    assert fields["env"] == "PORT=8080 GREETING='hello world'"
    assert fields["cwd"] == "/srv/app"
    assert fields["restart"] == "on-failure"
    assert fields["restart delay"] == "0.5s"
    assert fields["restart delay max"] == "30s"
    assert fields["min uptime"] == "10s"
    assert fields["max restarts"] == "unlimited"
    assert fields["stop signal"] == "SIGINT"
    assert fields["stop timeout"] == "2.5s"
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("5e7a1c00-")}
    assert rows["5e7a1c00-0"] == ["5e7a1c00-0", "0", "a1b2c3d4", "backoff", "-", "1", "3", "5m", "5m"]
    assert rows["5e7a1c00-1"][3:6] == ["failed", "-", "SIGSEGV"]
    assert rows["5e7a1c00-2"][3:6] == ["exited", "-", "SIGTERM"]


def test_new_states_are_coloured(master: FakeMaster) -> None:
    instances = [{**INSTANCES[0], "state": "backoff"}, {**INSTANCES[1], "state": "failed"}]
    master.serve("GET", "/api/v1/services/5e7a1c00", json_body={**SERVICE, "instances": instances})

    result = run_client(master.url, "get", "service", "5e7a1c00", env={"FORCE_COLOR": "1", "COLUMNS": "80"})

    assert result.exit_code == 0, result.output
    assert "\x1b[33mbackoff" in result.stdout
    assert "\x1b[31mfailed" in result.stdout


# -- events --------------------------------------------------------------------------


def test_events_table(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services/5e7a1c00/events", json_body=EVENTS)

    result = run_client(master.url, "events", "5e7a1c00")

    assert result.exit_code == 0, result.output
    assert [(r.method, r.path) for r in master.requests] == [("GET", "/api/v1/services/5e7a1c00/events")]
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TIME", "TYPE", "INSTANCE", "NODE", "MESSAGE"]
    assert lines[1].split() == ["2024-05-01T10:00:03Z", "placed", "5e7a1c00-0", "a1b2c3d4", "placed", "on", "node",
                                "alpha"]
    assert lines[2].split()[:2] == ["2024-05-01T10:00:04Z", "exited"]
    assert lines[3].split() == ["2024-05-01T10:00:05Z", "scaled", "-", "-", "replicas", "3", "->", "4"]


def test_events_empty(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services/5e7a1c00/events", json_body={"events": []})

    result = run_client(master.url, "events", "5e7a1c00")

    assert result.exit_code == 0, result.output
    assert result.stdout == "no events\n"


def test_events_unexpected_shape(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services/5e7a1c00/events", json_body={"events": "none"})

    result = run_client(master.url, "events", "5e7a1c00")

    assert_one_error_line(result, "unexpected response", "GET /api/v1/services/5e7a1c00/events")


# -- logs ----------------------------------------------------------------------------

LOG_LINES = b"[5e7a1c00-0] \xff\xfe raw bytes\n[gdpm] node e5f6a7b8 (beta) unreachable: Connection refused\n"


def test_logs_request_and_raw_bytes(master: FakeMaster) -> None:
    master.serve_stream("/api/v1/services/5e7a1c00/logs", [LOG_LINES[:20], LOG_LINES[20:]])

    result = run_client(master.url, "logs", "5e7a1c00", "--instance", "5e7a1c00-0", "--tail", "5", "--stderr")

    assert result.exit_code == 0, result.output
    assert master.requests[0].path == "/api/v1/services/5e7a1c00/logs"
    assert master.requests[0].query == {"tail": "5", "stream": "stderr", "follow": "0", "instance": "5e7a1c00-0"}
    assert result.stdout_bytes == LOG_LINES


def test_logs_defaults(master: FakeMaster) -> None:
    master.serve_stream("/api/v1/services/5e7a1c00/logs", [])

    result = run_client(master.url, "logs", "5e7a1c00")

    assert result.exit_code == 0, result.output
    assert master.requests[0].query == {"tail": "100", "stream": "stdout", "follow": "0"}
    assert result.stdout_bytes == b""


def test_logs_unknown_service_is_one_line(master: FakeMaster) -> None:
    master.serve("GET", "/api/v1/services/nope/logs", status=404, json_body=NOT_FOUND)

    result = run_client(master.url, "logs", "nope")

    assert_one_error_line(result, "service 'nope' not found (HTTP 404)")


@pytest.mark.parametrize("tail", ["-1", "100001", "many"])
def test_logs_invalid_tail_is_usage_error(master: FakeMaster, tail: str) -> None:
    result = run_client(master.url, "logs", "5e7a1c00", "--tail", tail)

    assert result.exit_code == 2
    assert master.requests == []


def test_logs_unreachable_master_is_one_line(closed_port_url: str) -> None:
    result = run_client(closed_port_url, "logs", "5e7a1c00", "-f")

    assert_one_error_line(result, f"cannot reach the master at {closed_port_url}", "Connection refused")


def read_until(stream, expected: bytes, timeout: float = 30.0) -> bytes:
    """Read a pipe until ``expected`` appears in what was read, or fail after ``timeout`` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    while expected not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{expected!r} not read within {timeout} s; read {data!r}"
        ready, _, _ = select.select([stream], [], [], remaining)
        if ready:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, f"end of output before {expected!r}; read {data!r}"
            data += chunk
    return data


def test_logs_follow_until_ctrl_c(master: FakeMaster) -> None:
    master.serve_stream("/api/v1/services/5e7a1c00/logs", [LOG_LINES], hold_open=True)
    process = subprocess.Popen(
        [sys.executable, "-W", "error", "-m", "gdpm", "client", "--master", master.url, "logs", "5e7a1c00", "-f"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert read_until(process.stdout, LOG_LINES) == LOG_LINES
        assert master.requests[0].query["follow"] == "1"

        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 130
    assert stderr == b""


# -- rendering helpers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (timedelta(seconds=0), "0s"),
        (timedelta(seconds=59), "59s"),
        (timedelta(minutes=5, seconds=30), "5m"),
        (timedelta(hours=3, minutes=59), "3h"),
        (timedelta(days=2, hours=5), "2d"),
        (timedelta(seconds=-30), "0s"),
    ],
)
def test_format_age(delta: timedelta, expected: str) -> None:
    assert format_age((NOW - delta).isoformat(), NOW) == expected


def test_format_age_odd_values() -> None:
    assert format_age(None, NOW) == "-"
    assert format_age("yesterday", NOW) == "yesterday"
    assert format_age("2024-01-01T00:00:00Z", datetime(2024, 1, 1, 0, 10, tzinfo=timezone.utc)) == "10m"
    assert format_age("2024-01-01T00:00:00", datetime(2024, 1, 1, 0, 10, tzinfo=timezone.utc)) == "10m"


def test_shorten_command() -> None:
    assert shorten_command("sleep 1") == "sleep 1"
    assert shorten_command("a\nb") == "a\\nb"
    shortened = shorten_command("x" * 100)
    assert len(shortened) == 60
    assert shortened.endswith("...")


def test_render_escapes_control_characters():
    from gdpm.cli.render import printable, shorten_command

    assert printable("a\x1b[31mred\x1b[0m\x01\x7f\x9b") == "a\\x1b[31mred\\x1b[0m\\x01\\x7f\\x9b"
    assert printable("tab\there\nnew\rline") == "tab\\there\\nnew\\rline"
    assert "\x1b" not in shorten_command("printf \x1b[31mRED" + "x" * 100)
