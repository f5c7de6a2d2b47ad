"""``GET /api/v1/services/{service_id}/logs``: instance output, fetched from the slaves that store it.

Query parameters:

- ``instance``: one instance id. By default, all instances of the service.
- ``stream``: ``stdout`` (the default) or ``stderr``.
- ``tail``: lines per instance, 0 to MAX_TAIL, 100 by default.
- ``follow``: 0 or 1.

The response is ``application/octet-stream``. Each line is ``[INSTANCE_ID] `` followed
by the line's bytes exactly as the instance wrote them. Lines from gdpm itself start
with ``[gdpm] `` (an instance id never is ``gdpm``): a node that cannot be reached, an
instance that moved or was removed, a service that was deleted. Every line ends with a
newline, so an unfinished last line, or a piece of a line longer than
MAX_LINE_BYTES, gets one added.

Without ``follow``, the instances are read one after the other, in index order. With
``follow``, one task per instance streams from its slave and the lines are merged as
they arrive, until the client disconnects. A follow reconnects when the slave's stream
breaks, switches to the new node when an instance moves, and picks up instances that a
scale-up adds.

Errors found before the first byte is sent (unknown service or instance, invalid
parameter) are API errors. Later problems become ``[gdpm]`` lines in the stream.

Register with ``app.add_routes(routes)`` and ``setup_log_client(app)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import quote

import aiohttp
import structlog
from aiohttp import web

from gdpm.common.models import InstanceRecord
from gdpm.common.tasks import cancel_and_wait, start_task
from gdpm.master.errors import invalid, not_found
from gdpm.master.view import ClusterView

log = structlog.get_logger("gdpm.master.logs")

routes = web.RouteTableDef()

STREAMS = ("stdout", "stderr")
DEFAULT_TAIL = 100
MAX_TAIL = 100_000

# Seconds to connect to a slave's log server.
CONNECT_TIMEOUT = 5.0
# Seconds a slave may stay silent while it sends a tail, and seconds one tail may take.
TAIL_READ_TIMEOUT = 30.0
TAIL_TOTAL_TIMEOUT = 120.0
# Seconds between two attempts to reach a slave while following.
FOLLOW_RETRY_DELAY = 2.0
# Seconds between two checks, while following, for moved, added or removed instances
# and for a client that disconnected.
FOLLOW_CHECK_INTERVAL = 1.0
# Lines of all followed instances waiting for the client. When it is full, the tasks
# stop reading from the slaves, so a slow client slows the slaves' streams down.
FOLLOW_QUEUE_LINES = 1024

# Maximum length of a line held in memory, in bytes. A longer line is sent in pieces of this size.
MAX_LINE_BYTES = 1024 * 1024
# Bytes sent to the client in one write.
WRITE_BATCH_BYTES = 64 * 1024
# Connections to slaves open at once, over all requests. A request waits for a free
# one, and gives up after CONNECT_TIMEOUT.
MAX_SLAVE_CONNECTIONS = 1024

LOG_CLIENT_KEY = web.AppKey("log_client", aiohttp.ClientSession)
STOPPING_KEY = web.AppKey("log_follow_stopping", asyncio.Event)


def setup_log_client(app: web.Application) -> None:
    """Register the start-up and clean-up of the HTTP client that reads the slaves' logs.

    At shutdown, open follows end at once, so that they do not hold up the server.
    """
    app[STOPPING_KEY] = asyncio.Event()
    app.on_startup.append(_open_log_client)
    app.on_shutdown.append(_end_follows)
    app.on_cleanup.append(_close_log_client)


async def _open_log_client(app: web.Application) -> None:
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=MAX_SLAVE_CONNECTIONS, limit_per_host=0)
    app[LOG_CLIENT_KEY] = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False)


async def _end_follows(app: web.Application) -> None:
    app[STOPPING_KEY].set()


async def _close_log_client(app: web.Application) -> None:
    await app[LOG_CLIENT_KEY].close()


# -- the route -------------------------------------------------------------------------


@routes.get("/api/v1/services/{service_id}/logs")
async def service_logs(request: web.Request) -> web.StreamResponse:
    view: ClusterView = request.app["view"]
    service_id = request.match_info["service_id"]
    if service_id not in view.services:
        raise not_found("service", service_id)
    instance_id = request.query.get("instance")
    if instance_id is not None and instance_id not in view.instances.get(service_id, {}):
        raise not_found("instance", instance_id)
    stream = request.query.get("stream", "stdout")
    if stream not in STREAMS:
        raise invalid(f"stream must be stdout or stderr, got {stream!r}")
    tail = _parse_tail(request.query.get("tail"))
    follow = _parse_follow(request.query.get("follow"))

    response = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    })
    await response.prepare(request)
    reader = _LogReader(request, response, service_id, instance_id, stream)
    try:
        if follow:
            await reader.follow(tail)
        else:
            await reader.tail(tail)
        await response.write_eof()
    except ConnectionResetError:
        pass  # The client went away; aiohttp's ClientConnectionResetError is one.
    return response


def _parse_tail(value: str | None) -> int:
    if value is None:
        return DEFAULT_TAIL
    if not re.fullmatch(r"[0-9]{1,6}", value) or int(value) > MAX_TAIL:
        raise invalid(f"tail must be an integer from 0 to {MAX_TAIL}, got {value!r}")
    return int(value)


def _parse_follow(value: str | None) -> bool:
    if value in (None, "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise invalid(f"follow must be 0 or 1, got {value!r}")


# -- reading from the slaves -----------------------------------------------------------


class SlaveLogError(Exception):
    """A slave's log server returned an unexpected status."""


