"""A TCP proxy on loopback that can simulate a network partition, for chaos tests.

``FaultProxy(target_host, target_port)`` listens on 127.0.0.1 on a free port and
forwards bytes both ways between each client and a new connection to the target. Its
asyncio loop runs in a background thread, so synchronous tests call its methods
directly::

    proxy = FaultProxy("127.0.0.1", etcd.port)
    slave = cluster.start_slave("slave-1", etcd_endpoints=proxy.endpoint)
    proxy.cut()        # partition: every connection hangs
    proxy.restore()    # heal: held connections close, new ones forward again
    proxy.close()

Two kinds of cut:

``blackhole`` (the default, what a real partition looks like)
    Nothing is forwarded any more, in either direction, but every connection stays
    open, so a peer sees a hang rather than an error. Bytes that arrive meanwhile are
    held, not dropped. The proxy stops reading once it holds about 200 KiB per
    direction (one chunk and asyncio's stream buffer), so the sender's socket buffers
    fill up as they would when packets go unacknowledged. New connections are
    accepted and held the same way, without a connection to the target.
``reset``
    Every connection is closed with a TCP reset (RST), and new connections are reset
    as soon as they are accepted, so a peer sees "connection reset" at once.

``restore()`` closes the connections that a blackhole held, so that clients notice and
reconnect, and forwards every new connection again. ``restore(reconnect=False)``
instead lets the held connections go on from where they stopped, delivering the bytes
they held, like a partition that healed before TCP gave up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, Literal

CutMode = Literal["blackhole", "reset"]

# Seconds a call from the test thread may wait for the proxy's loop.
CALL_TIMEOUT = 10.0
# Bytes read from one side per chunk.
CHUNK_SIZE = 65536


def _check_loopback(host: str) -> None:
    """Raise ValueError unless ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"invalid proxy target {host!r}: expected a loopback IP address or localhost") from None
    if not address.is_loopback:
        raise ValueError(f"invalid proxy target {host!r}: the proxy forwards to loopback addresses only")


def _set_linger_zero(sock: socket.socket | None) -> None:
    """Make the next close of ``sock`` send a TCP reset (RST) instead of a FIN."""
    if sock is None or sock.fileno() < 0:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Connection:
    """One accepted client socket and, once forwarding starts, its streams and the target's."""

    def __init__(self, client_socket: socket.socket) -> None:
        self.client_socket = client_socket
        self.client_writer: asyncio.StreamWriter | None = None
        self.target_writer: asyncio.StreamWriter | None = None
        # Set when a blackhole held this connection; restore() closes such connections.
        self.held = False
        self.closed = False

    def abort(self, reset: bool = False) -> None:
        self.closed = True
        if self.client_writer is None:
            # Accepted, but no stream wraps the socket yet.
            if reset:
                _set_linger_zero(self.client_socket)
            self.client_socket.close()
        for writer in (self.client_writer, self.target_writer):
            if writer is None or writer.transport.is_closing():
                continue
            if reset:
                _set_linger_zero(writer.get_extra_info("socket"))
            writer.transport.abort()


