"""A thin layer over aetcd: endpoints, transactions that return their revision, and a
local mirror of a key prefix that survives lost connections and compaction."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aetcd
import aetcd.client
import aetcd.exceptions
import aetcd.rpc
import structlog

from gdpm.common.keys import MAX_TXN_BYTES, MAX_TXN_OPS

log = structlog.get_logger("gdpm.etcd")

# Errors that mean "etcd could not be reached or did not answer in time"; callers retry.
UNAVAILABLE_ERRORS = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    aetcd.exceptions.InternalError,
)

# Seconds one etcd request may take before it fails.
REQUEST_TIMEOUT = 5.0


# gRPC keepalive pings find a connection that hangs without an error (a network
# partition, a paused etcd), which would otherwise stall a watch for good. etcd answers
# pings more frequent than its --grpc-keepalive-min-time (5 s by default) with GOAWAY.
#
# gRPC waits 1 s or more before reconnecting after a failure by default; when an etcd
# member dies, a slave must reach another one well within its fence deadline.
_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1_000,
}


class EndpointError(ValueError):
    """An --etcd-endpoints value that is not a list of host:port."""


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    """Parse ``host:port,host:port`` (an ``http://`` scheme is allowed and dropped)."""
    endpoints = []
    for item in text.split(","):
        item = item.strip().removeprefix("http://").rstrip("/")
        if not item:
            continue
        host, sep, port_text = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise EndpointError(
                f"invalid etcd endpoint {item!r}: expected host:port, such as 127.0.0.1:2379"
            )
        endpoints.append((host, int(port_text)))
    if not endpoints:
        raise EndpointError(f"invalid etcd endpoints {text!r}: expected host:port[,host:port...]")
    return endpoints


def grpc_target(endpoints: Sequence[tuple[str, int]]) -> str:
    """Build one gRPC target for all endpoints, so that gRPC fails over between them.

    gRPC accepts a list of addresses only as IPs (``ipv4:a:p,b:p``), so host names
    are resolved once here.
    """
    if len(endpoints) == 1:
        host, port = endpoints[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    addresses = []
    for host, port in endpoints:
        addresses.append((_resolve(host), port))
    if all(ipaddress.ip_address(ip).version == 4 for ip, _ in addresses):
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in addresses)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in addresses)


def _resolve(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]


class Etcd:
    """An etcd client for one cluster, given as a list of endpoints."""

    def __init__(self, endpoints: Sequence[tuple[str, int]], timeout: float = REQUEST_TIMEOUT):
        self.endpoints = list(endpoints)
        target = grpc_target(self.endpoints)
        # aetcd builds its target as f"{host}:{port}", so split ours at the last colon.
        host, _, port = target.rpartition(":")
        self.client = aetcd.Client(host=host, port=int(port), timeout=timeout, options=_CHANNEL_OPTIONS)
        self.ops = self.client.transactions

    async def close(self) -> None:
        await self.client.close()

    async def txn(self, compare: Sequence, success: Sequence, failure: Sequence = ()) -> tuple[bool, int]:
        """Run one transaction and return whether it succeeded and its revision.

        aetcd's own ``transaction`` drops the response header, and with it the
        revision that read-your-writes needs.
        """
        return await _txn(self.client, compare, success, failure)

    async def apply_in_batches(self, operations: Sequence) -> int:
        """Apply unconditional puts and deletes in as few transactions as etcd allows.

        Returns the revision of the last transaction (0 when there was nothing to do).
        The batches are not atomic together: a failure can leave earlier batches applied.
        """
        revision = 0
        batch: list = []
        size = 0
        for operation in operations:
            operation_size = len(operation.key) + len(getattr(operation, "value", b"") or b"")
            if batch and (len(batch) == MAX_TXN_OPS or size + operation_size > MAX_TXN_BYTES):
                _, revision = await self.txn([], batch)
                batch, size = [], 0
            batch.append(operation)
            size += operation_size
        if batch:
            _, revision = await self.txn([], batch)
        return revision


