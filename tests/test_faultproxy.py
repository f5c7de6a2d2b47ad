"""Tests of the fault-injecting proxy against a small echo server on 127.0.0.1."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest
from cluster import wait_until
from faultproxy import FaultProxy

# Seconds a read may wait before the test concludes that nothing is coming.
QUIET_TIMEOUT = 0.3
# Seconds a read may wait for bytes that must arrive.
READ_TIMEOUT = 5.0


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.connections += 1
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                # Close after the client's half-close, once everything was echoed.
                return
            self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.connections = 0
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(READ_TIMEOUT)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo.port) as fault_proxy:
        yield fault_proxy


def connect(proxy: FaultProxy) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=READ_TIMEOUT)
    return client


def read_exactly(client: socket.socket, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        chunk = client.recv(remaining)
        if not chunk:
            raise AssertionError(f"connection closed after {size - remaining} of {size} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def assert_silent(client: socket.socket) -> None:
    """Assert that nothing arrives and the connection stays open for QUIET_TIMEOUT seconds."""
    client.settimeout(QUIET_TIMEOUT)
    try:
        data = client.recv(65536)
    except TimeoutError:
        return
    finally:
        client.settimeout(READ_TIMEOUT)
    raise AssertionError(f"expected a hang, got {data!r} (b'' means the connection was closed)")


def assert_closed(client: socket.socket) -> None:
    """Assert that the connection ends (end of file or reset) without more data."""
    try:
        data = client.recv(65536)
    except ConnectionResetError:
        return
    assert data == b"", f"expected the connection to close, got {data!r}"


def test_proxy_endpoint_and_url(proxy: FaultProxy):
    assert proxy.endpoint == f"127.0.0.1:{proxy.port}"
    assert proxy.url == f"http://127.0.0.1:{proxy.port}"
    assert proxy.mode == "forward"


def test_proxy_forwards_both_ways(proxy: FaultProxy):
    payload = bytes(range(256)) * 4096  # 1 MiB, more than any socket buffer
    with connect(proxy) as client:
        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        echoed = read_exactly(client, len(payload))
        sender.join(READ_TIMEOUT)

    assert echoed == payload
    assert proxy.bytes_to_target == len(payload)
    assert proxy.bytes_to_client == len(payload)


def test_proxy_passes_half_close(proxy: FaultProxy):
    with connect(proxy) as client:
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)
        assert read_exactly(client, 10) == b"last words"
        # The echo server closes after the half-close reached it.
        assert client.recv(1) == b""


def test_proxy_serves_many_connections(proxy: FaultProxy, echo: EchoServer):
    clients = [connect(proxy) for _ in range(5)]
    try:
        for number, client in enumerate(clients):
            client.sendall(f"client {number}".encode())
        for number, client in enumerate(clients):
            assert read_exactly(client, len(f"client {number}")) == f"client {number}".encode()
        assert proxy.active_connections() == 5
    finally:
        for client in clients:
            client.close()
    assert echo.connections == 5
    wait_until(lambda: proxy.active_connections() == 0, READ_TIMEOUT, message="proxy connections closed")


def test_blackhole_hangs_open_connection(proxy: FaultProxy):
    with connect(proxy) as client:
        client.sendall(b"before")
        assert read_exactly(client, 6) == b"before"

        proxy.cut()
        assert proxy.mode == "blackhole"
        client.sendall(b"during")
        assert_silent(client)
        assert proxy.active_connections() == 1

        proxy.restore()
        # The held connection is closed on restore, so the client reconnects.
        assert_closed(client)

    with connect(proxy) as client:
        client.sendall(b"after")
        assert read_exactly(client, 5) == b"after"


def test_blackhole_holds_new_connections(proxy: FaultProxy, echo: EchoServer):
    proxy.cut("blackhole")
    with connect(proxy) as client:
        client.sendall(b"hello?")
        assert_silent(client)
        assert echo.connections == 0, "a held connection must not reach the target"
        proxy.restore()
        assert_closed(client)

    with connect(proxy) as client:
        client.sendall(b"hello")
        assert read_exactly(client, 5) == b"hello"
    assert echo.connections == 1


def test_restore_without_reconnect_delivers_held_bytes(proxy: FaultProxy):
    with connect(proxy) as open_before:
        open_before.sendall(b"warm")
        assert read_exactly(open_before, 4) == b"warm"
        proxy.cut()
        with connect(proxy) as opened_during:
            open_before.sendall(b"held one")
            opened_during.sendall(b"held two")
            assert_silent(open_before)
            assert_silent(opened_during)

            proxy.restore(reconnect=False)
            assert read_exactly(open_before, 8) == b"held one"
            assert read_exactly(opened_during, 8) == b"held two"


def test_reset_closes_connections_at_once(proxy: FaultProxy):
    with connect(proxy) as client:
        client.sendall(b"ping")
        assert read_exactly(client, 4) == b"ping"
        proxy.cut("reset")
        assert proxy.mode == "reset"
        with pytest.raises(ConnectionResetError):
            client.recv(1)

    # A new connection is accepted by the kernel, then reset by the proxy, which the
    # client sees either while connecting or at its first read.
    with pytest.raises(ConnectionResetError):
        with connect(proxy) as client:
            client.recv(1)

    proxy.restore()
    with connect(proxy) as client:
        client.sendall(b"back")
        assert read_exactly(client, 4) == b"back"


def test_cut_rejects_unknown_mode(proxy: FaultProxy):
    with pytest.raises(ValueError, match="invalid cut mode 'drop'"):
        proxy.cut("drop")  # type: ignore[arg-type]


def test_proxy_rejects_non_loopback_target():
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("gdpm-test.invalid", 2379)


def test_close_stops_listening(echo: EchoServer):
    proxy = FaultProxy("127.0.0.1", echo.port)
    client = connect(proxy)
    proxy.close()

    assert_closed(client)
    client.close()
    assert not proxy._thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=READ_TIMEOUT).close()
    with pytest.raises(RuntimeError, match="is closed"):
        proxy.cut()
    # A second close does nothing.
    proxy.close()