class FaultProxy:
    """A loopback TCP proxy to ``target_host:target_port`` that can cut and restore traffic.

    The listening port is chosen by the kernel, so it is free by construction. Use it
    as a context manager, or call :meth:`close`, to stop the thread and close every
    socket.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        _check_loopback(target_host)
        self.target_host = target_host
        self.target_port = target_port
        self.mode: Literal["forward", "blackhole", "reset"] = "forward"
        # Counters for tests: connections accepted, and bytes forwarded in each direction.
        self.accepted = 0
        self.bytes_to_target = 0
        self.bytes_to_client = 0

        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._forwarding: asyncio.Event | None = None
        self._listener: socket.socket | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fault-proxy-{target_port}",
                                        daemon=True)
        self._thread.start()
        try:
            self.port: int = self._call(self._start())
        except BaseException:
            self._stop_loop()
            raise

    # -- public API, called from the test thread ------------------------------------

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, the form --etcd-endpoints takes."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, for an HTTP target such as the master."""
        return f"http://127.0.0.1:{self.port}"

    def cut(self, mode: CutMode = "blackhole") -> None:
        """Start a partition; see the module docstring for the two modes."""
        if mode not in ("blackhole", "reset"):
            raise ValueError(f"invalid cut mode {mode!r}: expected 'blackhole' or 'reset'")
        self._call(self._cut(mode))

    def restore(self, reconnect: bool = True) -> None:
        """End a partition: forward new connections again.

        With ``reconnect`` (the default), the connections held by a blackhole are
        closed, so clients reconnect. Without it they resume forwarding.
        """
        self._call(self._restore(reconnect))

    def active_connections(self) -> int:
        """Return the number of client connections open now."""
        return self._call(self._count_connections())

    def close(self) -> None:
        """Close every connection and the listening socket, and stop the thread."""
        if not self._loop.is_closed() and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._call(self._shutdown())
        self._stop_loop()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FaultProxy({self.endpoint} -> {self.target_host}:{self.target_port}, {self.mode})"

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        if not self._thread.is_alive():
            coroutine.close()
            raise RuntimeError(f"{self!r} is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CALL_TIMEOUT)

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CALL_TIMEOUT)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    # -- the proxy's loop -----------------------------------------------------------

    async def _start(self) -> int:
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept_ready)
        return self._listener.getsockname()[1]

    def _accept_ready(self) -> None:
        # Accepting synchronously in a reader callback, rather than with
        # asyncio.start_server or sock_accept, puts every accepted socket in
        # self._connections at once, so _cut and _shutdown see all of them and none
        # is lost to a cancellation.
        while True:
            try:
                client_socket, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            client_socket.setblocking(False)
            self.accepted += 1
            connection = _Connection(client_socket)
            if self.mode == "reset":
                connection.abort(reset=True)
                continue
            connection.held = self.mode == "blackhole"
            self._connections.add(connection)
            task = asyncio.get_running_loop().create_task(self._handle(connection))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _cut(self, mode: CutMode) -> None:
        self.mode = mode
        self._forwarding.clear()
        for connection in list(self._connections):
            if mode == "reset":
                connection.abort(reset=True)
            else:
                connection.held = True

    async def _restore(self, reconnect: bool) -> None:
        if reconnect:
            for connection in list(self._connections):
                if connection.held:
                    connection.abort()
        for connection in self._connections:
            connection.held = False
        self.mode = "forward"
        self._forwarding.set()

    async def _count_connections(self) -> int:
        return sum(1 for connection in self._connections if not connection.closed)

    async def _shutdown(self) -> None:
        asyncio.get_running_loop().remove_reader(self._listener.fileno())
        # Connections still in the kernel's accept queue are reset by this close.
        self._listener.close()
        for connection in list(self._connections):
            connection.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CALL_TIMEOUT)

    async def _handle(self, connection: _Connection) -> None:
        try:
            await self._serve(connection)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            connection.abort()
            self._connections.discard(connection)

    async def _serve(self, connection: _Connection) -> None:
        if connection.closed:
            return
        client_reader, connection.client_writer = await asyncio.open_connection(sock=connection.client_socket)
        if connection.held:
            # Accepted during a blackhole: hold the connection, without a connection to
            # the target, until restore() closes it or lets it go on.
            await self._forwarding.wait()
        if connection.closed:
            return

        target_reader, connection.target_writer = await asyncio.open_connection(
            self.target_host, self.target_port)
        if connection.closed:
            # Cut with "reset", or closed, while connecting.
            connection.abort()
            return
        await asyncio.gather(
            self._pump(connection, client_reader, connection.target_writer, "bytes_to_target"),
            self._pump(connection, target_reader, connection.client_writer, "bytes_to_client"),
        )

    async def _pump(self, connection: _Connection, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, counter: str) -> None:
        """Copy one direction until end of file, pausing while the proxy is cut."""
        try:
            while True:
                data = await reader.read(CHUNK_SIZE)
                if not data:
                    # Pass the half-close on; the other direction goes on.
                    if writer.can_write_eof() and not writer.transport.is_closing():
                        writer.write_eof()
                    return
                if not self._forwarding.is_set():
                    # Hold the chunk and stop reading: the peer's buffers fill up.
                    await self._forwarding.wait()
                if connection.closed:
                    return
                # Count first, so that a reader who got the bytes also sees the count.
                setattr(self, counter, getattr(self, counter) + len(data))
                writer.write(data)
                await writer.drain()
        except OSError:
            # A reset or an abort on either side ends the whole connection.
            connection.abort()