@aetcd.client._handle_errors
async def _txn(client: aetcd.Client, compare, success, failure) -> tuple[bool, int]:
    await client.connect()
    request = aetcd.rpc.TxnRequest(
        compare=[c.build_message() for c in compare],
        success=client._ops_to_requests(success),
        failure=client._ops_to_requests(failure),
    )
    response = await client.kvstub.Txn(request, timeout=client._timeout, metadata=client.metadata)
    return response.succeeded, response.header.revision


@dataclass(frozen=True, slots=True)
class Change:
    """One change to a mirrored key: ``value`` is None for a deletion."""

    key: bytes
    value: bytes | None
    revision: int


class PrefixMirror:
    """A local copy of every key under a prefix, kept current by a watch.

    ``on_changes`` is called with each batch of changes, in revision order. After a
    lost connection the watch resumes from the last revision seen. When that revision
    was compacted, the mirror reads the whole prefix again and reports the difference
    as changes, so the consumer never misses a change, though it may see the same
    value twice.
    """

    def __init__(
        self,
        etcd: Etcd,
        prefix: bytes,
        on_changes: Callable[[list[Change]], None],
        *,
        name: str,
    ) -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.on_changes = on_changes
        self.name = name
        self.items: dict[bytes, bytes] = {}
        self.revision = 0
        self.loaded = asyncio.Event()
        # False from a watch failure until the watch runs again.
        self.connected = False
        self._revision_changed = asyncio.Condition()

    async def run(self) -> None:
        """Load the prefix, then follow it until cancelled, retrying through outages."""
        retry_delay = 0.1
        while True:
            try:
                if not self.loaded.is_set():
                    await self._load()
                await self._follow()
                retry_delay = 0.1
            except aetcd.exceptions.RevisionCompactedError as error:
                self.connected = False
                log.warning("watch revision compacted, reloading", mirror=self.name,
                            revision=self.revision, compacted_revision=error.compacted_revision)
                self.loaded.clear()
            except UNAVAILABLE_ERRORS + (aetcd.exceptions.WatchTimeoutError,) as error:
                self.connected = False
                log.warning("watch interrupted, resuming", mirror=self.name,
                            revision=self.revision, error=str(error) or type(error).__name__)
                await asyncio.sleep(retry_delay)
                retry_delay = min(retry_delay * 2, 2.0)

    async def wait_for_revision(self, revision: int, timeout: float = REQUEST_TIMEOUT) -> None:
        """Wait until the mirror has applied every change up to ``revision``."""
        async with asyncio.timeout(timeout):
            async with self._revision_changed:
                await self._revision_changed.wait_for(lambda: self.revision >= revision)

    async def _load(self) -> None:
        result = await self.etcd.client.get_prefix(self.prefix)
        fresh = {kv.key: kv.value for kv in result}
        revision = result.header.revision

        changes = [Change(key, value, revision) for key, value in fresh.items()
                   if self.items.get(key) != value]
        changes += [Change(key, None, revision) for key in self.items if key not in fresh]
        self.items = fresh
        self.loaded.set()
        if changes:
            self.on_changes(changes)
        await self._advance(revision)

    async def _follow(self) -> None:
        watch = await self.etcd.client.watch_prefix(self.prefix, start_revision=self.revision + 1)
        self.connected = True
        try:
            async for event in watch:
                if event is None:
                    continue
                revision = event.kv.mod_revision
                if event.kind == "PUT":
                    self.items[event.kv.key] = event.kv.value
                    change = Change(event.kv.key, event.kv.value, revision)
                else:
                    self.items.pop(event.kv.key, None)
                    change = Change(event.kv.key, None, revision)
                self.on_changes([change])
                await self._advance(revision)
        finally:
            await asyncio.shield(_cancel_quietly(watch))
        # The iterator ends without an error when aetcd shut the stream down.
        raise aetcd.exceptions.ConnectionFailedError("watch stream ended")

    async def _advance(self, revision: int) -> None:
        if revision <= self.revision:
            return
        self.revision = revision
        async with self._revision_changed:
            self._revision_changed.notify_all()


async def _cancel_quietly(watch) -> None:
    try:
        await watch.cancel()
    except Exception:  # noqa: BLE001 - the stream is already gone; nothing to clean up
        pass
