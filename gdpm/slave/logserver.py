"""The slave's log server: the master reads instance logs from it over HTTP.

``GET /v1/logs/{instance_id}?stream=stdout|stderr&tail=N&follow=0|1`` returns the last
N lines of the stream (100 by default). With ``follow=1`` it then sends each new line
as the instance writes it, until the client disconnects. The body is
``application/octet-stream``: the lines exactly as stored, each ending with a newline
except an unfinished last line (and the pieces of a line longer than
:data:`gdpm.slave.logs.MAX_LINE_BYTES`). Errors are 400 or 404 with a one-line text
message.

The server has no authentication: it serves every instance's output to anyone who can
connect, so listen on an address that only the master can reach.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Callable
from pathlib import Path

import structlog
from aiohttp import web

from gdpm.slave.logs import STREAMS, follow_batches, log_path, rotated_paths, tail_lines

log = structlog.get_logger("gdpm.slave.logserver")

DEFAULT_TAIL = 100
MAX_TAIL = 100_000

# Seconds the server waits at shutdown for responses in progress; follows end at once.
SHUTDOWN_TIMEOUT = 2.0

# Bytes of lines sent in one write of a tail.
WRITE_BATCH_BYTES = 64 * 1024

# An instance id as the master builds it: the service id, "-", the replica index.
# Nothing else reaches the file system, so no path can leave the log directory.
INSTANCE_ID = re.compile(r"[0-9a-f]{8}-(0|[1-9][0-9]{0,8})")

LOG_DIR_KEY = web.AppKey("log_dir", Path)
KNOWN_INSTANCE_KEY = web.AppKey("known_instance", Callable[[str], bool])
STOPPING_KEY = web.AppKey("stopping", asyncio.Event)


def build_log_app(log_dir: Path, known_instance: Callable[[str], bool] | None = None) -> web.Application:
    """Return the application that serves the logs stored in ``log_dir``.

    ``known_instance`` returns whether an instance runs on this node. A log file is
    created at the instance's first output, so for such an instance a missing file is
    an empty log, not an error.
    """
    app = web.Application()
    app[LOG_DIR_KEY] = Path(log_dir)
    app[KNOWN_INSTANCE_KEY] = known_instance or (lambda instance_id: False)
    app[STOPPING_KEY] = asyncio.Event()
    app.router.add_get("/v1/logs/{instance_id}", get_logs)
    app.on_shutdown.append(_end_follows)
    return app


async def start_log_server(app: web.Application, host: str, port: int, *,
                           advertise_host: str | None = None) -> tuple[web.AppRunner, str]:
    """Listen on ``host``:``port`` (0: a free port) and return the runner and the base URL to advertise.

    The URL names ``advertise_host`` when given. Otherwise it names ``host``, or this
    machine's host name when ``host`` is a wildcard address (0.0.0.0 or ::). Stop the
    server with ``await runner.cleanup()``. Raises OSError when it cannot listen.
    """
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    url = f"http://{_url_host(advertise_host or _advertised_host(host))}:{bound_port}"
    log.info("log server started", listen=f"{host}:{bound_port}", url=url)
    return runner, url


def _advertised_host(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.is_unspecified:
        # NOTE: the host name must resolve, on the master, to an address of this machine.
        return socket.gethostname()
    return host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _end_follows(app: web.Application) -> None:
    app[STOPPING_KEY].set()


def _text_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n")


def _parse_tail(value: str | None) -> int:
    if value is None:
        return DEFAULT_TAIL
    if not re.fullmatch(r"[0-9]{1,6}", value) or int(value) > MAX_TAIL:
        raise ValueError(f"tail must be an integer from 0 to {MAX_TAIL}, got {value!r}")
    return int(value)


def _parse_flag(value: str | None, name: str) -> bool:
    if value in (None, "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise ValueError(f"{name} must be 0 or 1, got {value!r}")


async def get_logs(request: web.Request) -> web.StreamResponse:
    instance_id = request.match_info["instance_id"]
    if not INSTANCE_ID.fullmatch(instance_id):
        return _text_error(400, f"invalid instance id {instance_id!r}: expected SERVICE_ID-INDEX such as 5e7a1c00-0")
    stream = request.query.get("stream", "stdout")
    if stream not in STREAMS:
        return _text_error(400, f"stream must be stdout or stderr, got {stream!r}")
    try:
        tail = _parse_tail(request.query.get("tail"))
        follow = _parse_flag(request.query.get("follow"), "follow")
    except ValueError as error:
        return _text_error(400, str(error))

    log_dir = request.app[LOG_DIR_KEY]
    if not follow and not _has_logs(log_dir, instance_id, stream) and not request.app[KNOWN_INSTANCE_KEY](instance_id):
        return _text_error(404, f"no {stream} log for instance {instance_id} on this node")

    response = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    })
    await response.prepare(request)
    try:
        if follow:
            await _send_follow(request, response, log_dir, instance_id, stream, tail)
        else:
            lines = await asyncio.to_thread(tail_lines, log_dir, instance_id, stream, tail)
            await _send_lines(response, lines)
        await response.write_eof()
    except ConnectionResetError:
        pass  # The client went away; aiohttp's ClientConnectionResetError is one.
    return response


def _has_logs(log_dir: Path, instance_id: str, stream: str) -> bool:
    return log_path(log_dir, instance_id, stream).exists() or bool(rotated_paths(log_dir, instance_id, stream))


async def _send_lines(response: web.StreamResponse, lines: list[bytes]) -> None:
    batch: list[bytes] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if size >= WRITE_BATCH_BYTES:
            await response.write(b"".join(batch))
            batch, size = [], 0
    if batch:
        await response.write(b"".join(batch))


async def _send_follow(request: web.Request, response: web.StreamResponse, log_dir: Path,
                       instance_id: str, stream: str, tail: int) -> None:
    """Send the tail, then new lines until the client disconnects or the server stops."""
    stopping = request.app[STOPPING_KEY]
    batches = follow_batches(log_dir, instance_id, stream, from_end=True, tail=tail)
    try:
        async for lines in batches:
            if stopping.is_set():
                return
            if lines:
                await _send_lines(response, lines)
            elif _client_gone(request):
                # An idle poll. aiohttp cancels no handler when its client disconnects
                # (handler_cancellation is off by default), and with no line to write,
                # no write fails either. So check here.
                return
    finally:
        await batches.aclose()


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