class _LineSplitter:
    """Cuts a byte stream into lines that end with a newline, none longer than MAX_LINE_BYTES."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        lines = []
        start = 0
        while True:
            newline = self._pending.find(b"\n", start)
            if newline < 0:
                break
            lines.extend(_pieces(bytes(self._pending[start:newline + 1])))
            start = newline + 1
        del self._pending[:start]
        while len(self._pending) >= MAX_LINE_BYTES:
            lines.append(bytes(self._pending[:MAX_LINE_BYTES]) + b"\n")
            del self._pending[:MAX_LINE_BYTES]
        return lines

    def flush(self) -> list[bytes]:
        """Return the unfinished last line, with a newline added, if there is one."""
        rest = bytes(self._pending)
        self._pending.clear()
        return [rest + b"\n"] if rest else []


def _pieces(line: bytes) -> list[bytes]:
    if len(line) <= MAX_LINE_BYTES:
        return [line]
    pieces = [line[start:start + MAX_LINE_BYTES] for start in range(0, len(line), MAX_LINE_BYTES)]
    return [piece if piece.endswith(b"\n") else piece + b"\n" for piece in pieces]


def _describe_failure(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorError):
        os_error = error.os_error
        # asyncio's text for a refused connection is "Connect call failed (ADDRESS)",
        # so the errno's text ("Connection refused") is clearer.
        if os_error.errno and os_error.errno > 0:
            return os.strerror(os_error.errno)
        return str(os_error) or type(os_error).__name__
    if isinstance(error, TimeoutError):
        return "timed out"
    text = " ".join(str(error).split())
    return text or type(error).__name__


class _LogReader:
    """One client request: reads the service's instances from their slaves and writes the lines."""

    def __init__(self, request: web.Request, response: web.StreamResponse, service_id: str,
                 instance_id: str | None, stream: str) -> None:
        self.request = request
        self.response = response
        self.view: ClusterView = request.app["view"]
        self.session = request.app[LOG_CLIENT_KEY]
        self.stopping = request.app[STOPPING_KEY]
        self.service_id = service_id
        self.instance_id = instance_id
        self.stream = stream

    def _records(self) -> list[InstanceRecord]:
        records = self.view.service_instances(self.service_id)
        if self.instance_id is not None:
            records = [record for record in records if record.id == self.instance_id]
        return records

    def node_label(self, node_id: str) -> str:
        node = self.view.nodes.get(node_id)
        return f"node {node_id} ({node.name})" if node is not None else f"node {node_id}"

    def log_url_of(self, node_id: str) -> tuple[str | None, str | None]:
        """Return the node's log URL, or None and the reason why there is none."""
        node = self.view.nodes.get(node_id)
        if node is None:
            return None, f"node {node_id} is not registered any more"
        if not node.log_url:
            return None, f"{self.node_label(node_id)} has no log server (its slave does not report one)"
        return node.log_url, None

    async def lines_from_slave(self, url: str, instance_id: str, *, tail: int, follow: bool,
                                on_connected: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
        """Yield the lines a slave sends for one instance; nothing when it has no log for it.

        Raises aiohttp.ClientError, TimeoutError or SlaveLogError.
        """
        params = {"stream": self.stream, "tail": str(tail), "follow": "1" if follow else "0"}
        if follow:
            # NOTE: no read timeout, because an instance may print nothing for hours. So a
            # slave that vanishes without a TCP reset (a network partition) leaves this
            # stream waiting until the instance moves to another node.
            timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=None)
        else:
            timeout = aiohttp.ClientTimeout(total=TAIL_TOTAL_TIMEOUT, connect=CONNECT_TIMEOUT,
                                            sock_read=TAIL_READ_TIMEOUT)
        target = f"{url.rstrip('/')}/v1/logs/{quote(instance_id, safe='')}"
        async with self.session.get(target, params=params, timeout=timeout) as response:
            if response.status == 404:
                return
            if response.status != 200:
                excerpt = (await response.content.read(200)).decode("utf-8", errors="replace")
                raise SlaveLogError(f"HTTP {response.status}: {' '.join(excerpt.split())}")
            if on_connected is not None:
                await on_connected()
            splitter = _LineSplitter()
            async for chunk in response.content.iter_any():
                for line in splitter.feed(chunk):
                    yield line
            for line in splitter.flush():
                yield line

    # -- tail ----------------------------------------------------------------------

    async def tail(self, count: int) -> None:
        """Send the last ``count`` lines of each instance, one instance after the other."""
        failed_nodes: dict[str, str] = {}
        for record in self._records():
            if record.node_id is None:
                # Not placed, so it has not run anywhere yet.
                if self.instance_id is not None:
                    await self._write_notice(f"instance {record.id} is not placed on a node yet")
                continue
            url, problem = self.log_url_of(record.node_id)
            if problem is None:
                problem = failed_nodes.get(record.node_id)
            if problem is not None:
                await self._write_notice(f"{problem}; no logs from instance {record.id}")
                continue
            batch = _Batch(self.response)
            prefix = _prefix(record.id)
            lines = self.lines_from_slave(url, record.id, tail=count, follow=False)
            try:
                async with contextlib.aclosing(lines):
                    async for line in lines:
                        await batch.add(prefix + line)
                await batch.flush()
            except (aiohttp.ClientError, TimeoutError, SlaveLogError) as error:
                await batch.flush()
                reason = f"{self.node_label(record.node_id)} unreachable: {_describe_failure(error)}"
                failed_nodes[record.node_id] = reason
                log.warning("reading instance logs from a slave failed", node_id=record.node_id,
                            instance_id=record.id, error=_describe_failure(error))
                await self._write_notice(f"{reason}; no logs from instance {record.id}")

    async def _write_notice(self, message: str) -> None:
        await self.response.write(_notice(message))

    # -- follow --------------------------------------------------------------------

    async def follow(self, tail: int) -> None:
        """Send the last ``tail`` lines of each instance, then its new lines as they come, until the client leaves."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=FOLLOW_QUEUE_LINES)
        followers: dict[str, _InstanceFollower] = {}
        next_check = 0.0
        try:
            while True:
                if time.monotonic() >= next_check:
                    if await self._update_followers(followers, queue, tail):
                        return
                    next_check = time.monotonic() + FOLLOW_CHECK_INTERVAL
                batch = await _next_batch(queue, FOLLOW_CHECK_INTERVAL)
                if self.stopping.is_set():
                    return
                if batch:
                    await self.response.write(batch)
                elif _client_gone(self.request):
                    # aiohttp cancels no handler when its client disconnects
                    # (handler_cancellation is off by default), and with no line to
                    # write, no write fails either. So check here.
                    return
        finally:
            await cancel_and_wait(*(follower.task for follower in followers.values()))

    async def _update_followers(self, followers: dict[str, _InstanceFollower], queue: asyncio.Queue[bytes],
                                tail: int) -> bool:
        """Start, restart and stop followers to match the view; return True when the stream should end."""
        if self.service_id not in self.view.services:
            await self._write_notice(f"service {self.service_id} was deleted")
            return True
        records = {record.id: record for record in self._records()}

        for instance_id in list(followers):
            if instance_id not in records:
                followers.pop(instance_id).stop()
                await self._write_notice(f"instance {instance_id} was removed")
        if self.instance_id is not None and not records:
            return True

        for instance_id, record in records.items():
            follower = followers.get(instance_id)
            if follower is None:
                followers[instance_id] = _InstanceFollower(self, queue, record, tail)
                continue
            if follower.node_id == record.node_id:
                continue
            follower.stop()
            if record.node_id is None:
                await self._write_notice(f"instance {instance_id} is waiting for a live node")
            elif follower.node_id is None:
                await self._write_notice(f"instance {instance_id} placed on {self.node_label(record.node_id)}")
            else:
                await self._write_notice(f"instance {instance_id} moved to {self.node_label(record.node_id)}")
            # On its new node the instance starts a new file, so its start is shown.
            followers[instance_id] = _InstanceFollower(self, queue, record, tail)
        return False


class _InstanceFollower:
    """A task that follows one instance on one node and puts its lines in the queue.

    It reconnects after FOLLOW_RETRY_DELAY when the slave's stream breaks, and reports
    each new failure reason once. The reader replaces it when the instance moves.
    """

    def __init__(self, reader: _LogReader, queue: asyncio.Queue[bytes], record: InstanceRecord, tail: int) -> None:
        self.reader = reader
        self.queue = queue
        self.instance_id = record.id
        self.node_id = record.node_id
        self.task: asyncio.Task | None = None
        if record.node_id is not None:
            self.task = start_task(self._run(tail), name=f"follow-logs-{record.id}", instance_id=record.id)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self, tail: int) -> None:
        reader = self.reader
        prefix = _prefix(self.instance_id)
        failure: str | None = None

        async def connected() -> None:
            nonlocal failure
            if failure is not None:
                failure = None
                await self.queue.put(_notice(
                    f"reconnected to {reader.node_label(self.node_id)}; "
                    f"output of instance {self.instance_id} written meanwhile is not shown"))

        while True:
            url, problem = reader.log_url_of(self.node_id)
            if url is None:
                # A later check restarts the follower if the instance moves.
                await self.queue.put(_notice(f"{problem}; not following instance {self.instance_id}"))
                return
            lines = reader.lines_from_slave(url, self.instance_id, tail=tail, follow=True, on_connected=connected)
            try:
                async with contextlib.aclosing(lines):
                    async for line in lines:
                        await self.queue.put(prefix + line)
                reason = "closed the log stream"
            except (aiohttp.ClientError, TimeoutError, SlaveLogError) as error:
                reason = f"unreachable: {_describe_failure(error)}"
            if reason != failure:
                failure = reason
                log.warning("following instance logs: slave stream ended", node_id=self.node_id,
                            instance_id=self.instance_id, reason=reason)
                await self.queue.put(_notice(
                    f"{reader.node_label(self.node_id)} {reason}; retrying every {FOLLOW_RETRY_DELAY:g} s"))
            # Lines written while disconnected are lost rather than repeated on reconnection.
            tail = 0
            await asyncio.sleep(FOLLOW_RETRY_DELAY)


class _Batch:
    """Collects lines into writes of about WRITE_BATCH_BYTES."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self.lines: list[bytes] = []
        self.size = 0

    async def add(self, line: bytes) -> None:
        self.lines.append(line)
        self.size += len(line)
        if self.size >= WRITE_BATCH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self.lines:
            data = b"".join(self.lines)
            self.lines, self.size = [], 0
            await self.response.write(data)


async def _next_batch(queue: asyncio.Queue[bytes], timeout: float) -> bytes:
    """Wait up to ``timeout`` seconds for a line, then take what else is queued, up to WRITE_BATCH_BYTES."""
    try:
        first = await asyncio.wait_for(queue.get(), timeout)
    except TimeoutError:
        return b""
    lines = [first]
    size = len(first)
    while size < WRITE_BATCH_BYTES and not queue.empty():
        line = queue.get_nowait()
        lines.append(line)
        size += len(line)
    return b"".join(lines)


def _prefix(instance_id: str) -> bytes:
    return f"[{instance_id}] ".encode()


def _notice(message: str) -> bytes:
    return f"[gdpm] {message}\n".encode()


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
